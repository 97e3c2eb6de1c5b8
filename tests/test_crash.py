"""Power cuts in the middle of fills, commits and user writes (promise 2), on ext4, xfs and btrfs.

Each test makes its own store filesystem (a fresh loop image: the session's shared images must
survive), mounts a view of a source that lives elsewhere (a plain directory on the root filesystem,
so the cut spares it), keeps readers and writers busy through the view, and cuts the power of the
store with the filesystem's shutdown ioctl, NOLOGFLUSH (hsmfs.linux.fs.shutdown): what the journal
has not committed is lost. Everything a power cut kills is then killed with SIGKILL (workers, the
supervisor and its filler), the view is detached, what a reboot empties in /run/hsmfs is removed,
the store is unmounted and mounted again (journal replay), and a new view of the same store is
mounted with ``hsmfs mount`` (same name and store: no populate). Then:

(a) no file claims to be resident (``hsmfs stat --json``: "resident") with bytes that differ from
    its source, unless a user wrote them;
(b) no fsync'd user write is lost or overwritten, and a file holding one never claims "resident"
    (resident files may be evicted: that would throw the write away);
(c) every file reads through the new view as its source, except users' files, which hold exactly
    their durable bytes (and the source's wherever the user did not write).

btrfs: BTRFS_IOC_SHUTDOWN (6.17+) exists only in kernels built with CONFIG_BTRFS_EXPERIMENTAL; where
it answers ENOTTY (as on the project's 6.18 machines), the btrfs image lives on an ext4 "disk" of
its own, and the cut shuts that ext4 down with NOLOGFLUSH instead: every write btrfs has not
flushed (its REQ_PREFLUSH/FUA writes reach the image file as fsync) is lost, like a drive's
volatile cache in a real power cut. btrfs then mounts its last committed tree and replays its log.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
from conftest import FILESYSTEMS, IMAGE_SIZE, MKFS, hsmfs

from hsmfs import state, tree
from hsmfs.linux.fs import shutdown, shutdown_supported, syncfs
from hsmfs.places import LOG_DIR, RUN_DIR
from hsmfs.views import is_mountpoint

pytestmark = pytest.mark.root  # loop mounts, shutdown ioctls, fanotify

# -- the source: on the root filesystem, never on the store's ----------------------------------------

@dataclass
class Source:
    root: str
    rels: list[str]
    sums: dict[str, tuple[int, str]]  # rel -> (size, sha256)

    def read(self, rel: str) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read()

    def sized(self, least: int) -> list[str]:
        return [r for r in self.rels if self.sums[r][0] >= least]


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    """300 files, random bytes, sizes from 0 to 1 MiB (the page and btrfs-inline edges included)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop mounts, shutdown ioctls and fanotify pre-content marks")
    root = tempfile.mkdtemp(prefix="hsmfs-crash-src-", dir="/var/tmp")  # /var/tmp: the root fs, not tmpfs
    rnd = random.Random(0xC0FFEE)
    sizes = [0, 1, 100, 2047, 2048, 2049, 4095, 4096, 4097, 65536, 65537, 1 << 20]
    sizes += [rnd.randrange(1, 1 << 20) for _ in range(287)]
    rels, sums = [], {}
    for i, size in enumerate(sizes):
        rel = f"d{i % 7}/f{i:03d}.bin"
        os.makedirs(os.path.join(root, f"d{i % 7}"), exist_ok=True)
        data = rnd.randbytes(size)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        rels.append(rel)
        sums[rel] = (size, hashlib.sha256(data).hexdigest())
    # one sparse source file: a hole in the middle reads as zeros from the source too
    rel = "d0/sparse.bin"
    with open(os.path.join(root, rel), "wb") as f:
        f.write(rnd.randbytes(100_000))
        f.seek(700_000)
        f.write(rnd.randbytes(50_000))
    rels.append(rel)
    with open(os.path.join(root, rel), "rb") as f:
        data = f.read()
    sums[rel] = (len(data), hashlib.sha256(data).hexdigest())
    yield Source(root, sorted(rels), sums)
    shutil.rmtree(root, ignore_errors=True)


# -- a store filesystem whose power the test can cut ----------------------------------------------------

