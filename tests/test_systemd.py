"""systemd integration: unit files verify clean, install-units, mount.hsmfs, sd_notify, and a real boot.

The boot test runs systemd 252 from the host's /usr in systemd-nspawn (docs/systemd.md, "Tests"):
a .mount unit with Type=hsmfs is started, the filler is killed with SIGKILL under readers, systemd
restarts it with the group from its fd store, and stopping the mount stops the filler.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LoopFS, hsmfs

import hsmfs as hsmfs_pkg
from hsmfs import sdnotify
from hsmfs.mounthelper import HelperError, parse_args
from hsmfs.places import journal_path, log_path
from hsmfs.process import JournalFormatter
from hsmfs.systemd import escape_path, service_name, unescape_path
from hsmfs.views import is_mountpoint

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "hsmfs" / "data" / "units"  # the one copy, shipped as package data
CONTRIB = ROOT / "contrib" / "systemd"
FSTAB_GENERATOR = "/lib/systemd/system-generators/systemd-fstab-generator"


def need(cmd: str) -> str:
    path = shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{cmd} is missing (Debian: apt-get install systemd systemd-container)")
    return path


def verify(*units: Path) -> None:
    """systemd-analyze verify must say nothing at all: it warns (rc 0) about unknown keys, bad values
    and ordering cycles, and only some of those change its exit status."""
    r = subprocess.run([need("systemd-analyze"), "verify", "--man=no", *map(str, units)], capture_output=True,
                       text=True, cwd=units[0].parent)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), \
        f"systemd-analyze verify {' '.join(u.name for u in units)} (rc {r.returncode}):\n{r.stdout}{r.stderr}"


def template_instance(unit_dir: Path, template: Path, instance: str) -> Path:
    """hsmfs@INSTANCE.service -> hsmfs@.service, how templates verify (docs/systemd-notes A3)."""
    if template.parent != unit_dir:
        shutil.copy(template, unit_dir / template.name)
    link = unit_dir / f"hsmfs@{instance}.service"
    link.symlink_to(template.name)
    return link


# --- unit files ------------------------------------------------------------------------------------


def test_restart_prevent_exit_status_is_what_the_errors_say() -> None:
    """RestartPreventExitStatus= lists exactly the codes of the errors a restart cannot fix."""
    from hsmfs.errors import restart_prevent_exit_status

    lines = [line for line in (UNITS / "hsmfs@.service").read_text().splitlines()
             if line.startswith("RestartPreventExitStatus=")]
    assert len(lines) == 1, lines
    listed = [int(w) for w in lines[0].split("=", 1)[1].split()]
    assert listed == restart_prevent_exit_status(), "set RestartPreventExitStatus= to " \
        + " ".join(map(str, restart_prevent_exit_status()))


def test_units_have_no_trailing_comments_or_newer_keys() -> None:
    """'Key=v  # x' makes '# x' part of the value; 254+ keys make 252 warn (and so fail verify)."""
    for p in UNITS.iterdir():
        for line in p.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith(("#", ";")):
                assert "#" not in line.split("=", 1)[1], f"{p.name}: trailing comment in {line!r}"
            assert not line.startswith(("RestartMode=", "FileDescriptorStorePreserve=")), line


def test_template_and_example_mount_verify(tmp_path: Path) -> None:
    template_instance(tmp_path, UNITS / "hsmfs@.service", "srv-data")
    shutil.copy(CONTRIB / "srv-data.mount", tmp_path)
    verify(tmp_path / "hsmfs@srv-data.service", tmp_path / "srv-data.mount")


@pytest.mark.parametrize("options", ["_netdev,store=/var/lib/hsmfs/srv-data", "store=/var/lib/hsmfs/srv-data"])
def test_no_ordering_cycle_with_a_mount_that_wants_the_filler(tmp_path: Path, options: str) -> None:
    """The ordering trap: a local (no _netdev) view is before local-fs.target, which is before
    sysinit.target; a mount that pulls in a default-dependency filler would be a cycle."""
    template_instance(tmp_path, UNITS / "hsmfs@.service", "srv-data")
    (tmp_path / "srv-data.mount").write_text(textwrap.dedent(f"""\
        [Unit]
        Wants=hsmfs@srv-data.service
        After=hsmfs@srv-data.service

        [Mount]
        What=/srv/source
        Where=/srv/data
        Type=hsmfs
        Options={options}
        """))
    verify(tmp_path / "srv-data.mount", tmp_path / "hsmfs@srv-data.service")


def test_fstab_example_generates_units_that_verify(tmp_path: Path) -> None:
    if not os.access(FSTAB_GENERATOR, os.X_OK):
        pytest.skip(f"{FSTAB_GENERATOR} is missing")
    gen = tmp_path / "gen"
    gen.mkdir()
    env = dict(os.environ, SYSTEMD_FSTAB=str(CONTRIB / "fstab"), SYSTEMD_PROC_CMDLINE="", SYSTEMD_IN_INITRD="0")
    r = subprocess.run([FSTAB_GENERATOR, str(gen), str(gen), str(gen)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr, r.stderr
    mount = gen / "srv-data.mount"
    text = mount.read_text()
    assert "Type=hsmfs" in text and "What=/srv/source" in text and "TimeoutSec=15min" in text
    assert (gen / "remote-fs.target.wants" / "srv-data.mount").exists(), "_netdev: a remote mount"
    template_instance(gen, UNITS / "hsmfs@.service", "srv-data")
    verify(mount, gen / "hsmfs@srv-data.service")


def test_install_units_into_a_root(tmp_path: Path) -> None:
    r = hsmfs("install-units", "--root", str(tmp_path))
    installed = tmp_path / "etc" / "systemd" / "system" / "hsmfs@.service"
    assert f"installed {installed}" in r.stderr
    text = installed.read_text()
    assert f"ExecStart={sys.executable} -m hsmfs.filler --systemd %f" in text
    helper = tmp_path / "sbin" / "mount.hsmfs"
    target = os.readlink(helper)
    assert os.path.isabs(target) and os.access(target, os.X_OK)
    with open(target, "rb") as f:
        assert f.readline().startswith(b"#!/"), "the helper runs with an empty environment: no shims"
    assert "daemon-reload" not in r.stderr
    template_instance(installed.parent, installed, "srv-data")
    verify(installed.parent / "hsmfs@srv-data.service")
    # again: replaces, does not fail
    hsmfs("install-units", "--root", str(tmp_path))
    assert os.readlink(helper) == target


# --- names, notify, journal --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/srv/data", "/srv/my data/x-1", "/", "/.dot/a", "/a//b/", "/ü/ß", "/a\\b",
                                  "/a:b_c.d"])
def test_escape_path_matches_systemd_escape(path: str) -> None:
    out = subprocess.run([need("systemd-escape"), "--path", path], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert escape_path(path) == out
    back = subprocess.run([need("systemd-escape"), "--unescape", "--path", out], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert unescape_path(out) == back
    assert service_name(path) == f"hsmfs@{out}.service"


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_and_listen_fds(tmp_path: Path, abstract: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real datagram socket as the manager: the message and SCM_RIGHTS fds arrive."""
    name = f"hsmfs-test-{os.getpid()}-{random.random()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as mgr:
        mgr.bind("\0" + name if abstract else name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name if abstract else name)
        r, w = os.pipe()
        try:
            assert sdnotify.notify("FDSTORE=1\nFDNAME=group", [r])
            msg, fds, _flags, _addr = socket.recv_fds(mgr, 4096, 4) if hasattr(socket, "recv_fds") \
                else _recv_fds(mgr)
            assert msg == b"FDSTORE=1\nFDNAME=group" and len(fds) == 1
            os.write(w, b"x")
            assert os.read(fds[0], 1) == b"x"  # the same pipe
            os.close(fds[0])
            assert sdnotify.notify("READY=1")
            assert mgr.recv(4096) == b"READY=1"
        finally:
            os.close(r)
            os.close(w)
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")


