"""The filler: reads one group's permission events, fills stubs, commits, marks, answers.

Threads: one reader (the only one that reads the group), a pool of fill workers (one fetch per
inode however many events wait on it), one committer (group commit: one syncfs makes a batch of
fills durable before their records say "resident" and their ignore marks go on), and with a space
budget one evictor (hsmfs.filler.budget). Evictions (hsmfs.filler.evict) run one at a time.

This process never opens a file through a view. It touches the tree through event fds and its own
fds on the store (opened by handle for fills, by handle or store path for evictions); the events
its own opens and I/O raise are answered at once by the reader thread (its pid), and it never does
I/O on a watched file while holding that file's lease. It reads the source, which no mark covers.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from hsmfs import tree
from hsmfs.filler.budget import Budget, Scan, evict_lru, scan
from hsmfs.filler.evict import DIRTY, FILLING, IN_USE, Outcome, evict_file
from hsmfs.filler.hydrate import FILLED, RESIDENT, USERS, FillError, hydrate
from hsmfs.filler.journal import Journal
from hsmfs.linux import fanotify as fan
from hsmfs.linux.fs import syncfs
from hsmfs.linux.handles import handle_of, open_handle
from hsmfs.policy import Policy
from hsmfs.sources import Source

log = logging.getLogger("hsmfs.filler")

# Events the view's mount mark asks for. FAN_OPEN_PERM fills before hole-aware copiers (cp, tar -S)
# look for data with SEEK_DATA (kernel-facts §14); FAN_PRE_ACCESS covers fds opened earlier.
MASK = fan.FAN_PRE_ACCESS | fan.FAN_OPEN_PERM
IGNORE = fan.FAN_MARK_ADD | fan.FAN_MARK_IGNORE | fan.FAN_MARK_IGNORED_SURV_MODIFY | fan.FAN_MARK_EVICTABLE
ROOM_MIN = 32 << 20  # a full store: free at least this much at once, not one file's worth per fill
ROOM_TRIES = 4
COMMIT_BATCH = 512  # at most this many fds wait for one commit
SWEEP_FDS = 65536  # fd numbers a successor answers blindly at least (responses match by fd number)

Key = tuple[int, int]  # (st_dev, st_ino)


@dataclass
class Stats:
    events: int = 0
    fills: int = 0
    fill_bytes: int = 0
    fill_errors: int = 0
    timeouts: int = 0
    replayed: int = 0
    swept: int = 0
    commits: int = 0
    overflows: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    enospc: int = 0  # fills that found the store full (and made room, or answered ENOSPC)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def as_dict(self) -> dict[str, object]:
        lat = sorted(self.latencies)

        def pct(p: float) -> Optional[float]:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        return {"events": self.events, "fills": self.fills, "fill_bytes": self.fill_bytes,
                "fill_errors": self.fill_errors, "timeouts": self.timeouts, "replayed": self.replayed,
                "swept": self.swept, "commits": self.commits, "overflows": self.overflows,
                "evictions": self.evictions, "evicted_bytes": self.evicted_bytes, "enospc": self.enospc,
                "fill_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)}}


@dataclass
class _Pending:
    key: Key
    fd: int
    rec: tree.Record
    state: str  # what the record will say once committed


@dataclass
class _Waiter:
    ev: fan.Event
    since: float
    journaled: bool
    answered: bool = False


class Filler:
    def __init__(self, group: int, store_fd: int, paths: tree.PathTable, source: Source, policy: Policy,
                 journal: Optional[Journal] = None) -> None:
        self.group = group
        self.paths = paths
        self.journal = journal
        self.store_fd = store_fd
        self.source = source
        self.policy = policy
        self.stats = Stats()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._inflight: dict[Key, list[_Waiter]] = {}
        self._known: dict[Key, str] = {}
        self._pending: list[_Pending] = []
        self._pending_cv = threading.Condition(self._lock)
        self._stopping = False
        self._flushes = 0  # flush() requests; the committer skips the wait while any is pending
        self._evict_lock = threading.Lock()  # one eviction at a time (by hand, budget, full store)
        self.root = os.readlink(_proc(store_fd))  # the store tree, for scans (lstat and xattrs only)
        self.budget: Optional[Budget] = None
        if policy.max_resident_bytes:
            self.budget = Budget(self, policy, self.root)
        self._committed = threading.Condition(self._lock)
        self._committing: list[_Pending] = []  # the batch the committer is working on
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pool = ThreadPoolExecutor(max_workers=policy.workers, thread_name_prefix="fill")
        self._reader = threading.Thread(target=self._read_loop, name="reader", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="committer", daemon=True)
        self._deadlines = threading.Thread(target=self._deadline_loop, name="deadlines", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._reader.start()
        self._committer.start()
        self._deadlines.start()
        if self.budget is not None:
            self.budget.start()

    def stop(self) -> None:
        """Stop reading, let running fills finish and answer their readers, commit what's filled."""
        with self._lock:
            self._stopping = True
            self._pending_cv.notify_all()
        os.write(self._wake_w, b"x")
        self._reader.join()
        if self.budget is not None:
            self.budget.stop()
        self._pool.shutdown(wait=True)
        self._committer.join()
        self._deadlines.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def take_over(self, tree_fd: int) -> None:
        """Start serving after a dead predecessor: sweep, then fill and allow what it journaled.

        Responses match by fd number only (kernel-facts §6), so before the first new event is
        read every stale number is either answered (EAGAIN: an error, never a stub's holes) or,
        for journaled events, reserved by a dup so no new event can take it. The journaled files
        are then reopened by handle from the store: a stub's inode mark makes that open an event
        of our own group, which the running reader hands to a worker like any other; once it is
        filled the stale numbers are allowed.
        """
        pending = self.journal.pending() if self.journal is not None else {}
        if self.journal is not None:
            self.journal.reset()
        again = fan.deny_errno(11)  # EAGAIN
        for n in range(max(SWEEP_FDS, max(pending, default=0) + 1)):
            if n in pending:
                continue
            try:
                fan.respond(self.group, n, again)
                self.stats.swept += 1
            except OSError:
                pass  # ENOENT: nothing pending under that number
        reserved = _reserve(pending)
        self.start()
        try:
            by_handle: dict[tuple[int, bytes], list[int]] = {}
            for fd, h in pending.items():
                by_handle.setdefault(h, []).append(fd)
            for (htype, handle), fds in by_handle.items():
                response = self._refill(tree_fd, htype, handle)
                for n in fds:
                    try:
                        fan.respond(self.group, n, response)
                    except OSError:
                        pass  # answered before the crash, after all
                self.stats.replayed += len(fds)
        finally:
            for n in reserved:
                os.close(n)
        if pending or self.stats.swept:
            log.warning("took over from a dead filler: %d events filled and allowed, %d answered EAGAIN",
                        self.stats.replayed, self.stats.swept)

    def _refill(self, tree_fd: int, htype: int, handle: bytes) -> int:
        """Fill the file a stale event was about; the response its fd number gets."""
        try:
            fd = open_handle(tree_fd, htype, handle, os.O_RDONLY)
        except OSError as e:
            log.error("cannot refill a file a dead filler was filling: %s; its readers get %s", e,
                      self.policy.source_error)
            return fan.deny_errno(self.policy.source_errno)
        try:
            st = os.fstat(fd)
            rec = tree.read_record(fd)
            with self._lock:
                known = self._known.get((st.st_dev, st.st_ino))
            if rec is None or known is not None or tree.file_state(rec, st) not in ("stub", "unverified"):
                return fan.FAN_ALLOW
            # our own opens are allowed at once by the reader: fill here, through a writable fd
            wfd = open_handle(tree_fd, htype, handle, os.O_RDWR)
            outcome = hydrate(wfd, rec, st, self.source, self.paths.get(rec.path_id))
            if outcome == FILLED:
                self._commit([_Pending((st.st_dev, st.st_ino), wfd, rec, "resident")])
            else:
                os.close(wfd)
            return fan.FAN_ALLOW
        except (FillError, tree.RecordError, OSError) as e:
            log.error("cannot refill %s after a filler restart: %s; its readers get %s", _fd_path(fd), e,
                      self.policy.source_error)
            return fan.deny_errno(self.policy.source_errno)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            self._read_events()
        except BaseException:
            # a filler that no longer reads would hang every reader: die, the supervisor restarts us
            log.critical("the event reader failed; exiting so the supervisor restarts the filler", exc_info=True)
            os._exit(70)

    def _read_events(self) -> None:
        buf = bytearray(1 << 16)
        poller = select.poll()
        poller.register(self.group, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if self._wake_r in ready:
                return
            try:
                n = os.readv(self.group, [buf])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                # the kernel could not open an event's fd (it denied that event): keep reading
                log.error("reading the fanotify group failed: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    with self._lock:
                        self._pending_cv.notify_all()  # a commit closes the fds it holds
                    time.sleep(0.05)
                continue
            try:
                events = list(fan.parse(memoryview(buf)[:n]))
            except ValueError as e:  # never seen; answer nothing we can't parse rather than guess
                log.critical("fanotify read returned garbage: %s", e)
                continue
            for ev in events:
                self._dispatch(ev)

    def _dispatch(self, ev: fan.Event) -> None:
        if ev.mask & fan.FAN_Q_OVERFLOW:
            self.stats.overflows += 1
            log.critical("ALARM: fanotify queue overflowed; some reads may have seen stub holes")
            return
        if ev.fd < 0:
            return
        self.stats.events += 1
        if not ev.mask & fan.PERM_EVENTS:
            os.close(ev.fd)
            return
        if ev.pid == self._pid:  # our own fill fds on the store: answering them is what fills
            self._answer(ev, fan.FAN_ALLOW)
            return
        try:
            st = os.fstat(ev.fd)
        except OSError as e:
            log.error("fstat of event fd failed: %s", e)
            self._answer(ev, fan.deny_errno(self.policy.source_errno))
            return
        key = (st.st_dev, st.st_ino)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event mask=%#x fd=%d pid=%d range=%d+%d ino=%d", ev.mask, ev.fd, ev.pid, ev.offset,
                      ev.count, st.st_ino)
        with self._lock:
            known = self._known.get(key)
            busy = key in self._inflight
        if known in (FILLED, RESIDENT) and not busy and not self._holds_data(ev.fd, st):
            # never allow a read of holes on the word of our memory alone: fill it again
            log.warning("%s was filled, but is a stub without its data now: filling it again", _fd_path(ev.fd))
            with self._lock:
                if self._known.get(key) == known:
                    del self._known[key]
            known = None
        if known is None and not busy and self._settled_on_disk(ev.fd, st):
            # resident (or a user's own file) whose evictable mark went with its inode, after a
            # cache drop or a restart: re-mark and allow here, no journal, no worker, no fill
            with self._lock:
                self._known.setdefault(key, RESIDENT)
            self._settle(ev.fd)
            self._answer(ev, fan.FAN_ALLOW)
            return
        with self._lock:  # lock order: self._lock, then the journal's
            known = self._known.get(key)
            if known is None:
                waiter = _Waiter(ev, time.monotonic(), self._journal_read(ev.fd))
                waiters = self._inflight.get(key)
                if waiters is not None:
                    waiters.append(waiter)
                    return
                self._inflight[key] = [waiter]
        if known is not None:
            if known != FILLED:  # its evictable ignore mark was dropped with the inode: re-mark
                self._settle(ev.fd)
            self._answer(ev, fan.FAN_ALLOW)
            return
        self._pool.submit(self._fill, key, ev, st)

    @staticmethod
    def _holds_data(fd: int, st: os.stat_result) -> bool:
        """Whether a file we filled still holds its data: committed resident (or a user's by now),
        or, before its commit, blocks (an empty file needs none)."""
        try:
            rec = tree.read_record(fd)
        except (OSError, tree.RecordError):
            return True  # the fill path reports it
        return rec is None or tree.file_state(rec, st) != "stub" or st.st_blocks > 0 or st.st_size == 0

    @staticmethod
    def _settled_on_disk(fd: int, st: os.stat_result) -> bool:
        """Whether the file needs nothing from us: resident, or without a record (a user's)."""
        try:
            rec = tree.read_record(fd)
        except (OSError, tree.RecordError):
            return False  # the fill path reports it
        return rec is None or tree.file_state(rec, st) == "resident"

    def _journal_read(self, fd: int) -> bool:
        if self.journal is None:
            return False
        try:
            self.journal.read(fd, *handle_of(fd))
            return True
        except OSError as e:
            log.warning("cannot journal event fd %d: %s", fd, e)
            return False

    def _answer(self, ev: fan.Event, response: int, *, close: bool = True) -> None:
        try:
            fan.respond(self.group, ev.fd, response)
        except OSError as e:
            log.error("answering event fd %d failed: %s", ev.fd, e)
        if close:
            os.close(ev.fd)

    def _answer_waiter(self, w: _Waiter, response: int) -> None:
        """Answer without closing: the fd number must stay ours until the journal says answered."""
        w.answered = True
        self._answer(w.ev, response, close=False)
        if w.journaled and self.journal is not None:
            self.journal.answered(w.ev.fd)

    def _deadline_loop(self) -> None:
        """Readers of a fill that takes longer than fill_timeout get the policy's errno, not a hang.

        Answers happen under the lock, so a worker finishing at the same moment sees them answered
        and no fd number is answered after it was closed (responses match by number).
        """
        period = min(1.0, self.policy.fill_timeout / 4)
        deny = fan.deny_errno(self.policy.source_errno)
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._pending_cv.wait(period)
                now = time.monotonic()
                for waiters in self._inflight.values():
                    for i, w in enumerate(waiters):
                        if w.answered or now - w.since <= self.policy.fill_timeout:
                            continue
                        log.error("fill of %s took longer than %.0f s; its reader gets %s", _fd_path(w.ev.fd),
                                  self.policy.fill_timeout, self.policy.source_error)
                        self._answer_waiter(w, deny)
                        self.stats.timeouts += 1
                        if i > 0:  # the worker owns the first event's fd
                            os.close(w.ev.fd)
                    waiters[1:] = [w for w in waiters[1:] if not w.answered]

    def _settle(self, fd: int) -> None:
        """A file that needs no fill: drop its stub's inode mark, add the evictable ignore mark.

        Two marks of one group cannot share an inode with different evictability (EEXIST), so the
        non-evictable inode mark goes first; a read in between through the view is answered at
        once (the file is known), through any other path it sees the file's real data.
        """
        try:  # a stub keeps its mark, whatever our memory says: its holes must never be read
            rec = tree.read_record(fd)
            if rec is not None and tree.file_state(rec, os.fstat(fd)) in ("stub", "unverified"):
                log.warning("not marking %s as settled: it is a stub", _fd_path(fd))
                return
        except (OSError, tree.RecordError):
            pass
        # by /proc path: fd may be an O_PATH fd, which fanotify_mark(fd, NULL) refuses
        try:
            fan.mark(self.group, fan.FAN_MARK_REMOVE, MASK, fan.AT_FDCWD, _proc(fd))
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("removing the stub mark failed: %s", e)
        try:
            fan.mark(self.group, IGNORE, MASK, fan.AT_FDCWD, _proc(fd))
        except OSError as e:
            log.warning("ignore mark failed: %s", e)

    # -- filling ---------------------------------------------------------------------------------
    def _fill(self, key: Key, ev: fan.Event, st: os.stat_result) -> None:
        t0 = time.monotonic()
        rec: Optional[tree.Record] = None
        src: Optional[str] = None
        outcome: Optional[str] = None
        response = fan.FAN_ALLOW
        wfd = -1
        try:
            rec = tree.read_record(ev.fd)
            if rec is not None and rec.state in ("stub", "unverified"):
                src = self.paths.get(rec.path_id)
                # Event fds are read-only: a reader on a read-only mount (overlayfs's copy of its
                # lower layer, a ro bind mount) must get one too. The bytes go through our own fd
                # on the store, whose events this process answers itself (_dispatch).
                wfd = open_handle(self.store_fd, *handle_of(ev.fd), os.O_RDWR)
                outcome = self._hydrate(wfd, rec, src, key)
            else:
                outcome = hydrate(ev.fd, rec, st, self.source, "")  # nothing to write: settled
        except StoreFull as e:
            log.error("cannot fill %s: %s; its readers get ENOSPC, the stub stays a stub", src, e)
            response = fan.deny_errno(e.errno)
            with self._lock:
                self.stats.fill_errors += 1
        except (FillError, tree.RecordError, OSError) as e:
            what = src or _fd_path(ev.fd)
            log.error("cannot fill %s from %s: %s; readers get %s, the stub stays a stub",
                      what, self.source.describe(), e, self.policy.source_error)
            response = fan.deny_errno(self.policy.source_errno)
            with self._lock:
                self.stats.fill_errors += 1
        except Exception:
            log.exception("bug while filling %s", _fd_path(ev.fd))
            response = fan.deny_errno(self.policy.source_errno)
        with self._lock:
            waiters = self._inflight.pop(key)
            if outcome is not None:
                self._known[key] = outcome
            if outcome == FILLED and rec is not None:
                self.stats.fills += 1
                self.stats.fill_bytes += rec.size
                self.stats.latencies.append(time.monotonic() - t0)
        # the worker owns ev.fd (the first event's) until here; the deadline answers but never closes it
        for w in waiters:
            if not w.answered:
                self._answer_waiter(w, response)
            if w.ev.fd != ev.fd:
                os.close(w.ev.fd)
        if outcome is None or wfd < 0 or rec is None:
            if outcome is not None:
                self._settle(ev.fd)
            os.close(ev.fd)
            if wfd >= 0:
                os.close(wfd)
            return
        # the store fd, not an event fd, waits for the commit: an event fd pins the mount the
        # reader used (the view, a bind mount), keeping it busy
        os.close(ev.fd)
        with self._lock:
            self._pending.append(_Pending(key, wfd, rec, "resident" if outcome == FILLED else "dirty"))
            if len(self._pending) in (1, COMMIT_BATCH):  # start a commit period, or end it early
                self._pending_cv.notify_all()

    def _hydrate(self, wfd: int, rec: tree.Record, src: str, key: Key) -> str:
        """hydrate(), making room when the store is full: evict least recently used clean files and
        try again; StoreFull once nothing more can be evicted. (hydrate gives back what a failed
        try wrote.)"""
        for _ in range(ROOM_TRIES):
            try:
                return hydrate(wfd, rec, os.fstat(wfd), self.source, src)
            except FillError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                err = e.errno
            with self._lock:
                self.stats.enospc += 1
            # fills waiting for their commit hold room too, and become evictable once committed
            self.flush(fills=False)
            need = max(rec.size - os.fstat(wfd).st_blocks * 512, 0) + ROOM_MIN
            found = scan(self.root)
            freed = evict_lru(self, found.candidates, need)
            log.warning("store full (%s) while filling %s: evicted %d bytes of least recently used files",
                        os.strerror(err), src, freed)
            if freed == 0:
                raise StoreFull(os.strerror(err), err, found)
        raise StoreFull("still full after evicting", errno.ENOSPC, scan(self.root))

    # -- committing ------------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._pending_cv.wait()
                if not self._pending and self._stopping:
                    return
                deadline = time.monotonic() + self.policy.commit_interval
                while len(self._pending) < COMMIT_BATCH and not self._stopping and not self._flushes:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._pending_cv.wait(left)
                batch, self._pending = self._pending, []
                self._committing = batch
            self._commit(batch)
            with self._lock:
                self._committing = []
                self._committed.notify_all()

    def flush(self, timeout: float = 30.0, *, fills: bool = True) -> None:
        """Commit every fill now and close the fds held for it (they keep the view busy, and a file
        someone holds open cannot be evicted). With fills, also wait for running fills; without,
        only for the fills waiting now (new ones may keep coming)."""
        with self._lock:
            self._flushes += 1
            try:
                self._pending_cv.notify_all()
                deadline = time.monotonic() + timeout
                mine = {id(p) for p in self._pending + self._committing}
                while time.monotonic() < deadline:
                    if fills and not (self._pending or self._inflight or self._committing):
                        break
                    if not fills and not any(id(p) in mine for p in self._pending + self._committing):
                        break
                    self._committed.wait(0.05)
            finally:
                self._flushes -= 1

    def _commit(self, batch: list[_Pending]) -> None:
        """Data durable, then records, then ignore marks: a crash anywhere costs a refetch at most."""
        try:
            syncfs(self.store_fd)
            for p in batch:
                tree.write_record(_proc(p.fd), p.rec.with_state(p.state))
            syncfs(self.store_fd)
        except OSError as e:
            # nothing is marked: the next access re-checks each file against its source
            log.error("commit of %d files failed: %s; they will be re-checked on next access", len(batch), e)
            with self._lock:
                for p in batch:
                    self._known.pop(p.key, None)
            for p in batch:
                os.close(p.fd)
            return
        with self._lock:
            for p in batch:
                self._known[p.key] = RESIDENT if p.state == "resident" else USERS
        filled = 0
        for p in batch:
            self._settle(p.fd)
            if self.budget is not None:
                filled += tree.resident_bytes(os.fstat(p.fd))
            os.close(p.fd)
        if self.budget is not None:
            self.budget.filled(filled)
        with self._lock:
            self.stats.commits += 1  # counted once the batch is marked: status shows a finished commit

    # -- evicting --------------------------------------------------------------------------------
    def evict(self, handles: list[tuple[int, bytes]]) -> list[Outcome]:
        """Evict the files named by handles (hsmfs evict); one Outcome each, in order."""
        with self._lock:
            pending = bool(self._pending)
        if pending:
            self.flush(fills=False)  # our own fds on uncommitted fills would refuse the lease
        out = []
        for htype, handle in handles:
            try:
                fd = open_handle(self.store_fd, htype, handle, os.O_RDWR)
            except OSError as e:
                out.append(Outcome(False, IN_USE if e.errno == errno.ETXTBSY else f"cannot open: {e.strerror}"))
                continue
            try:
                out.append(self.evict_fd(fd))
            except OSError as e:
                log.error("eviction of %s failed: %s", _fd_path(fd), e)
                out.append(Outcome(False, f"failed: {e.strerror or e}"))
            finally:
                os.close(fd)
        return out

    def evict_fd(self, fd: int) -> Outcome:
        """Evict the file behind fd (an O_RDWR fd on the store); counted in the stats."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._evict_lock:
            rec = tree.read_record(fd)
            if rec is not None and tree.file_state(rec, st) == "unverified":
                # It still carries the stub's mark, so I/O through fd (opened under it) raises
                # events, and opening their fds would break our own lease: compare it with its
                # source first, as a fill does, and commit that; the ignore mark the commit puts on
                # silences fd from then on, and it is evicted as the resident file it turned out to be.
                why = self._verify(fd, key, rec)
                if why is not None:
                    return Outcome(False, why)
            return self._evict_settled(fd, key)

    def _evict_settled(self, fd: int, key: Key) -> Outcome:
        with self._lock:
            if key in self._inflight or any(p.key == key for p in self._pending + self._committing):
                return Outcome(False, FILLING)
        outcome = evict_file(fd, self.source, self.paths, _EvictMarks(self, key))
        if outcome.evicted:
            with self._lock:
                self.stats.evictions += 1
                self.stats.evicted_bytes += outcome.freed
            if self.budget is not None:
                self.budget.freed(outcome.freed)
        return outcome

    def _verify(self, fd: int, key: Key, rec: tree.Record) -> Optional[str]:
        """Compare an unverified file with its source (filling any holes) and commit the verdict, as a
        fill would; readers that come meanwhile wait for it. None, or why it cannot be evicted."""
        with self._lock:
            if key in self._inflight:
                return FILLING
            self._inflight[key] = []
        outcome: Optional[str] = None
        try:
            outcome = hydrate(fd, rec, os.fstat(fd), self.source, self.paths.get(rec.path_id))
        except (FillError, tree.RecordError, OSError) as e:
            log.error("cannot compare %s with its source before evicting it: %s", _fd_path(fd), e)
        with self._lock:
            waiters = self._inflight.pop(key)
            if outcome is not None:
                self._known[key] = outcome
        response = fan.FAN_ALLOW if outcome is not None else fan.deny_errno(self.policy.source_errno)
        for w in waiters:
            if not w.answered:
                self._answer_waiter(w, response)
            os.close(w.ev.fd)
        if outcome is None:
            return "cannot compare it with its source (see the log)"
        self._commit([_Pending(key, os.dup(fd), rec, "resident" if outcome == FILLED else "dirty")])
        if outcome != FILLED:
            return DIRTY
        now = tree.read_record(fd)
        return None if now is not None and now.state == "resident" else "its comparison with the source could not " \
            "be committed (see the log)"

    def status(self) -> dict[str, object]:
        with self._lock:
            d = self.stats.as_dict()
            d["inflight"] = len(self._inflight)
            d["pending_commit"] = len(self._pending)
        d["budget"] = self.budget.status() if self.budget is not None else None
        return d


class StoreFull(FillError):
    """The store has no room for a fill, and nothing clean and unpinned is left to evict."""

    def __init__(self, what: str, err: int, found: Scan) -> None:
        super().__init__(f"the store filesystem is full ({what}) and nothing can be evicted: {found.pinned} pinned "
                         f"and {found.dirty} dirty files hold {found.pinned_bytes + found.dirty_bytes} bytes; "
                         f"unpin or evict files, or give the store more room", err)


class _EvictMarks:
    """hsmfs.filler.evict.Marks for the group this filler serves."""

    def __init__(self, filler: Filler, key: Key) -> None:
        self.filler = filler
        self.key = key

    def arm(self, fd: int) -> None:
        # an evictable ignore mark turns non-evictable here (the stub's mark pins the inode)
        fan.mark(self.filler.group, fan.FAN_MARK_ADD, MASK, fan.AT_FDCWD, _proc(fd))

    def disarm(self, fd: int) -> None:
        self._unignore(fd)
        self.filler._settle(fd)  # back to an evictable ignore mark alone

    def release(self, fd: int) -> None:
        with self.filler._lock:
            self.filler._known.pop(self.key, None)  # the next event fills it again
        self._unignore(fd)

    def _unignore(self, fd: int) -> None:
        try:
            fan.mark(self.filler.group, fan.FAN_MARK_REMOVE | fan.FAN_MARK_IGNORE, MASK, fan.AT_FDCWD, _proc(fd))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _reserve(numbers: dict[int, tuple[int, bytes]]) -> list[int]:
    """Occupy each free fd number in numbers (with /dev/null) so no new event fd can take it."""
    reserved = []
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    for n in numbers:
        if n == null:
            reserved.append(n)
            continue
        try:
            os.fstat(n)
            continue  # ours already: no event fd can get that number either
        except OSError:
            pass
        os.dup2(null, n, inheritable=False)
        reserved.append(n)
    if null not in reserved:
        os.close(null)
    return reserved
