"""Space: the budget's background evictor, and making room when the store is full.

Resident bytes are the blocks held by files that came from the source (resident, unverified,
dirty); files users made in the view are theirs and not counted. Only clean, unpinned resident
files are evicted, least recently used first: recency is the backing inode's atime, which the
fill sets and every read through a view updates (views of a mount with a budget are
``strictatime``), and which ignore marks do not hide.

The evictor keeps an estimate (the last scan, plus fills committed, minus bytes evicted since),
wakes when a commit pushes it past the high watermark or every SCAN_PERIOD seconds, and then
scans the tree for the exact figure and evicts down to the low watermark. It never holds a lock
a reader or a fill waits on: evictions are one file at a time, under that file's lease.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hsmfs import tree

if TYPE_CHECKING:
    from hsmfs.filler import Filler
    from hsmfs.policy import Policy

log = logging.getLogger("hsmfs.filler")

SCAN_PERIOD = 30.0  # seconds between scans while under the high watermark (users' writes grow files too)


@dataclass
class Scan:
    """What one walk of the tree found."""

    resident_bytes: int = 0  # blocks held by files from the source
    candidates: list[tuple[int, str, int]] = field(default_factory=list)  # (atime_ns, path, bytes), oldest first
    pinned: int = 0
    pinned_bytes: int = 0
    dirty: int = 0
    dirty_bytes: int = 0


def scan(root: str) -> Scan:
    """Walk the store tree (lstat and xattrs only: no event, no open)."""
    out = Scan()
    for path, st, rec in tree.files(root):
        if rec is None:
            continue
        held = tree.resident_bytes(st)
        out.resident_bytes += held
        state = tree.file_state(rec, st)
        try:
            pinned = tree.is_pinned(path)
        except OSError:
            continue  # removed meanwhile: the next scan sees it
        if state == "dirty":
            out.dirty += 1
            out.dirty_bytes += held
        elif pinned and held:
            out.pinned += 1
            out.pinned_bytes += held
        elif state in ("resident", "unverified") and held:
            out.candidates.append((st.st_atime_ns, path, held))
    out.candidates.sort()
    return out


def evict_lru(filler: Filler, candidates: list[tuple[int, str, int]], want: int) -> int:
    """Evict from candidates (oldest first) until want bytes are freed; returns bytes freed."""
    freed = 0
    for _atime, path, _held in candidates:
        if freed >= want:
            break
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ETXTBSY, errno.ELOOP):
                log.warning("cannot open %s to evict it: %s", path, e)
            continue
        try:
            freed += filler.evict_fd(fd).freed
        except OSError as e:
            log.error("eviction of %s failed: %s", path, e)
        finally:
            os.close(fd)
    return freed


class Budget:
    """max_resident_bytes with its watermarks, kept by a background thread of the filler."""

    def __init__(self, filler: Filler, policy: Policy, root: str) -> None:
        self.filler = filler
        self.root = root
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
        found = scan(self.root)
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
