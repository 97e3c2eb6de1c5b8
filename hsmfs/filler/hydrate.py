"""Filling one stub, identified by an event fd (never by path: renames must not matter)."""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Optional

from hsmfs import tree
from hsmfs.linux.fs import punch_hole
from hsmfs.sources import Source
from hsmfs.sources.local import copy_range

log = logging.getLogger("hsmfs.filler")

# What a worker decided about one inode
FILLED = "filled"  # bytes written, resident state not yet durable
RESIDENT = "resident"  # already resident on disk
USERS = "users"  # not (or no longer) a stub of the source: a user's file, never refetched


class FillError(Exception):
    """The file could not be filled; readers get the policy's errno (or ENOSPC for a full store)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of data (non-hole) regions of fd, by SEEK_DATA/SEEK_HOLE."""
    regions = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= size:
            break
        regions.append((start, end))
        pos = end
    return regions


PUNCH_ALIGN = 1 << 16  # at least any filesystem's block size


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


def same_as_source(fd: int, src_fd: int, start: int, end: int) -> bool:
    chunk = 1 << 20
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        if os.pread(fd, n, pos) != os.pread(src_fd, n, pos):
            return False
        pos += n
    return True


def hydrate(fd: int, rec: Optional[tree.Record], st: os.stat_result, source: Source, src: str) -> str:
    """Make the file behind fd hold the bytes of source object src; return FILLED, RESIDENT or USERS.

    A (re)fill only ever writes into holes or over bytes equal to the source's: a file whose data
    differs from its source, or whose size no longer matches its record (O_TRUNC raises no
    event), is the user's (design.md, "The first event may be a write").
    """
    if rec is None:
        return USERS
    state = tree.file_state(rec, st)
    if state == "resident":
        return RESIDENT
    if state not in ("stub", "unverified"):
        return USERS
    size = rec.size
    regions = data_regions(fd, size) if st.st_blocks or state == "unverified" else []
    try:
        src_fd = source.open(src)
        try:
            # the source must still be what the stub describes: other bytes under the stub's old
            # metadata would be wrong, and could show a file its owner has since made private
            sst = os.fstat(src_fd)
            if sst.st_size != size:
                raise FillError(f"source file changed size since the stub was made: {sst.st_size} bytes, "
                                f"stub says {size}")
            if sst.st_mtime_ns != rec.mtime_ns:
                raise FillError(f"source file changed since the stub was made: mtime {sst.st_mtime_ns}, "
                                f"stub says {rec.mtime_ns}")
            # Left over from a fill or from user writes before a crash: bytes equal to the
            # source's were ours, any other byte is a user's and stays; every hole gets the
            # source's bytes either way (a write made durable by O_DSYNC or a ranged msync leaves
            # the rest of an uncommitted fill as holes, which must not read as zeros).
            users = not all(same_as_source(fd, src_fd, start, end) for start, end in regions)
            pos = 0
            for start, end in [*regions, (size, size)]:
                if pos < start:
                    try:
                        copy_range(src_fd, fd, pos, start)
                    except OSError:
                        # it was a hole: give back what this copy wrote. A copy cut short (ENOSPC)
                        # can leave allocated blocks past where it stopped, and their zeros would be
                        # taken for a user's bytes by the next try
                        _give_back(fd, pos, start, size)
                        raise
                pos = end
        finally:
            os.close(src_fd)
        if users:
            return USERS
    except FileNotFoundError as e:
        raise FillError(f"source file is gone: {e.strerror}") from None
    except OSError as e:
        raise FillError(e.strerror or str(e), e.errno or 0) from None
    # writing the bytes bumped mtime: restore the source's, or make rebuilds everything. atime is
    # the time of this access: the space budget evicts the least recently used files first.
    os.utime(fd, ns=(time.time_ns(), rec.mtime_ns))
    return FILLED