def _recv_fds(sock: socket.socket) -> tuple[bytes, list[int], int, object]:  # Python 3.9
    import array

    fds = array.array("i")
    msg, anc, flags, addr = sock.recvmsg(4096, socket.CMSG_LEN(4 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds), flags, addr


def test_listen_fds_names_and_pid() -> None:
    code = textwrap.dedent("""
        import os, sys
        from hsmfs import sdnotify
        os.dup2(int(sys.argv[2]), 3)
        os.dup2(int(sys.argv[3]), 4)
        os.environ.update(LISTEN_FDS="2", LISTEN_FDNAMES="group:state",
                          LISTEN_PID=str(os.getpid()) if sys.argv[1] == "ours" else "1")
        got = sdnotify.listen_fds()
        print(sorted(got.items()), "LISTEN_FDS" in os.environ, os.get_inheritable(3))
        """)
    r, w = os.pipe()
    try:
        def run(who: str) -> str:
            return subprocess.run([sys.executable, "-c", code, who, str(r), str(w)], capture_output=True, text=True,
                                  check=True, pass_fds=(r, w)).stdout.strip()

        assert run("ours") == "[('group', [3]), ('state', [4])] False False"
        assert run("other") == "[] False True"
    finally:
        os.close(r)
        os.close(w)


def test_journal_prefixes_only_when_stderr_is_the_journal_stream() -> None:
    code = textwrap.dedent("""
        import logging, os, sys
        st = os.fstat(2)
        if sys.argv[1] == "journal":
            os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        else:
            os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        from hsmfs.process import setup_logging
        setup_logging("debug")
        log = logging.getLogger("hsmfs.x")
        log.debug("d"); log.info("i"); log.warning("w"); log.error("two\\nlines"); log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        """)
    out = subprocess.run([sys.executable, "-c", code, "journal"], capture_output=True, text=True, check=True).stderr
    lines = out.splitlines()
    # a message is one entry: a newline in it (a file name's, say) is escaped, never a forged entry
    # of that priority (issue 11, item 10); a traceback keeps one entry per line, each prefixed
    assert lines[:6] == ["<7>hsmfs.x: d", "<6>hsmfs.x: i", "<4>hsmfs.x: w", "<3>hsmfs.x: two\\nlines",
                         "<2>hsmfs.x: c", "<3>hsmfs.x: failed"]
    assert lines[6] == "<3>Traceback (most recent call last):" and lines[-1] == "<3>ValueError: boom", lines
    out = subprocess.run([sys.executable, "-c", code, "terminal"], capture_output=True, text=True, check=True).stderr
    assert not any(line[:1] == "<" and line[1:3].rstrip(">").isdigit() for line in out.splitlines()), out
    assert " WARNING w" in out and " ERROR two\\nlines" in out


def test_journal_formatter_prefixes_traceback_lines() -> None:
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = JournalFormatter("%(message)s").format(rec).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)


