"""hsmfs doctor says where untrusted users can write on the way to a source or the store (issue 11).

A source below a directory a user owns or may write to can be replaced by them (hsmfs then refuses
it, tests/test_security_store.py): a warning, exit status unchanged. A store there is refused by
hsmfs mount: a failed check.
"""

from __future__ import annotations

import os

from conftest import LoopFS, hsmfs
from test_security import NOBODY


def _doctor(store: str, *sources: str) -> tuple[int, dict[str, list[str]]]:
    """(exit code, check name -> its lines) of hsmfs doctor."""
    args = [a for s in sources for a in ("--source", s)]
    r = hsmfs("doctor", "--store", store, *args, check=False)
    lines: dict[str, list[str]] = {}
    last = ""
    for line in r.stdout.splitlines():
        if line.startswith(("ok ", "WARN ", "FAIL ")):
            last = line.split(maxsplit=1)[1]
            last = "source path" if last.startswith("source path") else last.split("  ")[0]
            lines.setdefault(last, []).append(line)
        elif line.strip().startswith("fix:"):
            lines[last].append(line.strip())
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, lines


def test_doctor_warns_of_sources_others_can_replace(loopfs: LoopFS) -> None:
    base = loopfs.fresh_dir("doc")
    os.chmod(base, 0o755)
    store = os.path.join(loopfs.fresh_dir("store"), "s")
    safe = os.path.join(base, "safe", "src")  # root's all the way
    os.makedirs(safe)
    home = os.path.join(base, "home")  # a user's
    os.makedirs(os.path.join(home, "src"))
    os.chown(home, NOBODY, NOBODY)
    open_dir = os.path.join(base, "open")  # anyone may rename in it
    os.makedirs(os.path.join(open_dir, "src"))
    os.chmod(open_dir, 0o777)
    sticky = os.path.join(base, "tmp")  # as /tmp: a user's own entry there is theirs to rename
    os.makedirs(sticky)
    os.chmod(sticky, 0o1777)
    os.mkdir(os.path.join(sticky, "src"))  # as if nobody had made it
    os.chown(os.path.join(sticky, "src"), NOBODY, NOBODY)
    os.makedirs(os.path.join(sticky, "roots"))  # root's own entry in it: others cannot touch it

    code, checks = _doctor(store, safe, os.path.join(home, "src"), os.path.join(open_dir, "src"),
                           os.path.join(sticky, "src"), os.path.join(sticky, "roots"))
    assert code == 0, checks  # warnings do not fail the doctor
    # (the sources of running mounts are checked too: another test run's may be among them)
    src_lines = [line for line in checks["source path"] if base in line or line.startswith("fix:")]
    text = "\n".join(src_lines)
    verdicts = [line.split()[0] for line in src_lines if not line.startswith("fix:")]
    assert verdicts == ["ok", "WARN", "WARN", "WARN", "ok"], text
    assert f"{home} (owned by uid {NOBODY})" in text
    assert f"{open_dir} (writable by everyone, mode 0777 without the sticky bit)" in text
    assert f"{sticky}/src (owned by uid {NOBODY} in the sticky directory {sticky}" in text
    assert sum(line.startswith("fix: keep sources in directories only root can change") for line in src_lines) == 3
    assert checks["store path"][0].startswith("ok"), checks["store path"]


def test_doctor_fails_a_store_others_can_change(loopfs: LoopFS) -> None:
    base = loopfs.fresh_dir("doc")
    os.chmod(base, 0o755)
    theirs = os.path.join(base, "theirs")
    os.mkdir(theirs)
    os.chown(theirs, NOBODY, NOBODY)
    code, checks = _doctor(os.path.join(theirs, "store"))
    assert code == 69, checks
    assert checks["store path"][0].startswith("FAIL"), checks["store path"]
    assert f"{theirs} (owned by uid {NOBODY})" in checks["store path"][0]
    assert checks["store path"][1].startswith("fix: put the store where only root can change it")
