"""What a fill reads (issue 11, items 3, 4 and 5, and the suspected source lease).

After populate, the users who own source files can still change them: chmod them, rename another
file over them, put a FIFO in their place, make them sparse and huge, take a lease on them. A fill
runs as root. Each test here makes such a change after the mount and then reads the stub through
the view as an unprivileged user, on ext4, xfs and btrfs:

- 3a: a source file ``chmod 600``'d by its owner after the mount is not served at its old mode;
- 3b: a victim's 0600 file renamed over an attacker's 0644 file (same size and mtime) is not served
  through the attacker's stub;
- 4: FIFOs put in the place of source files fail their reads at once, four at a time, while other
  reads are served, and ``hsmfs umount`` still works; a user whose reads wait on four slow fills
  holds three of the four workers, and another user's read is served meanwhile;
- 5: a sparse 8 GiB source file costs the store its data only; a fill larger than the whole store
  is refused with ENOSPC before anything is evicted for it;
- lease: a write lease its owner holds on a source file fails the read at once instead of stalling
  it for the lease-break time.

Users act in forked children of this process that drop to their uid (the interpreter lives under
/root, which they could not exec); each child is killed by SIGALRM if it hangs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from conftest import LoopFS, View, hsmfs
from helpers import AsUser, wait_for
from test_budget import SMALL_FS, SmallFS
from test_remote import Origin, origin  # noqa: F401 (origin: the fixture)
from test_security import NOBODY

from hsmfs import manifest, state, tree
from hsmfs.filler.core import INLINE_MAX

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
OWNER = NOBODY  # owns the source files that change under the view
READER = 4343  # another unprivileged user, who reads them through the view
ATTACKER, VICTIM, GROUP = 4301, 4302, 4242  # item 3b: both in GROUP, which may write the directory
FAST = 15.0  # seconds: "at once" on a loaded machine, well under fill_timeout (60) and lease-break-time (45)
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


# -- running things as another user ----------------------------------------------------------------


def as_user(uid: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return AsUser(uid, fn, *args, **kw).result()


def timed_read(path: str) -> dict[str, Any]:
    """{"sha", "size", "secs"} of reading the whole file, or {"errno", "secs"}."""
    t0 = time.monotonic()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"errno": e.errno, "secs": time.monotonic() - t0}
    return {"sha": sha(data), "size": len(data), "secs": time.monotonic() - t0}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def show(got: dict[str, Any]) -> str:
    if "errno" in got:
        return f"{errno.errorcode.get(got['errno'], got['errno'])} after {got['secs']:.2f} s"
    return f"{got['size']} bytes (sha {got['sha'][:12]}) after {got['secs']:.2f} s"


def write_file(path: str, data: bytes, uid: int, mode: int = 0o644, gid: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, uid if gid is None else gid)
    os.chmod(path, mode)


def store_file(v: View, rel: str) -> str:
    return os.path.join(v.store, "tree", rel)


def assert_still_stub(v: View, rel: str) -> None:
    """The store's file of rel is a stub holding no byte (read from the store: no open, no event)."""
    p = store_file(v, rel)
    got = state.state_in_store(p)
    held = tree.resident_bytes(os.lstat(p))
    assert (got, held) == (state.FileState.STUB, 0), f"{rel} is {got.value} holding {held} bytes, not an empty stub"


def log_says(v: View, rel: str, why: str) -> str:
    """The log line of the failed fill of rel, which must give why."""
    pattern = rf"cannot fill {re.escape(rel)} from .*{why}.*"
    log = v.log
    m = re.search(pattern, log)  # . stops at a newline: the whole line
    assert m is not None, f"no line /{pattern}/ in the log:\n{log[-3000:]}"
    return m.group(0)


# -- 3a: chmod 600 after the mount -------------------------------------------------------------------


