"""The on-disk stub format: the stub record, the source paths, the store record.

Every regular file that came from the source carries one extended attribute, ``trusted.hsmfs``
(``trusted.*``: only root can read or change it), 42 bytes, little-endian (``struct "<BBQqQQq"``).
It describes the source object the stub stands for and is written once, when the stub is made;
nothing hsmfs does later writes it again, so filling, committing or evicting a file never changes
its ctime (see :mod:`hsmfs.state` for where the file's state lives and why):

============  =====  ===========================================================================
field         bytes  meaning
============  =====  ===========================================================================
version       1      record schema; this module writes ``2`` (``1``: see :func:`upgrade`)
flags         1      bit 0 ``IDENTITY``: src_ino and src_ctime_ns name the local source object;
                     bit 1 ``CONTENT``: a remote object (HTTP, S3): src_ino is the index of its
                     sha256 in ``STORE/hashes`` (:class:`HashTable`), src_ctime_ns is 0
size          8      the source's size in bytes when the stub was made
mtime_ns      8      the source's mtime in nanoseconds (the stub's own; restored after every fill)
path_id       8      offset of the source path in ``STORE/paths`` (see :class:`PathTable`)
src_ino       8      the source object's inode number when the stub was made
src_ctime_ns  8      the source object's ctime then
============  =====  ===========================================================================

A fill refuses a source object whose size, mtime, inode number or ctime differ from the record:
its owner can set size and mtime, but nobody can set ctime or make another file take its inode,
so a file renamed over the source path, or one whose mode or owner changed since, is never served
under the stub's old metadata (docs/security.md).

It is this small so that ext4 keeps it inside the inode (a 256-byte inode has about 90 bytes for
xattrs): a stub then has no block at all, and the stub tree costs inodes and directories only.
The source path lives in the append-only ``STORE/paths`` file: the path of the source object
relative to the source root, UTF-8 with surrogateescape, NUL-terminated, at offset ``path_id``.

Files, directories, symlinks and special files without a record were made by users of the view.
Hardlinks share one inode and so one record.

A store directory holds one tree::

    STORE/hsmfs.json   store record: schema, name, source, populate progress (see Store)
    STORE/paths        source paths of the stubs (see PathTable)
    STORE/hashes       sha256 of each remote object, 32 bytes per slot (see HashTable)
    STORE/manifest.json  the manifest the tree was populated or last refreshed from (remote only)
    STORE/state        the state log: resident, dirty, pinned... (see hsmfs.state)
    STORE/tree/        the stub tree; views are clones of this directory's mount
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional, Union

from hsmfs.errors import DataError

XATTR = "trusted.hsmfs"
SCHEMA = 2
FLAG_IDENTITY = 1
FLAG_CONTENT = 2
TMP_PREFIX = ".hsmfs-tmp."  # populate makes entries under this prefix, then renames them into place
_RECORD = struct.Struct("<BBQqQQq")
_RECORD_V1 = struct.Struct("<BBQqqQ")  # schema 1 (hsmfs 0.1): version, state, size, mtime, atime, path_id
V1_STATES = ("stub", "resident", "dirty", "unverified")
_NO_RECORD = (errno.ENODATA, errno.EOPNOTSUPP)  # symlinks and special files take no trusted.* on some fs


class RecordError(DataError):
    """A trusted.hsmfs value, hsmfs.json or STORE/paths entry that this version cannot read."""


@dataclass(frozen=True)
class Record:
    path_id: int
    size: int
    mtime_ns: int
    src_ino: int = 0
    src_ctime_ns: int = 0
    flags: int = FLAG_IDENTITY

    def encode(self) -> bytes:
        return _RECORD.pack(SCHEMA, self.flags, self.size, self.mtime_ns, self.path_id, self.src_ino,
                            self.src_ctime_ns)

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        if len(raw) == _RECORD.size and raw[0] == SCHEMA:
            _v, flags, size, mtime_ns, path_id, src_ino, src_ctime_ns = _RECORD.unpack(raw)
            return cls(path_id, size, mtime_ns, src_ino, src_ctime_ns, flags)
        if len(raw) == _RECORD_V1.size and raw[0] == 1:
            raise RecordError("stub record of schema 1 (hsmfs 0.1): mount the store once with 'hsmfs mount' "
                              "to upgrade it")
        raise RecordError(f"stub record of {len(raw)} bytes, schema {raw[0] if raw else '?'}: this hsmfs reads "
                          f"schema {SCHEMA} ({_RECORD.size} bytes)")

    def same_object(self, st: os.stat_result) -> Optional[str]:
        """Why the source object st is not the one this stub was made from; None if it is."""
        if st.st_size != self.size:
            return f"source file changed size since the stub was made: {st.st_size} bytes, stub says {self.size}"
        if st.st_mtime_ns != self.mtime_ns:
            return f"source file changed since the stub was made: mtime {st.st_mtime_ns}, stub says {self.mtime_ns}"
        if self.flags & FLAG_CONTENT:
            return None  # a remote object: its hash is its identity (hsmfs.sources.http)
        if self.flags & FLAG_IDENTITY:
            if st.st_ino != self.src_ino:
                return "source path now names another file (it was replaced or renamed over since the stub was made)"
            if st.st_ctime_ns != self.src_ctime_ns:
                return "source file changed since the stub was made (its mode, owner, xattrs or data: ctime " \
                       f"{st.st_ctime_ns}, stub says {self.src_ctime_ns})"
        return None


def read_record(fd_or_path: int | str) -> Optional[Record]:
    """The record of an fd or path (symlinks not followed), None if it has none."""
    try:
        if isinstance(fd_or_path, int):
            raw = os.getxattr(fd_or_path, XATTR)
        else:
            raw = os.getxattr(fd_or_path, XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_RECORD:
            return None
        raise
    return Record.decode(raw)


def write_record(fd_or_path: int | str, rec: Record) -> None:
    os.setxattr(fd_or_path, XATTR, rec.encode())


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


class HashTable:
    """STORE/hashes: the sha256 of each remote object a stub stands for, 32 bytes per slot.

    A remote stub's record has FLAG_CONTENT and names its slot in src_ino. Append-only like
    STORE/paths, synced before the stubs that name new slots are renamed into place.
    """

    SLOT = 32

    def __init__(self, store_path: str, *, writable: bool = False) -> None:
        self.path = os.path.join(store_path, "hashes")
        flags = (os.O_RDWR | os.O_CREAT | os.O_APPEND) if writable else os.O_RDONLY
        self.fd = os.open(self.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._slots = os.fstat(self.fd).st_size // self.SLOT
        self._lock = threading.Lock()

    def add_many(self, digests: list[bytes]) -> int:
        """Append digests; the slot of the first one (the others follow it)."""
        if any(len(d) != self.SLOT for d in digests):
            raise ValueError("a sha256 digest is 32 bytes")
        with self._lock:
            first = self._slots
            data = b"".join(digests)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self._slots += len(digests)
        return first

    def get(self, slot: int) -> bytes:
        raw = os.pread(self.fd, self.SLOT, slot * self.SLOT)
        if len(raw) != self.SLOT:
            raise RecordError(f"content hash slot {slot} is past the end of {self.path}")
        return raw

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def is_remote(source: str) -> bool:
    """Whether a store's source is a URL (http, https, s3) rather than a local directory."""
    return source.startswith(("http://", "https://", "s3://"))