# --- mount.hsmfs -----------------------------------------------------------------------------------


def test_helper_argv_as_mount_passes_it() -> None:
    """The argv mount(8) and systemd were seen to pass (docs/systemd-notes.md A1)."""
    inv = parse_args(["SRC", "DST", "-o", "rw,config=/etc/hsmfs/a.toml,_netdev,nofail"])
    assert (inv.source, inv.target, inv.config, inv.store) == ("SRC", "DST", "/etc/hsmfs/a.toml", None)
    assert inv.ignored == ["rw", "_netdev", "nofail"] and not inv.unknown
    inv = parse_args(["SRC", "DST", "-s", "-v", "-o", "rw", "-t", "hsmfs.sub"])
    assert inv.sloppy and inv.verbose and not inv.fake
    inv = parse_args(["SRC", "DST", "-sfnv", "-N", "/proc/1/ns/mnt", "-o", "store=/s,name=n", "-o", "defaults"])
    assert (inv.store, inv.name, inv.namespace, inv.fake) == ("/s", "n", "/proc/1/ns/mnt", True)
    inv = parse_args(["-o", "x-systemd.requires=a.service,comment=x,auto,noauto,user,users,nouser", "S", "D"])
    assert len(inv.ignored) == 7 and (inv.source, inv.target) == ("S", "D")
    inv = parse_args(["S", "D", "-s", "-o", "nosuid,bogus=1"])
    assert inv.unknown == ["nosuid", "bogus=1"]