def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _wait(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def _loop_attached(image: str) -> bool:
    return bool(_sh("losetup", "-j", image, check=False).stdout.strip())


class CrashDisk:
    """A fresh loop-mounted filesystem for one test; cut() is the power cut, restart() the reboot."""

    def __init__(self, fstype: str, base: str) -> None:
        self.fstype = fstype
        self.base = base
        self.mnt = os.path.join(base, fstype)
        self.lower_image: Optional[str] = None
        self.lower_mnt: Optional[str] = None
        self.image = os.path.join(base, f"{fstype}.img")
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        fstype, base = self.fstype, self.base
        os.mkdir(self.mnt)
        self._make(fstype, self.image, IMAGE_SIZE)
        self._mount(self.image, self.mnt)
        if self._can_shut_down(self.mnt):
            self.how = f"{fstype} shutdown ioctl, NOLOGFLUSH"
            return
        # no shutdown ioctl (btrfs without CONFIG_BTRFS_EXPERIMENTAL): cut the disk beneath it instead
        self._umount(self.mnt, self.image)
        os.unlink(self.image)
        self.lower_image = os.path.join(base, "disk-ext4.img")
        self.lower_mnt = os.path.join(base, "disk")
        os.mkdir(self.lower_mnt)
        self._make("ext4", self.lower_image, IMAGE_SIZE + (256 << 20))
        self._mount(self.lower_image, self.lower_mnt)
        assert self._can_shut_down(self.lower_mnt), "the ext4 disk beneath the store has no shutdown ioctl"
        self.image = os.path.join(self.lower_mnt, f"{fstype}.img")
        self._make(fstype, self.image, IMAGE_SIZE)
        self._mount(self.image, self.mnt)
        self.how = f"{fstype} has no shutdown ioctl here: shutdown of the ext4 disk holding its image, NOLOGFLUSH"

    @staticmethod
    def _make(fstype: str, image: str, size: int) -> None:
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run([*MKFS[fstype], image], check=True, capture_output=True)

    @staticmethod
    def _mount(image: str, mnt: str) -> None:
        _wait(lambda: not _loop_attached(image), 20, f"the old loop device of {image} to go")
        _sh("mount", "-o", "loop", image, mnt)

    @staticmethod
    def _umount(mnt: str, image: str) -> None:
        if not is_mountpoint(mnt):
            return
        deadline = time.monotonic() + 10
        while _sh("umount", mnt, check=False).returncode != 0:
            if time.monotonic() > deadline:
                _sh("umount", "-l", mnt, check=False)
                break
            time.sleep(0.1)
        _wait(lambda: not _loop_attached(image), 20, f"{mnt} to let go of its loop device")

    @staticmethod
    def _can_shut_down(mnt: str) -> bool:
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return shutdown_supported(fd)
        finally:
            os.close(fd)

    def cut(self) -> None:
        fd = os.open(self.lower_mnt or self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            shutdown(fd)  # NOLOGFLUSH
        finally:
            os.close(fd)

    def restart(self) -> None:
        """Unmount what the cut left, mount it again: the journal (or log tree) is replayed."""
        self._umount(self.mnt, self.image)
        if self.lower_image is not None and self.lower_mnt is not None:
            self._umount(self.lower_mnt, self.lower_image)
            self._mount(self.lower_image, self.lower_mnt)
        self._mount(self.image, self.mnt)

    def sync(self) -> None:
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self._umount(self.mnt, self.image)
        finally:
            if self.lower_image is not None and self.lower_mnt is not None:
                self._umount(self.lower_mnt, self.lower_image)


# -- one test's world: disk, hsmfs mount, worker processes -------------------------------------------

_names = [0]


class Worker:
    """A process touching the view (never this one: a blocked read must not hang the test).

    session: the worker runs processes of its own (``hsmfs evict`` in a loop); it gets a process
    group of its own, and killing it kills the whole group.
    """

    def __init__(self, code: str, args: list[str], *, session: bool = False) -> None:
        self.session = session
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=session)
        self.lines: list[tuple[float, str]] = []
        self.cut_at: Optional[float] = None  # when the power cut that killed it began
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def sigkill(self) -> None:
        if self.session:  # the group outlives its leader: its children are killed too
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def kill(self) -> None:
        self.sigkill()
        self.proc.wait(timeout=30)
        if self.session:
            _wait(lambda: not _in_group(self.proc.pid), 30, f"process group {self.proc.pid} to die")
        self._thread.join(timeout=30)

    def finish(self, timeout: float = 120) -> None:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        if self.proc.returncode != 0:
            raise AssertionError(f"worker failed ({self.proc.returncode}):\n" + "\n".join(x for _, x in self.lines))


class Crash:
    def __init__(self, fstype: str, base: str, source: Source) -> None:
        self.fstype = fstype
        self.base = base
        self.source = source
        self.fill_ahead = True
        _names[0] += 1
        self.name = f"crash{os.getpid()}-{_names[0]}"
        self.target = os.path.join(base, "view")
        os.mkdir(self.target)
        self.disk = CrashDisk(fstype, base)
        self.store = os.path.join(self.disk.mnt, "store")
        self.workers: list[Worker] = []
        self.pid: Optional[int] = None
        self.cut_at: Optional[float] = None
        self.raw: dict[str, Raw] = {}
        self.unclean = False  # the store said its last session was cut (hsmfs.json "mounted")

    # paths
    def view(self, rel: str) -> str:
        return os.path.join(self.target, rel)

    def backing(self, rel: str) -> str:
        """The file in the store tree (not through the view): what the disk holds."""
        return os.path.join(self.store, "tree", rel)

    # the hsmfs mount
    def mount(self, commit_interval: float, workers: int = 4, *, fill_ahead: Optional[bool] = None) -> None:
        """fill_ahead: None keeps what the last mount had (true at first)."""
        if fill_ahead is not None:
            self.fill_ahead = fill_ahead
        config = os.path.join(self.base, f"policy-{commit_interval}-{self.fill_ahead}.toml")
        with open(config, "w") as f:
            f.write(f"commit_interval = {commit_interval}\nworkers = {workers}\n"
                    f"fill_ahead = {str(self.fill_ahead).lower()}\n")
        hsmfs("mount", "--name", self.name, "--store", self.store, "--config", config, self.source.root,
              self.target)
        with open(os.path.join(RUN_DIR, self.name + ".json")) as f:
            self.pid = int(json.load(f)["pid"])

    def umount(self) -> None:
        assert self.pid is not None
        pids = [self.pid, *_descendants(self.pid)]
        hsmfs("umount", self.target)
        _wait(lambda: all(_gone(p) for p in pids), 30, f"hsmfs processes {pids} to exit")
        self.pid = None

    def status(self) -> dict[str, Any]:
        out: list[dict[str, Any]] = json.loads(hsmfs("status", "--json", self.name).stdout)
        return out[0]

    def stat(self, rels: list[str]) -> dict[str, str]:
        rows = json.loads(hsmfs("stat", "--json", *[self.view(r) for r in rels]).stdout)
        return {os.path.relpath(r["path"], self.target): r["state"] for r in rows}

    def flush(self) -> None:
        """Wait until every fill is committed (its stub mark gone), and every file a cut left unverified
        was compared with its source."""
        def idle() -> bool:
            f = self.status()["filler"]
            return bool(f["pending_commit"] == 0 and f["inflight"] == 0 and f["unverified_left"] == 0)
        _wait(idle, 60, "the filler to commit every fill", step=0.1)

    @property
    def log(self) -> str:
        try:
            with open(os.path.join(LOG_DIR, self.name + ".log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # workers
    def spawn(self, code: str, *args: str, session: bool = False) -> Worker:
        w = Worker(code, list(args), session=session)
        self.workers.append(w)
        return w

    # the power cut and the reboot
    def cut(self) -> None:
        self.cut_at = time.monotonic()  # before: a worker may see EIO while the ioctl is still running
        self.disk.cut()
        for w in self.workers:  # a power cut stops every process at once
            if w.cut_at is None:
                w.cut_at = self.cut_at
            w.sigkill()
        self._kill_daemon()
        for w in self.workers:
            w.kill()
        self._umount_view()

    def _kill_daemon(self) -> None:
        """SIGKILL the supervisor and every process under it (the filler), as a power cut would."""
        rt = os.path.join(RUN_DIR, self.name + ".json")
        if self.pid is None and os.path.exists(rt):  # started, but the test never learnt its pid
            try:
                with open(rt) as f:
                    self.pid = int(json.load(f)["pid"])
            except (OSError, ValueError, KeyError):
                pass
        if self.pid is not None:
            pid = self.pid
            try:
                os.kill(pid, signal.SIGSTOP)  # no filler restarts from here on
            except ProcessLookupError:
                pass
            pids = [pid, *_descendants(pid)]
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait(lambda: all(_gone(p) for p in pids), 30, f"hsmfs processes {pids} to die")
            self.pid = None
        # a reboot empties /run: runtime record, control socket, in-flight journal of the old group
        for ext in (".json", ".sock", ".journal"):
            try:
                os.unlink(os.path.join(RUN_DIR, self.name + ext))
            except FileNotFoundError:
                pass

    def _umount_view(self) -> None:
        if is_mountpoint(self.target):
            _sh("umount", "-l", self.target)

    def reboot(self, commit_interval: float = 0.05) -> None:
        """Remount the store (journal replay), record its raw state, mount a new view of it."""
        self.disk.restart()
        self.raw = {rel: Raw.of(self.backing(rel)) for rel in self.source.rels}
        stored = tree.Store.load(self.store)
        self.unclean = stored is not None and stored.mounted
        self.mount(commit_interval)

    def close(self) -> None:
        """Leave nothing behind, whatever state the test stopped in."""
        try:
            for w in self.workers:
                w.kill()
            if self.pid is not None and os.path.exists(os.path.join(RUN_DIR, self.name + ".sock")):
                pids = [self.pid, *_descendants(self.pid)]
                try:
                    r = hsmfs("umount", self.target, check=False, timeout=60)
                    if r.returncode == 0:
                        _wait(lambda: all(_gone(p) for p in pids), 30, f"hsmfs processes {pids} to exit")
                        self.pid = None
                except (subprocess.TimeoutExpired, AssertionError):
                    pass
        finally:
            try:
                self._kill_daemon()
                if is_mountpoint(self.target):
                    _sh("umount", "-l", self.target, check=False)
            finally:
                self.disk.close()
                try:
                    os.unlink(os.path.join(LOG_DIR, self.name + ".log"))
                except FileNotFoundError:
                    pass


def _descendants(pid: int) -> list[int]:
    """Every process below pid (children, their children...), from /proc/PID/stat."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp == frontier[-1]]
        frontier.pop()
        out += kids
        frontier += kids
    return out


def _in_group(pgid: int) -> bool:
    """Whether a live process is in process group pgid."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.fixture(params=FILESYSTEMS)
def crash(request: pytest.FixtureRequest, source: Source) -> Iterator[Crash]:
    base = tempfile.mkdtemp(prefix="hsmfs-crash-", dir="/var/tmp")
    c: Optional[Crash] = None
    try:
        c = Crash(request.param, base, source)
        yield c
    finally:
        try:
            if c is not None:
                c.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)


# -- what users did, and what may be on disk after the cut ---------------------------------------------

@dataclass
class Op:
    """One user write through the view. kind: how it was made durable.

    pwrite: pwrite, fsync. trunc: open O_TRUNC, write, fsync. datasync: pwrite, fdatasync.
    dsync: pwrite on an O_DSYNC fd. nosync: pwrite only (never promised to survive).
    """

    i: int
    rel: str
    kind: str
    off: int
    data: bytes

    def apply(self, content: bytes) -> bytes:
        if self.kind == "trunc":
            return self.data
        end = self.off + len(self.data)
        buf = bytearray(content)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[self.off:end] = self.data
        return bytes(buf)

    def as_json(self, path: str) -> dict[str, Any]:
        return {"i": self.i, "path": path, "kind": self.kind, "off": self.off, "data": self.data.hex()}


WRITER = r"""
import json, os, sys, time
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
for n, op in enumerate(json.load(open(sys.argv[1]))):
    if pause and n:
        time.sleep(pause)
    print("begin", op["i"], flush=True)
    data, kind = bytes.fromhex(op["data"]), op["kind"]
    flags = os.O_WRONLY | (os.O_TRUNC if kind == "trunc" else 0) | (os.O_DSYNC if kind == "dsync" else 0)
    try:
        fd = os.open(op["path"], flags)
        try:
            if kind == "trunc":
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            else:
                assert os.pwrite(fd, data, op["off"]) == len(data)
            if kind in ("pwrite", "trunc"):
                os.fsync(fd)
            elif kind == "datasync":
                os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        print("error", op["i"], e, flush=True)
        break  # like the power cut that caused it, the first error ends the writer
    print("done", op["i"], flush=True)
"""

READER = r"""
import os, random, sys, time
rnd = random.Random(int(sys.argv[1]))
pause = float(sys.argv[2])
paths = sys.argv[3:]
rnd.shuffle(paths)
for p in paths:
    try:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as e:
        print("error", p, e, flush=True)
    time.sleep(rnd.uniform(0, 2 * pause))
"""

HASHER = r"""
import hashlib, json, sys
out = {}
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            h, n = hashlib.sha256(), 0
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
                n += len(b)
        out[p] = [n, h.hexdigest()]
    except OSError as e:
        out[p] = [-1, str(e)]
print(json.dumps(out))
"""


class Users:
    """Every user write of a test, and which of them the writers saw complete (durable)."""

    def __init__(self, crash: Crash) -> None:
        self.crash = crash
        self.ops: list[Op] = []
        self.writers: list[Worker] = []

    def op(self, rel: str, kind: str, off: int, data: bytes) -> Op:
        o = Op(len(self.ops), rel, kind, off, data)
        self.ops.append(o)
        return o

    def run(self, ops: list[Op], pause: float = 0.0) -> Worker:
        """Start one writer process doing ops in order (pause seconds between two)."""
        plan = os.path.join(self.crash.base, f"plan-{len(self.writers)}.json")
        with open(plan, "w") as f:
            json.dump([o.as_json(self.crash.view(o.rel)) for o in ops], f)
        w = self.crash.spawn(WRITER, plan, *([str(pause)] if pause else []))
        self.writers.append(w)
        return w

    def events(self, word: str) -> set[int]:
        return {int(line.split()[1]) for w in self.writers for _, line in list(w.lines)
                if line.startswith(word + " ")}

    def errors_before_cut(self) -> list[str]:
        """Errors writers saw before the cut that stopped them (each writer its own, in tests that cut
        more than once)."""
        out = []
        for w in self.writers:
            cut = w.cut_at or self.crash.cut_at or float("inf")
            out += [line for t, line in list(w.lines) if line.startswith("error ") and t < cut]
        return out

    def files(self) -> dict[str, list[Op]]:
        out: dict[str, list[Op]] = {}
        for o in self.ops:
            out.setdefault(o.rel, []).append(o)
        return out

    def expectation(self, rel: str, src: bytes) -> tuple[bytes, Optional[Op], bool]:
        """(content every durable write gives, the one write that may or may not be there, whether
        the file holds a durable write of a user)."""
        done, begun = self.events("done"), self.events("begin")
        content, maybe, durable = src, None, False
        for o in self.files()[rel]:
            if o.i in done and o.kind != "nosync":
                if maybe is not None:  # a later durable write makes the earlier one durable too
                    content, maybe = maybe.apply(content), None
                content, durable = o.apply(content), True
            elif o.i in begun:
                assert maybe is None, f"{rel}: two writes that may or may not have landed"
                maybe = o
        return content, maybe, durable


def plan_writes(users: Users, rnd: random.Random, src: Source, rels: list[str], kinds: list[str],
                most: int = 3) -> list[Op]:
    """1..most writes per file, each differing from what the file holds at that point, round-robin."""
    per_file: list[list[Op]] = []
    for rel in rels:
        content = src.read(rel)
        ops = []
        for _ in range(rnd.randint(1, most)):
            kind = rnd.choice(kinds) if content else "trunc"
            if kind == "trunc":
                n = rnd.randrange(0, 30_000)
                if n == src.sums[rel][0]:
                    n += 1  # another size: a file whose size no longer matches its record is the user's
                o = users.op(rel, kind, 0, rnd.randbytes(n))
            else:
                off = rnd.randrange(len(content))
                n = rnd.randint(1, min(20_000, len(content) - off))
                data = bytearray(rnd.randbytes(n))
                data[0] = (content[off] + 1) % 256  # never a no-op
                o = users.op(rel, kind, off, bytes(data))
            content = o.apply(content)
            ops.append(o)
        per_file.append(ops)
    out = []
    for r in range(most):
        out += [ops[r] for ops in per_file if len(ops) > r]
    return out


# -- the checks ------------------------------------------------------------------------------------------

@dataclass
class Raw:
    """A file of the store tree right after the remount, before any hsmfs process runs."""

    exists: bool
    state: str = ""
    size: int = 0
    blocks: int = 0
    record: Optional[str] = None
    error: str = ""

    @classmethod
    def of(cls, path: str) -> Raw:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return cls(exists=False)
        try:
            rec = tree.read_record(path)
        except (OSError, tree.RecordError) as e:
            return cls(exists=True, size=st.st_size, error=str(e))
        try:
            fs = state.state_in_store(path).value
        except (OSError, state.DataError) as e:
            return cls(exists=True, size=st.st_size, error=str(e))
        return cls(exists=True, state=fs, size=st.st_size, blocks=st.st_blocks,
                   record=None if rec is None else f"size={rec.size}")

    def __str__(self) -> str:
        if not self.exists:
            return "missing"
        return (f"state={self.state or '?'} size={self.size} on-disk={self.blocks * 512} record=({self.record})"
                + (f" error={self.error}" if self.error else ""))


def diff(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes, expected {len(want)}"
    bad = [i for i in range(len(got)) if got[i] != want[i]] if len(got) < 5_000_000 else []
    if not bad:
        return "same bytes"
    zeros = all(got[i] == 0 for i in bad)
    return (f"{len(bad)} bytes differ, first at {bad[0]}, last at {bad[-1]}"
            + (" (all zeros where data belongs)" if zeros else ""))


def plausible(got: bytes, base: bytes, maybe: Op) -> bool:
    """got is base with the write maybe landed wholly, partly or not at all."""
    if got == base:
        return True
    if maybe.kind == "trunc":  # truncated, then some or none of the new bytes
        return len(got) <= len(maybe.data) and all(b in (maybe.data[i], 0) for i, b in enumerate(got))
    full = maybe.apply(base)
    if len(got) != len(full):
        return False
    lo, hi = maybe.off, maybe.off + len(maybe.data)
    return got[:lo] == full[:lo] and got[hi:] == full[hi:] and \
        all(got[i] in (base[i], full[i]) for i in range(lo, min(hi, len(got))))


def verify(c: Crash, users: Optional[Users] = None, *, resident_after: bool = True,
           cut_session: bool = True) -> list[str]:
    """Check (a), (b), (c) on the rebooted store and its new view; return what is wrong.

    cut_session: the cut stopped a session (a mount) of the store, so it must say so; False when the
    cut stopped only an offline command (``hsmfs evict`` on a store no mount serves)."""
    src = c.source
    bad: list[str] = []
    user_files = users.files() if users else {}
    expect: dict[str, tuple[bytes, Optional[Op], bool]] = {}
    for rel in user_files:
        assert users is not None
        expect[rel] = users.expectation(rel, src.read(rel))
    if users:
        bad += [f"a user write failed before the cut: {e}" for e in users.errors_before_cut()]

    def durable_user(rel: str) -> bool:
        return rel in expect and expect[rel][2]

    def check_resident(rel: str, state: str, when: str) -> None:
        # (a): resident means the source's bytes; (b): a file holding a durable user write is never resident
        if state != "resident":
            return
        if durable_user(rel):
            bad.append(f"{rel}: {when}: claims resident but holds a durable user write "
                       f"(raw after remount: {c.raw[rel]})")
            return
        if rel in expect:
            return  # a user may have written it (not durably): (a) does not apply
        with open(c.backing(rel), "rb") as f:
            got = f.read()
        want = src.read(rel)
        if got != want:
            bad.append(f"{rel}: {when}: claims resident with bytes that are not the source's: {diff(got, want)} "
                       f"(raw after remount: {c.raw[rel]})")

    # the store as the power cut left it (journal replayed, nothing of hsmfs running on it yet)
    # A store whose session was cut says so (hsmfs.json "mounted"); hsmfs then turns its resident
    # records into "unverified" before serving anything: fdatasync and O_DSYNC make a user's bytes
    # durable but not the mtime that marks a resident file dirty, so a raw "resident" record in a
    # cut store claims nothing. What hsmfs itself reports (below) must be right.
    assert c.unclean or not cut_session, "the cut store does not say its last session ended uncleanly"
    for rel in src.rels:
        raw = c.raw[rel]
        if not raw.exists or raw.error:
            bad.append(f"{rel}: after remount: {raw}")
            continue
        if not durable_user(rel):
            check_resident(rel, raw.state, "after remount")

    # what hsmfs stat says through the new view, before anything is read
    states = c.stat(src.rels)
    for rel in src.rels:
        check_resident(rel, states.get(rel, "?"), "hsmfs stat before reading")

    # (c): every file through the new view; two readers at once, in opposite orders
    paths = [c.view(r) for r in src.rels]
    hashers = [c.spawn(HASHER, *paths), c.spawn(HASHER, *reversed(paths))]
    sums: list[dict[str, list[Any]]] = []
    for h in hashers:
        h.finish()
        sums.append(json.loads(h.lines[-1][1]))
    for rel in src.rels:
        got_sums = {tuple(s[c.view(rel)]) for s in sums}
        if rel not in expect:
            if got_sums != {tuple(src.sums[rel])}:
                with open(c.backing(rel), "rb") as f:
                    what = diff(f.read(), src.read(rel))
                bad.append(f"{rel}: read through the new view {sorted(got_sums)} is not the source's: {what} "
                           f"(raw after remount: {c.raw[rel]})")
            continue
        want, maybe, _ = expect[rel]
        r = subprocess.run(["cat", c.view(rel)], capture_output=True, timeout=60)
        got = r.stdout
        if r.returncode != 0:
            bad.append(f"{rel}: user's file unreadable through the new view: {r.stderr.decode().strip()}")
        elif maybe is None and got != want:
            bad.append(f"{rel}: user's file lost or changed its durable writes: {diff(got, want)} "
                       f"(writes {[(o.kind, o.off, len(o.data)) for o in user_files[rel]]}; "
                       f"raw after remount: {c.raw[rel]})")
        elif maybe is not None and not plausible(got, want, maybe):
            bad.append(f"{rel}: user's file is neither with nor without its last write "
                       f"({maybe.kind} {len(maybe.data)} bytes at {maybe.off}): {diff(got, want)} "
                       f"(raw after remount: {c.raw[rel]})")
        elif len({s for s in got_sums}) != 1 or next(iter(got_sums))[1] != hashlib.sha256(got).hexdigest():
            bad.append(f"{rel}: two readers of the user's file saw different bytes: {sorted(got_sums)}")

    # after the refills are committed: the source's files are resident, users' files dirty
    if resident_after:
        c.flush()
        states = c.stat(src.rels)
        for rel in src.rels:
            state = states.get(rel, "?")
            check_resident(rel, state, "hsmfs stat after reading")
            if durable_user(rel) and state != "dirty":
                bad.append(f"{rel}: holds a durable user write but is {state}, not dirty")
            elif rel not in expect and state != "resident":
                bad.append(f"{rel}: filled from the source but {state}, not resident "
                           f"(raw after remount: {c.raw[rel]})")
    return bad


def summary(c: Crash) -> str:
    """What the cut left, for the log (pytest -s): which recovery paths the test went through."""
    n: dict[str, int] = {}
    for rel, raw in c.raw.items():
        kind = raw.state if raw.state != "stub" else ("stub holding data" if raw.blocks else "empty stub")
        if kind == "stub holding data" and raw.blocks * 512 >= c.source.sums[rel][0]:
            kind = "stub holding all its data"
        n[kind] = n.get(kind, 0) + 1
    return f"{c.fstype}: after the cut: " + ", ".join(f"{v} {k}" for k, v in sorted(n.items()))


def report(c: Crash, bad: list[str], what: str) -> str:
    log = c.log.splitlines()
    return (f"{c.fstype} ({c.disk.how}), {what}: {len(bad)} problems\n  " + "\n  ".join(bad[:40])
            + "\n--- filler log (last 30 lines) ---\n" + "\n".join(log[-30:]))


def filled(c: Crash, rels: list[str]) -> int:
    """How many of rels hold data (or delayed-allocation reservations) in the store now."""
    n = 0
    for rel in rels:
        try:
            n += os.lstat(c.backing(rel)).st_blocks > 0
        except OSError:
            pass
    return n


def read_all(c: Crash, rels: list[str]) -> None:
    """Read rels through the view in one process and check they are the source's bytes."""
    h = c.spawn(HASHER, *[c.view(r) for r in rels])
    h.finish()
    got = json.loads(h.lines[-1][1])
    for rel in rels:
        assert tuple(got[c.view(rel)]) == c.source.sums[rel], f"{c.fstype}: {rel} read wrong before the cut"


# -- 1. readers filling many files ---------------------------------------------------------------------

def test_cut_during_fills_and_commits(crash: Crash, source: Source) -> None:
    """Four readers of all 300 files; the power goes when a random share of them holds data.

    Then again, while the new view refills what the first cut left (stubs holding some of their
    data are compared with the source and completed): a cut during recovery must be as harmless.
    """
    c = crash
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    c.mount(commit_interval=0.05)
    rels = [r for r in source.rels if source.sums[r][0] > 0]

    def readers() -> list[Worker]:  # a pause between files spreads the fills over a second, many commits
        return [c.spawn(READER, str(rnd.randrange(1 << 30)), "0.002", *[c.view(r) for r in source.rels])
                for _ in range(4)]

    def failures(ws: list[Worker], when: str) -> list[str]:
        return [f"{when}: a reader failed before the cut: {line}" for w in ws for t, line in w.lines
                if line.startswith("error ") and c.cut_at is not None and t < c.cut_at]

    first = readers()
    goal = rnd.randint(len(rels) // 8, len(rels) * 7 // 8)
    _wait(lambda: filled(c, rels) >= goal or all(w.proc.poll() is not None for w in first), 120,
          f"{goal} files to fill", step=0.005)
    c.cut()
    bad = failures(first, "first cut")
    c.reboot()
    print(summary(c), f"(first cut when {goal} files held data)")
    bad += [f"first cut: {b}" for b in resident_mismatches(c)]  # (a) on what it left; the rest after the second

    second = readers()
    pause = rnd.uniform(0.02, 0.6)  # the leftovers hold data already: cut after a random time
    time.sleep(pause)
    c.cut()
    bad += failures(second, "second cut")
    c.reboot()
    print(summary(c), f"(second cut {pause:.2f} s into the refill)")
    bad += verify(c)
    assert not bad, report(c, bad, f"seed {seed}, first cut when {goal} files held data, second {pause:.2f} s "
                                   "into the refill")


def resident_mismatches(c: Crash) -> list[str]:
    """(a) on the raw store: files recorded resident whose bytes are not the source's."""
    out = []
    for rel, raw in c.raw.items():
        if raw.state == "resident":
            with open(c.backing(rel), "rb") as f:
                got = f.read()
            want = c.source.read(rel)
            if got != want:
                out.append(f"{rel}: after remount: claims resident with bytes that are not the source's: "
                           f"{diff(got, want)} ({raw})")
    return out


# -- 2. users writing while readers fill ---------------------------------------------------------------

def test_cut_during_user_writes(crash: Crash, source: Source) -> None:
    """Writers pwrite+fsync into stubs and rewrite others with O_TRUNC+fsync while readers fill."""
    c = crash
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    c.mount(commit_interval=0.05)
    users = Users(c)
    chosen = rnd.sample(source.rels, 36)
    for k in range(3):
        users.run(plan_writes(users, rnd, source, chosen[k::3], ["pwrite", "pwrite", "trunc"]))
    for _ in range(2):
        c.spawn(READER, str(rnd.randrange(1 << 30)), "0.002", *[c.view(r) for r in source.rels])
    goal = rnd.randint(2, len(users.ops) * 3 // 4)
    _wait(lambda: len(users.events("done")) >= goal or all(w.proc.poll() is not None for w in users.writers),
          120, f"{goal} user writes to complete")
    c.cut()
    done = len(users.events("done"))
    c.reboot()
    print(summary(c), f"(cut after {done} of {len(users.ops)} user writes)")
    bad = verify(c, users)
    assert not bad, report(c, bad, f"seed {seed}, cut after {done} of {len(users.ops)} user writes")


# -- 3. a fill written and allowed, not committed ------------------------------------------------------

def test_cut_between_fill_and_commit(crash: Crash, source: Source) -> None:
    """commit_interval 30 s: every fill is written and allowed, none committed, when the power goes.

    A: filled only (data in the page cache). B: filled, then the store synced (data durable, record
    still "stub"). E: filled, then the first half written back. C: filled, then a user's pwrite and
    fsync. D: a user's O_TRUNC write and fsync. F: filled, then a user's pwrite without fsync.
    After the reboot each must be a stub or resident with the source's bytes, and C and D the
    user's: the refill compares what is there with the source and leaves differing bytes alone.
    """
    c = crash
    rnd = random.Random(3)
    c.mount(commit_interval=30)
    pool = source.sized(4097)
    rnd.shuffle(pool)
    groups = {g: pool[i * 5:(i + 1) * 5] for i, g in enumerate("ABCDEF")}
    users = Users(c)

    read_all(c, groups["B"])
    c.disk.sync()
    read_all(c, groups["E"])
    for rel in groups["E"]:  # msync(MS_SYNC) of the first half: that range durable, the rest not
        with open(c.backing(rel), "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m.flush(0, source.sums[rel][0] // 2 // mmap.PAGESIZE * mmap.PAGESIZE or mmap.PAGESIZE)
    read_all(c, groups["C"])
    users.run(plan_writes(users, rnd, source, groups["C"], ["pwrite"], most=2)).finish()
    users.run(plan_writes(users, rnd, source, groups["D"], ["trunc"], most=1)).finish()
    read_all(c, groups["A"] + groups["F"])
    users.run(plan_writes(users, rnd, source, groups["F"], ["nosync"], most=1)).finish()
    status = c.status()["filler"]
    assert status["commits"] == 0 and status["pending_commit"] > 0, \
        f"the scenario needs fills that are not committed yet: {status}"
    c.cut()
    c.reboot()
    print(summary(c))
    bad = verify(c, users)
    for rel in source.rels:
        if c.raw[rel].state == "resident":
            bad.append(f"{rel}: resident after the reboot, but no commit ever ran: {c.raw[rel]}")
    durable = [r for r in groups["B"] if c.raw[r].blocks * 512 < source.sums[r][0]]
    assert not durable, f"{c.fstype}: test setup: syncfs did not make these fills durable: {durable}"
    assert not bad, report(c, bad, "cut between fills and their commit")


# -- 4. user writes made durable by less than fsync ------------------------------------------------------

def test_cut_after_partial_syncs(crash: Crash, source: Source) -> None:
    """Writes made durable by O_DSYNC (only the written range) or fdatasync (data, not mtime).

    G: filled, not committed, then a user's pwrite on an O_DSYNC fd: that range is durable, the
    rest of the fill is not. H: resident (committed), then a user's pwrite and fdatasync: the data
    is durable, the new mtime (which is how a resident file is known to be dirty) is not.
    """
    c = crash
    rnd = random.Random(4)
    pool = source.sized(64 * 1024)
    rnd.shuffle(pool)
    g, h = pool[:5], pool[5:10]
    c.mount(commit_interval=0.05)
    read_all(c, h)
    c.flush()
    c.umount()
    c.mount(commit_interval=30)
    assert set(c.stat(h).values()) == {"resident"}
    users = Users(c)
    read_all(c, g)
    users.run(plan_writes(users, rnd, source, g, ["dsync"], most=1)).finish()
    # last: a journal commit forced by anything after it would make the new mtime durable too
    users.run(plan_writes(users, rnd, source, h, ["datasync"], most=1)).finish()
    c.cut()
    c.reboot()
    bad = verify(c, users)
    assert not bad, report(c, bad, "cut after O_DSYNC and fdatasync writes")


# -- 5. evictions: resident -> stub -> resident, over and over ------------------------------------------

EVICTOR = r"""
import json, subprocess, sys, time
cmd = [sys.executable, "-m", "hsmfs", "evict", "--json", *sys.argv[1:]]
n = 0
while True:
    print("start", n, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    try:
        rows = json.loads(r.stdout) if r.stdout.strip() else []
    except ValueError:
        rows = []
    print("end", json.dumps({"n": n, "rc": r.returncode, "evicted": [x["path"] for x in rows if x["evicted"]],
                             "files": len(rows), "said": r.stderr.strip().splitlines()[-1:]}), flush=True)
    n += 1
"""

# hsmfs itself, in the worker process (killing the worker kills the command: the cut stops it)
CLI = r"""
import runpy, sys
sys.argv = ["hsmfs", *sys.argv[1:]]
runpy.run_module("hsmfs", run_name="__main__", alter_sys=True)
"""

SYNCER = r"""
import os, random, sys, time
from hsmfs.linux.fs import syncfs
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
rnd = random.Random(int(sys.argv[2]))
while True:
    time.sleep(rnd.uniform(0.005, 0.05))
    syncfs(fd)
"""

EVICT_ROUNDS = int(os.environ.get("HSMFS_CRASH_EVICT_ROUNDS", "3"))


def evictions(c: Crash) -> int:
    """The filler's eviction count (its control socket, asked from here: no process to start)."""
    from hsmfs.control import request

    return int(request(c.name, {"op": "status"}, timeout=10)["filler"]["evictions"])


def stub_records(c: Crash, rels: list[str]) -> int:
    """How many of rels the state log says are stubs now (in memory: durable or not)."""
    n = 0
    for rel in rels:
        try:
            n += state.state_in_store(c.backing(rel)) is state.FileState.STUB
        except (OSError, state.DataError):
            continue
    return n


def evictor_runs(w: Worker, c: Crash) -> tuple[list[tuple[float, float, list[str]]], list[str]]:
    """The evictor's finished runs, (start, end, evicted rels) each, and its failures before the cut."""
    runs, bad, started = [], [], 0.0
    for t, line in list(w.lines):
        word = line.split(" ", 1)[0]
        if word == "start":
            started = t
        elif word == "end":
            r = json.loads(line.split(" ", 1)[1])
            runs.append((started, t, [os.path.relpath(p, c.target) for p in r["evicted"]]))
            if r["rc"] not in (0, 75) and (c.cut_at is None or t < c.cut_at):  # 75: some files in use
                bad.append(f"hsmfs evict failed ({r['rc']}) before the cut: {r['said']}")
        elif c.cut_at is None or t < c.cut_at:
            bad.append(f"evictor: {line}")
    return runs, bad


def test_cut_during_evictions(crash: Crash, source: Source) -> None:
    """`hsmfs evict` of the whole view in a loop, readers refilling, users writing; the power goes.

    Every file is resident and committed at the start of a round. Then one process runs
    ``hsmfs evict --json VIEW`` over and over (through the filler), two readers read every file
    again and again (each read of an evicted file refills it: resident -> stub -> resident), and a
    user writes a few files, one write every 0.1 s: pwrite+fsync, pwrite+fdatasync or
    O_TRUNC+write+fsync (a dirty file is never evicted). The power goes a random 0.3-1.5 s after
    the first eviction. After the reboot (a, b, c) are checked, every file is refilled and
    committed, and the next round starts
    on the same store (HSMFS_CRASH_EVICT_ROUNDS rounds, 3 by default): users' files of earlier
    rounds must stay theirs through the later evictions and cuts.
    """
    c = crash
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    c.mount(commit_interval=0.05)
    users = Users(c)
    pool = [r for r in source.rels if source.sums[r][0] > 0]
    rnd.shuffle(pool)
    per_round = 4
    paths = [c.view(r) for r in source.rels]
    read_all(c, source.rels)
    c.flush()
    bad: list[str] = []
    cuts: list[str] = []
    for k in range(EVICT_ROUNDS):
        mine = pool[k * per_round:(k + 1) * per_round]
        states = c.stat(source.rels)
        resident = sorted(r for r, s in states.items() if s == "resident")
        assert len(resident) > len(source.rels) // 2, f"round {k}: too few resident files to evict: {states}"
        evictor = c.spawn(EVICTOR, c.target, session=True)
        readers = [c.spawn(READER, str(rnd.randrange(1 << 30)), "0.002", *(paths * 20)) for _ in range(2)]
        writer = users.run(plan_writes(users, rnd, source, mine, ["pwrite", "datasync", "trunc"]), pause=0.1)
        _wait(lambda e=evictor: evictions(c) > 0 or e.proc.poll() is not None, 60, "the first eviction", step=0.01)
        pause = rnd.uniform(0.3, 1.5)
        time.sleep(pause)
        before = evictions(c)
        c.cut()
        runs, failed = evictor_runs(evictor, c)
        failed += [f"a reader failed before the cut: {line}" for w in readers for t, line in w.lines
                   if line.startswith("error ") and c.cut_at is not None and t < c.cut_at]
        done = users.events("done")
        # a user's file is dirty from its first durable write on: an eviction run begun after it must skip it
        for rel in mine:
            durable = [t for w in [writer] for t, line in w.lines if line.startswith("done ")
                       and any(o.rel == rel and o.i == int(line.split()[1]) and o.kind != "nosync" for o in users.ops)]
            for start, _end, evicted in runs:
                if durable and start > min(durable) and rel in evicted:
                    failed.append(f"{rel}: evicted by a run begun after a user's durable write")
        c.reboot()
        what = (f"round {k}: cut {pause:.2f} s after the first eviction, after {before} evictions "
                f"({len(runs)} evict runs finished), {len([o for o in users.ops if o.rel in mine and o.i in done])}"
                f" of {len([o for o in users.ops if o.rel in mine])} user writes")
        print(summary(c), f"({what})")
        cuts.append(what)
        assert before > 0, f"{c.fstype}: round {k}: no eviction before the cut: {evictor.lines[-5:]}"
        round_bad = failed + verify(c, users)
        bad += [f"round {k}: {b}" for b in round_bad]
        if round_bad:
            break  # the next round would only pile on
    print(f"{c.fstype}: " + "; ".join(cuts))
    assert not bad, report(c, bad, f"seed {seed}; " + "; ".join(cuts))


def test_cut_during_offline_eviction(crash: Crash, source: Source) -> None:
    """`hsmfs evict STORE/tree` on a store no mount serves (so no marks), cut by the power.

    The store was unmounted cleanly, so after the cut nothing downgrades its resident records:
    the next session trusts them as they are. A syncfs every 5-50 ms (the journal's periodic
    commit, sped up) makes some evictions durable, whole or half done. The cut comes once a random
    number of files has a "stub" record; then (a, b, c) on a new view, which refills everything,
    and it is unmounted cleanly again for the next round (HSMFS_CRASH_EVICT_ROUNDS).
    """
    c = crash
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    rnd.seed(seed)
    c.mount(commit_interval=0.05)
    read_all(c, source.rels)
    c.flush()
    c.umount()
    bad: list[str] = []
    cuts: list[str] = []
    for k in range(EVICT_ROUNDS):
        base = stub_records(c, source.rels)
        goal = rnd.randint(1, (len(source.rels) - base) * 7 // 8)
        # the journal's own periodic commits (5 s on ext4, 30 s on xfs) would rarely land in a run this
        # short: a syncfs every 5-50 ms stands in for them, so some evictions are durable at the cut
        c.spawn(SYNCER, c.disk.mnt, str(rnd.randrange(1 << 30)))
        w = c.spawn(CLI, "evict", "--json", os.path.join(c.store, "tree"))
        _wait(lambda b=base, g=goal, w=w: stub_records(c, source.rels) - b >= g or w.proc.poll() is not None, 120,
              f"{goal} evictions", step=0.002)
        before = stub_records(c, source.rels) - base
        finished = w.proc.poll() is not None
        c.cut()
        c.reboot()
        durable = sum(c.raw[r].state == "stub" for r in source.rels) - base
        what = (f"round {k}: cut after {before} evictions (goal {goal}; {durable} stub records durable)"
                + (" AFTER hsmfs evict had finished" if finished else ""))
        print(summary(c), f"({what})")
        cuts.append(what)
        assert before > 0, f"{c.fstype}: round {k}: no eviction before the cut: {w.lines[-5:]}"
        round_bad = verify(c, cut_session=False)
        bad += [f"round {k}: {b}" for b in round_bad]
        c.umount()
        if round_bad:
            break
    print(f"{c.fstype}: " + "; ".join(cuts))
    assert not bad, report(c, bad, f"seed {seed}; " + "; ".join(cuts))


def test_offline_evict_after_cut_keeps_fdatasync_writes(crash: Crash, source: Source) -> None:
    """`hsmfs evict STORE/tree` after a power cut, before any mount: fdatasync'd user writes stay.

    H: resident (committed), then a user's pwrite and fdatasync, then the cut (as in scenario 4:
    the data is durable, the new mtime that marks the file dirty is not). The store says its
    session was cut ("mounted" in hsmfs.json), so its "resident" records claim nothing; a mount
    would turn them into "unverified" and compare each with its source. An offline eviction must
    distrust them the same way: evicting H on its record's word throws the user's bytes away.
    """
    c = crash
    rnd = random.Random(5)
    pool = source.sized(64 * 1024)
    rnd.shuffle(pool)
    h = pool[:5]
    c.mount(commit_interval=0.05)
    read_all(c, h)
    c.flush()
    c.umount()
    c.mount(commit_interval=30)
    assert set(c.stat(h).values()) == {"resident"}
    users = Users(c)
    users.run(plan_writes(users, rnd, source, h, ["datasync"], most=1)).finish()
    c.cut()
    c.disk.restart()  # the reboot, without mounting: nobody serves the store
    stored = tree.Store.load(c.store)
    assert stored is not None and stored.mounted, "the cut store does not say its last session ended uncleanly"
    lost_mtime = [r for r in h if state.state_in_store(c.backing(r)) is state.FileState.RESIDENT]
    out = hsmfs("evict", "--json", *[c.backing(r) for r in h], check=False)
    rows = {os.path.relpath(r["path"], os.path.join(c.store, "tree")): r for r in json.loads(out.stdout or "[]")}
    c.raw = {rel: Raw.of(c.backing(rel)) for rel in source.rels}
    c.unclean = True
    c.mount(commit_interval=0.05)
    bad = [f"{rel}: holds a user's fdatasync'd write (its record still said resident after the cut), and the "
           f"offline hsmfs evict evicted it: {rows[rel]}" for rel in h if rows.get(rel, {}).get("evicted")]
    bad += verify(c, users)
    print(f"{c.fstype}: {len(lost_mtime)} of {len(h)} files lost their new mtime in the cut; offline evict: "
          f"{out.stderr.strip()}")
    assert not bad, report(c, bad, f"offline hsmfs evict after a cut ({len(lost_mtime)} of {len(h)} files "
                                   "lost their new mtime)")


def test_evict_unverified_after_cut(crash: Crash, source: Source) -> None:
    """`hsmfs evict` through the filler, first thing after a cut: the records are "unverified".

    The new session turned the cut session's resident records into "unverified"; evicting one
    compares it with its source under the write lease. That must neither stall the filler (an
    eviction is quick; a reader of another file is served meanwhile) nor call the file in use:
    nobody has it open, and it equals its source, so it is evicted.
    """
    c = crash
    pool = source.sized(64 * 1024)
    victim, other = pool[0], pool[1]
    c.mount(commit_interval=0.05, fill_ahead=False)  # other stays a stub
    read_all(c, [victim])
    c.flush()
    c.cut()
    c.reboot()
    assert c.stat([victim, other]) == {victim: "unverified", other: "stub"}
    t0 = time.monotonic()
    ev = subprocess.Popen([sys.executable, "-m", "hsmfs", "evict", "--json", c.view(victim)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bad = []
    try:
        time.sleep(1)
        h = c.spawn(HASHER, c.view(other))
        try:
            h.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            bad.append(f"{other}: a read through the view waited more than 10 s while {victim} was being evicted")
        h.kill()
        try:
            out, err = ev.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            with open("/proc/sys/fs/lease-break-time") as f:
                lease_break = f.read().strip()
            bad.append(f"hsmfs evict of one unverified file took more than 20 s (lease-break-time is {lease_break} s)")
            out, err = "", ""
    finally:
        if ev.poll() is None:
            ev.kill()
            ev.communicate()
    took = time.monotonic() - t0
    rows = json.loads(out) if out.strip() else []
    if rows and not rows[0]["evicted"]:
        bad.append(f"{victim}: unverified, equal to its source, used by nobody, not evicted: {rows[0]['reason']}")
    print(f"{c.fstype}: evicting one unverified file took {took:.1f} s: {rows} {err.strip()}")
    assert not bad, report(c, bad, f"evicting an unverified file ({took:.1f} s)")
