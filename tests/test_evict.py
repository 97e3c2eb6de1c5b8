"""hsmfs evict, pin/unpin and prefetch on live views and offline stores, on ext4, xfs and btrfs.

Real mounts, real kernel events, real bytes compared with the source: an evicted file frees its
blocks and reads as its source again (never zeros, even for readers racing the eviction through
the view or a bind mount); a file anyone uses, a user changed or pinned stays as it is, and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import helpers
import pytest
from conftest import LoopFS, View, hsmfs
from helpers import cat

from hsmfs import state, tree
from hsmfs.views import is_mountpoint

MiB = 1 << 20
# not block-aligned on purpose: a partial last block that survives the punch as zeros would make the
# refill take it for a user's bytes and serve zeros
SIZES = {"a4095": 4095, "b300001": 300_001, "c5m17": 5 * MiB + 17, "d4096": 4096,
         "dir/e1": 1, "dir/f70001": 70_001, "dir/sub/g1m3": MiB + 3}
IN_USE = "in use (open, mapped or running)"
DIRTY = "dirty (changed by a user)"
PINNED = "pinned"
STUB = "already a stub"
NEAR_ZERO = 0  # what an evicted file may still hold on disk: ext4, xfs and btrfs keep nothing


# -- helpers ---------------------------------------------------------------------------------------

def make_source(root: str, sizes: dict[str, int] = SIZES, *, sleep_bin: bool = False) -> str:
    src = helpers.make_source(root, sizes, seed=2024)[0]
    if sleep_bin:
        shutil.copy2(shutil.which("sleep") or "/bin/sleep", os.path.join(src, "sleep-bin"))
    return src


def src_bytes(v: View, rel: str) -> bytes:
    with open(os.path.join(v.source, rel), "rb") as f:
        return f.read()


def store_path(v: View, rel: str) -> str:
    return os.path.join(v.store, "tree", rel)


def on_disk(v: View, rel: str) -> int:
    """Bytes of blocks the file holds in the store (lstat raises no event)."""
    return os.lstat(store_path(v, rel)).st_blocks * 512


def du(path: str) -> int:
    out = subprocess.run(["du", "-B1", path], capture_output=True, text=True, timeout=30, check=True).stdout
    return int(out.split()[0])


def stat_of(path: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = json.loads(hsmfs("stat", "--json", path).stdout)
    assert len(rows) == 1, rows
    return rows[0]


def pinned(v: View, rel: str) -> bool:
    log_ = state.StateLog(v.store)
    try:
        return log_.pinned(state.key_at(store_path(v, rel)))
    finally:
        log_.close()


def record_state(path: str) -> str:
    """The state hsmfs stat would print, read here directly (getxattr and lstat raise no event)."""
    return state.state_in_store(path).value


def wait_state(path: str, state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while record_state(path) != state:
        assert time.monotonic() < deadline, f"{path} is {record_state(path)}, not {state}, after {timeout} s"
        time.sleep(0.05)
    assert stat_of(path)["state"] == state


def evict(*paths: str, rc: int = 0) -> list[dict[str, Any]]:
    r = hsmfs("evict", "--json", *paths, check=False)
    assert r.returncode == rc, f"hsmfs evict {paths}: exit {r.returncode}, wanted {rc}\n{r.stdout}\n{r.stderr}"
    out: list[dict[str, Any]] = json.loads(r.stdout)
    assert "hsmfs: evicted" in r.stderr  # the summary line
    return out


def evict_one(path: str, rc: int = 0) -> dict[str, Any]:
    out = evict(path, rc=rc)
    assert len(out) == 1 and out[0]["path"] == path, out
    return out[0]


def fill(v: View, rel: str) -> None:
    """Read rel through the view (source bytes) and wait for its resident commit."""
    assert cat(v.path(rel)) == src_bytes(v, rel), rel
    wait_state(store_path(v, rel), "resident")


def evict_and_check(v: View, rel: str) -> dict[str, Any]:
    """Evict a resident file; its blocks go, freed says how many, the stub reads as its source."""
    before = on_disk(v, rel)
    assert before >= os.lstat(store_path(v, rel)).st_size, (rel, before)  # resident: all its blocks
    res = evict_one(v.path(rel))
    assert res["evicted"] is True and res["reason"] == "", res
    after = on_disk(v, rel)
    assert after <= NEAR_ZERO, f"{rel}: {after} bytes still on disk after eviction (had {before})"
    assert res["freed"] == before - after, (rel, res, before, after)
    info = stat_of(v.path(rel))
    assert info["state"] == "stub" and info["resident_bytes"] == min(after, info["size"]), info
    assert info["size"] == len(src_bytes(v, rel))
    return res


class Procs:
    """Processes a test starts; whatever still runs at teardown is killed (by pid, ours only)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            for s in (p.stdin, p.stdout, p.stderr):
                if s is not None:
                    s.close()