@pytest.mark.parametrize("argv, message", [
    (["S", "D", "-o", "ro"], "read-write"),
    (["S", "D", "-o", "nosuid"], "unknown option nosuid"),
    (["S", "D", "-o", "confg=/x"], "unknown option confg=/x"),
    (["S", "D", "-o", "config="], "needs a value"),
    (["S", "D", "-o"], "needs a value"),
    (["S"], "usage"),
    (["S", "D", "E"], "usage"),
    (["S", "D", "-t", "ext4"], "type hsmfs only"),
    (["S", "D", "-x"], "unknown flag"),
])
def test_helper_refuses_bad_invocations(argv: list[str], message: str) -> None:
    with pytest.raises(HelperError, match=message) as e:
        parse_args(argv)
    assert e.value.code == 1


@pytest.fixture
def helper(tmp_path: Path) -> str:
    """A mount.hsmfs symlink to the hsmfs script, as install-units makes it."""
    from hsmfs.systemd import hsmfs_script

    link = tmp_path / "mount.hsmfs"
    link.symlink_to(hsmfs_script())
    return str(link)


def test_helper_exit_codes_through_argv0(helper: str, tmp_path: Path) -> None:
    empty_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # as systemd runs helpers
    r = subprocess.run([helper, "S", "D", "-o", "ro"], capture_output=True, text=True, env=empty_env)
    assert r.returncode == 1 and "mount.hsmfs: option ro" in r.stderr
    r = subprocess.run([helper, "S", "D", "-f", "-o", "rw,_netdev,nofail"], capture_output=True, text=True,
                       env=empty_env)
    if os.geteuid() != 0:
        assert r.returncode == 1 and "must be root" in r.stderr
    else:
        assert (r.returncode, r.stderr) == (0, "")
        r = subprocess.run([helper, str(tmp_path / "nope"), str(tmp_path), "-o", "_netdev"], capture_output=True,
                           text=True, env=empty_env)
        assert r.returncode == 32 and "does not exist" in r.stderr


def _ext4(loopfs_all: dict[str, LoopFS], loopfs_base: str) -> LoopFS:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop mounts, fanotify and mounts")
    if "ext4" not in loopfs_all:
        loopfs_all["ext4"] = LoopFS("ext4", loopfs_base)
    return loopfs_all["ext4"]


def test_helper_without_systemd_mounts_like_hsmfs_mount(helper: str, loopfs_all: dict[str, LoopFS],
                                                         loopfs_base: str) -> None:
    if sdnotify.booted():
        pytest.skip("systemd is the init system here: the helper would start hsmfs@.service")
    fs = _ext4(loopfs_all, loopfs_base)
    base = fs.fresh_dir("helper")
    src = os.path.join(base, "src")
    os.mkdir(src)
    with open(os.path.join(src, "a"), "wb") as f:
        f.write(os.urandom(100_000))
    target = tempfile.mkdtemp(prefix="view-", dir=fs.base)
    name = f"mh{os.getpid()}"
    r = subprocess.run([helper, src, target, "-o", f"rw,_netdev,nofail,store={base}/store,name={name}"],
                       capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=120)
    try:
        assert r.returncode == 0, r.stderr
        assert is_mountpoint(target)
        with open(os.path.join(target, "a"), "rb") as f, open(os.path.join(src, "a"), "rb") as g:
            assert f.read() == g.read()
    finally:
        hsmfs("umount", target, check=False)
        if is_mountpoint(target):
            subprocess.run(["umount", "-l", target], check=False)
        os.rmdir(target)
        for leftover in (log_path(name), journal_path(name)):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


