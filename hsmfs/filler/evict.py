"""Turning resident files back into stubs without ever losing a byte a user wrote.

One file at a time (:func:`evict_file`), by whoever may change the tree's marks: the filler of a
live mount, which owns the group (``Filler.evict``, the space budget, a full store), or
``hsmfs evict`` on a store that no filler serves (no marks then: the next mount marks stubs).

The order is what makes it safe:

1. The stub's inode mark goes on first (``Marks.arm``), still silenced by the file's ignore mark.
   An open decides at open time whether its fd raises pre-content events (kernel-facts §3), so
   any open that starts from here on gets a watched fd, through any path to the file.
2. ``F_SETLEASE F_WRLCK`` (kernel-facts §11): granted only if no one else has the file open or
   mapped (a running binary included) or is in the middle of opening it; while it is held, new
   opens wait. Refused: the file is in use and stays as it is.
3. Under the lease, the file is checked again: resident (an unverified one is compared with its
   source first), unchanged since its fill, not pinned, and its source still holds the same
   file (or evicting it would lose the only copy).
4. The record says "stub" first, then the data is punched out and mtime restored: a crash in
   between leaves a stub with bytes equal to its source, which a refill keeps. Never a "resident"
   record over holes.
5. ``Marks.release`` removes the ignore mark, then the lease goes: the next access fills it again.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Optional, Protocol

from hsmfs import tree
from hsmfs.filler.hydrate import data_regions, punch, same_as_source
from hsmfs.linux.fs import release_lease, take_write_lease
from hsmfs.sources import Source
from hsmfs.sources.local import copy_range

# Why a file was not evicted (the words hsmfs evict prints)
IN_USE = "in use (open, mapped or running)"
DIRTY = "dirty (changed by a user)"
PINNED = "pinned"
STUB = "already a stub"
LOCAL = "not from the source (made by a user)"
FILLING = "being filled"
SOURCE_CHANGED = "its source changed or is gone: evicting it would lose the only copy"


@dataclass(frozen=True)
class Outcome:
    evicted: bool
    reason: str = ""  # why not, when not evicted
    freed: int = 0  # bytes of blocks given back to the filesystem

    def as_dict(self) -> dict[str, object]:
        return {"evicted": self.evicted, "reason": self.reason, "freed": self.freed}


class Marks(Protocol):
    """What the group's owner does around an eviction (nothing, for a store no filler serves)."""

    def arm(self, fd: int) -> None:
        """Put the stub's inode mark on; the file's ignore mark still silences it."""

    def disarm(self, fd: int) -> None:
        """Undo arm: the file stays resident."""

    def release(self, fd: int) -> None:
        """The file is a stub now: forget it was filled, remove its ignore mark."""


def precheck(fd: int) -> Optional[str]:
    """Why the file behind fd cannot be evicted, from its record alone (no lease); None if it may be."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return LOCAL
    rec = tree.read_record(fd)
    if rec is None:
        return LOCAL
    state = tree.file_state(rec, st)
    if state == "stub":
        return STUB
    if state == "dirty":
        return DIRTY
    if tree.is_pinned(fd):
        return PINNED
    return None


def evict_file(fd: int, source: Source, paths: tree.PathTable, marks: Optional[Marks] = None, *,
               distrust: bool = False) -> Outcome:
    """Evict the file behind fd, an O_RDWR fd on the store opened by the caller (who closes it).

    distrust: treat a resident record as unverified (compare the file with its source first): the
    store's last session ended uncleanly and no session has downgraded its records since. With
    marks (a live group) unverified files must have been verified already (Filler.evict_fd): their
    stub mark would raise events for our own I/O under the lease.

    Raises OSError only for failures of the filesystem itself; every reason to leave a file
    alone is an :class:`Outcome` that says why.
    """
    why = precheck(fd)
    if why is not None:
        return Outcome(False, why)
    if marks is not None:
        marks.arm(fd)
    leased = stubbed = done = False
    try:
        leased = take_write_lease(fd)
        if not leased:
            return Outcome(False, IN_USE)
        # nobody else has it open now, and nobody can open it until the lease goes: look again
        why = precheck(fd)
        if why is not None:
            return Outcome(False, why)
        st = os.fstat(fd)
        rec = tree.read_record(fd)
        assert rec is not None  # precheck
        src_fd, why = _open_source(fd, rec, st, source, paths, distrust=distrust)
        if src_fd is None:
            return Outcome(False, why)
        try:
            before = st.st_blocks * 512
            tree.write_record(fd, rec.with_state("stub"))  # before the punch: never "resident" over holes
            stubbed = True
            punch(fd, 0, st.st_size, st.st_size)
            # whatever a filesystem kept must still be the source's bytes, or a refill takes it for a user's
            for start, end in data_regions(fd, st.st_size):
                copy_range(src_fd, fd, start, end)
        finally:
            os.close(src_fd)
        os.utime(fd, ns=(st.st_atime_ns, rec.mtime_ns))  # the punch bumped mtime
        if marks is not None:
            marks.release(fd)
        done = True
        return Outcome(True, freed=max(0, before - os.fstat(fd).st_blocks * 512))
    finally:
        if marks is not None and not done:
            # a failure after the record says stub leaves a stub: its mark must work, not be silenced
            (marks.release if stubbed else marks.disarm)(fd)
        if leased:
            release_lease(fd)


def _open_source(fd: int, rec: tree.Record, st: os.stat_result, source: Source, paths: tree.PathTable, *,
                 distrust: bool) -> tuple[Optional[int], str]:
    """(fd of the source object, "") if the source still holds what the stub will describe and, for
    an unverified file, the file still equals it; else (None, why the file must stay)."""
    try:
        src_fd = source.open(paths.get(rec.path_id))
    except (OSError, tree.RecordError):
        return None, SOURCE_CHANGED
    try:
        sst = os.fstat(src_fd)
        if sst.st_size != rec.size or sst.st_mtime_ns != rec.mtime_ns:
            why = SOURCE_CHANGED
        # unverified: a session ended uncleanly, and a user's fdatasync'd write may hide under the record
        elif (rec.state == "unverified" or distrust) and not same_as_source(fd, src_fd, 0, st.st_size):
            tree.write_record(fd, rec.with_state("dirty"))
            why = DIRTY
        else:
            return src_fd, ""
    except OSError as e:
        os.close(src_fd)
        if e.errno in (errno.EIO, errno.ENOENT, errno.ESTALE):
            return None, SOURCE_CHANGED
        raise
    os.close(src_fd)
    return None, why
