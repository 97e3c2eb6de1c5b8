"""The space budget (max_resident_bytes, watermarks, LRU by atime) and a full store, on ext4, xfs and btrfs.

Readers are separate processes under a timeout: a hung fill fails the test, not the suite. Resident
bytes are measured the way ``du`` sees them: the blocks of every file in STORE/tree (lstat only,
which raises no event), each capped at its size, like hsmfs.tree.resident_bytes.

On xfs and btrfs the budget tests' source and store share a filesystem, so fills are reflinks
(copy_file_range); a reflinked file's st_blocks still counts its blocks, so the figures are the
same as for a copy. The full-store tests put the store on a small filesystem of its own (a real
copy, by sendfile: copy_file_range refuses to cross filesystems there).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
from conftest import LoopFS, View, hsmfs
from helpers import LoopImage

from hsmfs import state, tree
from hsmfs.views import is_mountpoint

KiB, MiB = 1 << 10, 1 << 20

# budget: 8 MiB, high 0.9, low 0.8; files of 512 KiB, so high holds 14.4 files and low 12.8
LIMIT = 8 * MiB
HIGH = int(LIMIT * 0.9)
LOW = int(LIMIT * 0.8)
FILE = 512 * KiB
# a short commit period: each read waits for its own commit, and 48 of them at the default 0.5 s add up
BUDGET_POLICY = """# space budget for tests/test_budget.py
max_resident_bytes = "8M"
high_watermark = 0.9
low_watermark = 0.8
commit_interval = 0.05
"""
CATCH_UP = 30.0  # seconds the evictor (a background thread woken after commits) gets to come back under high

READ = r"""
import hashlib, sys
try:
    with open(sys.argv[1], "rb") as f:
        data = f.read()
except OSError as e:
    print("errno", e.errno)
else:
    print("sha", hashlib.sha256(data).hexdigest(), len(data))
"""


# -- helpers -----------------------------------------------------------------------------------------
def make_files(root: str, names: list[str], size: int, seed: int) -> dict[str, str]:
    """Files of random bytes (no holes) under root; {name: sha256}."""
    rnd = random.Random(seed)
    out = {}
    for name in names:
        h = hashlib.sha256()
        with open(os.path.join(root, name), "wb") as f:
            left = size
            while left:
                chunk = rnd.randbytes(min(left, 4 * MiB))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        out[name] = h.hexdigest()
    return out


def cat_sha(path: str, v: Optional[View] = None) -> str:
    """sha256 of what cat reads from path (a child process under a timeout); v's log tail if it fails."""
    return hashlib.sha256(cat_bytes(path, v)).hexdigest()


def cat_bytes(path: str, v: Optional[View] = None) -> bytes:
    r = subprocess.run(["cat", path], capture_output=True, timeout=60)
    assert r.returncode == 0, f"cat {path} failed ({r.returncode}): {r.stderr.decode()}" + \
        (f"\n{v.status()['filler']}\n--- log:\n{v.log[-4000:]}" if v is not None else "")
    return r.stdout


def compare(got: bytes, source: str) -> str:
    """Where got differs from the source file, by 4 KiB page."""
    with open(source, "rb") as f:
        want = f.read()
    bad = [i for i in range(0, max(len(want), len(got)), 4096) if got[i:i + 4096] != want[i:i + 4096]]
    zero = [i for i in bad if not got[i:i + 4096].strip(b"\0")]
    return (f"{len(got)} bytes of {len(want)}, {len(bad)} pages differ ({len(zero)} all zeros), "
            f"offsets {bad[0] if bad else None}..{bad[-1] + 4096 if bad else None}")