# --- a real boot ------------------------------------------------------------------------------------

INSIDE = r'''
import hashlib, json, os, signal, subprocess, sys, time
from hsmfs.views import is_mountpoint

SRC, VIEW, SVC, MOUNT = "/srv/hsmfs/src", "/srv/data", "hsmfs@srv-data.service", "srv-data.mount"
res = {"steps": []}

def step(s):
    res["steps"].append(s)
    with open("/results/result.json", "w") as f:
        json.dump(res, f, indent=1)

def show(prop, unit=SVC):
    return subprocess.run(["systemctl", "show", "-p", prop, "--value", unit], capture_output=True,
                          text=True).stdout.strip()

def wait(cond, what, timeout=30):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out: " + what)
        time.sleep(0.05)

def status():
    r = subprocess.run([sys.executable, "-m", "hsmfs", "status", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]

frozen = False

def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

try:
    names = sorted(os.listdir(SRC))
    want = {n: sha(os.path.join(SRC, n)) for n in names}
    r = subprocess.run(["systemctl", "start", MOUNT], capture_output=True, text=True)
    assert r.returncode == 0, "systemctl start %s: %s" % (MOUNT, r.stderr)
    assert is_mountpoint(VIEW), "not mounted after start"
    assert show("ActiveState") == "active" and show("ActiveState", MOUNT) == "active"
    step("mounted")
    first = names[:10]
    for n in first:
        assert sha(os.path.join(VIEW, n)) == want[n], n + " differs through the view"
    step("first reads match")
    # kill 1: a fill in flight (the store is frozen, so its write blocks) is finished by the successor
    pid = int(show("MainPID"))
    subprocess.run(["fsfreeze", "-f", "/srv/hsmfs"], check=True)
    frozen = True
    cat = subprocess.Popen(["cat", os.path.join(VIEW, names[10])], stdout=subprocess.PIPE)
    wait(lambda: status()["filler"]["inflight"] == 1, "the fill to start")
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    subprocess.run(["fsfreeze", "-u", "/srv/hsmfs"], check=True)
    frozen = False
    out, _ = cat.communicate(timeout=60)
    assert cat.returncode == 0 and hashlib.sha256(out).hexdigest() == want[names[10]], "the in-flight read"
    wait(lambda: show("NRestarts") == "1" and show("ActiveState") == "active"
         and show("MainPID") not in ("0", str(pid)), "the filler to be restarted")
    res["status_after_kill_1"] = status()
    step("killed a filler with a fill in flight; its successor finished it")
    # kill 2: readers of stubs across the kill
    pid = int(show("MainPID"))
    readers = [subprocess.Popen([sys.executable, "/opt/hsmfs-test/reader.py", VIEW, ",".join(names[11:]), "4"],
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    step("killed filler %d under readers" % pid)
    wait(lambda: show("NRestarts") == "2" and show("ActiveState") == "active"
         and show("MainPID") not in ("0", str(pid)), "the filler to be restarted")
    step("restarted")
    reads = errors = 0
    for r in readers:
        out, _ = r.communicate(timeout=60)
        lines = out.splitlines()
        assert lines and lines[-1].startswith("DONE"), lines[-3:]
        for line in lines[:-1]:
            n, digest = line.split()
            assert digest == want[n], n + " read wrong bytes across the kill"
        reads += int(lines[-1].split()[1])
        errors += int(lines[-1].split()[2])
    res["reads_across_kill"], res["errors_across_kill"] = reads, errors
    step("readers across the kill saw the right bytes")
    for n in names:
        assert sha(os.path.join(VIEW, n)) == want[n], n + " differs after the restart"
    step("all files match after the restart")
    res["status"] = status()
    r = subprocess.run(["systemctl", "stop", MOUNT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not is_mountpoint(VIEW)
    wait(lambda: show("ActiveState") in ("inactive", "failed"), "the filler to stop with its view")
    res["after_stop"] = {"filler": show("ActiveState"), "result": show("Result"), "mount": show("ActiveState", MOUNT)}
    step("stopped")
    # mount again (the tree is there), then stop the filler itself: it unmounts its view first
    r = subprocess.run(["systemctl", "start", MOUNT], capture_output=True, text=True)
    assert r.returncode == 0 and is_mountpoint(VIEW), r.stderr
    assert sha(os.path.join(VIEW, names[-1])) == want[names[-1]]
    r = subprocess.run(["systemctl", "stop", SVC], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wait(lambda: show("ActiveState", MOUNT) == "inactive", "the mount unit to see the view gone")
    assert not is_mountpoint(VIEW)
    res["after_filler_stop"] = {"filler": show("ActiveState"), "result": show("Result")}
    step("stopping the filler unmounted its view")
    j = subprocess.run(["journalctl", "-b", "-u", SVC, "-u", MOUNT, "-o", "json", "--no-pager"],
                       capture_output=True, text=True)
    res["journal"] = [{"unit": e.get("_SYSTEMD_UNIT", ""), "prio": e.get("PRIORITY"), "msg": e.get("MESSAGE")}
                      for e in map(json.loads, j.stdout.splitlines()) if isinstance(e.get("MESSAGE"), str)]
    res["ok"] = True
    step("done")
except BaseException as e:
    import traceback
    res["ok"] = False
    res["error"] = traceback.format_exc()
    step("failed")
finally:
    if frozen:
        subprocess.run(["fsfreeze", "-u", "/srv/hsmfs"])
    with open("/results/journal.txt", "w") as f:
        subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"], stdout=f)
    if is_mountpoint(VIEW):
        subprocess.run(["umount", "-l", VIEW])
sys.exit(0 if res.get("ok") else 1)
'''

