"""Other mounts of a view's tree keep it served after the view goes (promise 1, docs/unwatched.md).

A bind mount of the view, its copy in a later mount namespace and an overlay over it read stubs
through inode marks that die with the group: `hsmfs umount` refuses while they exist, and after
`--lazy` or a plain `umount` the supervisor keeps the group and the filler until the last is gone.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Callable

import helpers
import pytest
from conftest import LoopFS, View, hsmfs
from helpers import wait_for

from hsmfs.views import MountEntry, is_mountpoint

N = 12


@pytest.fixture
def view(loopfs: LoopFS, make_view: Callable[..., View]) -> tuple[View, dict[str, bytes]]:
    """A live view of N random files (5,000 to 300,000 bytes), none read yet."""
    rnd = random.Random(7)
    src = os.path.join(loopfs.fresh_dir("src"), "src")
    os.mkdir(src)
    want = {}
    for i in range(N):
        want[f"f{i:02d}"] = rnd.randbytes(rnd.randrange(5_000, 300_000))
        with open(os.path.join(src, f"f{i:02d}"), "wb") as f:
            f.write(want[f"f{i:02d}"])
    return make_view(src), want


@pytest.fixture
def mounts(loopfs: LoopFS) -> Iterator[Callable[..., str]]:
    """mount(*args) mounts on a new directory and returns it; all unmounted at teardown, pass or fail."""
    base = tempfile.mkdtemp(prefix="other-", dir=loopfs.base)
    made: list[str] = []

    def mount(*args: str) -> str:
        point = tempfile.mkdtemp(dir=base)
        subprocess.run(["mount", *args, point], check=True)
        made.append(point)
        return point

    yield mount
    for point in reversed(made):
        while is_mountpoint(point):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], check=False)
    subprocess.run(["rm", "-rf", base], check=False)


@pytest.fixture
def namespace() -> Iterator[Callable[..., int]]:
    """new(propagation) -> the pid of a process in a new mount namespace; killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def new(propagation: str = "private") -> int:
        p = subprocess.Popen(["unshare", "-m", "--propagation", propagation, "sleep", "600"])
        procs.append(p)
        wait_for(lambda: os.readlink(f"/proc/{p.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"),
                 "the namespace", timeout=10)
        return p.pid

    yield new
    for p in procs:
        p.kill()
        p.wait()


def cat(path: str, *, ns: int | None = None) -> bytes:
    return helpers.cat(path, prefix=["nsenter", "-t", str(ns), "-m"] if ns else [])


def supervisor_exits(v: View, pid: int) -> None:
    # another test run on this machine may copy the view into a namespace of its own: then the
    # supervisor rightly serves until that namespace is gone (the log says so)
    try:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the supervisor to exit", timeout=60)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{v.log[-3000:]}") from None


def refused(v: View, mentioned: str) -> str:
    """hsmfs umount without --lazy: exit 75, the other mount named, the view still mounted."""
    r = hsmfs("umount", v.target, check=False)
    assert r.returncode == 75, r.stderr
    assert mentioned in r.stderr, r.stderr
    assert is_mountpoint(v.target)
    return r.stderr


def detach_lazily(v: View) -> tuple[int, str]:
    """hsmfs umount --lazy, and the supervisor sees the view go; (supervisor pid, umount's stderr)."""
    pid: int = v.status()["pid"]
    r = hsmfs("umount", "--lazy", v.target)
    assert not is_mountpoint(v.target)
    wait_for(lambda: "is gone, but its tree is still mounted" in v.log, "the supervisor to see the view go", timeout=10)
    return pid, r.stderr


def test_umount_refused_while_a_bind_mount_exists(view: tuple[View, dict[str, bytes]],
                                                  mounts: Callable[..., str]) -> None:
    v, want = view
    bind = mounts("--bind", v.target)
    before = v.status()
    err = refused(v, f"at {bind} (bind mount)")
    assert "--lazy" in err, err
    # nothing changed: the view is mounted, the same filler serves both paths
    assert is_mountpoint(bind)
    after = v.status()
    assert (after["pid"], after["filler_pid"], after["view_mounted"]) == (before["pid"], before["filler_pid"], True)
    for i, rel in enumerate(sorted(want)):
        assert cat(os.path.join(bind if i % 2 else v.target, rel)) == want[rel], rel


def test_lazy_umount_serves_a_bind_mount_until_it_goes(view: tuple[View, dict[str, bytes]],
                                                       mounts: Callable[..., str]) -> None:
    v, want = view
    bind = mounts("--bind", v.target)
    pid, err = detach_lazily(v)
    assert f"at {bind} (bind mount)" in err, err
    st = v.status()
    assert st["view_mounted"] is False and f"at {bind} (bind mount)" in st["other_mounts"], st
    for rel in sorted(want):  # never read before: each one is filled now, through the bind mount
        assert cat(os.path.join(bind, rel)) == want[rel], rel
    assert os.path.exists(f"/proc/{pid}")
    subprocess.run(["umount", bind], check=True)
    supervisor_exits(v, pid)


