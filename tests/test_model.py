"""Model-based fault test: random operations on a view, checked against an in-memory model, while
the filler is SIGKILLed again and again. Never zeros, never a wrong byte, never a lost change.

The model holds what every file must contain: its source bytes until a user changes it, then what
the user wrote. One driver thread makes random changes (write, mmap write, O_APPEND, truncate, a
hole punched, O_TRUNC, copy_file_range into it, an edit with mtime put back, rename, hard link) and
reads (whole, pread past EOF, pread of a range, mmap); two reader threads read files no one is
changing; an evictor evicts random batches through the control socket; pins come and go; the
mount is remounted now and then; and a killer SIGKILLs the filler every 0.5-1 s. Fault delays
(``HSMFS_FAULT_DELAYS``, hsmfs.filler.faults) widen the windows inside evictions, commits and
fills. Every read is compared with the model: a read of zeros where the model has data, a read
of other bytes, or a change that comes undone fails the test. Reads that get EAGAIN or EIO while a
filler restarts are allowed (the promise: real bytes or an error), and counted.

At the end every file is read again after a clean remount, and every file a user changed must be
dirty in ``hsmfs stat``: a changed file is never resident, whatever the user set back.

CI runs it for HSMFS_MODEL_SECONDS (default 30) per filesystem. The long mode for releases:
``HSMFS_MODEL_SECONDS=900 HSMFS_MODEL_OUT=model.jsonl pytest tests/test_model.py``; the figures
go to docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
from conftest import LoopFS, View, hsmfs

from hsmfs import state
from hsmfs.control import request
from hsmfs.places import record_path

SECONDS = float(os.environ.get("HSMFS_MODEL_SECONDS", "30"))
OUT = os.environ.get("HSMFS_MODEL_OUT")
SIZES = [0, 1, 4095, 4096, 4097, 9000, 65536, 70001, 300_000, (1 << 20) + 17]
RETRYABLE = (errno.EAGAIN, errno.EIO)
FAULTS = "evict=0.03,commit=0.03,fill=0.005"


@dataclass
class Inode:
    data: bytearray
    writable: bool = False  # the driver changes only these: the others stay clean, for evictions
    changed: bool = False  # by a user: must be dirty, never resident
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Figures:
    reads: int = 0
    errors: int = 0  # EAGAIN/EIO while a filler restarted: allowed
    zero_reads: int = 0
    wrong_reads: int = 0
    changes: int = 0
    kills: int = 0
    evicted: int = 0
    evict_requests: int = 0
    remounts: int = 0
    max_blocked_read_s: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


class Run:
    def __init__(self, view: View, src: dict[str, bytes], seed: int) -> None:
        self.v = view
        self.rnd = random.Random(seed)
        self.f = Figures()
        self.lock = threading.Lock()  # the name table
        self.inodes: dict[str, Inode] = {}  # path -> inode (hard links share one)
        for i, (rel, data) in enumerate(sorted(src.items())):
            self.inodes[rel] = Inode(bytearray(data), writable=i % 3 == 0)
        self.stop = threading.Event()
        self.crashed: list[str] = []  # exceptions of background threads: the run is void then
        self.mounted = threading.Event()
        self.mounted.set()
        self.remount_lock = Shared()  # every file operation holds it shared; remount() alone
        self.n = 0

    # -- checking ------------------------------------------------------------------------------
    def check(self, rel: str, got: bytes, want: bytes, off: int, what: str) -> None:
        with self.lock:
            self.f.reads += 1
        if got == want:
            return
        at = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
        tail = got[at:at + 4096]
        zeros = len(tail) > 0 and tail.count(0) == len(tail) and want[at:at + len(tail)].count(0) != len(tail)
        with self.lock:
            if zeros:
                self.f.zero_reads += 1
            else:
                self.f.wrong_reads += 1
            if len(self.f.failures) < 20:
                self.f.failures.append(f"{what} {rel} @{off + at}: got {len(got)} bytes, want {len(want)}; "
                                       f"{'zeros' if zeros else 'other bytes'} ({got[at:at + 16]!r} for "
                                       f"{want[at:at + 16]!r})")

    def retry(self, fn: Callable[[], object], what: str) -> object:
        """fn() until it does not fail with an error a filler restart may cause (it changed nothing then)."""
        for _ in range(200):
            try:
                return fn()
            except OSError as e:
                if e.errno not in RETRYABLE:
                    raise
                with self.lock:
                    self.f.errors += 1
                time.sleep(0.02)
        raise AssertionError(f"{what}: still failing after 200 tries")

    # -- reads -----------------------------------------------------------------------------------
    def read(self, rel: str, rnd: random.Random) -> None:
        ino = self.inodes[rel]
        path = self.v.path(rel)
        kind = rnd.choice(("whole", "whole", "past_eof", "range", "mmap"))
        with ino.lock:
            with self.lock:
                if self.inodes.get(rel) is not ino:
                    return  # renamed meanwhile
            want = bytes(ino.data)
            t0 = time.monotonic()
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                if e.errno in RETRYABLE:
                    with self.lock:
                        self.f.errors += 1
                    return
                raise
            try:
                if kind == "whole":
                    got, off = _read_all(fd), 0
                elif kind == "past_eof":
                    got, off, want = os.pread(fd, 4096, len(want) + rnd.randrange(8192)), len(want), b""
                elif kind == "range" and want:
                    off = rnd.randrange(len(want))
                    n = rnd.randrange(1, 20000)
                    got, want = os.pread(fd, n, off), want[off:off + n]
                elif want:
                    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                        got, off = bytes(m), 0
                else:
                    got, off = _read_all(fd), 0
            finally:
                os.close(fd)
            took = time.monotonic() - t0
        with self.lock:
            self.f.ops["read-" + kind] += 1
            self.f.max_blocked_read_s = max(self.f.max_blocked_read_s, took)
        self.check(rel, got, want, off, kind)

    # -- changes -----------------------------------------------------------------------------------
    def change(self, rel: str, rnd: random.Random) -> None:
        ino = self.inodes[rel]
        path = self.v.path(rel)
        kind = rnd.choice(("write", "mmap_write", "append", "truncate", "punch", "otrunc", "copy_range", "touch_back"))
        with ino.lock:
            with self.lock:
                if self.inodes.get(rel) is not ino:
                    return
            d = ino.data
            size = len(d)
            if kind == "write":
                off = rnd.randrange(size + 5000)
                data = rnd.randbytes(rnd.randrange(1, 9000))

                def op() -> None:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, data, off)
                    finally:
                        os.close(fd)
                self.retry(op, kind)
                if off > size:
                    d.extend(bytes(off - size))
                d[off:off + len(data)] = data
            elif kind == "mmap_write" and size:
                off = rnd.randrange(size)
                data = rnd.randbytes(min(rnd.randrange(1, 5000), size - off))

                def op() -> None:
                    fd = os.open(path, os.O_RDWR)
                    try:
                        with mmap.mmap(fd, 0) as m:
                            m[off:off + len(data)] = data
                            m.flush()
                    finally:
                        os.close(fd)
                self.retry(op, kind)
                d[off:off + len(data)] = data
            elif kind == "append":
                data = rnd.randbytes(rnd.randrange(1, 6000))

                def op() -> None:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                self.retry(op, kind)
                d.extend(data)
            elif kind == "truncate":
                n = rnd.randrange(size + 10000)
                self.retry(lambda: os.truncate(path, n), kind)
                del d[n:]
                d.extend(bytes(n - len(d)))
            elif kind == "punch" and size:
                off = rnd.randrange(size)
                n = rnd.randrange(1, size - off + 1)

                def op() -> None:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        _punch(fd, off, n)
                    finally:
                        os.close(fd)
                self.retry(op, kind)
                d[off:off + n] = bytes(n)
            elif kind == "otrunc":
                data = rnd.randbytes(rnd.randrange(0, 20000))

                def op() -> None:
                    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                self.retry(op, kind)
                d[:] = data
            elif kind == "copy_range":
                other = rnd.choice(sorted(self.inodes))
                oi = self.inodes[other]
                if oi is ino or not oi.lock.acquire(timeout=1):
                    return
                try:
                    odata = bytes(oi.data)
                    if not odata:
                        return
                    so = rnd.randrange(len(odata))
                    n = rnd.randrange(1, len(odata) - so + 1)
                    off = rnd.randrange(size + 1)

                    def op() -> None:
                        s = os.open(self.v.path(other), os.O_RDONLY)
                        t = os.open(path, os.O_WRONLY)
                        try:
                            left, a, b = n, so, off
                            while left:
                                k = os.copy_file_range(s, t, left, a, b)
                                assert k > 0
                                left, a, b = left - k, a + k, b + k
                        finally:
                            os.close(s)
                            os.close(t)
                    self.retry(op, kind)
                    d[off:off + n] = odata[so:so + n]
                finally:
                    oi.lock.release()
            elif kind == "touch_back" and size:
                # an edit whose mtime is then put back, as touch -r, cp -p, rsync -t do
                off = rnd.randrange(size)
                data = bytes([d[off] ^ 0xFF])

                def op() -> None:
                    st = os.stat(path)
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, data, off)
                        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                    finally:
                        os.close(fd)
                self.retry(op, kind)
                d[off:off + 1] = data
            else:
                return
            ino.changed = True
        with self.lock:
            self.f.changes += 1
            self.f.ops["change-" + kind] += 1

    def rename_or_link(self, rnd: random.Random) -> None:
        with self.lock:
            rel = rnd.choice(sorted(self.inodes))
            self.n += 1
            new = f"d{rnd.randrange(4)}/n{self.n}"
        ino = self.inodes[rel]
        with ino.lock:
            if rnd.random() < 0.5:
                os.rename(self.v.path(rel), self.v.path(new))
                with self.lock:
                    del self.inodes[rel]
                    self.inodes[new] = ino
                what = "rename"
            else:
                os.link(self.v.path(rel), self.v.path(new))
                with self.lock:
                    self.inodes[new] = ino
                what = "link"
        with self.lock:
            self.f.ops[what] += 1

    # -- background ----------------------------------------------------------------------------
    def guarded(self, target: Callable[[int], None], seed: int) -> None:
        try:
            target(seed)
        except BaseException:
            self.crashed.append(f"{target.__name__}: {traceback.format_exc()}")
            self.stop.set()

    def reader(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            with self.remount_lock:
                with self.lock:
                    rel = rnd.choice(sorted(self.inodes))
                self.read(rel, rnd)

    def evictor(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.wait(rnd.uniform(0.02, 0.1)):
            with self.remount_lock:
                with self.lock:
                    rels = rnd.sample(sorted(self.inodes), min(8, len(self.inodes)))
                handles = []
                for rel in rels:
                    try:
                        htype, h = state.split_key(state.key_at(self.v.path(rel)))
                    except FileNotFoundError:  # renamed meanwhile
                        continue
                    handles.append([htype, h.hex()])
                try:
                    reply = request(self.v.name, {"op": "evict", "handles": handles}, timeout=60, wait=5)
                except Exception:  # the filler died mid-request: what it did is not known, and need not be
                    continue
                with self.lock:
                    self.f.evict_requests += 1
                    self.f.evicted += sum(1 for r in reply.get("results", []) if r["evicted"])

    def killer(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.wait(rnd.uniform(0.5, 1.0)):
            with self.remount_lock:
                pid = filler_pid(self.v)
                if pid is None:
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                with self.lock:
                    self.f.kills += 1

    def pins(self, rnd: random.Random) -> None:
        with self.lock:
            rels = rnd.sample(sorted(self.inodes), 3)
        hsmfs("pin" if rnd.random() < 0.5 else "unpin", *[self.v.path(r) for r in rels], timeout=120)
        with self.lock:
            self.f.ops["pin/unpin"] += 1

    def remount(self) -> None:
        with self.remount_lock.alone():
            hsmfs("umount", self.v.target, timeout=120)
            self.v.mounted = False
            self.v.mount()
            with self.lock:
                self.f.remounts += 1


class Shared:
    """A lock many hold at once (``with lock:``) and one can hold alone (``with lock.alone():``)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._users = 0
        self._alone = False

    def __enter__(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._alone)
            self._users += 1

    def __exit__(self, *_: object) -> None:
        with self._cv:
            self._users -= 1
            self._cv.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._alone)
            self._alone = True
            self._cv.wait_for(lambda: self._users == 0)
        try:
            yield
        finally:
            with self._cv:
                self._alone = False
                self._cv.notify_all()