READER = r'''
import hashlib, os, random, sys, time
view, names, seconds = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
rnd = random.Random(os.getpid())
ok = err = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    name = rnd.choice(names)
    # os.read, not file.read(): for EAGAIN (the answer to an event a dead filler left unjournaled)
    # io's read() returns None instead of raising
    try:
        fd = os.open(os.path.join(view, name), os.O_RDONLY)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError:
        err += 1
        continue
    data = b"".join(chunks)
    print(name, hashlib.sha256(data).hexdigest(), flush=True)
    ok += 1
print("DONE", ok, err, flush=True)
'''

TEST_UNIT = """\
[Unit]
Description=hsmfs systemd test
SuccessAction=exit-force
FailureAction=exit-force

[Service]
Type=oneshot
ExecStart={python} /opt/hsmfs-test/inside.py
TimeoutStartSec=100
"""


def _binds() -> list[str]:
    """The interpreter, its venv and the project, read-only at the same paths inside."""
    project = str(Path(hsmfs_pkg.__file__).resolve().parent.parent)
    paths = {sys.prefix, sys.base_prefix, project, os.path.dirname(os.path.realpath(sys.executable))}
    keep = sorted(p for p in paths if not (p == "/usr" or p.startswith("/usr/")))
    keep = [p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)]
    return [f"--bind-ro={p}" for p in keep]


