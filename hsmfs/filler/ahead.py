"""Fill-ahead: when a stub is filled on demand, fill its directory's other small stubs too.

Programs that read one file of a directory tend to read its neighbours next (a tree walk, a
compiler including headers, an interpreter importing a package). The first demand fill in a
directory queues its stubs of at most ``fill_ahead_max_size`` bytes, in name order; the workers
fill them when no demand fill waits, never more than ``fill_ahead_bytes`` at a time. A reader that
gets there finds them filled (its open is answered at once) or committed (no event at all); one
that gets there first simply joins the fill.

Each directory is queued once per filler. The directory is the source path's: the store tree
mirrors the source, and a directory a user renamed in the view is passed over. With a space
budget, nothing is filled ahead once resident bytes pass the low watermark: fill-ahead never
evicts anyone's files to make room for guesses.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import TYPE_CHECKING

from hsmfs import tree
from hsmfs.linux.fs import open_beneath

if TYPE_CHECKING:
    from hsmfs.filler.core import Filler
    from hsmfs.policy import Policy

log = logging.getLogger("hsmfs.filler")


class FillAhead:
    def __init__(self, filler: Filler, policy: Policy) -> None:
        self.filler = filler
        # never for a remote source: every byte fetched costs, and a reader of 20 % of a tree must not
        # fetch its neighbours too (docs/remote.md: bytes fetched stay within 1.1x the bytes read)
        self.enabled = policy.fill_ahead and not getattr(filler.source, "remote", False)
        self.max_size = policy.fill_ahead_max_size
        self.limit = policy.fill_ahead_bytes
        self.max_files = 2 * policy.workers  # queued at once: a demand fill waits for at most these
        self._lock = threading.Lock()
        self._scanned: set[str] = set()
        self._queue: deque[tuple[str, int]] = deque()
        self._bytes = 0
        self._files = 0
        self._stopped = False

    def touched(self, path_id: int) -> None:
        """A stub was filled on demand: queue its directory, once."""
        if not self.enabled or self._stopped:
            return
        budget = self.filler.budget
        if budget is not None and budget.estimate + self.filler.pending_bytes() >= budget.low:
            return
        try:
            d = os.path.dirname(self.filler.paths.get(path_id))
        except (OSError, tree.RecordError):
            return
        with self._lock:
            if d in self._scanned:
                return
            self._scanned.add(d)
        self.filler._submit(1, lambda: self._scan(d))

    def _scan(self, d: str) -> None:
        if self._stopped:
            return
        try:
            dfd = open_beneath(self.filler.root_fd, d or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return  # renamed or removed in the view
        found = []
        try:
            with os.scandir(dfd) as it:  # lstat by dir fd: no file is opened, no event
                for e in it:
                    if e.is_file(follow_symlinks=False) and not e.name.startswith(tree.TMP_PREFIX):
                        st = e.stat(follow_symlinks=False)
                        if st.st_size <= self.max_size and st.st_blocks == 0:
                            found.append((e.name, st.st_size))
        except OSError as e:
            log.debug("fill-ahead cannot list %s: %s", d, e)
            return
        finally:
            os.close(dfd)
        found.sort()
        with self._lock:
            self._queue.extend((os.path.join(d, name), size) for name, size in found)
        self._pump()

    def _pump(self) -> None:
        go = []
        budget = self.filler.budget
        # with a budget, what resident bytes would be once everything filled so far is committed
        used = budget.estimate + self.filler.pending_bytes() if budget is not None else 0
        with self._lock:
            while self._queue and not self._stopped and self._files < self.max_files and \
                    (self._files == 0 or self._bytes + self._queue[0][1] <= self.limit) and \
                    (budget is None or used + self._bytes + self._queue[0][1] <= budget.low):
                path, size = self._queue.popleft()
                self._bytes += size
                self._files += 1
                go.append((path, size))
        for path, size in go:
            self.filler._submit(1, lambda p=path, n=size: self._fill(p, n))  # type: ignore[misc]

    def _fill(self, path: str, size: int) -> None:
        if self._stopped:
            self.done(size)
            return
        self.filler.fill_ahead(path, size)

    def done(self, size: int) -> None:
        """An ahead fill is over (filled, or passed over): its bytes no longer count as in flight."""
        with self._lock:
            self._bytes -= size
            self._files -= 1
        self._pump()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._queue.clear()

    def status(self) -> dict[str, object]:
        with self._lock:
            return {"enabled": self.enabled, "directories": len(self._scanned), "queued": len(self._queue),
                    "in_flight_bytes": self._bytes}
