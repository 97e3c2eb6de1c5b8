"""populate: a metadata-complete stub tree of a source, atomic per entry, resumable after SIGKILL.

Every test runs on ext4, xfs and btrfs (the loopfs fixture); source and store share the filesystem.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Optional

import pytest
from conftest import LoopFS

from hsmfs import tree
from hsmfs.errors import SourceMissing
from hsmfs.populate import PopulateStats, populate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("system.posix_acl_access", "system.posix_acl_default")
T0 = 1_500_000_000_123_456_789  # mtimes: odd nanoseconds
# atimes in the future: relatime then never updates them when a directory is listed or a symlink
# read, so the source's atimes stay what populate saw and the tree's what populate set.
A0 = time.time_ns() + 10 * 86400 * 10**9 + 987_654_321
BAD = os.fsdecode(b"bad\xff\xfename")  # not UTF-8: surrogateescape


@dataclass(frozen=True)
class Info:
    kind: int
    mode: int
    uid: int
    gid: int
    size: Optional[int]  # not for directories: their sizes are the filesystem's business
    mtime_ns: int
    atime_ns: int
    rdev: int
    target: Optional[str]
    xattrs: tuple[tuple[str, bytes], ...]
    nlink: int


def snapshot(root: str) -> tuple[dict[str, Info], dict[str, tuple[int, int]]]:
    """rel path -> metadata, rel path -> (dev, ino); each entry lstat'ed before its directory is read."""
    infos: dict[str, Info] = {}
    inodes: dict[str, tuple[int, int]] = {}

    def visit(rel: str) -> None:
        path = os.path.join(root, rel) if rel else root
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if kind != stat.S_IFLNK:
            names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                           if n.startswith("user.") or n in COPIED)
            xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
        infos[rel] = Info(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                          None if kind == stat.S_IFDIR else st.st_size, st.st_mtime_ns, st.st_atime_ns,
                          st.st_rdev, os.readlink(path) if kind == stat.S_IFLNK else None, xattrs,
                          1 if kind == stat.S_IFDIR else st.st_nlink)
        inodes[rel] = (st.st_dev, st.st_ino)
        if kind == stat.S_IFDIR:
            for name in sorted(os.listdir(path)):
                visit(os.path.join(rel, name) if rel else name)

    visit("")
    return infos, inodes


def setfacl(*args: str) -> None:
    subprocess.run(["setfacl", *args], check=True, capture_output=True)


def write(path: str, data: bytes = b"", *, mode: Optional[int] = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)


