"""What hsmfs knows about each file beyond its stub record: the state log, ``STORE/state``.

Why a log beside the tree and not an xattr on the file: any change to a file's xattrs changes its
ctime, and ctime is the one thing about a file that its users cannot set. A file's state lives
here, keyed by its file handle (inode and generation: a renamed or hard-linked file keeps it, a
new file never reuses it), so hsmfs never changes a file after the fill that made it resident,
and "resident" can say at which ctime:

- **resident at ctime C**: all of the file's data was made durable by a commit, after which the
  file's ctime was C. If its ctime is no longer C, someone changed the file since (a write, an
  mmap write, a truncate, a punch, a chmod, an xattr, a utime setting mtime back: Linux 6.13+
  gives every change after a stat a new ctime, and nobody can set ctime); it is **dirty**: never
  refetched over, never evicted.
- **dirty**: known to differ from its source.
- **unverified at ctime C**: was resident when a session ended uncleanly. fdatasync and O_DSYNC
  make a user's bytes durable but not the ctime that would tell (docs/reliability.md), so its
  bytes are compared with the source before it is evicted.
- **stub** (or no entry): the record's description is all there is; the file may hold some of
  its data (a fill cut short) and every byte it holds is compared with the source before it is
  trusted.
- **pinned** is kept apart (its own ops): never evicted.

Format: a 16-byte header ``b"HSMFS-STATE\\0"`` + u32 version (1), then 48-byte entries
(``struct "<BBHi24sqII"``): op, handle length, 0, handle type, handle (zero-padded), ctime_ns,
0, CRC-32 of the first 44 bytes. Ops: 1 resident, 2 dirty, 3 unverified, 4 stub (forget), 5 pin,
6 unpin; the last state op and the last pin op of a handle win. A torn tail (a crash mid-append)
fails its CRC and is dropped. Appends are whole entries with O_APPEND under a shared flock;
compaction rewrites the live entries into a new file under an exclusive flock and renames it into
place (appenders that find the file replaced reopen it).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from hsmfs import tree
from hsmfs.errors import DataError
from hsmfs.linux.fs import open_beneath, syncfs
from hsmfs.linux.handles import handle_at, handle_of

log = logging.getLogger("hsmfs.state")

HEADER = b"HSMFS-STATE\0" + struct.pack("<I", 1)
_ENTRY = struct.Struct("<BBHi24sqII")
ENTRY_SIZE = _ENTRY.size  # 48
MAX_HANDLE = 24  # ext4 8, xfs 12, btrfs 20 bytes
COMPACT_MIN = 1 << 20  # bytes: never compact a smaller log while serving

OP_RESIDENT, OP_DIRTY, OP_UNVERIFIED, OP_STUB, OP_PIN, OP_UNPIN = 1, 2, 3, 4, 5, 6
_STATE_OPS = frozenset({OP_RESIDENT, OP_DIRTY, OP_UNVERIFIED, OP_STUB})

T = TypeVar("T")
Key = bytes  # handle type (4 bytes, little-endian) + handle


class FileState(str, enum.Enum):
    """What a user sees (``hsmfs stat``)."""

    STUB = "stub"  # no data of its own yet (or a fill that was cut short)
    FILLED = "filled"  # all its data is there, the commit that makes it resident is pending
    RESIDENT = "resident"
    UNVERIFIED = "unverified"
    DIRTY = "dirty"
    LOCAL = "local"  # made by a user of the view: not from the source

    def __str__(self) -> str:
        return self.value


SETTLED = frozenset({FileState.RESIDENT, FileState.UNVERIFIED, FileState.DIRTY, FileState.LOCAL})


def make_key(handle_type: int, handle: bytes) -> Key:
    if len(handle) > MAX_HANDLE:
        raise DataError(f"a file handle of {len(handle)} bytes: hsmfs knows ext4, xfs and btrfs handles "
                        f"(at most {MAX_HANDLE})")
    return struct.pack("<i", handle_type) + handle


def split_key(key: Key) -> tuple[int, bytes]:
    return struct.unpack_from("<i", key)[0], key[4:]


def key_of(fd: int) -> Key:
    """The key of the file behind fd (any fd, O_PATH included)."""
    return make_key(*handle_of(fd))


def key_at(path: str, dirfd: int = -100) -> Key:
    """The key of the file at path (relative to dirfd), symlinks not followed, without opening it."""
    return make_key(*handle_at(dirfd, path))


@dataclass(frozen=True)
class Entry:
    op: int
    ctime_ns: int = 0


def classify(rec: Optional[tree.Record], st: os.stat_result, entry: Optional[Entry]) -> FileState:
    """The state of a file from its record, its stat and its log entry."""
    if rec is None or not stat.S_ISREG(st.st_mode):
        return FileState.LOCAL
    if entry is None or entry.op == OP_STUB:
        return FileState.STUB
    if entry.op == OP_DIRTY or st.st_ctime_ns != entry.ctime_ns:
        return FileState.DIRTY
    return FileState.UNVERIFIED if entry.op == OP_UNVERIFIED else FileState.RESIDENT


def _encode(key: Key, op: int, ctime_ns: int) -> bytes:
    htype, handle = split_key(key)
    head = _ENTRY.pack(op, len(handle), 0, htype, handle, ctime_ns, 0, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


class StateLog:
    """STORE/state, loaded into memory; writable=True to record changes (creates it if missing)."""

    def __init__(self, store_path: str, *, writable: bool = False) -> None:
        self.path = os.path.join(store_path, "state")
        self.writable = writable
        self.states: dict[Key, Entry] = {}
        self.pins: set[Key] = set()
        self._lock = threading.Lock()
        self._fd = -1
        self._end = 0  # bytes of the file read so far (whole entries only)
        self._size = 0  # bytes in the file, valid or not, when last read
        self._open()

    # -- reading -------------------------------------------------------------------------------
    def _open(self) -> None:
        flags = os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_RDWR | os.O_APPEND | os.O_CREAT if self.writable else os.O_RDONLY)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # read-only and none yet: every file is a stub or a user's
            self._fd, self._end, self._size = -1, 0, 0
            self.states, self.pins = {}, set()
            return
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._end, self._size = fd, 0, 0
        if self.writable and os.fstat(fd).st_size == 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size == 0:
                    _write_all(fd, HEADER)
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        states: dict[Key, Entry] = {}
        pins: set[Key] = set()
        self._read_into(states, pins)  # other threads read the old tables until the new ones are whole
        self.states, self.pins = states, pins

    def _read_new(self) -> None:
        """Apply the entries appended since the last read."""
        self._read_into(self.states, self.pins)

    def _read_into(self, states: dict[Key, Entry], pins: set[Key]) -> None:
        if self._fd < 0:
            return
        size = os.fstat(self._fd).st_size
        data = _pread_all(self._fd, size - self._end, self._end) if size > self._end else b""
        off = 0
        if self._end == 0:
            if len(data) < len(HEADER):
                self._size = size
                return  # being created
            if data[:12] != HEADER[:12]:
                raise DataError(f"{self.path} is not an hsmfs state log", hint="remove the store and mount again")
            if data[:len(HEADER)] != HEADER:
                raise DataError(f"{self.path}: state log version {struct.unpack_from('<I', data, 12)[0]}; this "
                                "hsmfs reads version 1", hint="use the hsmfs version that made this store")
            off = len(HEADER)
        while off + ENTRY_SIZE <= len(data):
            raw = data[off:off + ENTRY_SIZE]
            if zlib.crc32(raw[:-4]) != struct.unpack_from("<I", raw, ENTRY_SIZE - 4)[0]:
                break  # a torn tail
            op, hlen, _r, htype, handle, ctime_ns, _r2, _crc = _ENTRY.unpack(raw)
            key = struct.pack("<i", htype) + handle[:hlen]
            if op in _STATE_OPS:
                if op == OP_STUB:
                    states.pop(key, None)
                else:
                    states[key] = Entry(op, ctime_ns)
            elif op == OP_PIN:
                pins.add(key)
            elif op == OP_UNPIN:
                pins.discard(key)
            off += ENTRY_SIZE
        self._end += off
        self._size = size

    def refresh(self) -> None:
        """See what other processes recorded since (pins, an offline eviction), or a compacted log."""
        with self._lock:
            if self._replaced():
                self._open()
            else:
                self._read_new()

    def _replaced(self) -> bool:
        try:
            return self._fd < 0 or os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return self._fd >= 0

    def get(self, key: Key) -> Optional[Entry]:
        return self.states.get(key)

    def pinned(self, key: Key) -> bool:
        return key in self.pins

    def state(self, rec: Optional[tree.Record], st: os.stat_result, key: Optional[Key]) -> FileState:
        return classify(rec, st, self.states.get(key) if key is not None else None)

    # -- writing -------------------------------------------------------------------------------
    def record(self, items: Iterable[tuple[Key, int, int]], *, durable: bool = True) -> None:
        """Append (key, op, ctime_ns) entries; with durable, they are on disk when this returns."""
        items = list(items)
        if not items:
            return
        if not self.writable:
            raise RuntimeError("StateLog opened read-only")
        data = b"".join(_encode(k, op, c) for k, op, c in items)
        with self._lock:
            # shared: O_APPEND writes of whole entries from several processes don't interleave;
            # exclusive only to cut a torn tail (a crash mid-append), which must not be mistaken
            # for another appender's write in progress
            if not self._with_lock(fcntl.LOCK_SH, lambda: self._append(data, durable, exclusive=False)):
                self._with_lock(fcntl.LOCK_EX, lambda: self._append(data, durable, exclusive=True))

    def _append(self, data: bytes, durable: bool, *, exclusive: bool) -> bool:
        self._read_new()  # others' entries first
        if self._size > self._end:  # bytes after the last whole entry
            if not exclusive:
                return False
            os.ftruncate(self._fd, self._end)
        _write_all(self._fd, data)
        if durable:
            os.fdatasync(self._fd)
        self._read_new()
        return True

    def _with_lock(self, how: int, action: Callable[[], T]) -> T:
        """action() under flock(how) on the current log file (reopened first if it was replaced)."""
        while True:
            fcntl.flock(self._fd, how)
            try:
                if not self._replaced():
                    return action()
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._open()

    def compact(self, *, distrust: bool = False, force: bool = False) -> bool:
        """Rewrite the log with one entry per live fact; with distrust, "resident" becomes "unverified"
        (the last session ended uncleanly). Without force, only a log much larger than its facts."""
        with self._lock:
            live = len(self.states) + len(self.pins)
            if not (force or distrust) and (self._end < COMPACT_MIN or self._end < 4 * live * ENTRY_SIZE):
                return False

            def rewrite() -> None:
                self._read_new()
                out = [HEADER]
                for key, e in self.states.items():
                    op = OP_UNVERIFIED if distrust and e.op == OP_RESIDENT else e.op
                    out.append(_encode(key, op, e.ctime_ns))
                out.extend(_encode(key, OP_PIN, 0) for key in self.pins)
                tree.atomic_write(self.path, b"".join(out))

            self._with_lock(fcntl.LOCK_EX, rewrite)
            self._open()
            return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_all(fd: int, n: int, off: int) -> bytes:
    out = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 24), off)
        if not chunk:
            break
        out.append(chunk)
        n -= len(chunk)
        off += len(chunk)
    return b"".join(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- walking a tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeFile:
    path: str
    st: os.stat_result
    rec: Optional[tree.Record]
    key: Optional[Key]  # None for a user's file (no record): its state needs none
    state: FileState
    pinned: bool


def tree_files(root: str, log_: StateLog) -> Iterator[TreeFile]:
    """Every regular file beneath root with its state, each inode once; lstat, getxattr and
    name_to_handle_at only: no file is opened, so the walk raises no fanotify event."""
    for f, rec in tree.files(root):
        key = None
        if rec is not None:
            try:
                key = key_at(f.name, f.dirfd)
            except OSError:
                continue
        yield TreeFile(f.path, f.st, rec, key, log_.state(rec, f.st, key), key is not None and log_.pinned(key))


def state_of_path(path: str, log_: StateLog) -> FileState:
    """The state of the file at path (symlinks not followed)."""
    st = os.lstat(path)
    rec = tree.read_record(path) if stat.S_ISREG(st.st_mode) else None
    return log_.state(rec, st, key_at(path) if rec is not None else None)


# -- from hsmfs 0.1 -----------------------------------------------------------------------------

PIN_XATTR_V1 = "trusted.hsmfspin"


def upgrade(store: tree.Store) -> int:
    """Rewrite a schema-1 store (hsmfs 0.1: state and pin in xattrs) as schema 2; returns files upgraded.

    Each stub record is rewritten with the source object's identity (when the source still holds
    the file it describes); what 0.1 knew becomes log entries: resident and unverified files turn
    unverified (compared with the source before eviction), dirty ones dirty, pins pins. Safe to
    run again after a crash: records already rewritten are kept, their pins still in xattrs.
    """
    paths = tree.PathTable(store.path)
    log_ = StateLog(store.path, writable=True)
    rootfd = os.open(store.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    entries: list[tuple[Key, int, int]] = []
    pinned: list[str] = []
    done = 0
    try:
        for path, st, _rec in _records_any_schema(store.tree):
            raw = os.getxattr(path, tree.XATTR, follow_symlinks=False)
            try:
                if os.getxattr(path, PIN_XATTR_V1, follow_symlinks=False) == b"1":
                    pinned.append(path)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
            if raw[:1] != b"\x01":
                continue
            _v, state, size, mtime_ns, _atime, path_id = tree._RECORD_V1.unpack(raw)
            old = tree.V1_STATES[state] if state < len(tree.V1_STATES) else "dirty"
            ino = ctime = 0
            flags = 0
            try:
                sfd = open_beneath(rootfd, paths.get(path_id), os.O_PATH)
                try:
                    sst = os.fstat(sfd)
                finally:
                    os.close(sfd)
                if stat.S_ISREG(sst.st_mode) and sst.st_size == size and sst.st_mtime_ns == mtime_ns:
                    ino, ctime, flags = sst.st_ino, sst.st_ctime_ns, tree.FLAG_IDENTITY
            except (OSError, tree.RecordError):
                pass  # gone or changed: its fill fails on size or mtime as it did
            changed = st.st_size != size or (old != "stub" and st.st_mtime_ns != mtime_ns)
            tree.write_record(path, tree.Record(path_id, size, mtime_ns, ino, ctime, flags))
            key = key_at(path)
            if old == "dirty" or (old != "stub" and changed):
                entries.append((key, OP_DIRTY, 0))
            elif old in ("resident", "unverified"):
                entries.append((key, OP_UNVERIFIED, os.lstat(path).st_ctime_ns))
            done += 1
        entries.extend((key_at(p), OP_PIN, 0) for p in pinned)
        log_.record(entries, durable=True)
        for p in pinned:
            os.removexattr(p, PIN_XATTR_V1, follow_symlinks=False)
        tfd = os.open(store.tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(tfd)
        finally:
            os.close(tfd)
        store.schema = tree.SCHEMA
        store.save()
    finally:
        os.close(rootfd)
        log_.close()
        paths.close()
    log.info("upgraded %s from schema 1: %d stub records rewritten, %d states and %d pins moved to %s",
             store.path, done, len(entries) - len(pinned), len(pinned), log_.path)
    return done


def _records_any_schema(root: str) -> Iterator[tuple[str, os.stat_result, None]]:
    for f in tree.walk(root):
        try:
            os.getxattr(f.fd_path, tree.XATTR, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                continue
            raise
        yield f.path, f.st, None


def store_of(path: str) -> str:
    """The store directory whose tree holds path (STORE/tree/...)."""
    d = os.path.dirname(os.path.abspath(path))
    while d != "/":
        if os.path.basename(d) == "tree" and os.path.isfile(os.path.join(os.path.dirname(d), "hsmfs.json")):
            return os.path.dirname(d)
        d = os.path.dirname(d)
    raise FileNotFoundError(errno.ENOENT, "not in an hsmfs store's tree", path)


def state_in_store(path: str) -> FileState:
    """The state of the file at path in a store's tree, read from disk (records, log, stat)."""
    log_ = StateLog(store_of(path))
    try:
        return state_of_path(path, log_)
    finally:
        log_.close()