@pytest.fixture
def procs(make_view: Callable[..., View]) -> Iterator[Procs]:
    """Torn down before make_view's views, which a live process would keep busy."""
    ps = Procs()
    yield ps
    ps.close()


@pytest.fixture
def view(loopfs: LoopFS, make_view: Callable[..., View]) -> View:
    return make_view(make_source(loopfs.fresh_dir("src"), sleep_bin=True), "--config", no_fill_ahead(loopfs))


def no_fill_ahead(loopfs: LoopFS) -> str:
    """A policy without fill-ahead: these tests say which files are resident, one by one. Commits
    come every 0.1 s (0.5 by default): most of these tests wait for a fill's commit."""
    path = os.path.join(loopfs.base, "no-fill-ahead.toml")
    with open(path, "w") as f:
        f.write("fill_ahead = false\ncommit_interval = 0.1\n")
    return path


@pytest.fixture
def bind_of(loopfs: LoopFS, make_view: Callable[..., View]) -> Iterator[Callable[[View], str]]:
    """bind_of(view) -> a bind mount of the view (unwatched by its mount mark), unmounted at teardown."""
    made: list[str] = []

    def bind(v: View) -> str:
        d = tempfile.mkdtemp(prefix="bind-", dir=loopfs.base)
        made.append(d)
        subprocess.run(["mount", "--bind", v.target, d], check=True)
        return d

    yield bind
    for d in made:
        if is_mountpoint(d) and subprocess.run(["umount", d]).returncode != 0:
            subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


# -- 1. evict, then read again -----------------------------------------------------------------

def test_evict_frees_blocks_and_refills_source_bytes(view: View) -> None:
    for rel in SIZES:
        fill(view, rel)
    rel = "c5m17"
    assert du(store_path(view, rel)) == on_disk(view, rel) >= SIZES[rel] - 4096
    for rel in SIZES:
        evict_and_check(view, rel)
        assert du(store_path(view, rel)) == on_disk(view, rel)
        got = cat(view.path(rel))
        assert got == src_bytes(view, rel), f"{rel}: refill after eviction differs from the source"
        wait_state(store_path(view, rel), "resident")
        assert on_disk(view, rel) >= SIZES[rel]  # refilled: all its blocks again
    # the view's files are still the source's in every byte, and the source is untouched
    for rel in SIZES:
        assert cat(view.path(rel)) == src_bytes(view, rel), rel


def test_evict_twice_in_a_row(view: View) -> None:
    for rel in ("b300001", "a4095"):
        fill(view, rel)
        evict_and_check(view, rel)
        # a second eviction of the stub changes nothing and says why
        again = evict_one(view.path(rel))
        assert again == {"path": view.path(rel), "evicted": False, "reason": STUB, "freed": 0}
        assert on_disk(view, rel) <= NEAR_ZERO
        # fill, evict, fill again: every round gives the source's bytes
        for _ in range(2):
            fill(view, rel)
            evict_and_check(view, rel)
        assert cat(view.path(rel)) == src_bytes(view, rel)