def make_rich_source(src: str) -> None:
    """Every kind of entry and metadata populate must carry."""
    os.makedirs(os.path.join(src, "a", "b", "c"))
    os.makedirs(os.path.join(src, "acl-dir"))
    os.makedirs(os.path.join(src, "sgid-dir"))
    os.makedirs(os.path.join(src, "empty-dir"))
    write(os.path.join(src, "empty"))
    write(os.path.join(src, "small"), b"hello\n")
    write(os.path.join(src, "a", "b", "c", "multi-MB"), os.urandom(3 * 1024 * 1024 + 5))
    with open(os.path.join(src, "sparse"), "wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.seek(4 * 1024 * 1024)
        f.write(b"island")
    write(os.path.join(src, "setuid"), b"#!/bin/sh\n", mode=0o4755)
    write(os.path.join(src, "setgid"), b"x", mode=0o2711)
    write(os.path.join(src, "private"), b"secret", mode=0o600)
    write(os.path.join(src, "nothing"), b"zero", mode=0o000)
    write(os.path.join(src, "owned"), b"theirs", mode=0o640)
    os.chown(os.path.join(src, "owned"), 1234, 5678)
    os.chown(os.path.join(src, "a", "b"), 1234, 5678)
    write(os.path.join(src, "xattrs"), b"x")
    os.setxattr(os.path.join(src, "xattrs"), "user.colour", b"blue")
    os.setxattr(os.path.join(src, "xattrs"), "user.binary", b"\x00\xff\x00")
    os.setxattr(os.path.join(src, "a"), "user.dir", b"on a directory")
    os.setxattr(os.path.join(src, "xattrs"), "trusted.other", b"never copied")
    os.setxattr(os.path.join(src, "xattrs"), tree.XATTR, b"a record of the source's own: never copied")
    write(os.path.join(src, "acl-file"), b"x")
    setfacl("-m", "u:1234:rw-,g:5678:r--", os.path.join(src, "acl-file"))
    setfacl("-d", "-m", "u:1234:rwx", os.path.join(src, "acl-dir"))
    setfacl("-m", "u:1234:r-x", os.path.join(src, "acl-dir"))
    write(os.path.join(src, "acl-dir", "inherits"), b"x")  # gets an access ACL from the default one
    os.mkdir(os.path.join(src, "acl-dir", "sub"))  # gets both ACLs
    os.chown(os.path.join(src, "sgid-dir"), 0, 5678)
    os.chmod(os.path.join(src, "sgid-dir"), 0o2775)
    write(os.path.join(src, "sgid-dir", "f"), b"x")  # group 5678, inherited
    os.chmod(os.path.join(src, "empty-dir"), 0o1777)
    os.symlink("small", os.path.join(src, "link-rel"))
    os.symlink("/etc/passwd", os.path.join(src, "link-abs"))
    os.symlink("does/not/exist", os.path.join(src, "link-dangling"))
    os.symlink("../../outside", os.path.join(src, "a", "link-outside"))
    os.symlink("a", os.path.join(src, "link-dir"))
    os.lchown(os.path.join(src, "link-rel"), 1234, 5678)
    os.link(os.path.join(src, "link-rel"), os.path.join(src, "link-rel-too"), follow_symlinks=False)
    write(os.path.join(src, "pair-1"), b"pair")
    os.link(os.path.join(src, "pair-1"), os.path.join(src, "a", "pair-2"))
    write(os.path.join(src, "triple-1"), b"triple", mode=0o751)
    os.link(os.path.join(src, "triple-1"), os.path.join(src, "triple-2"))
    os.link(os.path.join(src, "triple-1"), os.path.join(src, "a", "b", "c", "triple-3"))
    os.setxattr(os.path.join(src, "triple-1"), "user.shared", b"one inode")
    os.mkfifo(os.path.join(src, "fifo"), 0o640)
    os.mknod(os.path.join(src, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(os.path.join(src, "block"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mknod(os.path.join(src, "socket"), stat.S_IFSOCK | 0o755)
    os.chown(os.path.join(src, "fifo"), 1234, 5678)
    write(os.path.join(src, "with space"), b" ")
    write(os.path.join(src, "new\nline"), b"\n")
    write(os.path.join(src, BAD), b"\xff")
    os.mkdir(os.path.join(src, "dir " + BAD))
    write(os.path.join(src, "dir " + BAD, "é"), b"e")
    write(os.path.join(src, tree.TMP_PREFIX + "0"), b"a source name that looks like a temporary")
    # times last, deepest first, so that making entries does not change them afterwards
    paths = []
    for top, dirnames, filenames in os.walk(src, topdown=False):
        paths += [os.path.join(top, n) for n in filenames + dirnames]
    paths.append(src)
    for i, p in enumerate(paths):
        os.utime(p, ns=(A0 + i * 1000, T0 + i * 1_000_001), follow_symlinks=False)


def check_tree(src: str, store: tree.Store, before: dict[str, Info], src_inodes: dict[str, tuple[int, int]]) -> None:
    """The tree equals the source snapshot in every field; stubs hold no data and a valid record."""
    after, tree_inodes = snapshot(store.tree)
    assert sorted(after) == sorted(before), "names differ (leftovers or missing entries)"
    for rel, want in before.items():
        assert after[rel] == want, f"{rel!r}: tree {after[rel]} != source {want}"
    # hardlinks: same source inode <-> same tree inode
    groups: dict[tuple[int, int], set[tuple[int, int]]] = {}
    back: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for rel, key in src_inodes.items():
        groups.setdefault(key, set()).add(tree_inodes[rel])
        back.setdefault(tree_inodes[rel], set()).add(key)
    assert all(len(v) == 1 for v in groups.values()), "a source inode became several tree inodes"
    assert all(len(v) == 1 for v in back.values()), "several source inodes became one tree inode"
    # first name (in sorted walk order) of each source inode: the path its record names
    first: dict[tuple[int, int], str] = {}
    for rel in walk_order(src):
        first.setdefault(src_inodes[rel], rel)
    table = tree.PathTable(store.path)
    try:
        for rel, info in after.items():
            path = os.path.join(store.tree, rel)
            if info.kind != stat.S_IFREG:
                assert tree.read_record(path) is None, f"{rel!r} is not a regular file but has a record"
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                with pytest.raises(OSError) as e:
                    os.lseek(fd, 0, os.SEEK_DATA)
                assert e.value.errno == errno.ENXIO, f"{rel!r}: the stub has data"
                rec = tree.read_record(fd)
            finally:
                os.close(fd)
            assert rec is not None, f"{rel!r} has no record"
            sst = os.lstat(os.path.join(src, rel))
            assert (rec.size, rec.mtime_ns, rec.src_ino, rec.src_ctime_ns, rec.flags) == \
                (info.size, info.mtime_ns, sst.st_ino, sst.st_ctime_ns, tree.FLAG_IDENTITY)
            assert table.get(rec.path_id) == first[src_inodes[rel]]
            if not info.xattrs:
                assert os.lstat(path).st_blocks == 0, f"{rel!r}: the stub has blocks"
    finally:
        table.close()
    assert "trusted.other" not in os.listxattr(os.path.join(store.tree, "xattrs"))
    names = [rel for rel in after if os.path.basename(rel).startswith(tree.TMP_PREFIX)]
    assert names == [tree.TMP_PREFIX + "0"]  # the source's own, no leftover
    assert tree.Store.load(store.path) == store and store.populated


def walk_order(root: str) -> list[str]:
    """Every name below root, each directory's names sorted, parents before children."""
    out: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(path))
        subs = []
        for n in names:
            r = os.path.join(rel, n) if rel else n
            out.append(r)
            if stat.S_ISDIR(os.lstat(os.path.join(root, r)).st_mode):
                subs.append(r)
        stack.extend(reversed(subs))
    return out


def settle(src: str) -> None:
    """Give the directories future atimes (see A0), so that listing them changes nothing."""
    for top, dirnames, _ in os.walk(src, topdown=False):
        for n in dirnames:
            os.utime(os.path.join(top, n), ns=(A0, T0))
    os.utime(src, ns=(A0, T0))


def new_store(fs: LoopFS, source: str) -> tree.Store:
    return tree.Store(path=os.path.join(fs.fresh_dir("store"), "store"), name="t", source=source)


def test_populate_carries_all_metadata(loopfs: LoopFS) -> None:
    src = os.path.join(loopfs.fresh_dir("src"), "src")
    make_rich_source(src)
    before, inodes = snapshot(src)
    store = new_store(loopfs, src)
    calls: list[tuple[int, int]] = []
    stats = populate(src, store, progress=lambda d, t: calls.append((d, t)))
    check_tree(src, store, before, inodes)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
    n = len(before) - 1
    sizes = {inodes[r]: i.size or 0 for r, i in before.items() if i.kind == stat.S_IFREG}
    assert stats == PopulateStats(files=20, dirs=8, symlinks=5, hardlinks=4, specials=4, bytes=sum(sizes.values()),
                                  created=n, kept=0)
    assert calls[-1] == (n, n) and all(t == n for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    again = populate(src, store)  # a complete tree: nothing to make
    assert (again.created, again.kept) == (0, n)
    check_tree(src, store, before, inodes)

    # what a killed run leaves: missing names, a missing hardlink name, leftover temporaries
    os.unlink(os.path.join(store.tree, "small"))
    os.unlink(os.path.join(store.tree, "a", "pair-2"))
    os.unlink(os.path.join(store.tree, "a", "b", "c", "multi-MB"))
    write(os.path.join(store.tree, tree.TMP_PREFIX + "7"), b"half made")
    os.mkfifo(os.path.join(store.tree, "a", "b", tree.TMP_PREFIX + "1"))
    resumed = populate(src, store)
    assert (resumed.created, resumed.kept) == (3, n - 3)
    check_tree(src, store, before, inodes)


def test_missing_source(loopfs: LoopFS) -> None:
    base = loopfs.fresh_dir("missing")
    store = tree.Store(path=os.path.join(base, "store"), name="t", source=os.path.join(base, "nope"))
    with pytest.raises(SourceMissing, match="nope"):
        populate(os.path.join(base, "nope"), store)
    write(os.path.join(base, "file"))
    with pytest.raises(SourceMissing, match="not a directory"):
        populate(os.path.join(base, "file"), store)
    assert not os.path.exists(store.path), "a failed populate made the store"


@pytest.mark.parametrize("workers", [1, 2])
def test_file_vanished_after_the_scan_still_gets_its_stub(loopfs: LoopFS, monkeypatch: pytest.MonkeyPatch,
                                                          workers: int) -> None:
    """The scan is the only step that reads the source: a file gone after it still gets its stub (its
    fill fails later, as for any file the source lost), and populate completes. Names that vanish
    during the scan are left out: tests/test_security_populate.py."""
    src = loopfs.fresh_dir("src")
    for d in "abc":  # one task per directory: with 2 workers, b's is the forked worker's
        os.mkdir(os.path.join(src, d))
        write(os.path.join(src, d, "stays"))
    write(os.path.join(src, "b", "goes"), b"12345")
    import hsmfs.populate as mod

    real = mod._scan

    def scan_then_remove(*args: Any) -> Any:
        out = real(*args)
        os.unlink(os.path.join(src, "b", "goes"))
        return out

    monkeypatch.setattr(mod, "_scan", scan_then_remove)
    store = new_store(loopfs, src)
    stats = populate(src, store, workers=workers)
    assert (stats.created, stats.vanished) == (7, 0)
    assert store.populated and tree.Store.load(store.path) is not None
    assert os.stat(os.path.join(store.tree, "b", "goes")).st_size == 5


def test_no_fork_no_worker(loopfs: LoopFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    src = loopfs.fresh_dir("src")
    for d in range(4):
        os.mkdir(os.path.join(src, f"d{d}"))
        for f in range(3):
            write(os.path.join(src, f"d{d}", f"f{f}"), b"x")
    settle(src)
    before, _ = snapshot(src)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "fork", no_fork)
    store = new_store(loopfs, src)
    stats = populate(src, store, workers=2)
    assert (stats.created, stats.kept) == (16, 0)
    assert "fork failed" in caplog.text
    after, _ = snapshot(store.tree)
    assert after == before


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from hsmfs.populate import populate
    from hsmfs.tree import Store
    populate(sys.argv[1], Store(path=sys.argv[2], name="t", source=sys.argv[1]))
""")


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies do not count)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def count_files(top: str) -> int:
    return sum(len(files) for _, _, files in os.walk(top))


def test_resume_after_sigkill(loopfs: LoopFS) -> None:
    src = loopfs.fresh_dir("src")
    for d in range(100):
        os.mkdir(os.path.join(src, f"d{d:03}"))
        for f in range(200):
            write(os.path.join(src, f"d{d:03}", f"f{f:03}"), b"x" * (f % 7))
    os.link(os.path.join(src, "d000", "f000"), os.path.join(src, "d099", "z-link"))
    os.link(os.path.join(src, "d000", "f000"), os.path.join(src, "zz-link"))
    settle(src)
    total = 100 + 100 * 200 + 2  # dirs, files, extra names
    before, inodes = snapshot(src)
    store = new_store(loopfs, src)

    proc = subprocess.Popen([sys.executable, "-c", CHILD, src, store.path, ROOT], start_new_session=True)
    try:
        # about 2,000 entries in (d010's turn), kill populate itself: its worker must stop on its own
        probe = os.path.join(store.tree, "d010")
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if os.listdir(probe):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.001)
        assert proc.poll() is None, "populate finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while group_alive(proc.pid):
            assert time.monotonic() < deadline, "a populate worker outlived populate"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    made = count_files(store.tree)
    # the worker stopped after its job in hand (<= 128 entries), not after its half of the files
    assert 0 < made < total // 3, f"{made} of {total} entries made: the worker went on after populate died"
    assert not tree.Store.load(store.path)

    stats = populate(src, store)
    assert stats.kept > 0, "populate started over"
    assert stats.created > 0 and stats.created + stats.kept == total
    check_resumed(src, store, before, inodes)

    clean = new_store(loopfs, src)
    populate(src, clean)
    one, _ = snapshot(clean.tree)
    two, _ = snapshot(store.tree)
    assert one == two, "a resumed tree differs from a clean one"


def check_resumed(src: str, store: tree.Store, before: dict[str, Info], inodes: dict[str, tuple[int, int]]) -> None:
    after, tree_inodes = snapshot(store.tree)
    assert sorted(after) == sorted(before)
    assert after == before
    assert not [r for r in after if os.path.basename(r).startswith(tree.TMP_PREFIX)]
    assert len({tree_inodes[r] for r in ("d000/f000", "d099/z-link", "zz-link")}) == 1
    table = tree.PathTable(store.path)
    try:
        for rel in ("d000/f000", "d042/f100", "d099/f199", "zz-link"):
            rec = tree.read_record(os.path.join(store.tree, rel))
            assert rec is not None
            # a directory's names come before its subdirectories' in walk order: zz-link is first
            assert table.get(rec.path_id) == ("zz-link" if rel == "d000/f000" else rel)
    finally:
        table.close()


def test_worker_messages_survive_any_split() -> None:
    """A worker's reports may reach populate in pieces: only complete messages count."""
    import hsmfs.populate as mod

    run = mod._Populate("/src", tree.Store(path="/store", name="t", source="/src"), PopulateStats(), 10, None)
    data = mod._COUNTS.pack(b"C", 3, 1) + mod._COUNTS.pack(b"C", 2, 0)
    rest = b""
    for i in range(len(data)):
        rest = mod._parse(rest + data[i:i + 1], run)
    assert rest == b"" and (run.stats.created, run.stats.kept, run.done) == (5, 1, 6)
    body = b'{"kind": "SourceMissing", "message": "cannot read source /src/x", "hint": null}'
    err = mod._ERROR.pack(b"E", len(body)) + body
    assert mod._parse(err[:-1], run) == err[:-1]
    with pytest.raises(SourceMissing, match="/src/x"):
        mod._parse(err, run)
