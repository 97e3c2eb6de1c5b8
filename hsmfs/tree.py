"""The on-disk stub format.

Every regular file that came from the source carries one extended attribute, ``trusted.hsmfs``
(``trusted.*``: only root can read or change it), 34 bytes, little-endian (``struct "<BBQqqQ"``):

=========  =====  ===============================================================================
field      bytes  meaning
=========  =====  ===============================================================================
version    1      schema version; this module writes and reads ``1``
state      1      0 ``stub`` (no data yet), 1 ``resident`` (all data, committed durably),
                  2 ``dirty`` (a user changed the file: never refetched, never evicted),
                  3 ``unverified`` (was resident when the store's last session ended
                  uncleanly: a user's fdatasync'd write may hide in it; compared with the
                  source on next access)
size       8      the source's size in bytes when the stub was made
mtime_ns   8      the source's mtime in nanoseconds (restored after every fill)
atime_ns   8      the source's atime in nanoseconds (restored after every fill)
path_id    8      offset of the source path in ``STORE/paths`` (see :class:`PathTable`)
=========  =====  ===============================================================================

It is this small so that ext4 keeps it inside the inode (a 256-byte inode has about 90 bytes for
xattrs): a stub then has no block at all, and the stub tree costs inodes and directories only.
The source path lives in the append-only ``STORE/paths`` file: the path of the source object
relative to the source root, UTF-8 with surrogateescape, NUL-terminated, at offset ``path_id``.

The record is written only under the rules of design.md: "resident" only once the data is durable.
What a user sees as the state of a file (:func:`file_state`) also looks at the inode: a stub or
resident file whose size or mtime no longer match the record was changed by a user and is dirty.

Files, directories, symlinks and special files without a record were made by users of the view
(state ``"local"``). Hardlinks share one inode and so one record.

A pinned file also carries ``trusted.hsmfspin`` (one byte, ``1``): eviction, by hand or for the
space budget, never touches it. It is apart from the record so that a commit rewriting the record
can never drop a pin set meanwhile.

A store directory holds one tree::

    STORE/hsmfs.json   store record: schema, name, source, populate progress (see Store)
    STORE/paths        source paths of the stubs (see PathTable)
    STORE/tree/        the stub tree; views are clones of this directory's mount
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Optional

XATTR = "trusted.hsmfs"
PIN_XATTR = "trusted.hsmfspin"  # 8 characters after "trusted.": ext4 keeps it in the inode beside the record
SCHEMA = 1
STATES = ("stub", "resident", "dirty", "unverified")
TMP_PREFIX = ".hsmfs-tmp."  # populate makes entries under this prefix, then renames them into place
_RECORD = struct.Struct("<BBQqqQ")


class RecordError(ValueError):
    """A trusted.hsmfs value that this version cannot read."""


@dataclass(frozen=True)
class Record:
    path_id: int
    size: int
    mtime_ns: int
    atime_ns: int
    state: str = "stub"

    def encode(self) -> bytes:
        return _RECORD.pack(SCHEMA, STATES.index(self.state), self.size, self.mtime_ns, self.atime_ns,
                            self.path_id)

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        if len(raw) != _RECORD.size or raw[0] != SCHEMA:
            raise RecordError(f"stub record of {len(raw)} bytes, schema {raw[0] if raw else '?'}: "
                              f"this hsmfs reads schema {SCHEMA} ({_RECORD.size} bytes)")
        _v, state, size, mtime_ns, atime_ns, path_id = _RECORD.unpack(raw)
        if state >= len(STATES):
            raise RecordError(f"stub record state {state} unknown")
        return cls(path_id=path_id, size=size, mtime_ns=mtime_ns, atime_ns=atime_ns, state=STATES[state])

    def with_state(self, state: str) -> Record:
        return replace(self, state=state)


def read_record(fd_or_path: int | str) -> Optional[Record]:
    """The record of an fd or path (symlinks not followed), None if it has none."""
    try:
        if isinstance(fd_or_path, int):
            raw = os.getxattr(fd_or_path, XATTR)
        else:
            raw = os.getxattr(fd_or_path, XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (61, 95):  # ENODATA, EOPNOTSUPP (symlinks, special files)
            return None
        raise
    return Record.decode(raw)


def write_record(fd_or_path: int | str, rec: Record) -> None:
    os.setxattr(fd_or_path, XATTR, rec.encode())


def is_pinned(fd_or_path: int | str) -> bool:
    try:
        if isinstance(fd_or_path, int):
            return os.getxattr(fd_or_path, PIN_XATTR) == b"1"
        return os.getxattr(fd_or_path, PIN_XATTR, follow_symlinks=False) == b"1"
    except OSError as e:
        if e.errno in (61, 95):  # ENODATA, EOPNOTSUPP
            return False
        raise


def set_pinned(path: str, pinned: bool) -> bool:
    """Pin or unpin the file at path (symlinks not followed); returns whether that changed anything."""
    if is_pinned(path) == pinned:
        return False
    if pinned:
        os.setxattr(path, PIN_XATTR, b"1", follow_symlinks=False)
    else:
        os.removexattr(path, PIN_XATTR, follow_symlinks=False)
    return True


class PathTable:
    """STORE/paths: append-only source paths, each NUL-terminated, addressed by byte offset.

    Populate appends a file's path before the stub that names it exists, and syncs the table
    before it renames a batch of stubs into place, so no durable record points past its end.
    """

    def __init__(self, store_path: str, *, writable: bool = False) -> None:
        self.path = os.path.join(store_path, "paths")
        flags = (os.O_RDWR | os.O_CREAT | os.O_APPEND) if writable else os.O_RDONLY
        self.fd = os.open(self.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._end = os.fstat(self.fd).st_size
        self._lock = threading.Lock()

    def add(self, rel: str) -> int:
        data = os.fsencode(rel) + b"\0"
        with self._lock:
            off = self._end
            os.write(self.fd, data)
            self._end += len(data)
        return off

    def get(self, off: int) -> str:
        chunks = []
        while True:
            chunk = os.pread(self.fd, 4096, off)
            if not chunk:
                raise RecordError(f"source path at {off} is past the end of {self.path}")
            nul = chunk.find(b"\0")
            if nul >= 0:
                chunks.append(chunk[:nul])
                return os.fsdecode(b"".join(chunks))
            chunks.append(chunk)
            off += len(chunk)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def file_state(rec: Optional[Record], st: os.stat_result) -> str:
    """What a user sees: stub, resident, dirty, unverified, or local (not from the source)."""
    if rec is None:
        return "local"
    if rec.state == "dirty" or st.st_size != rec.size:
        return "dirty"
    if rec.state in ("resident", "unverified") and st.st_mtime_ns != rec.mtime_ns:
        return "dirty"
    return rec.state


def files(root: str) -> Iterator[tuple[str, os.stat_result, Optional[Record]]]:
    """(path, lstat, record) of each regular file beneath root, each inode once (hardlinks).

    lstat and getxattr only: walking a tree raises no fanotify event. Files that vanish or carry a
    record this version cannot read are passed over.
    """
    seen: set[int] = set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                rec = read_record(path)
            except (OSError, RecordError):
                continue
            yield path, st, rec


def resident_bytes(st: os.stat_result) -> int:
    """Bytes of data a file holds on disk (allocated blocks, capped at its size)."""
    return min(st.st_blocks * 512, st.st_size)


@dataclass
class Store:
    """STORE/hsmfs.json: which source this store mirrors and how far populate got.

    Keys: ``v`` (schema 1), ``name``, ``source`` (absolute path), ``populated`` (true once every
    entry of the source has a stub), ``mounted`` (true while a session serves the tree; still true
    at the next start means the last session ended uncleanly), ``source_dev``, ``source_ino``,
    ``source_fsid`` (which directory the source root was when the store was made: st_dev, st_ino,
    f_fsid; a mount of another directory is refused, hsmfs.trust; absent in stores made before).

    Its files are opened with O_NOFOLLOW, and hsmfs.json must be a regular file owned by root.
    """

    path: str
    name: str
    source: str
    populated: bool = False
    mounted: bool = False
    source_id: Optional[tuple[int, int, int]] = None

    @property
    def tree(self) -> str:
        return os.path.join(self.path, "tree")

    @property
    def meta(self) -> str:
        return os.path.join(self.path, "hsmfs.json")

    @classmethod
    def load(cls, path: str) -> Optional[Store]:
        try:
            fd = os.open(os.path.join(path, "hsmfs.json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                raise RecordError(f"{path}/hsmfs.json is not a regular file owned by root")
            d = json.load(f)
        if d.get("v") != SCHEMA:
            raise RecordError(f"{path}/hsmfs.json: schema {d.get('v')} is not {SCHEMA}")
        ident = (d.get("source_dev"), d.get("source_ino"), d.get("source_fsid"))
        return cls(path=path, name=str(d["name"]), source=str(d["source"]), populated=bool(d["populated"]),
                   mounted=bool(d.get("mounted", False)),
                   source_id=(int(ident[0]), int(ident[1]), int(ident[2])) if None not in ident else None)

    def save(self) -> None:
        """Replace hsmfs.json atomically and durably (temp file, fsync, rename, fsync dir)."""
        d: dict[str, object] = {"v": SCHEMA, "name": self.name, "source": self.source,
                                "populated": self.populated, "mounted": self.mounted}
        if self.source_id is not None:
            d["source_dev"], d["source_ino"], d["source_fsid"] = self.source_id
        data = json.dumps(d, indent=1).encode()
        tmp = self.meta + ".tmp"
        try:
            os.unlink(tmp)  # a leftover of a crash; never written through (O_EXCL|O_NOFOLLOW)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.meta)
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