def test_evict_directory_recursively(view: View) -> None:
    rels = [r for r in SIZES if r.startswith("dir/")]
    for rel in rels:
        fill(view, rel)
    fill(view, "a4095")  # outside dir: must stay resident
    with open(view.path("dir/sub/mine.txt"), "wb") as f:  # a user's own file: not from the source
        f.write(b"user data" * 1000)
    before = {rel: on_disk(view, rel) for rel in rels}
    out = evict(view.path("dir"))
    assert sorted(r["path"] for r in out) == sorted(view.path(rel) for rel in [*rels, "dir/sub/mine.txt"])
    mine = next(r for r in out if r["path"] == view.path("dir/sub/mine.txt"))
    assert mine == {"path": view.path("dir/sub/mine.txt"), "evicted": False,
                    "reason": "not from the source (made by a user)", "freed": 0}
    assert cat(view.path("dir/sub/mine.txt")) == b"user data" * 1000
    for r in out:
        if r is mine:
            continue
        rel = os.path.relpath(r["path"], view.target)
        assert r["evicted"] is True, r
        assert r["freed"] == before[rel] - on_disk(view, rel), (r, before[rel])
        assert on_disk(view, rel) <= NEAR_ZERO
        assert stat_of(view.path(rel))["state"] == "stub"
    assert record_state(store_path(view, "a4095")) == "resident"
    for rel in rels:
        assert cat(view.path(rel)) == src_bytes(view, rel), rel


# -- 2. readers racing evictions ----------------------------------------------------------------

READER = r"""
import hashlib, json, os, random, sys, time
path, source, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(source, "rb") as f:
    want = f.read()
rnd = random.Random(os.getpid())
reads = bad = 0
errors = []
first_bad = None
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if rnd.random() < 0.5:  # whole file, as cat does
                chunks = []
                while True:
                    b = os.read(fd, 1 << 20)
                    if not b:
                        break
                    chunks.append(b)
                got, off = b"".join(chunks), 0
                ok = got == want
            else:  # a few pages here and there, the last partial one included
                ok = True
                for off in [len(want) - 1 - (len(want) - 1) % 4096] + [rnd.randrange(len(want)) for _ in range(3)]:
                    got = os.pread(fd, 8192, off)
                    if got != want[off:off + 8192]:
                        ok = False
                        break
        finally:
            os.close(fd)
        reads += 1
        if not ok:
            bad += 1
            if first_bad is None:
                exp = want[off:off + len(got)] if off else want
                at = next((i for i in range(min(len(got), len(exp))) if got[i] != exp[i]), min(len(got), len(exp)))
                tail = got[at:at + 64]
                first_bad = {"offset": off + at, "len": len(got), "zeros": tail == bytes(len(tail))}
    except OSError as e:
        errors.append(f"{type(e).__name__}: {e}")
    time.sleep(rnd.uniform(0, 0.015))
print(json.dumps({"reads": reads, "bad": bad, "first_bad": first_bad, "errors": errors[:5], "nerrors": len(errors)}))
"""

HAMMER_SECONDS = 6.0


