"""The on-disk stub format.

Every regular file that came from the source carries one extended attribute, ``trusted.hsmfs.stub``
(``trusted.*`` so only root can read or change it), whose value is a JSON object:

====================  =============================================================================
key                   meaning
====================  =============================================================================
``v``                 schema version, an integer; this module writes and reads version ``1``
``src``               path of the source object relative to the source root (``str``, no ``..``)
``size``              the source's size in bytes when the stub was made
``mtime_ns``          the source's mtime in nanoseconds (restored after every fill)
``atime_ns``          the source's atime in nanoseconds (restored after every fill)
``state``             ``"stub"`` (no data yet), ``"resident"`` (all data, committed durably) or
                      ``"dirty"`` (a user changed the file: never refetched, never evicted)
====================  =============================================================================

The record is written only under the rules of design.md: "resident" only once the data is durable.
What a user sees as the state of a file (:func:`file_state`) also looks at the inode: a stub or
resident file whose size or mtime no longer match the record was changed by a user and is dirty.

Files, directories, symlinks and special files without a record were made by users of the view
(state ``"local"``). Hardlinks share one inode and so one record.

A store directory holds one tree::

    STORE/hsmfs.json   store record: schema, name, source, populate progress (see Store)
    STORE/tree/        the stub tree; views are clones of this directory's mount
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

XATTR = "trusted.hsmfs.stub"
SCHEMA = 1
STATES = ("stub", "resident", "dirty")
TMP_PREFIX = ".hsmfs-tmp."  # populate makes entries under this prefix, then renames them into place


class RecordError(ValueError):
    """A trusted.hsmfs.stub value that this version cannot read."""


@dataclass(frozen=True)
class Record:
    src: str
    size: int
    mtime_ns: int
    atime_ns: int
    state: str = "stub"

    def encode(self) -> bytes:
        d: dict[str, Any] = {"v": SCHEMA}
        d.update(asdict(self))
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise RecordError(f"stub record is not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("v") != SCHEMA:
            raise RecordError(f"stub record schema {d.get('v') if isinstance(d, dict) else '?'} "
                              f"is not {SCHEMA}")
        try:
            rec = cls(src=str(d["src"]), size=int(d["size"]), mtime_ns=int(d["mtime_ns"]),
                      atime_ns=int(d["atime_ns"]), state=str(d["state"]))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"stub record field missing or bad: {e}") from None
        if rec.state not in STATES:
            raise RecordError(f"stub record state {rec.state!r} unknown")
        return rec

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


def write_record(fd: int, rec: Record) -> None:
    os.setxattr(fd, XATTR, rec.encode())


def file_state(rec: Optional[Record], st: os.stat_result) -> str:
    """What a user sees: stub, resident, dirty, or local (not from the source)."""
    if rec is None:
        return "local"
    if rec.state == "dirty" or st.st_size != rec.size:
        return "dirty"
    if rec.state == "resident" and st.st_mtime_ns != rec.mtime_ns:
        return "dirty"
    return rec.state


def resident_bytes(st: os.stat_result) -> int:
    """Bytes of data a file holds on disk (allocated blocks, capped at its size)."""
    return min(st.st_blocks * 512, st.st_size)


@dataclass
class Store:
    """STORE/hsmfs.json: which source this store mirrors and how far populate got.

    Keys: ``v`` (schema 1), ``name``, ``source`` (absolute path), ``populated`` (true once every
    entry of the source has a stub).
    """

    path: str
    name: str
    source: str
    populated: bool = False

    @property
    def tree(self) -> str:
        return os.path.join(self.path, "tree")

    @property
    def meta(self) -> str:
        return os.path.join(self.path, "hsmfs.json")

    @classmethod
    def load(cls, path: str) -> Optional[Store]:
        try:
            with open(os.path.join(path, "hsmfs.json"), "rb") as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        if d.get("v") != SCHEMA:
            raise RecordError(f"{path}/hsmfs.json: schema {d.get('v')} is not {SCHEMA}")
        return cls(path=path, name=str(d["name"]), source=str(d["source"]), populated=bool(d["populated"]))

    def save(self) -> None:
        """Replace hsmfs.json atomically and durably (temp file, fsync, rename, fsync dir)."""
        data = json.dumps({"v": SCHEMA, "name": self.name, "source": self.source,
                           "populated": self.populated}, indent=1).encode()
        tmp = self.meta + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
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
