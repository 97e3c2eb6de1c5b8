"""populate reads a source that its users change under it (issue 11, items 2, 6 and 8).

- A directory swapped for a symlink while populate runs must not expose what the symlink points
  at (item 6): a user (uid 65534) swaps one of their directories with a symlink to root's 0700
  directory, atomically and over and over, while populate runs.
- Names that vanish while populate reads the source (a temporary directory's churn) are left out
  and counted; populate and the mount go on (item 8). Paths longer than PATH_MAX work (item 8).
- Populate does not cross mount points of the source (item 2): a nosuid,nodev submount's setuid
  binary and device node never reach a view.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import stat
import subprocess
import time
from typing import Callable

from conftest import LoopFS, View, hsmfs
from test_security import NOBODY, as_nobody

from hsmfs import tree
from hsmfs.errors import HsmfsError
from hsmfs.populate import populate

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SUBDIRS = 100


def tree_names(top: str) -> list[str]:
    """Every name in a tree, walked by directory fds (any depth)."""
    out = []
    for _dirpath, dirs, files, _fd in os.fwalk(top):
        out += dirs + files
    return out


# -- item 6: a directory swapped for a symlink while populate runs ------------------------------------


def test_directory_swapped_for_a_symlink_during_populate(loopfs: LoopFS, views: Callable[..., View],
                                                         children: Callable[[Callable[[], None]], int]) -> None:
    base = loopfs.fresh_dir("swap")
    os.chmod(base, 0o755)
    secret = os.path.join(base, "secret")  # root's: nobody cannot even list it
    src = os.path.join(base, "src")
    shared = os.path.join(src, "shared")
    for i in range(SUBDIRS):
        os.makedirs(os.path.join(secret, f"s{i:03}", f"SECRET-dir-{i}"))
        with open(os.path.join(secret, f"s{i:03}", f"SECRET-file-{i}"), "wb") as f:
            f.write(b"root's")
        os.makedirs(os.path.join(shared, "d", f"s{i:03}"))
        with open(os.path.join(shared, "d", f"s{i:03}", "f"), "wb") as f:
            f.write(b"nobody's")
    os.chmod(secret, 0o700)
    os.symlink(secret, os.path.join(shared, "dlink"))
    for dirpath, dirs, files in os.walk(shared):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirs + files)]:
            os.lchown(n, NOBODY, NOBODY)
    os.lchown(os.path.join(shared, "dlink"), NOBODY, NOBODY)
    assert as_nobody(["ls", secret]).denied

    def swap() -> None:  # nobody's own directory and symlink, exchanged atomically, again and again
        libc = ctypes.CDLL(None, use_errno=True)
        a, b = os.fsencode(os.path.join(shared, "d")), os.fsencode(os.path.join(shared, "dlink"))
        rnd = random.Random(os.getpid())
        while True:
            if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
                os._exit(3)
            time.sleep(rnd.random() / 5000)

    children(swap)
    leaks, failures = [], []
    seen = set()  # what d was to populate: a directory, a symlink, or vanished (a symlink when opened)
    for run in range(12):
        store = tree.Store(path=os.path.join(loopfs.fresh_dir("store"), "s"), name="t", source=src)
        try:
            stats = populate(src, store)
        except HsmfsError as e:
            failures.append(f"run {run}: {e}")
            leaks += re.findall(r"SECRET-[a-z]+-[0-9]+", str(e))  # a name of root's, in the error
            stats = None
        if os.path.isdir(store.tree):
            leaks += [n for n in tree_names(store.tree) if "SECRET" in n]
        if stats is not None:
            d = os.path.join(store.tree, "shared", "d")
            seen.add("vanished" if stats.vanished else "symlink" if os.path.islink(d) else "directory")
        shutil.rmtree(store.path, ignore_errors=True)
    assert not leaks, f"names in root's 0700 directory leaked into stub trees or errors: {sorted(set(leaks))[:10]}"
    assert not failures, "populate failed instead of leaving the swapped directory out:\n" + "\n".join(failures)
    # the swaps went on during the runs: populate saw d as a directory in some, a symlink in others
    assert "directory" in seen and len(seen) > 1, f"d was always {seen}: the test did not test"


# -- item 8: names that vanish, paths longer than PATH_MAX ----------------------------------------------


def test_vanishing_names_are_skipped(loopfs: LoopFS, views: Callable[..., View],
                                     children: Callable[[Callable[[], None]], int]) -> None:
    """A 1777 temporary directory whose files come and go while populate reads it: 3 of 3 mounts
    used to fail. Now each populate completes, leaves the vanished names out and says how many."""
    base = loopfs.fresh_dir("churn")
    os.chmod(base, 0o755)
    src = os.path.join(base, "src")
    tmp = os.path.join(src, "tmp")
    os.makedirs(tmp)
    os.chmod(tmp, 0o1777)
    for i in range(300):
        with open(os.path.join(src, f"stable-{i:03}"), "wb") as f:
            f.write(b"x" * i)

    def churn() -> None:  # bursts of short-lived files, as a busy /tmp has
        n = 0
        while True:
            names = [os.path.join(tmp, f"t{n}-{i}") for i in range(400)]
            n += 1
            for p in names:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
                os.setxattr(p, "user.k", b"v")
            for p in names:
                os.unlink(p)

    children(churn)
    vanished = 0
    for _ in range(25):
        store = tree.Store(path=os.path.join(loopfs.fresh_dir("store"), "s"), name="t", source=src)
        stats = populate(src, store)  # must not fail
        assert store.populated and sorted(n for n in os.listdir(store.tree) if n.startswith("stable")) == \
            [f"stable-{i:03}" for i in range(300)]
        vanished += stats.vanished
        shutil.rmtree(store.path)
        if vanished:
            break
    assert vanished, "no name vanished while populate read the source: the test did not test"
    # and end to end: the mount succeeds and its summary counts them
    results = []
    for _ in range(3):
        v = views(src, mount=False)
        r = hsmfs("mount", "--name", v.name, "--store", v.store, src, v.target, check=False)
        v.mounted = r.returncode == 0
        results.append((r.returncode, r.stderr, v.mounted and sorted(os.listdir(v.target))[:2]))
        v.close()
    assert all(rc == 0 and listed == ["stable-000", "stable-001"] for rc, _, listed in results), results


def _mkdirs_deep(top: str, names: list[str], leaf: Callable[[int], None]) -> None:
    """Make top/names[0]/names[1]/... through directory fds (no path is ever that long), then leaf(fd)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            os.mkdir(n, 0o755, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf(fd)
    finally:
        os.close(fd)


def _open_deep(top: str, names: list[str], last: str, flags: int = os.O_RDONLY) -> int:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(last, flags, dir_fd=fd)
    finally:
        os.close(fd)


def test_paths_longer_than_path_max(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = loopfs.fresh_dir("deep")
    names = [f"{i:02}-" + "d" * 200 for i in range(24)]  # 24 x 204 bytes: 4,896 > PATH_MAX (4,096)
    data = random.Random(4).randbytes(12345)

    def leaf(fd: int) -> None:
        out = os.open("deep.bin", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(out, data)
        os.close(out)
        os.symlink("deep.bin", "link", dir_fd=fd)

    _mkdirs_deep(src, names, leaf)
    v = make_view(src, mount=False)
    r = hsmfs("mount", "--name", v.name, "--store", v.store, src, v.target, check=False)
    v.mounted = r.returncode == 0
    assert r.returncode == 0, r.stderr
    # O_PATH: a look at the stub, not an open that fills it (its stub mark covers the store's path too)
    fd = _open_deep(os.path.join(v.store, "tree"), names, "deep.bin", os.O_PATH)
    try:
        st = os.fstat(fd)
        assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_blocks) == (len(data), 0o640, 0)
    finally:
        os.close(fd)
    # read through the view (by directory fds): the filler opens the source by its long path too
    fd = _open_deep(v.target, names, "deep.bin")
    try:
        assert os.read(fd, 20000) == data
    finally:
        os.close(fd)


# -- item 2: a submount of the source ------------------------------------------------------------------


def test_submount_of_the_source_is_left_out(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """A nosuid,nodev mount inside the source (a user's removable disk, say) holds a setuid-root
    binary and a 0666 device: through the source they are inert for nobody; the view must not give
    them back their power (the submount used to be copied into a view without nosuid and nodev)."""
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    sub = os.path.join(src, "media")
    os.mkdir(sub)
    os.chmod(sub, 0o755)
    usb = loopfs.fresh_dir("usb")  # what the submount shows
    os.chmod(usb, 0o751)
    shutil.copy(shutil.which("id") or "", os.path.join(usb, "suid-id"))
    os.chmod(os.path.join(usb, "suid-id"), 0o4755)
    os.mknod(os.path.join(usb, "zero"), stat.S_IFCHR | 0o666, os.makedev(1, 5))
    with open(os.path.join(src, "plain"), "wb") as f:
        f.write(b"plain")
    subprocess.run(["mount", "--bind", usb, sub], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,nosuid,nodev", usb, sub], check=True)
        on_source = as_nobody([os.path.join(sub, "suid-id"), "-u"])
        assert on_source.out == b"65534\n", on_source
        assert as_nobody(["head", "-c", "4", os.path.join(sub, "zero")]).denied
        v = views(src, mount=False)
        r = v.mount()
        for cmd in ([v.path("media/suid-id"), "-u"], ["head", "-c", "4", v.path("media/zero")]):
            o = as_nobody(cmd)
            assert o.rc != 0 and o.out == b"", (cmd, o)
        assert os.listdir(v.path("media")) == [], "the submount's files are in the view"
        st, want = os.stat(v.path("media")), os.stat(sub)  # the mounted directory's owner and mode
        assert (st.st_mode, st.st_uid) == (want.st_mode, want.st_uid)
        assert "left out what is mounted on media" in r.stderr, r.stderr
        with open(v.path("plain"), "rb") as f:
            assert f.read() == b"plain"
        v.close()  # the filler holds the source open: it goes before the submount
    finally:
        subprocess.run(["umount", sub], check=True)