@pytest.mark.parametrize("through", ["view", "bind"])
def test_readers_racing_evictions_never_see_zeros(loopfs: LoopFS, make_view: Callable[..., View], procs: Procs,
                                                  bind_of: Callable[[View], str], through: str) -> None:
    rel = "hot.bin"
    v = make_view(make_source(loopfs.fresh_dir("src"), {rel: 2 * MiB + 4097}), "--config", no_fill_ahead(loopfs))
    fill(v, rel)
    root = bind_of(v) if through == "bind" else v.target
    path = os.path.join(root, rel)
    fills0 = v.status()["filler"]["fills"]
    readers = [procs.start([sys.executable, "-c", READER, path, os.path.join(v.source, rel), str(HAMMER_SECONDS)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    evicted = in_use = other = 0
    freed = 0
    deadline = time.monotonic() + HAMMER_SECONDS - 0.5
    while time.monotonic() < deadline:
        r = hsmfs("evict", "--json", v.path(rel), check=False)  # evict names it in the view
        assert r.returncode in (0, 75), f"hsmfs evict: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        (res,) = json.loads(r.stdout)
        if res["evicted"]:
            evicted += 1
            freed += res["freed"]
        elif res["reason"] in (IN_USE, "being filled", STUB):
            in_use += 1
        else:
            other += 1
            raise AssertionError(f"unexpected eviction result while readers run: {res}")
    results = []
    for p in readers:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out))
    for res in results:
        assert res["reads"] > 10, results
        assert res["bad"] == 0 and res["nerrors"] == 0, f"readers through the {through} saw wrong bytes: {results}"
    # otherwise this test proves nothing: evictions happened and readers refilled the stub
    assert evicted > 0, f"no eviction succeeded ({in_use} refused) while 4 readers ran"
    print(f"{through}: {evicted} evictions, {in_use} refused, reads {[x['reads'] for x in results]}")
    assert freed > 0
    # every eviction after the first needed a refill in between (or it would have found a stub)
    assert v.status()["filler"]["fills"] - fills0 >= evicted - 1
    assert cat(path) == src_bytes(v, rel)


# -- 3. files that are not evicted, and why --------------------------------------------------

HOLD_OPEN = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.read(fd, 100)
print("ready", flush=True)
sys.stdin.read()
"""

HOLD_MAPPED = r"""
import ctypes, hashlib, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED (no dup of fd, unlike Python's mmap)
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
print(hashlib.sha256(ctypes.string_at(addr, size)).hexdigest(), flush=True)
sys.stdin.read()
print(hashlib.sha256(ctypes.string_at(addr, size)).hexdigest(), flush=True)
"""


def _holds(pid: int, path: str) -> tuple[bool, bool]:
    """(has an fd on path, has path mapped) for process pid."""
    real = os.path.realpath(path)
    fds = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except OSError:
            pass
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return real in fds, real in maps


def all_backed(path: str) -> bool:
    """Every byte of the file still has its block (nothing punched). Not an exact block count: xfs
    trims speculative and copy-on-write preallocations in the background."""
    st = os.lstat(path)
    return tree.resident_bytes(st) == st.st_size


def _kept(v: View, rel: str, blocks: int) -> None:
    assert all_backed(store_path(v, rel)) and on_disk(v, rel) >= min(blocks, SIZES.get(rel, 0)), \
        f"{rel}: blocks freed by a refused eviction ({blocks} before, {on_disk(v, rel)} now)"
    assert cat(v.path(rel)) == src_bytes(v, rel)


def test_open_file_not_evicted_until_closed(view: View, procs: Procs) -> None:
    rel = "b300001"
    fill(view, rel)
    blocks = on_disk(view, rel)
    holder = procs.start([sys.executable, "-c", HOLD_OPEN, view.path(rel)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == b"ready\n"
    assert _holds(holder.pid, view.path(rel))[0]
    res = evict_one(view.path(rel), rc=75)
    assert res == {"path": view.path(rel), "evicted": False, "reason": IN_USE, "freed": 0}
    _kept(view, rel, blocks)
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    evict_and_check(view, rel)
    assert cat(view.path(rel)) == src_bytes(view, rel)


def test_mapped_file_without_fd_not_evicted(view: View, procs: Procs) -> None:
    rel = "c5m17"
    fill(view, rel)
    blocks = on_disk(view, rel)
    want = hashlib.sha256(src_bytes(view, rel)).hexdigest().encode() + b"\n"
    holder = procs.start([sys.executable, "-c", HOLD_MAPPED, view.path(rel)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == want
    assert _holds(holder.pid, view.path(rel)) == (False, True)  # mapped, no fd: only the lease sees it
    res = evict_one(view.path(rel), rc=75)
    assert res["evicted"] is False and res["reason"] == IN_USE, res
    _kept(view, rel, blocks)
    holder.stdin.close()
    assert holder.stdout.readline() == want  # the mapping still shows the source's bytes
    assert holder.wait(timeout=30) == 0
    evict_and_check(view, rel)
    assert cat(view.path(rel)) == src_bytes(view, rel)


def test_running_binary_not_evicted(view: View, procs: Procs) -> None:
    rel = "sleep-bin"
    prog = procs.start([view.path(rel), "600"])
    deadline = time.monotonic() + 30
    while True:  # until the exec is done (its exe is the view's file)
        try:
            if os.readlink(f"/proc/{prog.pid}/exe") == os.path.realpath(view.path(rel)):
                break
        except OSError:
            pass
        assert prog.poll() is None, "the binary from the view did not run"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    wait_state(store_path(view, rel), "resident")
    blocks = on_disk(view, rel)
    res = evict_one(view.path(rel), rc=75)
    assert res["evicted"] is False and res["reason"] == IN_USE, res
    assert prog.poll() is None
    _kept(view, rel, blocks)
    prog.kill()
    prog.wait(timeout=30)
    evict_and_check(view, rel)
    assert cat(view.path(rel)) == src_bytes(view, rel)
    assert subprocess.run([view.path(rel), "0"], timeout=60).returncode == 0


def test_modified_file_not_evicted(view: View) -> None:
    rel = "b300001"
    fill(view, rel)
    subprocess.run([sys.executable, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); "
                    "os.pwrite(fd, b'USER BYTES', 123457); os.close(fd)", view.path(rel)], check=True, timeout=60)
    want = bytearray(src_bytes(view, rel))
    want[123457:123467] = b"USER BYTES"
    wait_state(store_path(view, rel), "dirty")
    res = evict_one(view.path(rel), rc=0)
    assert res == {"path": view.path(rel), "evicted": False, "reason": DIRTY, "freed": 0}
    assert all_backed(store_path(view, rel)), on_disk(view, rel)
    assert cat(view.path(rel)) == bytes(want)
    assert stat_of(view.path(rel))["state"] == "dirty"


@pytest.mark.parametrize("first", ["resident", "stub"])
def test_truncated_file_not_evicted(view: View, first: str) -> None:
    rel = "c5m17"
    if first == "resident":
        fill(view, rel)
    subprocess.run([sys.executable, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_TRUNC); "
                    "os.write(fd, b'new content'); os.close(fd)", view.path(rel)], check=True, timeout=60)
    wait_state(store_path(view, rel), "dirty")
    res = evict_one(view.path(rel), rc=0)
    assert res == {"path": view.path(rel), "evicted": False, "reason": DIRTY, "freed": 0}
    assert all_backed(store_path(view, rel)), on_disk(view, rel)
    assert cat(view.path(rel)) == b"new content"
    assert stat_of(view.path(rel))["state"] == "dirty"


def test_pinned_file_not_evicted_until_unpinned(view: View) -> None:
    rel = "c5m17"
    fill(view, rel)
    r = hsmfs("pin", view.path(rel))
    assert "pinned" in r.stdout and view.path(rel) in r.stdout
    blocks = on_disk(view, rel)
    assert pinned(view, rel)
    res = evict_one(view.path(rel), rc=0)
    assert res == {"path": view.path(rel), "evicted": False, "reason": PINNED, "freed": 0}
    # a directory eviction skips it too
    out = evict(view.target)
    assert next(x for x in out if x["path"] == os.path.join(view.target, rel))["reason"] == PINNED
    _kept(view, rel, blocks)
    hsmfs("unpin", view.path(rel))
    assert not pinned(view, rel)
    evict_and_check(view, rel)
    assert cat(view.path(rel)) == src_bytes(view, rel)


def test_file_whose_source_changed_not_evicted(view: View) -> None:
    """Evicting a file whose source has changed would lose the only copy of its bytes."""
    rel = "dir/f70001"
    fill(view, rel)
    want = src_bytes(view, rel)
    with open(os.path.join(view.source, rel), "r+b") as f:
        f.write(b"NEW SOURCE BYTES")
    res = evict_one(view.path(rel), rc=0)
    assert res["evicted"] is False and "source changed" in res["reason"] and res["freed"] == 0, res
    assert all_backed(store_path(view, rel)), on_disk(view, rel)
    assert cat(view.path(rel)) == want  # the bytes it was filled with, not lost
    assert stat_of(view.path(rel))["state"] == "resident"


# -- 4. offline: a store no mount serves -------------------------------------------------------

def _umount(v: View) -> None:
    hsmfs("umount", v.target)
    v.mounted = False
    assert not is_mountpoint(v.target)


def test_evict_offline_store_then_mount_again(view: View, procs: Procs) -> None:
    for rel in ("c5m17", "a4095", "dir/f70001", "dir/sub/g1m3"):
        fill(view, rel)
    _umount(view)
    rel = "c5m17"
    p = store_path(view, rel)
    before = on_disk(view, rel)
    # in use offline too: the lease sees an fd on the store's file
    holder = procs.start([sys.executable, "-c", HOLD_OPEN, p], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == b"ready\n"
    assert evict_one(p, rc=75) == {"path": p, "evicted": False, "reason": IN_USE, "freed": 0}
    assert all_backed(p) and on_disk(view, rel) >= SIZES[rel], on_disk(view, rel)
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    res = evict_one(p)
    assert res["evicted"] is True and res["freed"] == before - on_disk(view, rel), (res, before)
    assert on_disk(view, rel) <= NEAR_ZERO
    assert stat_of(p)["state"] == "stub"
    # a directory in the store, recursively; a4095 stays
    before_dir = {r: on_disk(view, r) for r in ("dir/f70001", "dir/sub/g1m3")}
    out = evict(store_path(view, "dir"))
    got = {os.path.relpath(x["path"], os.path.join(view.store, "tree")): x for x in out}
    assert got["dir/e1"]["reason"] == STUB
    for r, b in before_dir.items():
        assert got[r]["evicted"] is True and got[r]["freed"] == b - on_disk(view, r), got[r]
        assert on_disk(view, r) <= NEAR_ZERO
    assert record_state(store_path(view, "a4095")) == "resident"
    view.mount()
    for r in ("c5m17", "a4095", "dir/f70001", "dir/sub/g1m3", "dir/e1"):
        assert cat(view.path(r)) == src_bytes(view, r), r
    wait_state(p, "resident")


def test_pin_survives_umount_and_mount(view: View) -> None:
    rel = "b300001"
    fill(view, rel)
    hsmfs("pin", view.path(rel))
    _umount(view)
    assert evict_one(store_path(view, rel))["reason"] == PINNED  # offline too
    view.mount()
    blocks = on_disk(view, rel)
    assert evict_one(view.path(rel)) == {"path": view.path(rel), "evicted": False, "reason": PINNED, "freed": 0}
    _kept(view, rel, blocks)
    hsmfs("unpin", view.path(rel))
    evict_and_check(view, rel)
    assert cat(view.path(rel)) == src_bytes(view, rel)


# -- 5. prefetch ---------------------------------------------------------------------------------

def test_prefetch_fills_everything_once(view: View) -> None:
    rels = [r for r in SIZES if r.startswith("dir/")]
    for rel in rels:
        assert record_state(store_path(view, rel)) == "stub"
    fills0 = view.status()["filler"]["fills"]
    hsmfs("prefetch", "--jobs", "3", view.path("dir"))
    for rel in rels:
        wait_state(store_path(view, rel), "resident")
        assert stat_of(view.path(rel))["resident_bytes"] == SIZES[rel]
    assert record_state(store_path(view, "a4095")) == "stub"  # outside the directory
    fills = view.status()["filler"]["fills"]
    assert fills - fills0 == len(rels)
    for rel in rels:
        assert cat(view.path(rel)) == src_bytes(view, rel), rel
    assert view.status()["filler"]["fills"] == fills  # resident: reading raised no fill


def test_prefetch_without_running_mount(view: View) -> None:
    _umount(view)
    p = store_path(view, "dir")
    r = hsmfs("prefetch", p, check=False)
    assert r.returncode == 66, (r.stdout, r.stderr)
    assert "no running hsmfs mount" in r.stderr
    for rel in SIZES:
        assert record_state(store_path(view, rel)) == "stub"
        assert on_disk(view, rel) == 0


# -- 6. bad input --------------------------------------------------------------------------------

def test_evict_bad_paths_change_nothing(view: View, loopfs: LoopFS) -> None:
    rel = "b300001"
    fill(view, rel)
    blocks = on_disk(view, rel)
    r = hsmfs("evict", "/nonexistent-hsmfs-path", check=False)
    assert r.returncode == 66 and "/nonexistent-hsmfs-path does not exist" in r.stderr, (r.stdout, r.stderr)
    plain = os.path.join(loopfs.fresh_dir("plain"), "file")
    with open(plain, "wb") as f:
        f.write(b"x" * 100_000)
    pblocks = os.lstat(plain).st_blocks
    r = hsmfs("evict", plain, check=False)
    assert r.returncode == 66 and "is not in an hsmfs view or store" in r.stderr, (r.stdout, r.stderr)
    assert all_backed(plain) and os.lstat(plain).st_blocks >= min(pblocks, 100_000 // 512)
    with open(plain, "rb") as f:
        assert f.read() == b"x" * 100_000
    # one bad path among good ones: nothing is done at all
    r = hsmfs("evict", view.path(rel), "/nonexistent-hsmfs-path", check=False)
    assert r.returncode == 66 and "does not exist" in r.stderr, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert record_state(store_path(view, rel)) == "resident"
    _kept(view, rel, blocks)


# -- 7. status and stat --------------------------------------------------------------------------

def test_status_counts_evictions_and_stat_of_pinned(view: View) -> None:
    rel = "c5m17"
    fill(view, rel)
    f0 = view.status()["filler"]
    res = evict_and_check(view, rel)
    f1 = view.status()["filler"]
    assert f1["evictions"] == f0["evictions"] + 1
    assert f1["evicted_bytes"] == f0["evicted_bytes"] + res["freed"]
    assert res["freed"] >= SIZES[rel] - 4096
    # refused evictions are not counted
    fill(view, rel)
    hsmfs("pin", view.path(rel))
    assert evict_one(view.path(rel))["reason"] == PINNED
    f2 = view.status()["filler"]
    assert (f2["evictions"], f2["evicted_bytes"]) == (f1["evictions"], f1["evicted_bytes"])
    info = stat_of(view.path(rel))
    assert info["state"] == "resident" and info["resident_bytes"] == SIZES[rel] and info["pinned"] is True, info
    assert stat_of(store_path(view, rel))["pinned"] is True
    text = hsmfs("stat", view.path(rel)).stdout.split()
    assert text[:2] == ["resident", "pinned"] and text[-1] == view.path(rel), text
    hsmfs("unpin", view.path(rel))
    assert stat_of(view.path(rel))["pinned"] is False
    assert "pinned" not in hsmfs("stat", view.path(rel)).stdout.split()


def test_evict_store_path_of_live_mount_goes_through_filler(view: View) -> None:
    """STORE/tree/FILE of a mounted store is evicted by its filler (marks and all): the view reads it again."""
    rel = "b300001"
    fill(view, rel)
    f0 = view.status()["filler"]
    before = on_disk(view, rel)
    res = evict_one(store_path(view, rel))
    assert res["evicted"] is True and res["freed"] == before - on_disk(view, rel), res
    f1 = view.status()["filler"]
    assert f1["evictions"] == f0["evictions"] + 1 and f1["evicted_bytes"] == f0["evicted_bytes"] + res["freed"]
    assert cat(view.path(rel)) == src_bytes(view, rel)
    wait_state(store_path(view, rel), "resident")


def test_pinned_stub_holds_no_bytes(view: View) -> None:
    """Pinning a stub fetches nothing: hsmfs stat says it holds 0 bytes (its size is all holes)."""
    rel = "c5m17"
    hsmfs("pin", view.path(rel))
    info = stat_of(view.path(rel))
    assert info["state"] == "stub" and info["pinned"] is True, info
    assert info["resident_bytes"] == 0, f"a pinned stub reports {info['resident_bytes']} bytes on disk: {info}"
    summary = view.status()["states"]["stub"]
    assert summary["resident_bytes"] == 0, summary