def _read_all(fd: int) -> bytes:
    out = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(out)
        out.append(b)


def _punch(fd: int, off: int, n: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, 0x02 | 0x01, off, n) != 0:  # PUNCH_HOLE | KEEP_SIZE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def filler_pid(v: View) -> Optional[int]:
    try:
        with open(record_path(v.name)) as f:
            sup = json.load(f)["pid"]
        with open(f"/proc/{sup}/task/{sup}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except (OSError, ValueError, KeyError):
        return None
    return kids[0] if kids else None


def make_source(root: str, rnd: random.Random) -> dict[str, bytes]:
    out = {}
    for i in range(120):
        rel = f"d{i % 4}/f{i}"
        data = rnd.randbytes(SIZES[i % len(SIZES)])
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        out[rel] = data
    return out


@pytest.mark.slow
def test_model(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    seed = int(os.environ.get("HSMFS_MODEL_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    srcdir = os.path.join(loopfs.fresh_dir("model"), "src")
    src = make_source(srcdir, rnd)
    cfg = os.path.join(loopfs.base, "model.toml")
    with open(cfg, "w") as f:
        f.write("commit_interval = 0.1\nfill_timeout = 20\n")
    env = dict(os.environ, HSMFS_FAULT_DELAYS=FAULTS)
    v = make_view(srcdir, "--config", cfg, mount=False)
    v.env = env
    v.mount()
    run = Run(v, src, seed)
    threads = [threading.Thread(target=run.guarded, args=(target, seed + i))
               for i, target in enumerate((run.reader, run.reader, run.evictor, run.killer), start=1)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    next_remount = t0 + SECONDS / 3
    try:
        while time.monotonic() - t0 < SECONDS and not run.stop.is_set():
            x = rnd.random()
            if time.monotonic() > next_remount:
                run.remount()
                next_remount += SECONDS / 3
            with run.remount_lock:
                with run.lock:
                    rel = rnd.choice(sorted(run.inodes))
                    mine = rnd.choice(sorted(r for r, ino in run.inodes.items() if ino.writable))
                if x < 0.45:
                    run.read(rel, rnd)
                elif x < 0.85:
                    run.change(mine, rnd)
                elif x < 0.93:
                    run.rename_or_link(rnd)
            if 0.93 <= x < 0.935:
                run.pins(rnd)
    finally:
        run.stop.set()
        for t in threads:
            t.join()
    # the end: a clean remount, every file read again, every changed file dirty
    run.remount()
    for rel in sorted(run.inodes):
        run.read(rel, random.Random(0))
        ino = run.inodes[rel]
        with open(v.path(rel), "rb") as fh:
            run.check(rel, fh.read(), bytes(ino.data), 0, "final")
    rows = json.loads(hsmfs("stat", "--json", *[v.path(r) for r in sorted(run.inodes)]).stdout)
    undirty = [r["path"] for r, rel in zip(rows, sorted(run.inodes)) if run.inodes[rel].changed and
               r["state"] != "dirty"]
    took_over = [float(x) for x in _takeovers(v.log)]
    f = run.f
    figures = {"fs": loopfs.fstype, "seed": seed, "seconds": SECONDS, "reads": f.reads, "errors": f.errors,
               "zero_reads": f.zero_reads, "wrong_reads": f.wrong_reads, "changes": f.changes, "kills": f.kills,
               "evict_requests": f.evict_requests, "evicted": f.evicted, "remounts": f.remounts,
               "max_blocked_read_s": round(f.max_blocked_read_s, 3),
               "takeover_ms_max": max(took_over, default=0.0), "takeovers": len(took_over), "ops": dict(f.ops),
               "changed_not_dirty": len(undirty)}
    print("\n" + json.dumps(figures))
    if OUT:
        with open(OUT, "a") as fh:
            fh.write(json.dumps(figures) + "\n")
    assert not run.crashed, f"seed {seed}: a background thread failed: {run.crashed}\n{v.log[-5000:]}"
    assert f.zero_reads == 0 and f.wrong_reads == 0, f"seed {seed}: {figures}\n" + "\n".join(f.failures)
    assert not undirty, f"seed {seed}: changed by a user but not dirty: {undirty[:10]}"
    assert f.kills >= SECONDS / 2 and f.evicted > 0 and f.changes > 0, f"seed {seed}: the run did too little: {figures}"
    assert "Traceback" not in v.log and "bug " not in v.log, v.log[-4000:]


def _takeovers(log: str) -> list[str]:
    import re

    return re.findall(r"took over from a dead filler in (\d+) ms", log)