def test_chmod_600_after_mount_is_not_served(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """The owner closes their file after populate: the 0644 stub must not serve it (the chmod moved
    the source's ctime, which the stub's record holds and its owner cannot set back)."""
    src = loopfs.fresh_dir("chmod")
    os.chmod(src, 0o755)
    rnd = random.Random(31)
    data = {"diary": b"diary:" + rnd.randbytes(20000), "open": b"open:" + rnd.randbytes(7000)}
    for rel, b in data.items():
        write_file(os.path.join(src, rel), b, OWNER)
    v = views(src)
    assert os.stat(v.path("diary")).st_mode & 0o777 == 0o644

    as_user(OWNER, os.chmod, os.path.join(src, "diary"), 0o600)
    assert as_user(READER, timed_read, os.path.join(src, "diary"))["errno"] == errno.EACCES  # on the source

    got = as_user(READER, timed_read, v.path("diary"))
    assert got.get("sha") != sha(data["diary"]), f"the view served diary after its owner's chmod 600: {show(got)}"
    assert got.get("errno") == errno.EIO and got["secs"] < FAST, show(got)
    line = log_says(v, "diary", "source file changed since the stub was made")
    assert_still_stub(v, "diary")
    # the same reader reads the file nobody closed: the refusal is the chmod's doing
    ok = as_user(READER, timed_read, v.path("open"))
    assert ok.get("sha") == sha(data["open"]), show(ok)
    print(f"\n{loopfs.fstype}: diary after chmod 600: {show(got)}; log: {line}")


# -- 3b: a victim's file renamed over an attacker's ---------------------------------------------------


def test_file_renamed_over_a_stub_is_not_served(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """In a group-writable directory the attacker makes a 0644 file with the size and mtime of the
    victim's 0600 file; after populate they rename the victim's file over theirs. A third user
    reading the 0644 stub must not get the victim's bytes: the name now holds another inode."""
    src = loopfs.fresh_dir("rename")
    os.chmod(src, 0o755)
    shared = os.path.join(src, "shared")
    os.mkdir(shared)
    os.chown(shared, 0, GROUP)
    os.chmod(shared, 0o775)  # group-writable, no sticky bit
    rnd = random.Random(32)
    secret = b"victim's key:" + rnd.randbytes(6000)
    key, report = os.path.join(shared, "key"), os.path.join(shared, "report")
    write_file(key, secret, VICTIM, 0o600)
    forged = b"attacker:" + rnd.randbytes(len(secret) - 9)
    write_file(report, forged, ATTACKER, 0o644)

    def forge(path: str, like: str) -> None:  # the attacker copies what they can see of the victim's file
        st = os.stat(like)
        assert os.stat(path).st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    as_user(ATTACKER, forge, report, key, groups=[GROUP])
    v = views(src)
    assert os.stat(v.path("shared/report")).st_mode & 0o777 == 0o644

    as_user(ATTACKER, os.rename, key, report, groups=[GROUP])
    st = os.stat(report)
    assert (st.st_uid, st.st_mode & 0o777, st.st_size) == (VICTIM, 0o600, len(secret))  # the attack is set

    got = as_user(NOBODY, timed_read, v.path("shared/report"))
    assert got.get("sha") != sha(secret), f"the attacker's stub served the victim's 0600 file: {show(got)}"
    assert got.get("errno") == errno.EIO and got["secs"] < FAST, show(got)
    line = log_says(v, "shared/report", "source path now names another file")
    assert_still_stub(v, "shared/report")
    print(f"\n{loopfs.fstype}: the attacker's stub after the rename: {show(got)}; log: {line}")


# -- 4: FIFOs in place of source files ---------------------------------------------------------------


def test_fifos_do_not_wedge_fills(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """Four FIFOs (as many as fill workers) in place of source files: their reads fail at once, a
    read of another file at the same time and one after them get the source's bytes, and hsmfs
    umount works as usual. (Opened blocking, each FIFO used to hold a worker forever.)"""
    src = loopfs.fresh_dir("fifo")
    os.chown(src, OWNER, OWNER)
    os.chmod(src, 0o755)
    rnd = random.Random(4)
    size = INLINE_MAX + 44 * KiB  # past what the event reader fills itself: these go to the workers
    fifos = [f"pipe{i}" for i in range(4)]
    data = {rel: rnd.randbytes(size) for rel in [*fifos, "normal", "later"]}
    for rel, b in data.items():
        write_file(os.path.join(src, rel), b, OWNER)
    v = views(src)

    def to_fifos(paths: list[str]) -> None:
        for p in paths:
            os.unlink(p)
            os.mkfifo(p, 0o644)

    paths = [os.path.join(src, rel) for rel in fifos]
    as_user(OWNER, to_fifos, paths)
    try:
        readers = {rel: AsUser(READER, timed_read, v.path(rel)) for rel in fifos}
        readers["normal"] = AsUser(READER, timed_read, v.path("normal"))  # meanwhile
        got = {rel: r.result() for rel, r in readers.items()}
        report = ", ".join(f"{rel}: {show(g)}" for rel, g in got.items())
        for rel in fifos:
            assert got[rel].get("errno") == errno.EIO and got[rel]["secs"] < FAST, report
            log_says(v, rel, "source path is no longer a regular file")
            assert_still_stub(v, rel)
        assert got["normal"].get("sha") == sha(data["normal"]) and got["normal"]["secs"] < FAST, report
        # the workers are free: the FIFOs again, all at once, and a file nobody has read yet
        again = [AsUser(READER, timed_read, v.path(rel)) for rel in fifos]
        later = as_user(READER, timed_read, v.path("later"))
        assert later.get("sha") == sha(data["later"]) and later["secs"] < FAST, show(later)
        assert all(r.result().get("errno") == errno.EIO for r in again)

        t0 = time.monotonic()
        r = hsmfs("umount", v.target, check=False, timeout=180)
        took = time.monotonic() - t0
        v.mounted = r.returncode != 0  # the fixture cleans up what a failed umount left
        assert r.returncode == 0 and took < 60, f"hsmfs umount: {r.returncode} after {took:.1f} s\n{r.stdout}{r.stderr}"
        print(f"\n{loopfs.fstype}: {report}; later: {show(later)}; umount {took:.1f} s")
    finally:
        unwedge(paths)


def test_one_user_cannot_hold_every_fill_worker(origin: Origin, loopfs: LoopFS,  # noqa: F811
                                                views: Callable[..., View]) -> None:
    """A user opens four files whose fills take long (here an origin that answers them after 4 s;
    as well a huge file, or a source that hangs): with 4 workers, 3 of their fills run and the fourth
    waits in their own line, so another user's read gets its bytes at once. (Before, the four took
    every worker, and everyone else's reads waited behind them.)"""
    src = loopfs.fresh_dir("fair")
    os.chmod(src, 0o755)
    rnd = random.Random(11)
    slow = [f"slow{i}" for i in range(4)]
    data = {rel: rnd.randbytes(100 * KiB + i) for i, rel in enumerate([*slow, "quick"])}
    for rel, b in data.items():
        write_file(os.path.join(src, rel), b, OWNER)
    url = origin.publish(src, f"fair-{loopfs.fstype}")
    obj = {rel: f"/fair-{loopfs.fstype}/" + manifest.object_key(sha(b)) for rel, b in data.items()}
    origin.set_faults({obj[rel]: {"delay": 4} for rel in slow})
    try:
        v = views(url, "--config", origin.policy(loopfs.base, workers=4, fill_timeout=30))

        def fetched() -> int:
            counts = origin.counts()
            return sum(counts.get(obj[rel], 0) for rel in slow)

        readers = [AsUser(READER, timed_read, v.path(rel)) for rel in slow]
        wait_for(lambda: fetched() >= 3, "three of the slow files asked of the origin", timeout=20)
        quick = as_user(NOBODY, timed_read, v.path("quick"))
        held = fetched()
        got = [r.result() for r in readers]
        report = f"quick: {show(quick)}; slow: " + ", ".join(show(g) for g in got)
        assert quick.get("sha") == sha(data["quick"]) and quick["secs"] < 2, report
        assert held == 3, f"{held} slow files were being fetched at once, expected 3 (workers - 1); {report}"
        assert [g.get("sha") for g in got] == [sha(data[rel]) for rel in slow], report
        assert v.status()["filler"]["user_waits"] >= 1
        assert "fills waited for a worker because their user held fills_per_user" in hsmfs("status", v.name).stdout
        print(f"\n{loopfs.fstype}: {report}")
    finally:
        origin.set_faults({})


def unwedge(fifos: list[str]) -> None:
    """Open each FIFO for writing and close it: an open for reading blocked on it (a filler that
    opens sources blocking, as hsmfs once did) returns, so that a failed test leaves no stuck filler."""
    for p in fifos:
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            pass  # no reader (ENXIO): nothing is blocked on it


# -- 5: sparse source files, and fills that cannot fit -------------------------------------------------

SPARSE_SIZE = 8 * GiB
SPARSE_DATA = {0: 4 * KiB, GiB + 123: 5000, 5 * GiB: 2 * KiB, SPARSE_SIZE - 3000: 3000}  # offset: bytes


@pytest.fixture
def tmpfs_dir(loopfs: LoopFS) -> Iterator[str]:
    """A small tmpfs, for a source on another filesystem than the store: there every byte a fill
    copies is written (between files of one xfs or btrfs filesystem a fill is a reflink, which keeps
    holes whatever is asked). Requested before views, so that it goes after them."""
    mnt = tempfile.mkdtemp(prefix="tmpfs-", dir=loopfs.base)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "hsmfs-test-tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def make_sparse(path: str, size: int, data: dict[int, bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, b in data.items():
            os.pwrite(fd, b, off)
    finally:
        os.close(fd)


def regions(fd: int) -> list[list[int]]:
    size = os.fstat(fd).st_size
    out, pos = [], 0
    while pos < size:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        b = os.lseek(fd, a, os.SEEK_HOLE)
        out.append([a, b])
        pos = b
    return out


def compare_sparse(view_path: str, src_path: str) -> dict[str, Any]:
    """Whether the view's file reads as the source does, without reading 8 GiB of zeros: every data
    region of either file (holes read as zeros in both) must read the same from both."""
    t0 = time.monotonic()
    try:
        vfd = os.open(view_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return {"errno": e.errno, "secs": time.monotonic() - t0}
    sfd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        secs = time.monotonic() - t0  # the open waits for the fill
        vr, sr = regions(vfd), regions(sfd)
        differ = []
        for a, b in vr + sr:
            pos = a
            while pos < b:
                n = min(b - pos, 4 * MiB)
                if os.pread(vfd, n, pos) != os.pread(sfd, n, pos):
                    differ.append([pos, pos + n])
                pos += n
        return {"secs": secs, "size": os.fstat(vfd).st_size, "view_regions": vr, "source_regions": sr,
                "differ": differ}
    finally:
        os.close(vfd)
        os.close(sfd)


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_sparse_source_keeps_its_holes(loopfs: LoopFS, tmpfs_dir: str, views: Callable[..., View]) -> None:
    """A user's ``truncate -s 8G`` with a few KiB written: read through the view it reads right and
    costs the store about its data, not 8 GiB (the 4 GiB store image could not even hold it)."""
    src = os.path.join(tmpfs_dir, "src")
    os.mkdir(src)
    os.chown(src, OWNER, OWNER)
    rnd = random.Random(5)
    data = {off: rnd.randbytes(n) for off, n in SPARSE_DATA.items()}
    as_user(OWNER, make_sparse, os.path.join(src, "sparse"), SPARSE_SIZE, data)
    v = views(src)
    os.sync()
    before = used_bytes(v.store)

    got = as_user(READER, compare_sparse, v.path("sparse"), os.path.join(src, "sparse"))
    assert "errno" not in got, f"reading the sparse file through the view: {show(got)}\n{v.log[-3000:]}"
    assert got["size"] == SPARSE_SIZE and not got["differ"], got
    assert got["source_regions"], "the source has no data regions: the test did not test"
    os.sync()
    held = os.lstat(store_file(v, "sparse")).st_blocks * 512
    grew = used_bytes(v.store) - before
    data_bytes = sum(len(b) for b in data.values())
    print(f"\n{loopfs.fstype}: {data_bytes} bytes of data in {SPARSE_SIZE >> 30} GiB: filled in {got['secs']:.2f} s, "
          f"the store's file holds {held} bytes, the store's filesystem grew by {grew}; regions {got['view_regions']}")
    assert held <= data_bytes + 1 * MiB, f"the store's file holds {held} bytes for {data_bytes} of data"
    assert grew < 64 * MiB, f"the store's filesystem grew by {grew} bytes for {data_bytes} of data"
    assert state.state_in_store(store_file(v, "sparse")) in (state.FileState.RESIDENT, state.FileState.STUB)


@pytest.fixture
def small_store(loopfs: LoopFS) -> Iterator[SmallFS]:
    """A small filesystem of the same type for the store (tests/test_budget.py). Requested before
    views, so that it goes after them."""
    fs = SmallFS(loopfs.fstype)
    try:
        yield fs
    finally:
        fs.close()


def test_fill_that_cannot_fit_evicts_nothing(loopfs: LoopFS, small_store: SmallFS,
                                             views: Callable[..., View]) -> None:
    """Another user's files are resident; nobody reads a file with more data than the whole store
    filesystem. The read fails with ENOSPC at once, and nothing was evicted for it."""
    src = loopfs.fresh_dir("nofit")
    os.chmod(src, 0o755)
    v: View | None = None
    try:
        rnd = random.Random(6)
        others = {f"theirs{i}": rnd.randbytes(2 * MiB) for i in range(6)}
        for rel, b in others.items():
            write_file(os.path.join(src, rel), b, VICTIM)
        huge = SMALL_FS[loopfs.fstype][0] + 16 * MiB  # more than the store's whole filesystem
        with open(os.path.join(src, "huge"), "wb") as f:
            block = rnd.randbytes(MiB)
            for _ in range(huge // MiB):
                f.write(block)
        os.chown(os.path.join(src, "huge"), OWNER, OWNER)
        v = views(src, mount=False)
        v.store = os.path.join(small_store.mnt, "store")
        v.mount()

        for rel, b in others.items():
            got = as_user(VICTIM, timed_read, v.path(rel))
            assert got.get("sha") == sha(b), show(got)
        for rel in others:
            wait_for(lambda rel=rel: state.state_in_store(store_file(v, rel)) is state.FileState.RESIDENT,
                     f"{rel} committed resident", timeout=60)
        free = small_store.free()
        assert huge > free + sum(len(b) for b in others.values())

        got = as_user(NOBODY, timed_read, v.path("huge"))
        assert got.get("errno") == errno.ENOSPC and got["secs"] < FAST, show(got)
        still = {rel: (state.state_in_store(store_file(v, rel)).value,
                       tree.resident_bytes(os.lstat(store_file(v, rel)))) for rel in others}
        assert all(s == ("resident", 2 * MiB) for s in still.values()), \
            f"evicted for a fill that could not fit: {still}"
        f = v.status()["filler"]
        assert f["evictions"] == 0, f
        line = log_says(v, "huge", "the store has room for .* but this file needs")
        assert "readers get ENOSPC" in line, line
        assert_still_stub(v, "huge")
        print(f"\n{loopfs.fstype}: {huge} bytes into a store with {free} free: {show(got)}, evictions "
              f"{f['evictions']}; log: {line}")
    finally:
        if v is not None:
            v.close()  # before its source goes (the fixture then finds it closed)
        shutil.rmtree(src, ignore_errors=True)


BUDGET_POLICY = 'max_resident_bytes = "8M"\ncommit_interval = 0.05\nfill_ahead = false\n'


def test_fill_larger_than_the_budget_evicts_nothing(loopfs: LoopFS, views: Callable[..., View], tmp_path: Any) -> None:
    """The same with a space budget: a file with more data than max_resident_bytes is refused with
    ENOSPC at once. (It used to be filled; the evictor then evicted every other resident file, and
    the big file itself once it was closed.)"""
    src = loopfs.fresh_dir("overbudget")
    os.chmod(src, 0o755)
    try:
        rnd = random.Random(9)
        others = {f"theirs{i}": rnd.randbytes(MiB) for i in range(5)}
        for rel, b in others.items():
            write_file(os.path.join(src, rel), b, VICTIM)
        write_file(os.path.join(src, "big"), rnd.randbytes(12 * MiB), OWNER)
        cfg = tmp_path / "budget.toml"
        cfg.write_text(BUDGET_POLICY)
        v = views(src, "--config", str(cfg))
        for rel, b in others.items():
            got = as_user(VICTIM, timed_read, v.path(rel))
            assert got.get("sha") == sha(b), show(got)
        for rel in others:
            wait_for(lambda rel=rel: state.state_in_store(store_file(v, rel)) is state.FileState.RESIDENT,
                     f"{rel} committed resident", timeout=60)

        got = as_user(NOBODY, timed_read, v.path("big"))
        time.sleep(2)  # a fill that went ahead commits, and its commit wakes the evictor
        still = {rel: (state.state_in_store(store_file(v, rel)).value,
                       tree.resident_bytes(os.lstat(store_file(v, rel)))) for rel in others}
        f = v.status()["filler"]
        assert got.get("errno") == errno.ENOSPC and got["secs"] < FAST, \
            f"{show(got)}; then {f['evictions']} evictions, the others: {still}"
        assert all(s == ("resident", MiB) for s in still.values()), f"evicted for a fill that could not fit: {still}"
        assert f["evictions"] == 0, f
        line = log_says(v, "big", "more than the whole space budget")
        assert "readers get ENOSPC" in line, line
        assert_still_stub(v, "big")
        print(f"\n{loopfs.fstype}: 12 MiB under an 8 MiB budget: {show(got)}; log: {line}")
    finally:
        shutil.rmtree(src, ignore_errors=True)


# -- the suspected item: a lease on a source file -----------------------------------------------------


def leases_of(pid: int) -> list[str]:
    with open("/proc/locks") as f:
        return [line for line in f if "LEASE" in line and f" {pid} " in line]


def test_source_lease_does_not_stall_fills(loopfs: LoopFS, views: Callable[..., View],
                                           children: Callable[[Callable[[], None]], int]) -> None:
    """The owner of a source file holds a write lease on it (ignoring the break signal). A read of its
    stub through the view must not wait out lease-break-time: the fill opens the source non-blocking,
    which fails with EWOULDBLOCK instead of waiting, and the reader gets the policy's error at once.
    Once the lease is gone, the same read gets the source's bytes."""
    src = loopfs.fresh_dir("lease")
    os.chmod(src, 0o755)
    rnd = random.Random(8)
    data = {"leased": rnd.randbytes(40000), "free": rnd.randbytes(30000)}
    for rel, b in data.items():
        write_file(os.path.join(src, rel), b, OWNER)
    v = views(src)
    path = os.path.join(src, "leased")

    r, w = os.pipe()

    def hold() -> None:  # runs as OWNER (nobody), the file's owner
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # a break is asked for; the holder does not give in
        fd = os.open(path, os.O_RDONLY)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
        os.write(w, b"1")
        while True:
            time.sleep(60)

    holder = children(hold)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 60)
        assert ready and os.read(r, 1) == b"1", "the owner could not take a write lease on their file"
    finally:
        os.close(r)
    assert leases_of(holder), "no lease of the owner's in /proc/locks"
    with open("/proc/sys/fs/lease-break-time") as f:
        break_time = int(f.read())

    got = as_user(READER, timed_read, v.path("leased"))
    assert got["secs"] < min(FAST, break_time / 2), f"the read waited on the owner's lease: {show(got)}"
    assert got.get("errno") == errno.EIO, show(got)
    line = log_says(v, "leased", "another process holds a lease on the source file")
    assert_still_stub(v, "leased")
    ok = as_user(READER, timed_read, v.path("free"))
    assert ok.get("sha") == sha(data["free"]) and ok["secs"] < FAST, show(ok)

    os.kill(holder, signal.SIGKILL)  # its fd closes, the lease goes (the children fixture reaps it)
    wait_for(lambda: not leases_of(holder), "the lease to go", timeout=30)
    after = as_user(READER, timed_read, v.path("leased"))
    assert after.get("sha") == sha(data["leased"]), show(after)
    print(f"\n{loopfs.fstype}: leased: {show(got)}; log: {line}; after the lease: {show(after)}")
