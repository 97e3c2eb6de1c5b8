"""Views themselves: their mount flags, where they are attached, and who can keep them (issue 11).

- Views are nosuid,nodev unless the policy allows more (item 2).
- A TARGET in a directory a user can write is not redirected through a symlink the user puts there
  (suspected item: onto /etc/cron.d, say).
- A copy of a view in a mount namespace of another (unprivileged) user namespace does not block
  ``hsmfs umount`` (item 9).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import time
from typing import Callable

from conftest import LoopFS, View, hsmfs
from helpers import unlink_quietly
from test_security import NOBODY, as_nobody

from hsmfs.places import log_path, record_path
from hsmfs.views import is_mountpoint


def _setuid_source(loopfs: LoopFS) -> str:
    """A source with a setuid-root copy of id, a 0666 /dev/zero node and a plain executable."""
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    shutil.copy(shutil.which("id") or "", os.path.join(src, "suid-id"))
    os.chmod(os.path.join(src, "suid-id"), 0o4755)
    shutil.copy(shutil.which("true") or "", os.path.join(src, "true"))
    os.mknod(os.path.join(src, "zero"), stat.S_IFCHR | 0o666, os.makedev(1, 5))
    return src


def test_views_are_nosuid_nodev_by_default(loopfs: LoopFS, views: Callable[..., View]) -> None:
    src = _setuid_source(loopfs)
    # the loop filesystem itself lets both work: only the view's own flags can stop them
    assert as_nobody([os.path.join(src, "suid-id"), "-u"]).out == b"0\n"
    assert as_nobody(["head", "-c", "4", os.path.join(src, "zero")]).out == b"\0\0\0\0"

    v = views(src)
    assert as_nobody([v.path("suid-id"), "-u"]).out == b"65534\n"
    assert as_nobody(["head", "-c", "4", v.path("zero")]).denied
    assert as_nobody([v.path("true")]).rc == 0
    flags = os.statvfs(v.target).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV and not flags & os.ST_NOEXEC, hex(flags)

    # the policy can allow them (never more than the source's mount allows: test_security.py)
    config = os.path.join(loopfs.fresh_dir("policy"), "allow.toml")
    with open(config, "w") as f:
        f.write("allow_suid = true\nallow_devices = true\n")
    allowed = views(src, "--config", config)
    flags = os.statvfs(allowed.target).f_flag
    assert not flags & (os.ST_NOSUID | os.ST_NODEV), hex(flags)
    assert as_nobody([allowed.path("suid-id"), "-u"]).out == b"0\n"
    assert as_nobody(["head", "-c", "4", allowed.path("zero")]).out == b"\0\0\0\0"


# -- a TARGET redirected through a symlink ----------------------------------------------------------


def _landing(loopfs: LoopFS) -> tuple[str, str, str]:
    """(base, a root-owned directory standing for /etc/cron.d, a directory of nobody's)."""
    base = loopfs.fresh_dir("tgt")
    os.chmod(base, 0o755)
    cron = os.path.join(base, "cron.d")
    os.mkdir(cron, 0o755)
    with open(os.path.join(cron, "job"), "w") as f:
        f.write("root's own job\n")
    user = os.path.join(base, "user")
    os.mkdir(user, 0o755)
    os.chown(user, NOBODY, NOBODY)
    return base, cron, user


def _mount(loopfs: LoopFS, name: str, src: str, target: str) -> tuple[int, str, list[str]]:
    """hsmfs mount by hand (the target may be anything): (exit code, stderr, where the view landed);
    any view it made is gone afterwards."""
    store = os.path.join(loopfs.fresh_dir("store"), "s")
    r = hsmfs("mount", "--name", name, "--store", store, src, target, check=False)
    landed = _remove(name) if os.path.exists(record_path(name)) else []
    return r.returncode, r.stderr, landed


def _remove(name: str) -> list[str]:
    """Unmount the view of mount name wherever it landed (returned); its supervisor then stops by itself."""
    with open(record_path(name)) as f:
        rt = json.load(f)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if int(line.split()[0]) == rt["mnt_id"]]
    for point in points:
        subprocess.run(["umount", "-l", point], check=True)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{rt['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return points


def test_target_through_a_users_symlink_is_refused(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """TARGET (or a directory above it) is a symlink nobody put in their own directory: hsmfs mount
    used to follow it and cover root's directory with a view of a source users write to."""
    src = _setuid_source(loopfs)
    base, cron, user = _landing(loopfs)
    assert as_nobody(["ln", "-s", cron, os.path.join(user, "mnt")]).rc == 0
    assert as_nobody(["ln", "-s", base, os.path.join(user, "up")]).rc == 0
    for i, target in enumerate((os.path.join(user, "mnt"), os.path.join(user, "up", "cron.d"))):
        rc, err, landed = _mount(loopfs, f"t{os.getpid()}-sym{i}", src, target)
        assert cron not in landed, f"the view covered root's {cron}"
        assert rc == 73 and "leads through a symlink that is not root's" in err, (target, rc, err)
        assert f"(a symlink owned by uid {NOBODY})" in err and "hint: give the target's real path" in err
    assert os.listdir(cron) == ["job"]


def test_target_swapped_for_a_symlink_before_attach(loopfs: LoopFS, views: Callable[..., View],
                                                    children: Callable[[Callable[[], None]], int]) -> None:
    """TARGET's path is real directories when hsmfs mount checks it; nobody swaps the one above it
    for a symlink (to the directory holding root's cron.d) as soon as the view's supervisor starts,
    before it attaches the view. (move_mount never followed a symlink as the last name.)"""
    src = _setuid_source(loopfs)
    base, cron, user = _landing(loopfs)
    parent, spare = os.path.join(user, "d"), os.path.join(user, "lnk")
    target = os.path.join(parent, "cron.d")
    assert as_nobody(["mkdir", "-p", target]).rc == 0
    assert as_nobody(["ln", "-s", base, spare]).rc == 0
    name = f"t{os.getpid()}-swap"

    def swap_when_the_supervisor_starts() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        want = os.fsencode(target)
        while True:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if b"hsmfs.daemon" in argv and want in argv:
                    libc.renameat2(-100, os.fsencode(parent), -100, os.fsencode(spare), 2)  # RENAME_EXCHANGE
                    return

    children(swap_when_the_supervisor_starts)
    try:
        rc, err, landed = _mount(loopfs, name, src, target)
    finally:
        unlink_quietly(log_path(name))
    assert cron not in landed, f"the view covered root's {cron}"
    assert os.path.islink(parent), "the swap did not happen: the test did not test"
    assert rc == 73 and "is no longer the directory hsmfs mount checked" in err, (rc, err)
    assert os.listdir(cron) == ["job"]
    assert not os.path.exists(record_path(name))


def test_umount_not_redirected_through_a_symlink(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """The view is mounted below nobody's directory; nobody moves that directory away (the view
    goes with it) and puts a symlink in its place, to where root has another mount: hsmfs umount
    used to unmount root's mount (one that hides what is below it, say)."""
    src = _setuid_source(loopfs)
    base, _cron, user = _landing(loopfs)
    hidden = os.path.join(base, "mnt")  # the same last name as the view's mount point
    os.mkdir(hidden)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hsmfs-test-hides", hidden], check=True)
    name = f"t{os.getpid()}-umount"
    target = os.path.join(user, "d", "mnt")
    try:
        assert as_nobody(["mkdir", "-p", target]).rc == 0
        store = os.path.join(loopfs.fresh_dir("store"), "s")
        hsmfs("mount", "--name", name, "--store", store, src, target)
        moved = as_nobody(["sh", "-c", f"mv {user}/d {user}/x && ln -s {base} {user}/d"])
        assert moved.rc == 0, moved
        r = hsmfs("umount", name, check=False)
        assert is_mountpoint(hidden), f"hsmfs umount unmounted root's {hidden}: {r.stderr}"
        assert r.returncode != 0 and "Too many levels of symbolic links" in r.stderr, r.stderr
        assert is_mountpoint(os.path.join(user, "x", "mnt"))  # the view is still there, and served
        assert as_nobody(["cat", os.path.join(user, "x", "mnt", "suid-id")]).rc == 0
    finally:
        if os.path.exists(record_path(name)):
            _remove(name)
        unlink_quietly(log_path(name))
        while is_mountpoint(hidden):
            subprocess.run(["umount", hidden], check=True)


# -- item 9: a user's own namespace does not block hsmfs umount ------------------------------------


def test_users_namespace_copy_does_not_block_umount(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """nobody's own user and mount namespace, made after the view: its copy of the view is nobody's
    to keep as long as they like, so it must not block hsmfs umount (it made it exit 75). The view
    is unmounted; the filler serves the copy until it is gone, and says so."""
    src = _setuid_source(loopfs)
    with open(os.path.join(src, "data"), "wb") as f:
        f.write(b"served to the copy" * 1000)
    v = views(src)
    holder = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               "unshare", "-Urm", "sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline and holder.poll() is None, "no namespace"
            time.sleep(0.05)
        supervisor = v.status()["pid"]
        r = hsmfs("umount", v.target, check=False)
        assert r.returncode == 0, r.stderr
        v.mounted = False
        assert not is_mountpoint(v.target)
        assert f"mount namespace of pid {holder.pid}" in r.stderr and "another user namespace" in r.stderr, r.stderr
        assert "serves them until they are gone" in r.stderr, r.stderr
        # the copy reads real bytes: the filler still serves it
        with open(f"/proc/{holder.pid}/root{v.target}/data", "rb") as f:
            assert f.read() == b"served to the copy" * 1000
        assert os.path.exists(f"/proc/{supervisor}")
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{supervisor}"):
            assert time.monotonic() < deadline, f"the supervisor did not stop:\n{v.log[-2000:]}"
            time.sleep(0.1)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
