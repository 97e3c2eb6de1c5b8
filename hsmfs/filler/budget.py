"""Space: the budget's background evictor, and room for a fill when the store is full.

Resident bytes are the blocks held by files that came from the source (resident, unverified,
dirty); files users made in the view are theirs and not counted. Only clean, unpinned resident
files are evicted, least recently used first: recency is the inode's atime, which a fill sets and
every read through a view updates (views of a mount with a budget are ``strictatime``).

The evictor keeps an estimate (the last scan, plus fills committed, minus bytes evicted since),
wakes when a commit pushes it past the high watermark or every SCAN_PERIOD seconds, and then
scans the tree for the exact figure and evicts down to the low watermark.

Before a fill writes, :func:`make_room` checks the store's free space as an unprivileged user
would see it (root's reserved blocks are not for fills): a fill that fits goes ahead; one that
could fit once clean files are evicted makes that room first; one that cannot fit even then is
refused at once (ENOSPC), without evicting anything for it. So is a fill that needs more bytes
than the whole budget (max_resident_bytes): the evictor would evict everything else for it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hsmfs import tree
from hsmfs.filler.evict import Evictor, open_for_eviction
from hsmfs.linux.fs import syncfs
from hsmfs.sources import SourceError
from hsmfs.state import FileState, StateLog, tree_files

if TYPE_CHECKING:
    from hsmfs.filler.core import Filler
    from hsmfs.policy import Policy

log = logging.getLogger("hsmfs.filler")

SCAN_PERIOD = 30.0  # seconds between scans while under the high watermark (users' writes grow files too)
ROOM_MIN = 32 << 20  # a full store: free at least this much at once, not one file's worth per fill
MARGIN = 1 << 20  # free bytes a fill leaves for the filesystem's own metadata
ROOM_TRIES = 4  # writes a fill tries when it keeps finding the store full
# seconds a look at the free space is trusted, less what fills wrote since (the write itself has
# the last word: a fill that finds the store full makes room and tries again)
ROOM_RECHECK = 1.0


@dataclass
class Scan:
    """What one walk of the tree found."""

    resident_bytes: int = 0  # blocks held by files from the source
    candidates: list[tuple[int, str, int]] = field(default_factory=list)  # (atime_ns, path, bytes), oldest first
    pinned: int = 0
    pinned_bytes: int = 0
    dirty: int = 0
    dirty_bytes: int = 0

    @property
    def evictable(self) -> int:
        return sum(n for _a, _p, n in self.candidates)


def scan(root: str, log_: StateLog) -> Scan:
    """Walk the store tree (lstat, xattrs and handles only: no event, no open)."""
    out = Scan()
    log_.refresh()
    for f in tree_files(root, log_):
        if f.rec is None:
            continue
        held = tree.resident_bytes(f.st)
        out.resident_bytes += held
        if f.state is FileState.DIRTY:
            out.dirty += 1
            out.dirty_bytes += held
        elif f.pinned and held:
            out.pinned += 1
            out.pinned_bytes += held
        elif f.state in (FileState.RESIDENT, FileState.UNVERIFIED) and held:
            out.candidates.append((f.st.st_atime_ns, os.path.relpath(f.path, root), held))
    out.candidates.sort()
    return out


def evict_lru(filler: Filler, candidates: list[tuple[int, str, int]], want: int) -> int:
    """Evict from candidates (oldest first) until want bytes are freed; returns bytes freed."""
    freed = 0
    i = 0
    while freed < want and i < len(candidates):
        # a batch about the size still wanted, oldest first
        fds: list[int] = []
        planned = 0
        while i < len(candidates) and planned < want - freed and len(fds) < 64:
            _atime, rel, held = candidates[i]
            i += 1
            try:
                fds.append(open_for_eviction(filler.root_fd, rel))
                planned += held
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ETXTBSY, errno.ELOOP):
                    log.warning("cannot open %s to evict it: %s", rel, e)
        try:
            freed += sum(o.freed for o in filler.evict_fds(fds))
        finally:
            for fd in fds:
                os.close(fd)
    return freed


class NoRoom(SourceError):
    """A fill that cannot fit even if every evictable file went: refused before it writes or evicts."""


def room_after_enospc(filler: Filler, size: int, err: SourceError) -> None:
    """A fill's write found the store full: commit what waits, evict, let the filesystem see it;
    SourceError(ENOSPC) naming what holds the store once nothing can be evicted."""
    with filler._lock:
        filler.stats.enospc += 1
    filler.flush(fills=False)  # fills waiting for their commit hold room, and can go once committed
    found = scan(filler.root_path, filler.log)
    freed = evict_lru(filler, found.candidates, max(size, ROOM_MIN)) if found.candidates else 0
    if freed == 0:
        raise SourceError(f"the store filesystem is full ({os.strerror(err.errno)}) and nothing can be evicted: "
                          f"{found.pinned} pinned and {found.dirty} dirty files hold "
                          f"{found.pinned_bytes + found.dirty_bytes} bytes; unpin or evict files, or give the store "
                          "more room", err.errno)
    log.warning("store full (%s): evicted %d bytes of least recently used files", os.strerror(err.errno), freed)
    syncfs(filler.root_fd)  # btrfs gives freed extents back at its commit


def make_room(filler: Filler, need: int) -> None:
    """Before a fill writes need bytes; SourceError(ENOSPC) if they cannot fit even after evicting."""
    budget = filler.budget
    if budget is not None and need > budget.limit:
        # filled, it would go over the whole budget alone: the evictor would then evict every other
        # resident file, and this one too once closed
        raise NoRoom(f"this file needs {need} bytes, more than the whole space budget (max_resident_bytes = "
                     f"{budget.limit}); raise max_resident_bytes to serve it", errno.ENOSPC)
    now = time.monotonic()
    if now < filler.room_until and need <= filler.room_left:  # asked less than a second ago
        filler.room_left -= need
        return
    avail = _available(filler.root_fd)
    if need + MARGIN <= avail:
        filler.room_left, filler.room_until = avail - need - MARGIN, now + ROOM_RECHECK
        return
    filler.room_until = 0.0
    with filler._lock:
        filler.stats.enospc += 1
    filler.flush(fills=False)  # fills waiting for their commit become evictable once committed
    found = scan(filler.root_path, filler.log)
    if need + MARGIN > avail + found.evictable:
        raise NoRoom(f"the store has room for {avail} bytes and {found.evictable} more could be evicted, but "
                          f"this file needs {need}: {found.pinned} pinned and {found.dirty} dirty files hold "
                          f"{found.pinned_bytes + found.dirty_bytes} bytes; unpin or evict files, or give the store "
                          "more room", errno.ENOSPC)
    want = max(need + MARGIN - avail, ROOM_MIN)
    freed = evict_lru(filler, found.candidates, want)
    log.warning("store full: evicted %d bytes of least recently used files for a fill of %d bytes", freed, need)
    syncfs(filler.root_fd)  # btrfs gives freed extents back at its commit; the write itself has the last word


def _available(fd: int) -> int:
    """Bytes an unprivileged user could still write on the filesystem of fd (root's reserve left out)."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


class Budget:
    """max_resident_bytes with its watermarks, kept by a background thread of the filler."""

    def __init__(self, filler: Filler, policy: Policy) -> None:
        self.filler = filler
        self.limit = policy.max_resident_bytes
        self.high = int(self.limit * policy.high_watermark)
        self.low = int(self.limit * policy.low_watermark)
        self.estimate = 0
        self.last: Scan = Scan()
        self._cv = threading.Condition()
        self._stopping = False
        self._wake = True  # scan once at start: the estimate begins there
        self._thread = threading.Thread(target=self._loop, name="evictor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()

    def filled(self, nbytes: int) -> None:
        with self._cv:
            self.estimate += nbytes
            if self.estimate > self.high:
                self._wake = True
                self._cv.notify_all()

    def freed(self, nbytes: int) -> None:
        with self._cv:
            self.estimate -= nbytes

    def status(self) -> dict[str, object]:
        with self._cv:
            return {"max_resident_bytes": self.limit, "high": self.high, "low": self.low,
                    "resident_bytes": self.estimate}

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._wake and not self._stopping:
                    self._cv.wait(SCAN_PERIOD)
                if self._stopping:
                    return
                self._wake = False
            try:
                self.enforce()
            except Exception:  # a failed pass must not end the budget: the next one tries again
                log.exception("space budget pass failed")

    def enforce(self) -> int:
        """Scan; if resident bytes are past the high watermark, evict down to the low one."""
        found = scan(self.filler.root_path, self.filler.log)
        with self._cv:
            self.estimate = found.resident_bytes
            self.last = found
        if found.resident_bytes <= self.high:
            return 0
        want = found.resident_bytes - self.low
        freed = evict_lru(self.filler, found.candidates, want)
        level = logging.INFO if freed >= want else logging.WARNING
        log.log(level, "space budget: %d bytes resident, high watermark %d: evicted %d bytes (wanted %d; %d pinned "
                "and %d dirty files hold %d bytes)", found.resident_bytes, self.high, freed, want, found.pinned,
                found.dirty, found.pinned_bytes + found.dirty_bytes)
        return freed


__all__ = ["Budget", "Evictor", "NoRoom", "Scan", "evict_lru", "make_room", "scan"]