@dataclass(frozen=True)
class Found:
    """A regular file found by :func:`walk`; dirfd is valid only until the walk goes on."""

    dirfd: int
    name: str
    path: str  # root joined with the path beneath it: for messages, and for open_beneath (any length)
    st: os.stat_result

    @property
    def fd_path(self) -> str:
        """A path to the file through its directory's fd: short whatever the file's depth."""
        return f"/proc/self/fd/{self.dirfd}/{self.name}"


def walk(root: str) -> Iterator[Found]:
    """Every regular file beneath root, each inode once (hardlinks), symlinks not followed.

    Through directory fds (os.fwalk), so a tree deeper than PATH_MAX is walked whole: a stub that a
    path-based walk skipped would get no stub mark, and its holes would read as data. lstat only:
    no file is opened, no event is raised. Names that vanish meanwhile are passed over.
    """
    seen: set[int] = set()
    for dirpath, _dirs, names, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in names:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                yield Found(dirfd, name, os.path.join(dirpath, name), st)


def files(root: str) -> Iterator[tuple[Found, Optional[Record]]]:
    """(file, record) of each regular file beneath root (see :func:`walk`); files whose record this
    version cannot read are passed over."""
    for f in walk(root):
        try:
            rec = read_record(f.fd_path)
        except (OSError, RecordError):
            continue
        yield f, rec