class Boot:
    """One systemd-nspawn boot of the host's /usr with hsmfs's units installed (docs/systemd.md, "Tests").

    A directory DATA on the session's ext4 image is bound at /srv/hsmfs (source and store), the
    test's scripts at /opt/hsmfs-test, an output directory at /results.
    """

    def __init__(self, base: Path, fs: LoopFS, data: Path) -> None:
        self.base = base
        self.fs = fs
        self.data = data
        self.stage = base / "root"
        hsmfs("install-units", "--root", str(self.stage))  # the units as install-units installs them
        self.system = self.stage / "etc" / "systemd" / "system"
        self.scripts = base / "test"
        self.scripts.mkdir()
        self.out = base / "out"
        self.out.mkdir()
        (self.scripts / "reader.py").write_text(READER)
        self.journal = ""

    def mount_unit(self, *, options: str, extra_unit: str = "") -> None:
        """srv-data.mount: contrib's example with the source and store under /srv/hsmfs."""
        text = (CONTRIB / "srv-data.mount").read_text().replace("What=/srv/source", "What=/srv/hsmfs/src")
        text = text.replace("Options=_netdev,store=/var/lib/hsmfs/srv-data", f"Options={options}")
        text = text.replace("[Unit]\n", "[Unit]\n" + extra_unit)
        (self.system / "srv-data.mount").write_text(text)

    def run(self, inside: str) -> dict[str, Any]:
        (self.scripts / "inside.py").write_text(inside)
        (self.system / "hsmfs-test.service").write_text(TEST_UNIT.format(python=sys.executable))
        cmd = [need("systemd-nspawn"), "-D", "/", "--volatile=yes", "-b", "--register=no", "--keep-unit", "-q",
               f"--machine=hsmfs-t{os.getpid()}",
               # nspawn's seccomp filter refuses these by default (EPERM): the filler needs them
               "--system-call-filter=fanotify_init fanotify_mark open_by_handle_at",
               f"--overlay-ro=/usr/sbin:{self.stage / 'sbin'}:/usr/sbin",  # /sbin/mount.hsmfs (/sbin -> usr/sbin)
               f"--bind-ro={self.system}:/etc/systemd/system", f"--bind-ro={self.scripts}:/opt/hsmfs-test",
               f"--bind={self.out}:/results", f"--bind={self.data}:/srv/hsmfs", *_binds(),
               "--", "systemd.unit=hsmfs-test.service", "systemd.firstboot=no"]
        with open(self.base / "console.log", "wb") as console:
            try:
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                   timeout=150)
            finally:
                subprocess.run(["fsfreeze", "-u", self.fs.mnt], capture_output=True)  # if the test died frozen
        console_log = (self.base / "console.log").read_text(errors="replace")
        if (self.out / "journal.txt").exists():
            self.journal = (self.out / "journal.txt").read_text(errors="replace")
        assert (self.out / "result.json").exists(), \
            f"the test unit never ran (nspawn exit {r.returncode}):\n{console_log}"
        res: dict[str, Any] = json.loads((self.out / "result.json").read_text())
        assert res.get("ok"), f"{res.get('error')}\nsteps: {res['steps']}\n--- journal ---\n{self.journal[-20000:]}"
        return res


@pytest.fixture
def boot(loopfs_all: dict[str, LoopFS], loopfs_base: str) -> Iterator[Boot]:
    need("systemd-nspawn")
    fs = _ext4(loopfs_all, loopfs_base)
    data = Path(fs.fresh_dir("nspawn"))
    base = Path(tempfile.mkdtemp(prefix="hsmfs-nspawn-", dir="/var/tmp"))
    try:
        yield Boot(base, fs, data)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)  # the loop image is shared by the session


def make_source(root: Path, n: int) -> None:
    src = root / "src"
    src.mkdir()
    rnd = random.Random(5)
    for i in range(n):
        (src / f"f{i:03d}").write_bytes(rnd.randbytes(rnd.randrange(1, 400_000)))


