"""README's quick start works as written.

The first line mounts /mnt/hsmfs-doc with its store in /var/lib/hsmfs: the very view a user who
followed the README has mounted already. So the test runs that line in a mount namespace of its own
where a private /var/lib/hsmfs, /run/hsmfs, /var/log/hsmfs and /mnt (directories of a loop ext4:
the store needs a filesystem with pre-content marks) are bind-mounted over the real ones. The
user's view, store, log and runtime files are neither required to be absent nor touched, and the
test checks that they were not.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import venv
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from conftest import LoopFS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what hsmfs keeps on the machine, each replaced by a private directory in the test's namespace
PRIVATE_DIRS = ("/var/lib/hsmfs", "/run/hsmfs", "/var/log/hsmfs", "/mnt")


def quick_start() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no quick start block"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 2, lines
    return lines


def test_second_line_is_what_ci_runs() -> None:
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert quick_start()[1].strip() in ci


@pytest.fixture
def isolated_bin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A venv first on PATH, so line 1's pip and hsmfs are the venv's, not the machine's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the quick start mounts a view")
    d = str(tmp_path_factory.mktemp("venv"))
    venv.create(d, system_site_packages=True, with_pip=True)
    yield os.path.join(d, "bin")


def _mnt_ns(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _copies_to_drop() -> list[str]:
    """Mount points at or under PRIVATE_DIRS, and the targets of running hsmfs views; deepest first."""
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == d or point.startswith(d + "/") for d in PRIVATE_DIRS):
                points.add(point)
    for rt in glob.glob("/run/hsmfs/*.json"):
        try:
            with open(rt) as f:
                info = json.load(f)
            if info.get("namespace") is None and isinstance(info.get("target"), str):
                points.add(info["target"])
        except (OSError, ValueError, AttributeError):
            continue
    return sorted(points, key=lambda p: (-p.count("/"), p))


class PrivateNamespace:
    """A process (sleep) holding a private mount namespace where PRIVATE_DIRS are private directories."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.made: list[str] = []  # mount points made on the machine (none existed), removed if still empty
        binds = []
        for d in PRIVATE_DIRS:
            missing = []
            p = d
            while not os.path.isdir(p):
                missing.append(p)
                p = os.path.dirname(p)
            for p in reversed(missing):
                os.mkdir(p, 0o700)  # as hsmfs makes them
                self.made.append(p)
            os.mkdir(self.private(d), 0o755 if d == "/mnt" else 0o700)
            binds.append(f"mount --bind {shlex.quote(self.private(d))} {d}")
        # the namespace starts as a copy of this one: first unmount there the copies of the machine's
        # mounts under PRIVATE_DIRS and of its running views, so that neither shows through nor, as a
        # namespace copy, keeps the user's hsmfs umount from ending a view while the test runs
        copies = "".join(f"umount -l {shlex.quote(p)} 2>/dev/null; " for p in _copies_to_drop())
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             copies + " && ".join(binds) + " && echo ready && exec sleep 3600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != "ready\n":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            self.holder.wait()
            self.close()
            pytest.fail("could not make the test's private mount namespace (unshare --mount, then mount --bind "
                        f"over {', '.join(PRIVATE_DIRS)}): {err.strip()}; this needs root with CAP_SYS_ADMIN "
                        "in the initial mount namespace", pytrace=False)
        self.ns = _mnt_ns(self.holder.pid)

    def private(self, path: str) -> str:
        """The private directory that stands for path (one of PRIVATE_DIRS) in the namespace."""
        return os.path.join(self.base, path.strip("/").replace("/", "-"))

    def run(self, argv: list[str], cwd: str = "/", **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv in the namespace."""
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", f"--wd={cwd}", "--", *argv],
                              **kw)

    def others(self) -> list[int]:
        """Processes in the namespace besides the holder: what the quick start started there."""
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != self.holder.pid and _mnt_ns(int(d)) == self.ns:
                out.append(int(d))
        return out

    def close(self) -> None:
        """End every process in the namespace, so that it and all its mounts go; remove what was made."""
        if self.holder.returncode is None and self.ns is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.others():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 20
                while self.others() and time.monotonic() < deadline:
                    time.sleep(0.1)
            self.holder.kill()
            self.holder.wait()
        for f in (self.holder.stdout, self.holder.stderr):
            if f is not None:
                f.close()
        shutil.rmtree(self.base, ignore_errors=True)
        for d in reversed(self.made):
            try:
                os.rmdir(d)  # only if still empty: hsmfs may have been used meanwhile
            except OSError:
                pass


@pytest.fixture
def private_ns(loopfs_all: dict[str, LoopFS], loopfs_base: str) -> Iterator[PrivateNamespace]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the quick start mounts a view")
    for cmd in ("unshare", "nsenter", "mountpoint"):
        if shutil.which(cmd) is None:
            pytest.fail(f"{cmd} is missing: install util-linux (tests/run does)", pytrace=False)
    if "ext4" not in loopfs_all:
        loopfs_all["ext4"] = LoopFS("ext4", loopfs_base)
    ns = PrivateNamespace(loopfs_all["ext4"].fresh_dir("readme"))
    try:
        yield ns
    finally:
        ns.close()


def host_state(target: str, name: str) -> dict[str, Any]:
    """What the machine has at the quick start's paths: the user's view, store, log and runtime files."""
    store = os.path.join("/var/lib/hsmfs", name)
    out: dict[str, Any] = {}
    with open("/proc/self/mountinfo") as f:
        out["mounts"] = sorted(" ".join(line.split()[:5]) for line in f if line.split()[4] == target)
    for p in (target, store, os.path.join(store, "tree"), f"/var/log/hsmfs/{name}.log", f"/run/hsmfs/{name}.sock"):
        try:
            st = os.lstat(p)
            out[p] = (st.st_dev, st.st_ino, st.st_mode)
        except FileNotFoundError:
            out[p] = None
    for p in (os.path.join(store, "hsmfs.json"), f"/run/hsmfs/{name}.json"):
        try:
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            out[p] = None
    return out


@pytest.mark.root
def test_first_line_mounts_a_lazy_view(isolated_bin: str, private_ns: PrivateNamespace) -> None:
    line = quick_start()[0]
    m = re.search(r"hsmfs mount (\S+) (\S+)$", line)
    assert m, line
    source, target = m.groups()
    assert os.path.dirname(target) == "/mnt", f"{target}: the test gives the quick start a private /mnt only"
    name = target.strip("/").replace("/", "-")
    before = host_state(target, name)
    env = dict(os.environ, PATH=isolated_bin + os.pathsep + os.environ["PATH"])
    hsmfs = os.path.join(isolated_bin, "hsmfs")
    r = private_ns.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert private_ns.run(["mountpoint", "-q", target]).returncode == 0, f"{target} is not mounted"
    # the store is the default one, in the private /var/lib/hsmfs
    assert os.path.isfile(os.path.join(private_ns.private("/var/lib/hsmfs"), name, "hsmfs.json"))
    files = [os.path.join(dp, n) for dp, _, ns in os.walk(source) for n in ns]
    files = [f for f in files if os.path.isfile(f) and not os.path.islink(f)][:50]
    assert files
    for f in files:
        got = private_ns.run(["cat", os.path.join(target, os.path.relpath(f, source))],
                             capture_output=True, timeout=60, check=True).stdout
        with open(f, "rb") as src:
            assert got == src.read(), f
    st = private_ns.run([hsmfs, "status", "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert target in st
    r = private_ns.run([hsmfs, "umount", target], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 20
    while private_ns.others() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert private_ns.others() == [], "hsmfs umount left processes running"
    after = host_state(target, name)
    assert after == before, (f"the quick start in its own namespace changed the machine's {target}, "
                             f"/var/lib/hsmfs/{name}, its log or runtime files")