def test_plain_umount_of_the_view_keeps_a_bind_mount_served(view: tuple[View, dict[str, bytes]],
                                                            mounts: Callable[..., str]) -> None:
    v, want = view
    bind = mounts("--bind", v.target)
    pid = v.status()["pid"]
    subprocess.run(["umount", v.target], check=True)  # behind hsmfs's back
    wait_for(lambda: "is gone, but its tree is still mounted" in v.log, "the supervisor to see the view go", timeout=10)
    time.sleep(1.5)  # past a few polls: a supervisor that was going to stop has stopped
    for rel in sorted(want):
        assert cat(os.path.join(bind, rel)) == want[rel], rel
    assert os.path.exists(f"/proc/{pid}")
    subprocess.run(["umount", bind], check=True)
    supervisor_exits(v, pid)


def test_copy_in_a_later_namespace(view: tuple[View, dict[str, bytes]], namespace: Callable[..., int]) -> None:
    v, want = view
    ns = namespace()
    refused(v, f"in the mount namespace of pid {ns} at {v.target}")
    pid, _ = detach_lazily(v)
    for rel in sorted(want):
        assert cat(v.path(rel), ns=ns) == want[rel], rel
    assert os.path.exists(f"/proc/{pid}")
    os.kill(ns, signal.SIGKILL)  # our own holder: its namespace goes with it
    supervisor_exits(v, pid)


def test_overlay_over_the_view(view: tuple[View, dict[str, bytes]], mounts: Callable[..., str],
                               loopfs: LoopFS) -> None:
    v, want = view
    layers = tempfile.mkdtemp(prefix="layers-", dir=loopfs.base)
    try:
        upper, work = (os.path.join(layers, n) for n in ("upper", "work"))
        os.mkdir(upper)
        os.mkdir(work)
        merged = mounts("-t", "overlay", "overlay", "-o", f"lowerdir={v.target},upperdir={upper},workdir={work}")
        refused(v, f"under an overlay at {merged}")
        # the overlay keeps its own clone of the view: it is still found once the view is gone
        pid, _ = detach_lazily(v)
        for rel in sorted(want):
            assert cat(os.path.join(merged, rel)) == want[rel], rel
        assert os.path.exists(f"/proc/{pid}")
        subprocess.run(["umount", merged], check=True)
        supervisor_exits(v, pid)
    finally:
        subprocess.run(["rm", "-rf", layers], check=False)


def test_copies_that_go_with_the_view_do_not_block_it(loopfs: LoopFS, mounts: Callable[..., str],
                                                      make_view: Callable[..., View],
                                                      namespace: Callable[..., int]) -> None:
    """Under a shared mount, a slave namespace's copy of the view is unmounted with it (umount
    propagation): not a reason to refuse, and not left behind."""
    shared = mounts("--bind", loopfs.fresh_dir("shared"))
    subprocess.run(["mount", "--make-shared", shared], check=True)
    src = loopfs.fresh_dir("src")
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"x" * 5000)
    v = make_view(src, mount=False)
    os.rmdir(v.target)
    v.target = tempfile.mkdtemp(dir=shared)
    v.mount()
    ns = namespace("slave")
    assert cat(v.path("f"), ns=ns) == b"x" * 5000  # the copy is there, and served
    pid = v.status()["pid"]
    hsmfs("umount", v.target)
    assert subprocess.run(["nsenter", "-t", str(ns), "-m", "mountpoint", "-q", v.target]).returncode != 0
    supervisor_exits(v, pid)


def test_overlay_layers_from_mountinfo() -> None:
    line = ("49 27 0:41 / /m\\040n rw - overlay overlay rw,lowerdir=/a\\040b:/c\\:d::/e,upperdir=/u,"
            "workdir=/w,lowerdir+=/f\\054g,datadir+=/h,uuid=on\n")
    m = MountEntry.parse(line)
    assert (m.point, m.fstype, m.shared, m.master) == ("/m n", "overlay", None, None)
    assert m.layers() == ["/a b", "/c:d", "/e", "/u", "/f,g", "/h"]
    shared = MountEntry.parse("72 27 7:4 /store/tree /v rw,relatime shared:5 master:2 - ext4 /dev/loop4 rw\n")
    assert (shared.dev, shared.root, shared.shared, shared.master) == ("7:4", "/store/tree", 5, 2)