@pytest.mark.slow
def test_boot_mount_unit_kill_filler_stop(boot: Boot) -> None:
    make_source(boot.data, 300)
    # fill-ahead off: the first reads would fill the whole directory ahead, and then the read the test
    # freezes (kill 1) and the readers across kill 2 would find nothing left to fill
    (boot.data / "policy.toml").write_text("fill_ahead = false\n")
    boot.mount_unit(options="_netdev,store=/srv/hsmfs/store,config=/srv/hsmfs/policy.toml")
    # a short watchdog: a filler that failed to ping would be killed and restarted (NRestarts is checked)
    (boot.system / "hsmfs@.service.d").mkdir()
    (boot.system / "hsmfs@.service.d" / "watchdog.conf").write_text("[Service]\nWatchdogSec=2\n")
    res = boot.run(INSIDE)
    why = f"{json.dumps(res, indent=1)[:6000]}\n--- journal ---\n{boot.journal[-20000:]}"
    assert res["reads_across_kill"] > 50, why
    # EAGAIN for an event the dead filler had read and not journaled: at most one per blocked reader
    assert res["errors_across_kill"] <= 4, why
    first = res["status_after_kill_1"]
    assert first["restarts"] == 1 and first["filler"]["replayed"] >= 1, why
    last = res["status"]
    assert last["restarts"] == 2 and last["target"] == "/srv/data" and last["filler"]["fills"] > 0, why
    assert res["after_stop"] == {"filler": "inactive", "result": "success", "mount": "inactive"}, why
    assert res["after_filler_stop"] == {"filler": "inactive", "result": "success"}, why
    msgs = [(e["prio"], e["msg"]) for e in res["journal"]]
    assert ("6", "hsmfs.systemd: took the group back from the fd store; the view at /srv/data stayed live") in msgs
    took_over = r"hsmfs\.filler: took over from a dead filler in \d+ ms: 1 events filled and allowed"
    assert [m for p, m in msgs if p == "4" and re.match(took_over, m)], why
    assert not [m for _p, m in msgs if m[:1] == "<" and m[1:2].isdigit()], "unparsed <N> prefixes"
    ours = [(e["prio"], e["msg"]) for e in res["journal"] if e["unit"] in ("hsmfs@srv-data.service", "srv-data.mount")]
    assert ours and not [m for p, m in ours if p in ("0", "1", "2", "3")], f"errors in the journal: {ours}"


AT_BOOT = r'''
import json, subprocess
from hsmfs.views import is_mountpoint

def show(prop, unit):
    return subprocess.run(["systemctl", "show", "-p", prop, "--value", unit], capture_output=True,
                          text=True).stdout.strip()

res = {"steps": [], "ok": False}
try:
    res["mounted"] = is_mountpoint("/srv/data")
    with open("/srv/data/f003", "rb") as a, open("/srv/hsmfs/src/f003", "rb") as b:
        res["same"] = a.read() == b.read()
    res["active"] = [show("ActiveState", u) for u in ("srv-data.mount", "hsmfs@srv-data.service")]
    res["mounted_before_local_fs"] = (int(show("ActiveEnterTimestampMonotonic", "srv-data.mount"))
                                      <= int(show("ActiveEnterTimestampMonotonic", "local-fs.target")))
    res["ok"] = True
except BaseException:
    import traceback
    res["error"] = traceback.format_exc()
finally:
    with open("/results/journal.txt", "w") as f:
        subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"], stdout=f)
    with open("/results/result.json", "w") as f:
        json.dump(res, f)
'''


@pytest.mark.slow
def test_boot_local_view_mounts_before_local_fs_target(boot: Boot) -> None:
    """No ordering trap: a view without _netdev is mounted at boot, before local-fs.target, by a
    helper that starts the filler from inside the mount job (a filler with default dependencies
    would wait for sysinit.target, which waits for the mount)."""
    make_source(boot.data, 10)
    boot.mount_unit(options="store=/srv/hsmfs/store")
    wants = boot.system / "local-fs.target.wants"
    wants.mkdir()
    (wants / "srv-data.mount").symlink_to("../srv-data.mount")
    res = boot.run(AT_BOOT)
    assert res["mounted"] and res["same"] and res["active"] == ["active", "active"], res
    assert res["mounted_before_local_fs"], boot.journal[-20000:]
    assert "mount.hsmfs: /srv/hsmfs/src is live at /srv/data" in boot.journal