def read_outcome(path: str, timeout: float = 60) -> list[str]:
    """["errno", N] or ["sha", HEX, LEN] from a reader process; a hang fails as TimeoutExpired."""
    r = subprocess.run([sys.executable, "-c", READ, path], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def resident_total(store: str) -> int:
    """Bytes held by the files of STORE/tree, as du sees them (capped at size)."""
    total = 0
    seen: set[int] = set()
    for dirpath, _dirs, names in os.walk(os.path.join(store, "tree")):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if os.path.isfile(os.path.join(dirpath, n)) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += tree.resident_bytes(st)
    return total


def store_state(store: str, rel: str) -> tuple[str, int]:
    """(state, resident bytes) of rel from its store record and blocks (no open, no event)."""
    p = os.path.join(store, "tree", rel)
    st = os.lstat(p)
    return state.state_in_store(p).value, tree.resident_bytes(st)


def stat_json(paths: list[str]) -> dict[str, dict[str, Any]]:
    """hsmfs stat --json, keyed by basename."""
    rows = json.loads(hsmfs("stat", "--json", *paths).stdout)
    return {os.path.basename(r["path"]): r for r in rows}


def settle(v: View, rel: str, observed: list[int]) -> int:
    """Wait (bounded) until rel's fill is committed and the tree is back under the high watermark.

    Every total seen while waiting goes into observed; returns the last one.
    """
    deadline = time.monotonic() + CATCH_UP
    while True:
        total = resident_total(v.store)
        observed.append(total)
        state, held = store_state(v.store, rel)
        if state == "resident" and held == FILE and total <= HIGH:
            return total
        if time.monotonic() > deadline:
            raise AssertionError(f"after reading {rel}: {total} bytes resident (high {HIGH}), {rel} is {state} "
                                 f"holding {held}, {CATCH_UP:.0f} s on\n{v.status()['filler']}\n{v.log[-3000:]}")
        time.sleep(0.02)


def wait_quiet(v: View, timeout: float = 30) -> dict[str, Any]:
    """Wait until no fill is running or waiting for its commit; the filler's status."""
    deadline = time.monotonic() + timeout
    while True:
        f: dict[str, Any] = v.status()["filler"]
        if f["inflight"] == 0 and f["pending_commit"] == 0:
            return f
        assert time.monotonic() < deadline, f"fills still running {timeout:.0f} s on: {f}"
        time.sleep(0.1)


@pytest.fixture
def budget_view(loopfs: LoopFS, make_view: Callable[..., View], tmp_path: Any) -> Iterator[tuple[View, dict[str, str]]]:
    """A view of 48 files of 512 KiB (3 x the budget) under an 8 MiB budget; (view, {name: sha})."""
    src = loopfs.fresh_dir("budget-src")
    v: Optional[View] = None
    try:
        names = [f"f{i:03d}.bin" for i in range(48)]
        shas = make_files(src, names, FILE, seed=7)
        cfg = tmp_path / "budget.toml"
        cfg.write_text(BUDGET_POLICY)
        v = make_view(src, "--config", str(cfg))
        yield v, shas
    finally:
        if v is not None:
            v.close()  # before its source goes (make_view's teardown then finds it closed)
        shutil.rmtree(src, ignore_errors=True)


# -- 1. the budget -----------------------------------------------------------------------------------
def test_budget_keeps_resident_bytes_under_high_watermark(budget_view: tuple[View, dict[str, str]]) -> None:
    v, shas = budget_view
    names = sorted(shas)
    budget = v.status()["filler"]["budget"]
    assert budget["max_resident_bytes"] == LIMIT and budget["high"] == HIGH and budget["low"] == LOW, budget
    assert resident_total(v.store) == 0

    observed: list[int] = []
    for name in names:
        assert cat_sha(v.path(name)) == shas[name], f"{name}: not the source's bytes"
        observed.append(resident_total(v.store))  # right after the read: before the evictor caught up
        settle(v, name, observed)
    final = resident_total(v.store)
    peak = max(observed)
    f = wait_quiet(v)
    print(f"\n{v.fs.fstype}: read {len(names) * FILE} bytes; resident peak {peak} (high {HIGH}, low {LOW}), final "
          f"{final}; evictions {f['evictions']} ({f['evicted_bytes']} bytes), budget says {f['budget']}")

    # Reads are one at a time and each waits for its commit and for the tree to be back under high,
    # so at most one fill (one file) is ever on top of a state <= high: that is the slack.
    assert peak <= HIGH + FILE, f"resident bytes reached {peak}, high watermark {HIGH} + one file {FILE}"
    assert final <= HIGH
    assert len(names) * FILE - final == f["evicted_bytes"], \
        "every byte read and no longer resident was counted as evicted"
    assert f["evictions"] >= len(names) - HIGH // FILE

    # least recently used went first: what is still resident is exactly the last files read
    rows = stat_json([v.path(n) for n in names])
    resident = [n for n in names if rows[n]["state"] == "resident"]
    assert all(rows[n]["state"] in ("resident", "stub") for n in names), rows
    assert all(rows[n]["resident_bytes"] == (FILE if rows[n]["state"] == "resident" else 0) for n in names), rows
    assert resident == names[-len(resident):], f"resident files are not the most recently read: {resident}"
    assert len(resident) >= (LOW - FILE) // FILE, resident  # evicted down to low, not further
    assert sum(rows[n]["resident_bytes"] for n in names) == final
    assert rows[names[0]]["state"] == "stub"

    # an evicted file reads its real bytes again
    assert cat_sha(v.path(names[0])) == shas[names[0]]
    settle(v, names[0], observed)
    assert store_state(v.store, names[0]) == ("resident", FILE)
    assert resident_total(v.store) <= HIGH


def test_budget_evicts_least_recently_read_first(budget_view: tuple[View, dict[str, str]]) -> None:
    """A re-read through the (strictatime) view makes a file recent: files read before it go first."""
    v, shas = budget_view
    names = sorted(shas)
    observed: list[int] = []
    for name in names[:12]:  # 6 MiB: under high, nothing evicted yet
        assert cat_sha(v.path(name)) == shas[name]
        settle(v, name, observed)
    assert all(store_state(v.store, n) == ("resident", FILE) for n in names[:12])
    assert v.status()["filler"]["evictions"] == 0

    x = names[1]
    xpath = os.path.join(v.store, "tree", x)
    before = os.lstat(xpath).st_atime_ns
    newest = max(os.lstat(os.path.join(v.store, "tree", n)).st_atime_ns for n in names[:12])
    time.sleep(0.02)  # atime is a coarse clock: a tick apart
    assert cat_sha(v.path(x)) == shas[x]  # resident: no event, the kernel alone reads it
    after = os.lstat(xpath).st_atime_ns
    assert after > before and after > newest, \
        f"reading {x} through the view did not update its atime ({before} -> {after})"
    # relatime would have allowed that one (the commit's setxattr made ctime newer than atime), not a second
    time.sleep(0.02)
    assert cat_sha(v.path(x)) == shas[x]
    again = os.lstat(xpath).st_atime_ns
    assert again > after, f"a second read of {x} did not update its atime ({after} -> {again}): not strictatime"
    with open("/proc/self/mountinfo") as mi:
        opts = next(line.split()[5] for line in mi if line.split()[4] == v.target)
    assert "relatime" not in opts.split(",") and "noatime" not in opts.split(","), opts

    for name in names[12:21]:  # 9 files more: two passes past high, each evicting down to low
        assert cat_sha(v.path(name)) == shas[name]
        settle(v, name, observed)
    states = {n: store_state(v.store, n)[0] for n in names[:21]}
    evicted = [n for n in names[:21] if states[n] == "stub"]
    f = wait_quiet(v)
    print(f"\n{v.fs.fstype}: evicted {evicted}; peak {max(observed)} (high {HIGH}); evictions {f['evictions']}")
    assert states[x] == "resident", f"{x}, re-read after {names[11]}, was evicted: {states}"
    # the files read before x's re-read, oldest first, are the ones that went
    older = [n for n in names[:12] if n != x]
    assert evicted, states
    assert evicted == older[:len(evicted)], f"evicted {evicted}, oldest first would be {older}"
    assert len(evicted) >= 3
    assert all(states[n] == "resident" for n in names[12:21])


# -- 2. a store filesystem smaller than what is read -------------------------------------------------
SMALL_FS = {  # the smallest each mkfs makes without fuss
    "ext4": (64 * MiB, ["mkfs.ext4", "-q", "-F", "-m", "0"]),
    "xfs": (300 * MiB, ["mkfs.xfs", "-q", "-f"]),  # xfsprogs >= 5.19 refuses less than 300 MB
    # at least 109 MiB without --mixed. Not --mixed: there data and metadata share one pool, and a
    # store filled to its last byte leaves eviction no room for its setxattr and punch (ENOSPC)
    "btrfs": (128 * MiB, ["mkfs.btrfs", "-q", "-f"]),
}
CHUNK = 4 * MiB


def _dev_mounts(rdev: int) -> list[str]:
    """Mount points of the filesystem on block device rdev (in this mount namespace), deepest first."""
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                out.append(fields[4].encode().decode("unicode_escape"))
    return sorted(out, key=len, reverse=True)


class SmallFS(LoopImage):
    """A small loop filesystem of one type, for a store that fills up; close() leaves nothing behind."""

    def __init__(self, fstype: str) -> None:
        self.base = tempfile.mkdtemp(prefix="hsmfs-small-", dir="/var/tmp")
        size, mkfs = SMALL_FS[fstype]
        try:
            super().__init__(os.path.join(self.base, f"{fstype}.img"), os.path.join(self.base, "mnt"), fstype, size,
                             mkfs={fstype: mkfs})
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def free(self) -> int:
        """Bytes of data the filesystem can take now, found by allocating them (statvfs is only an
        estimate on btrfs, whose metadata and system chunks come out of the same free space)."""
        probe = os.path.join(self.mnt, "free-probe")
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        got = 0
        try:
            for step in (MiB, 64 * KiB, 4 * KiB):
                while True:
                    try:
                        os.posix_fallocate(fd, got, step)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
                    got += step
        finally:
            os.close(fd)
            os.unlink(probe)
            os.sync()  # btrfs and ext4 reuse freed extents after their transaction commits
        return got

    def close(self) -> None:
        if self.dev is not None:
            # views of a store here are clones of this filesystem's mount: they go first (only a
            # broken test leaves one; the view fixture closes them before this runs)
            for mp in _dev_mounts(os.stat(self.dev).st_rdev):
                if mp != self.mnt:
                    subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
        super().close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def small_store(loopfs: LoopFS) -> Iterator[SmallFS]:
    fs = SmallFS(loopfs.fstype)
    yield fs
    fs.close()
    assert not os.path.exists(fs.base)


@dataclass
class FullStore:
    view: View
    shas: dict[str, str]
    names: list[str]  # the CHUNK-sized files, read in this order
    huge: str  # a file larger than the store's free space can be once the others have filled it


@pytest.fixture
def full_view(loopfs: LoopFS, small_store: SmallFS, tmp_path: Any) -> Iterator[Callable[[Optional[str]], FullStore]]:
    """full_view(policy_text) -> a mounted view whose source is on the big loop fs and whose store is
    on small_store, with no budget: 1.5 x the store's room in 4 MiB files plus one file of 0.8 x it.
    Its view is unmounted at teardown, before small_store goes."""
    views: list[View] = []
    sources: list[str] = []

    def make(policy: Optional[str] = None) -> FullStore:
        room = small_store.free()
        src = loopfs.fresh_dir("full-src")
        sources.append(src)
        names = [f"c{i:03d}.bin" for i in range(-(-room * 3 // 2 // CHUNK))]
        shas = make_files(src, names, CHUNK, seed=11)
        shas.update(make_files(src, ["huge.bin"], room * 4 // 5 // 4096 * 4096, seed=12))
        extra = []
        if policy is not None:
            cfg = tmp_path / f"full{len(views)}.toml"
            cfg.write_text(policy)
            extra = ["--config", str(cfg)]
        v = View(loopfs, src, f"full{os.getpid()}-{loopfs.fstype}-{len(views)}", *extra)
        v.store = os.path.join(small_store.mnt, f"store{len(views)}")  # not View's default, on the big fs
        views.append(v)
        v.mount()
        return FullStore(v, shas, names, "huge.bin")

    try:
        yield make
    finally:
        for v in views:
            v.close()
        for src in sources:
            shutil.rmtree(src, ignore_errors=True)


def wait_committed(v: View, rel: str, states: tuple[str, ...] = ("resident",), timeout: float = 30) -> None:
    """Wait (bounded) until rel's store record says resident: its fill is committed."""
    deadline = time.monotonic() + timeout
    while store_state(v.store, rel)[0] not in states:
        assert time.monotonic() < deadline, f"{rel} not committed {timeout:.0f} s after its read:\n{v.log[-3000:]}"
        time.sleep(0.01)


def test_full_store_makes_room_then_answers_enospc(full_view: Callable[[Optional[str]], FullStore],
                                                   small_store: SmallFS) -> None:
    fs = full_view("commit_interval = 0.05\n")
    v, shas, names, huge = fs.view, fs.shas, fs.names, fs.huge
    room = small_store.free()
    assert v.status()["filler"]["budget"] is None
    total = len(names) * CHUNK
    assert total > room

    # every file, more than the store can hold: room is made by evicting the least recently used.
    # Each read waits for its commit: an uncommitted fill cannot be evicted (see the next test).
    t0 = time.monotonic()
    wrong: dict[str, str] = {}  # checked at the end, so that the rest is exercised too
    for name in names:
        data = cat_bytes(v.path(name), v)
        if hashlib.sha256(data).hexdigest() != shas[name]:
            wrong[name] = compare(data, os.path.join(v.source, name))
        wait_committed(v, name, ("resident", "dirty") if name in wrong else ("resident",))
    f = wait_quiet(v)
    held = resident_total(v.store)
    print(f"\n{v.fs.fstype}: store fs {SMALL_FS[v.fs.fstype][0] >> 20} MiB ({room} bytes free at start), read "
          f"{total} bytes in {time.monotonic() - t0:.1f} s; enospc {f['enospc']}, evictions {f['evictions']} "
          f"({f['evicted_bytes']} bytes), {held} resident, {small_store.free()} free")
    assert f["enospc"] > 0 and f["evictions"] > 0, f
    assert f["fill_errors"] == 0, f
    assert f["evicted_bytes"] >= total - room, f

    # everything resident pinned: nothing can be evicted, a fill larger than the free space gets ENOSPC
    rows = stat_json([v.path(n) for n in names])
    resident = [n for n in names if rows[n]["state"] == "resident"]
    dirty = [n for n in names if rows[n]["state"] == "dirty"]
    assert resident and all(rows[n]["state"] in ("resident", "stub") for n in names if n not in wrong), rows
    hsmfs("pin", *[v.path(n) for n in resident])
    free = small_store.free()
    size = os.lstat(v.path(huge)).st_size
    assert size > free, f"setup: {huge} ({size} bytes) must not fit in the {free} bytes left"
    t0 = time.monotonic()
    got = read_outcome(v.path(huge))
    took = time.monotonic() - t0
    assert got == ["errno", "28"], f"reading {huge} with a full store of pinned files gave {got}, not ENOSPC"
    state = stat_json([v.path(huge)])[huge]
    assert state["state"] == "stub", state
    assert all(store_state(v.store, n)[0] == "resident" for n in resident), "a pinned file was evicted"
    log = v.log
    # refused at once: it cannot fit even if everything evictable went, so nothing is evicted for it
    m = re.search(rf"cannot fill {re.escape(huge)} from .*?: the store has room for (\d+) bytes and (\d+) more could "
                  r"be evicted, but this file needs \d+: (\d+) pinned and (\d+) dirty files hold (\d+) bytes", log)
    assert m is not None, f"no 'store is full' line for {huge} in the log:\n{log[-3000:]}"
    print(f"{v.fs.fstype}: {len(resident)} files pinned, {free} bytes free; ENOSPC after {took:.2f} s "
          f"({state['resident_bytes']} bytes left in the stub); log: {m.group(0)}")
    assert int(m.group(2)) == 0, m.group(0)
    assert int(m.group(3)) >= len(resident) and int(m.group(4)) == len(dirty), m.group(0)
    assert int(m.group(5)) >= len(resident) * CHUNK, m.group(0)

    # unpinned, the same read makes room and gets the real bytes
    hsmfs("unpin", *[v.path(n) for n in resident])
    got = read_outcome(v.path(huge))
    assert got[0] == "sha" and got[2] == str(size), f"{huge} after unpinning: {got}\n{v.log[-3000:]}"
    if got[1] != shas[huge]:
        wrong[huge] = compare(cat_bytes(v.path(huge)), os.path.join(v.source, huge))
    wait_committed(v, huge, ("resident", "dirty") if huge in wrong else ("resident",))
    f = wait_quiet(v)
    print(f"{v.fs.fstype}: after unpinning: enospc {f['enospc']}, evictions {f['evictions']}")
    # Never zeros: a fill that hit ENOSPC and was retried after evicting must still give the source's
    # bytes (and must not take its own half-written blocks for a user's: state dirty)
    states = stat_json([v.path(n) for n in wrong]) if wrong else {}
    assert not wrong, f"reads that did not get the source's bytes: {wrong}; now {states}\n{v.log[-3000:]}"


def test_full_store_filled_within_one_commit_period(full_view: Callable[[Optional[str]], FullStore],
                                                    small_store: SmallFS) -> None:
    """Reads back to back, with a commit period longer than filling the store takes (the default 0.5 s
    is, on a small store): every file holding the store is then an uncommitted fill, which the
    full-store path neither commits nor evicts. Readers must still get the real bytes (commit the
    pending fills, then evict), not ENOSPC blaming "0 pinned and 0 dirty files"."""
    fs = full_view("commit_interval = 60\n")
    v, shas, names = fs.view, fs.shas, fs.names
    for name in names:
        assert cat_sha(v.path(name), v) == shas[name], f"{name}: not the source's bytes"
    f = v.status()["filler"]  # every read is answered; the last fills wait out the 60 s commit period
    print(f"\n{v.fs.fstype}: back to back: enospc {f['enospc']}, evictions {f['evictions']}, commits {f['commits']}")
    assert f["enospc"] > 0 and f["evictions"] > 0 and f["fill_errors"] == 0, f


# -- 3. bad budget keys: exit 78, nothing changed ----------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("max_resident_bytes", '"ten"', "expected a number of bytes"),
    ("low_watermark", "0.95", "must be below high_watermark (0.9), got 0.95"),
    ("high_watermark", "1.5", "expected a fraction of max_resident_bytes greater than 0 and at most 1"),
])
def test_bad_budget_policy_changes_nothing(loopfs: LoopFS, tmp_path: Any, key: str, value: str, message: str) -> None:
    src = loopfs.fresh_dir("policy-src")
    with open(os.path.join(src, "a"), "w") as f:
        f.write("a")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"# a bad budget\n{key} = {value}\nworkers = 2\n")
    name = f"bad{os.getpid()}-{loopfs.fstype}-{key}"
    store = os.path.join(loopfs.mnt, "store-" + name)
    target = tempfile.mkdtemp(prefix="view-", dir=loopfs.base)
    try:
        r = hsmfs("mount", "--name", name, "--store", store, "--config", str(cfg), src, target, check=False)
        assert r.returncode == 78, (r.returncode, r.stdout, r.stderr)
        assert f"{cfg}:2: {key}: {message}" in r.stderr, r.stderr
        assert not os.path.exists(store)
        assert not is_mountpoint(target) and os.listdir(target) == []
        assert not os.path.exists(f"/run/hsmfs/{name}.json")
        assert hsmfs("status", name, check=False).returncode == 66  # not running (asks for this name only:
        # the machine's own mounts are none of this test's business)
    finally:
        if is_mountpoint(target):
            hsmfs("umount", target, check=False)
        os.rmdir(target)
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
