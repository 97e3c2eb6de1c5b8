"""Filling one stub: the source's bytes into its holes, never over a user's.

A (re)fill only ever writes into holes: bytes the file already holds are compared with the
source's, and any difference means a user wrote them (the first event on a stub may be a write,
and a crash can leave a user's fdatasync'd bytes in a file whose fill was never committed); the
file is then the user's (dirty), and its holes still get the source's bytes, because a reader must
never see them as zeros. A file whose size is no longer the record's was truncated by a user
(O_TRUNC raises no event) and is the user's as it is. Holes of a sparse source stay holes: they
read as zeros there too, and cost no room.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from hsmfs.linux.fs import punch_hole
from hsmfs.sources import Source, SourceError
from hsmfs.sources.local import data_regions
from hsmfs.tree import Record

log = logging.getLogger("hsmfs.filler")

PUNCH_ALIGN = 1 << 16  # at least any filesystem's block size


@dataclass(frozen=True)
class Filled:
    ctime_ns: int  # the file's ctime right after the fill: any later change by anyone moves it
    users: bool  # the file held bytes other than the source's, or another size: it is a user's
    written: int  # bytes copied in


Room = Callable[[int], None]  # asked for bytes before they are written; raises SourceError(ENOSPC) if none


def fill(fd: int, rec: Record, source: Source, rel: str, *, room: Optional[Room] = None,
         st: Optional[os.stat_result] = None) -> Filled:
    """Make the file behind fd (O_RDWR, opened where our own I/O raises no event) hold the bytes of
    source object rel; SourceError if the source cannot give them (the file is left as it was).
    st: the file's stat, if the caller has it fresh."""
    if st is None:
        st = os.fstat(fd)
    if st.st_size != rec.size:
        return Filled(st.st_ctime_ns, True, 0)
    obj = source.open(rel, rec)
    try:
        have = data_regions(fd, rec.size) if st.st_blocks else []
        users = not all(obj.same(fd, a, b) for a, b in have)
        gaps = subtract(obj.data_regions(), have)
        need = sum(b - a for a, b in gaps)
        if need and room is not None:
            room(need)
        try:
            for a, b in gaps:
                obj.copy_to(fd, a, b)
            if not users and need:
                # a remote object is checked against its manifest hash before anything may call it
                # resident (hsmfs.sources.http); a local one has nothing to check (verify is a no-op)
                obj.verify(fd)
        except (OSError, SourceError) as e:
            # they were holes: give back what this fill wrote. A copy cut short (ENOSPC) can leave
            # allocated blocks past where it stopped, whose zeros the next try would take for a
            # user's bytes; a fetch cut short or a hash mismatch must leave no byte of it behind
            for a, b in gaps:
                _give_back(fd, a, b, rec.size)
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"copying from the source failed: {e.strerror or e}", e.errno or errno.EIO) \
                from None
    finally:
        obj.close()
    if not users and (need or st.st_mtime_ns != rec.mtime_ns):
        # writing bumped mtime: restore the source's, or make rebuilds everything. atime is the time
        # of this access: the space budget evicts the least recently used files first. A file that
        # held every byte already keeps its times: its ctime may be what a commit recorded
        os.utime(fd, ns=(time.time_ns(), rec.mtime_ns))
    return Filled(os.fstat(fd).st_ctime_ns, users, need)


def subtract(want: list[tuple[int, int]], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the sorted, disjoint ranges want that no range of have covers."""
    out = []
    i = 0
    for a, b in want:
        while i < len(have) and have[i][1] <= a:
            i += 1
        j = i
        pos = a
        while j < len(have) and have[j][0] < b:
            if have[j][0] > pos:
                out.append((pos, have[j][0]))
            pos = max(pos, have[j][1])
            j += 1
        if pos < b:
            out.append((pos, b))
    return out


def punch(fd: int, start: int, end: int, size: int) -> None:
    """Make [start, end) of a file of size bytes a hole. A range that reaches EOF is punched to a
    whole block past it: a partial last block would stay allocated, as zeros."""
    if end >= size:
        end = -(-size // PUNCH_ALIGN) * PUNCH_ALIGN
    punch_hole(fd, start, end - start)


def _give_back(fd: int, start: int, end: int, size: int) -> None:
    try:
        punch(fd, start, end, size)
    except OSError as e:  # the fill's own error is what the reader must hear about
        log.error("cannot give back a failed fill's blocks [%d, %d): %s; the next fill compares them with "
                  "the source", start, end, e)