def resident_bytes(st: os.stat_result) -> int:
    """Bytes of data a file holds on disk (allocated blocks, capped at its size)."""
    return min(st.st_blocks * 512, st.st_size)


def atomic_write(path: str, data: Union[bytes, Callable[[int], None]], *, mode: int = 0o600) -> None:
    """Replace path with data, durably: temp file, fsync, rename, fsync of the directory.

    data: the bytes, or a function that writes them to the fd it is given. A crash leaves either
    the old file or the new one, never a torn or empty one.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.unlink(tmp)  # a leftover of a crash: never written through (O_EXCL, O_NOFOLLOW)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # exactly mode, whatever the umask
        if callable(data):
            data(fd)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class Store:
    """STORE/hsmfs.json: which source this store mirrors and how far populate got.

    Keys: ``v`` (schema: 2; 1 was hsmfs 0.1's, whose stubs :func:`hsmfs.state.upgrade` rewrites),
    ``name``, ``source`` (absolute path), ``populated`` (true once every entry of the source has a
    stub), ``mounted`` (true while a session serves the tree; still true at the next start means the
    last session ended uncleanly), ``source_dev``, ``source_ino``, ``source_fsid`` (which directory
    the source root was when the store was made: st_dev, st_ino, f_fsid; a mount of another
    directory is refused, hsmfs.trust; absent in stores made before).

    Its files are opened with O_NOFOLLOW, and hsmfs.json must be a regular file owned by root.
    """

    path: str
    name: str
    source: str
    populated: bool = False
    mounted: bool = False
    schema: int = SCHEMA
    source_id: Optional[tuple[int, int, int]] = None

    @property
    def tree(self) -> str:
        return os.path.join(self.path, "tree")

    @property
    def meta(self) -> str:
        return os.path.join(self.path, "hsmfs.json")

    @classmethod
    def load(cls, path: str) -> Optional[Store]:
        meta = os.path.join(path, "hsmfs.json")
        try:
            fd = os.open(meta, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                raise RecordError(f"{meta} is not a regular file owned by root",
                                  hint="someone else made or replaced it: check the store, or remove it and mount "
                                  "again")
            try:
                d = json.load(f)
                if d.get("v") not in (1, SCHEMA):
                    raise RecordError(f"{meta}: schema {d.get('v')!r}; this hsmfs reads schema 1 and {SCHEMA}",
                                      hint="use the hsmfs version that made this store")
                ident = (d.get("source_dev"), d.get("source_ino"), d.get("source_fsid"))
                return cls(path=path, name=str(d["name"]), source=str(d["source"]), populated=bool(d["populated"]),
                           mounted=bool(d.get("mounted", False)), schema=int(d["v"]),
                           source_id=(int(ident[0]), int(ident[1]), int(ident[2])) if None not in ident else None)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise RecordError(f"{meta} is damaged: {e}",
                                  hint="restore it from a backup, or remove the store and mount again") from None

    def save(self) -> None:
        """Replace hsmfs.json atomically and durably."""
        d: dict[str, object] = {"v": self.schema, "name": self.name, "source": self.source,
                                "populated": self.populated, "mounted": self.mounted}
        if self.source_id is not None:
            d["source_dev"], d["source_ino"], d["source_fsid"] = self.source_id
        atomic_write(self.meta, json.dumps(d, indent=1).encode())
