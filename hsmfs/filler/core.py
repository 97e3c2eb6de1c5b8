"""The filler of one mount: reads its group's permission events, fills stubs, commits, answers.

Threads, each with its own job:

- **reader**: the only thread that reads the group. An event for a file being filled joins that
  fill; one for a file filled and waiting for its commit is allowed at once; one for a stub starts
  a fill (journaled first, :mod:`hsmfs.filler.takeover`). It also answers the readers of fills
  that outlast ``fill_timeout`` with the policy's errno.
- **workers** (``policy.workers``): fill one inode each, demand fills before fill-ahead. A fill
  reads and writes the stub through the filler's own clone of the tree
  (:func:`hsmfs.filler.marks.private_root`), so it raises no event in its own group.
- **committer**: every ``commit_interval``, or sooner when many fills wait, one ``syncfs`` makes a
  batch of fills durable, one append to the state log records them as resident at the ctime
  each had right after its fill, and only then do their stub marks go (hsmfs.state says why a
  ctime: any later change by anyone makes the file dirty).
- with a space budget, the **evictor** (hsmfs.filler.budget), and the control socket's thread.

Fill-ahead: the first fill in a directory queues the directory's other small stubs, filled by the
workers when no demand fill waits, bounded by ``fill_ahead_max_size`` per file and
``fill_ahead_bytes`` in flight. A tree walker then finds them filled, and most of them committed:
no event at all.

This process never opens a file through a view, and never touches a stub but through its own
clone of the tree: the source is the only other thing it reads.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hsmfs import state, tree
from hsmfs.filler import faults
from hsmfs.filler.evict import IN_USE, Evictor, Outcome
from hsmfs.filler.fill import Filled, fill
from hsmfs.filler.marks import Marks
from hsmfs.filler.takeover import Journal, reserve, sweep
from hsmfs.linux import fanotify as fan
from hsmfs.linux.fs import open_beneath, syncfs
from hsmfs.linux.handles import open_handle
from hsmfs.policy import Policy
from hsmfs.process import real_uid
from hsmfs.sources import IntegrityError, Source, SourceError
from hsmfs.state import FileState, Key, StateLog

log = logging.getLogger("hsmfs.filler")

Ino = tuple[int, int]  # (st_dev, st_ino): what an event fd's fstat names
VERIFY_DELAY = 5.0  # seconds after the start before unverified files are compared with their source
COMMIT_BATCH = 1024  # at most this many fills wait for one commit
INLINE_MAX = 256 << 10  # the reader thread fills files up to this size itself (see Filler._inline)
DEMAND, AHEAD, VERIFY, STOP = 0, 1, 2, 3  # worker queue priorities
_EAGAIN = fan.deny_errno(errno.EAGAIN)


@dataclass
class Stats:
    events: int = 0
    fills: int = 0
    fill_bytes: int = 0
    ahead_fills: int = 0
    fill_errors: int = 0
    timeouts: int = 0
    replayed: int = 0
    swept: int = 0
    commits: int = 0
    committed: int = 0
    overflows: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    enospc: int = 0  # fills that found the store full (and made room, or answered ENOSPC)
    hash_failures: int = 0  # fetched files whose bytes did not hash to the manifest's sha256
    user_waits: int = 0  # demand fills that waited because their user held policy.user_fills workers
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def as_dict(self) -> dict[str, object]:
        lat = sorted(self.latencies)

        def pct(p: float) -> Optional[float]:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        d: dict[str, object] = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        d["fill_latency_ms"] = {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)}
        return d


@dataclass(eq=False)
class Waiter:
    """A permission event waiting for a fill: its fd number, and whether the fd is ours to close
    (a dead predecessor's numbers are not: the kernel only needs an answer)."""

    fd: int
    since: float
    owned: bool = True
    journaled: bool = False  # an "R" line names it in the in-flight journal: answering it writes "A"
    answered: bool = False


@dataclass(eq=False)
class Job:
    """One inode being filled (or evicted): whoever asks for it meanwhile waits here."""

    ino: Ino
    kind: str  # "demand", "ahead", "replay", "evict"
    key: Key
    waiters: list[Waiter] = field(default_factory=list)
    rec: Optional[tree.Record] = None
    fd: int = -1  # the worker's O_RDWR fd through the private root
    reserved: int = 0  # bytes fill-ahead counted in flight for it
    st: Optional[os.stat_result] = None  # the inode's stat when the job began (saves an fstat)
    pid: int = 0  # the process whose read started it (0: none, a job hsmfs started itself)
    uid: Optional[int] = None  # pid's real uid, looked up only when workers run short (-1: pid gone)


@dataclass(eq=False)
class Pending:
    """A fill waiting for its commit (the committer opens the file again by its key)."""

    ino: Ino
    key: Key
    ctime_ns: int
    users: bool
    size: int


class Filler:
    def __init__(self, group: int, root_fd: int, root_path: str, paths: tree.PathTable, log_: StateLog,
                 source: Source, policy: Policy, journal: Optional[Journal] = None) -> None:
        """root_fd: the filler's private root of the tree (hsmfs.filler.marks.private_root);
        root_path: the tree's path, walked (lstat and xattrs only) by scans for the space budget."""
        self.group = group
        self.root_fd = root_fd
        self.root_path = root_path
        self.paths = paths
        self.log = log_
        self.source = source
        self.policy = policy
        self.journal = journal
        self.marks = Marks(group)
        self.stats = Stats()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._inflight: dict[Ino, Job] = {}
        self._pending: dict[Ino, Pending] = {}
        self._committing: list[Pending] = []
        self._committing_inos: set[Ino] = set()
        self._commit_cv = threading.Condition(self._lock)
        self._committed = threading.Condition(self._lock)
        self._flushes = 0
        self._urgent = False  # commit what waits without waiting for commit_interval (fills taken over)
        self._stopping = False
        self._closing = threading.Event()
        self._verify_queue: deque[Key] = deque()
        self._verifying = False
        self._evict_lock = threading.Lock()  # one eviction at a time (by hand, budget, full store)
        self._work: queue.PriorityQueue[tuple[int, int, Callable[[], None]]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._demand_queued = 0  # demand fills waiting for a worker (approximate: read without a lock)
        # One user's demand fills hold at most policy.user_fills workers; the rest wait in line here,
        # so that a user who opens many slow files at once leaves a worker for everyone else.
        self._user_cap = policy.user_fills
        self._demand_running: set[Job] = set()  # demand fills given to the workers, not done yet
        self._user_waiting: dict[int, deque[Job]] = {}
        self._quick = bool(getattr(source, "quick", False))
        self.room_left = 0  # bytes fills may still write before the store's free space is asked again
        self.room_until = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._threads = [threading.Thread(target=self._read_loop, name="reader", daemon=True),
                         threading.Thread(target=self._commit_loop, name="committer", daemon=True)]
        self._threads += [threading.Thread(target=self._work_loop, name=f"fill-{i}", daemon=True)
                          for i in range(policy.workers)]
        from hsmfs.filler.ahead import FillAhead
        from hsmfs.filler.budget import Budget

        self.ahead = FillAhead(self, policy)
        self.budget: Optional[Budget] = Budget(self, policy) if policy.max_resident_bytes else None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()
        if self.budget is not None:
            self.budget.start()
        self._verify_queue = deque(k for k, e in list(self.log.states.items()) if e.op == state.OP_UNVERIFIED)
        if self._verify_queue:
            log.info("comparing %d files that were resident when a session ended uncleanly with their source, in "
                     "the background", len(self._verify_queue))
            self._verifying = True
            # after the start's burst of demand fills, not in the middle of it
            timer = threading.Timer(VERIFY_DELAY, lambda: self._submit(VERIFY, self._verify_next))
            timer.daemon = True
            timer.start()

    # -- after an unclean end ----------------------------------------------------------------------
    def _verify_next(self) -> None:
        """Compare one unverified file with its source, then queue the next: one at a time, behind
        every fill, so a reader never waits for it."""
        key = self._verify_queue.popleft() if self._verify_queue and not self._closing.is_set() else None
        if key is not None:
            try:
                self._verify(key)
            except (OSError, tree.RecordError, SourceError) as e:
                log.warning("cannot compare a file with its source after the unclean end: %s; it stays "
                            "unverified (compared again before it is evicted)", e)
        with self._lock:
            if self._verify_queue and not self._closing.is_set():
                self._submit(VERIFY, self._verify_next)
            else:
                self._verifying = False
                self._committed.notify_all()

    def _verify(self, key: Key) -> None:
        """unverified -> resident if its bytes are the source's and nobody changed it meanwhile, else dirty."""
        try:
            fd = open_handle(self.root_fd, *state.split_key(key), os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ESTALE:  # deleted since
                self.log.record([(key, state.OP_STUB, 0)], durable=False)
                return
            raise
        try:
            st = os.fstat(fd)
            entry = self.log.get(key)
            if entry is None or entry.op != state.OP_UNVERIFIED or st.st_ctime_ns != entry.ctime_ns:
                return  # changed by a user since: dirty by its ctime already
            with self._lock:
                if (st.st_dev, st.st_ino) in self._inflight:
                    return
            rec = tree.read_record(fd)
            if rec is None:
                return
            obj = self.source.open(self.paths.get(rec.path_id), rec)
            try:
                same = st.st_size == rec.size and obj.same(fd, 0, st.st_size)
            finally:
                obj.close()
            if os.fstat(fd).st_ctime_ns != st.st_ctime_ns:
                return  # a user changed it while it was compared
            self.log.record([(key, state.OP_RESIDENT if same else state.OP_DIRTY, st.st_ctime_ns)], durable=False)
        finally:
            os.close(fd)

    def stop(self) -> None:
        """Stop reading; let running fills finish and answer their readers; commit what is filled."""
        self._closing.set()  # background work (verification) stops at its next step
        os.write(self._wake_w, b"x")
        self._threads[0].join()  # the reader: no new work from here on
        self.ahead.stop()
        if self.budget is not None:
            self.budget.stop()
        for _ in self._threads[2:]:
            self._work.put((STOP, next(self._seq), _STOP))  # after the work queued before it
        for t in self._threads[2:]:
            t.join()
        with self._lock:
            self._stopping = True
            self._commit_cv.notify_all()
        self._threads[1].join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def take_over(self) -> None:
        """Start serving after a dead predecessor: sweep, then fill and allow what it journaled.

        Responses match by fd number only, so before the first new event is read every stale
        number is either answered (EAGAIN: an error, never a stub's holes) or, for journaled
        events, held by a dup so no new event can take it. Journaled files are filled like any
        demand fill; their numbers are allowed as soon as their fill is done.
        """
        pending, fills = self.journal.pending() if self.journal is not None else ({}, {})
        if self.journal is not None:
            self.journal.reset()
        self._adopt(fills)
        t0 = time.monotonic()
        self.stats.swept = sweep(self.group, pending)
        reserved = reserve(pending)
        by_key: dict[Key, list[int]] = {}
        for n, key in pending.items():
            by_key.setdefault(key, []).append(n)
        jobs = []
        for key, numbers in by_key.items():
            waiters = [Waiter(n, t0, owned=False, journaled=True) for n in numbers]
            job = self._replay_job(key, waiters)
            if job is not None:
                jobs.append(job)
        self.start()
        for job in jobs:
            self._submit(DEMAND, lambda j=job: self._fill_job(j))  # type: ignore[misc]
        if pending or self.stats.swept:
            for job in jobs:
                self._wait_done(job)
            log.warning("took over from a dead filler in %.0f ms: %d events filled and allowed, %d answered EAGAIN",
                        (time.monotonic() - t0) * 1000, self.stats.replayed, self.stats.swept)
        for n in reserved:
            os.close(n)

    def _adopt(self, fills: dict[Key, tuple[int, bool]]) -> None:
        """Commit what a dead predecessor filled and did not commit: it removed their marks."""
        adopted = []
        for key, (ctime, users) in fills.items():
            if self.log.get(key) is not None:
                continue  # its commit reached the state log, not its "C" line
            try:
                fd = open_handle(self.root_fd, *state.split_key(key), os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue  # removed since
            try:
                st = os.fstat(fd)
                rec = tree.read_record(fd)
            except (OSError, tree.RecordError):
                continue
            finally:
                os.close(fd)
            if rec is not None:
                ino = (st.st_dev, st.st_ino)
                self._pending[ino] = Pending(ino, key, ctime, users, rec.size)
                adopted.append((key, ctime, users))
        if adopted:
            self._urgent = True  # they waited long enough: commit them first thing
            if self.journal is not None:
                self.journal.filled(adopted)  # ours now, should we die too
            log.info("took over %d fills of a dead filler that were not committed yet", len(adopted))

    def _replay_job(self, key: Key, waiters: list[Waiter]) -> Optional[Job]:
        """A job for a file a dead predecessor was filling, or None if its numbers were answered here."""
        try:
            fd = open_handle(self.root_fd, *state.split_key(key), os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            log.error("cannot reopen a file a dead filler was filling: %s; its readers get %s", e,
                      self.policy.source_error)
            self._answer(waiters, fan.deny_errno(self.policy.source_errno))
            return None
        st = os.fstat(fd)
        job = Job((st.st_dev, st.st_ino), "replay", key, waiters, fd=fd)
        with self._lock:
            self._inflight[job.ino] = job
        self.stats.replayed += len(waiters)
        return job

    def _wait_done(self, job: Job) -> None:
        with self._lock:
            while self._inflight.get(job.ino) is job:
                self._committed.wait()  # notified when a fill ends

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
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.group, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        period = min(1.0, self.policy.fill_timeout / 4)
        next_check = time.monotonic() + period
        while True:
            ready = poller.poll(period * 1000)
            now = time.monotonic()
            if now >= next_check:
                self._expire(now)
                next_check = now + period
            if any(fd == self._wake_r for fd, _ in ready):
                return
            if not ready:
                continue
            try:
                n = os.readv(self.group, [buf])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                # the kernel could not open an event's fd (and denied that event): keep reading
                log.error("reading the fanotify group failed: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    with self._lock:
                        self._commit_cv.notify_all()  # a commit closes the fds it holds
                    time.sleep(0.05)
                continue
            todo: list[Job] = []
            journal: list[tuple[int, Key]] = []
            try:
                events = list(fan.parse(view[:n]))
            except ValueError as e:  # never seen; answer nothing we can't parse rather than guess
                log.critical("fanotify read returned garbage: %s", e)
                continue
            for ev in events:
                try:
                    self._dispatch(ev, todo, journal)
                except Exception:
                    log.exception("bug while looking at an event for %s", _fd_path(ev.fd))
                    self._answer([Waiter(ev.fd, now)], fan.deny_errno(self.policy.source_errno))
            if journal and self.journal is not None:
                self.journal.read(journal)  # before any of this work can be answered
            inline = self._inline(todo)
            for job in todo:
                if job is not inline:
                    self._submit_demand(job)
            if inline is not None:
                self._fill_job(inline)

    def _inline(self, todo: list[Job]) -> Optional[Job]:
        """The job this thread fills itself, if any: a small file from a quick source, while no demand
        fill waits for a worker. It saves a hand-off to a worker per file (a wake-up and the GIL
        going back and forth, the larger part of a small fill's cost); events read meanwhile wait in
        the kernel for at most one small fill."""
        if not self._quick or self._demand_queued:
            return None
        for job in todo:
            if job.rec is not None and job.rec.size <= INLINE_MAX:
                return job
        return None

    def _dispatch(self, ev: fan.Event, todo: list[Job], journal: list[tuple[int, Key]]) -> None:
        if ev.mask & fan.FAN_Q_OVERFLOW:
            self.stats.overflows += 1
            log.critical("ALARM: fanotify queue overflowed; some reads may have seen stub holes")
            return
        if ev.fd < 0:
            return
        if not ev.mask & fan.PERM_EVENTS:  # the view's FAN_OPEN_EXEC: it only says the view is there
            os.close(ev.fd)
            return
        self.stats.events += 1
        now = time.monotonic()
        if ev.pid == self._pid:  # never expected (our own I/O goes through an ignored mount): never wait on it
            self._answer([Waiter(ev.fd, now)], fan.FAN_ALLOW)
            return
        st = os.fstat(ev.fd)
        ino = (st.st_dev, st.st_ino)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event mask=%#x fd=%d pid=%d range=%d+%d ino=%d", ev.mask, ev.fd, ev.pid, ev.offset,
                      ev.length, st.st_ino)
        with self._lock:
            job = self._inflight.get(ino)
            if job is not None:
                self._join(job, ev.fd, now)
                return
            filled = ino in self._pending or ino in self._committing_inos
        if filled:  # every byte is there, the commit is pending
            self._answer([Waiter(ev.fd, now)], fan.FAN_ALLOW)
            return
        rec = tree.read_record(ev.fd)
        key = state.key_of(ev.fd)
        fs = self.log.state(rec, st, key)
        if fs is not FileState.STUB:
            # a mark left over (a filler died between its commit and the marks): nothing to fill
            self.marks.settle(ev.fd)
            self._answer([Waiter(ev.fd, now)], fan.FAN_ALLOW)
            return
        assert rec is not None
        with self._lock:
            job = self._inflight.get(ino)  # an ahead fill may have taken it meanwhile
            if job is not None:
                self._join(job, ev.fd, now)
                return
            job = Job(ino, "demand", key, [Waiter(ev.fd, now, journaled=self.journal is not None)], rec, st=st,
                      pid=ev.pid)
            self._inflight[ino] = job
        journal.append((ev.fd, key))  # written before the job is submitted: nothing can answer it sooner
        todo.append(job)

    def _join(self, job: Job, fd: int, now: float) -> None:
        """Under the lock: the event fd waits for job. Journaled at once: a worker may answer it as
        soon as the lock is released, and "A" must never precede its "R"."""
        if self.journal is not None:
            self.journal.read([(fd, job.key)])
        job.waiters.append(Waiter(fd, now, journaled=self.journal is not None))

    def _expire(self, now: float) -> None:
        """Readers of a fill that takes longer than fill_timeout get the policy's errno, not a hang.

        They leave the job under the lock, so the worker, which takes the job's waiters under the
        same lock, never answers them again; the fill itself goes on."""
        late: list[tuple[Job, list[Waiter]]] = []
        with self._lock:
            for job in self._inflight.values():
                old = [w for w in job.waiters if now - w.since > self.policy.fill_timeout]
                if old:
                    job.waiters = [w for w in job.waiters if now - w.since <= self.policy.fill_timeout]
                    late.append((job, old))
                    self.stats.timeouts += len(old)
        for job, waiters in late:
            log.error("fill of %s took longer than %.0f s; %d readers get %s", self._describe(job),
                      self.policy.fill_timeout, len(waiters), self.policy.source_error)
            self._answer(waiters, fan.deny_errno(self.policy.source_errno))

    def _answer(self, waiters: list[Waiter], response: int) -> None:
        """Answer each waiter once; journal that; only then close the fds. Responses match by fd
        number: once an fd is closed its number may name a new event, so "A" goes first."""
        done = []
        for w in waiters:
            if w.answered:
                continue
            w.answered = True
            try:
                fan.respond(self.group, w.fd, response)
            except OSError as e:
                if w.owned:
                    log.error("answering event fd %d failed: %s", w.fd, e)
            done.append(w)
        if self.journal is not None:
            self.journal.answered([w.fd for w in done if w.journaled])
        for w in done:
            if w.owned:
                os.close(w.fd)

    # -- filling ---------------------------------------------------------------------------------
    def _submit_demand(self, job: Job) -> None:
        """Queue a demand fill for a worker, or, if its user already holds user_fills workers, put it
        in that user's line: it is queued when one of their fills ends (Filler._demand_done). Its
        readers still get the policy's error after fill_timeout, as anywhere else.

        Users are looked up (a read of /proc/PID/status, tens of microseconds) only once the workers
        hold user_fills demand fills in all: below that no user can hold that many, and a single
        reader walking a tree never pays for the lookup."""
        with self._lock:
            if job.pid > 0 and len(self._demand_running) >= self._user_cap:
                uid = self._uid(job)
                if self._holding(uid) >= self._user_cap:
                    self._user_waiting.setdefault(uid, deque()).append(job)
                    self.stats.user_waits += 1
                    return
            self._demand_running.add(job)
        self._submit(DEMAND, lambda: self._fill_job(job))

    def _uid(self, job: Job) -> int:
        if job.uid is None:
            uid = real_uid(job.pid) if job.pid > 0 else None
            job.uid = -1 if uid is None else uid
        return job.uid

    def _holding(self, uid: int) -> int:
        """Under the lock: how many workers uid's demand fills hold."""
        return sum(1 for j in self._demand_running if j.pid > 0 and self._uid(j) == uid)

    def _demand_done(self, job: Job) -> Optional[Job]:
        """Under the lock: job's worker is free. The next job in the line of job's user, if any,
        takes it (unless that user's other fills, looked up only now, hold user_fills workers: one
        of those takes the line on when it ends)."""
        self._demand_running.discard(job)
        uid = job.uid
        waiting = self._user_waiting.get(uid) if uid is not None else None
        if uid is None or not waiting or self._holding(uid) >= self._user_cap:
            return None
        following = waiting.popleft()
        if not waiting:
            del self._user_waiting[uid]
        self._demand_running.add(following)
        return following

    def _submit(self, priority: int, work: Callable[[], None]) -> None:
        if priority == DEMAND:
            self._demand_queued += 1
        self._work.put((priority, next(self._seq), work))

    def _work_loop(self) -> None:
        while True:
            prio, _seq, work = self._work.get()
            if prio == DEMAND:
                self._demand_queued -= 1
            if work is _STOP:
                return
            try:
                work()
            except Exception:
                log.exception("bug in a fill worker")

    def _fill_job(self, job: Job) -> None:
        """Fill job's inode; answer everyone who waited on it; queue the commit."""
        t0 = time.monotonic()
        response = fan.FAN_ALLOW
        done: Optional[Filled] = None
        failed = False
        try:
            if job.fd < 0:
                job.fd = open_handle(self.root_fd, *state.split_key(job.key), os.O_RDWR | os.O_NONBLOCK)
            st = job.st if job.st is not None else os.fstat(job.fd)
            rec = job.rec or tree.read_record(job.fd)
            job.rec = rec
            if job.kind != "demand" and self.log.state(rec, st, job.key) is not FileState.STUB:
                self.marks.settle(job.fd)  # a replayed file filled before its filler died, or an ahead race
            else:
                assert rec is not None
                done = self._fill_making_room(job.fd, rec, st)
                faults.pause("fill")
                if self.journal is not None:
                    self.journal.filled([(job.key, done.ctime_ns, done.users)])
                # Every byte is there: no event for this file any more, opens and reads alike. The
                # commit makes the data durable; if it cannot, it puts the stub mark back
                # (Filler._commit), so the next open compares the file with the source again.
                self.marks.settle(job.fd)
        except IntegrityError as e:
            # loud: the origin (or the path to it) serves bytes that are not the published ones
            log.critical("cannot fill %s: %s; readers get EIO, the stub stays a stub", self._describe(job), e)
            response = fan.deny_errno(errno.EIO)
            failed = True
            with self._lock:
                self.stats.hash_failures += 1
        except SourceError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error("cannot fill %s from %s: %s; %s, the stub stays a stub", self._describe(job),
                      self.source.describe(), e, "readers get ENOSPC" if full else
                      f"readers get {self.policy.source_error}")
            response = fan.deny_errno(e.errno if full else self.policy.source_errno)
            failed = True
        except (OSError, tree.RecordError) as e:
            log.error("cannot fill %s: %s; readers get %s, the stub stays a stub", self._describe(job), e,
                      self.policy.source_error)
            response = fan.deny_errno(self.policy.source_errno)
            failed = True
        except Exception:
            log.exception("bug while filling %s", self._describe(job))
            response = fan.deny_errno(self.policy.source_errno)
            failed = True
        following = None
        with self._lock:
            self.stats.fill_errors += failed
            del self._inflight[job.ino]
            following = self._demand_done(job)
            waiters = job.waiters
            job.waiters = []
            if done is not None:
                self._pending[job.ino] = Pending(job.ino, job.key, done.ctime_ns, done.users,
                                                 job.rec.size if job.rec is not None else 0)
                if len(self._pending) in (1, COMMIT_BATCH):  # start a commit period, or end it early
                    self._commit_cv.notify_all()
            if done is not None and job.kind != "ahead":
                self.stats.fills += 1
                self.stats.fill_bytes += done.written
                self.stats.latencies.append(time.monotonic() - t0)
            elif done is not None:
                self.stats.ahead_fills += 1
                self.stats.fill_bytes += done.written
            self._committed.notify_all()
        # no fd stays open on the file (one open for writing would make its exec fail with ETXTBSY)
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        self._answer(waiters, response)
        if following is not None:
            self._submit(DEMAND, lambda: self._fill_job(following))
        if job.kind in ("demand", "replay") and job.rec is not None:
            self.ahead.touched(job.rec.path_id)
        elif job.kind == "ahead":
            self.ahead.done(job.reserved)

    def _busy(self, ino: Ino) -> bool:
        """Under the lock: being filled or evicted, or filled and not yet in the state log. A file
        whose commit runs is still a stub in the log: filling it again would compare every byte
        with the source for nothing, and give it a new ctime the commit does not record."""
        return ino in self._inflight or ino in self._pending or ino in self._committing_inos

    def fill_ahead(self, path: str, size: int) -> None:
        """Fill the stub at path (relative to the tree) if it still is one and nobody fills it yet."""
        try:
            fd = open_beneath(self.root_fd, path, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            self.ahead.done(size)
            return
        job = None
        try:
            st = os.fstat(fd)
            ino = (st.st_dev, st.st_ino)
            with self._lock:
                busy = self._busy(ino)
            if not busy:
                rec = tree.read_record(fd)
                key = state.key_of(fd)
                if self.log.state(rec, st, key) is FileState.STUB:
                    with self._lock:
                        if not self._busy(ino):
                            job = Job(ino, "ahead", key, rec=rec, fd=fd, reserved=size)
                            self._inflight[ino] = job
        except (OSError, tree.RecordError):
            job = None
        if job is None:
            os.close(fd)
            self.ahead.done(size)
            return
        self._fill_job(job)

    def _fill_making_room(self, fd: int, rec: tree.Record, st: os.stat_result) -> Filled:
        """fill(), with room made for it: checked before it writes (hsmfs.filler.budget.make_room), and
        made again if the write still finds the store full (filesystems that free space only at their
        next commit, such as btrfs, show it late); SourceError(ENOSPC) once nothing more can go."""
        from hsmfs.filler.budget import ROOM_TRIES, NoRoom, make_room, room_after_enospc

        rel = self.paths.get(rec.path_id)
        for attempt in range(ROOM_TRIES):
            try:
                return fill(fd, rec, self.source, rel, room=lambda need: make_room(self, need),
                            st=st if attempt == 0 else None)
            except SourceError as e:
                if isinstance(e, NoRoom) or e.errno not in (errno.ENOSPC, errno.EDQUOT) or attempt == ROOM_TRIES - 1:
                    raise
                room_after_enospc(self, rec.size, e)
        raise AssertionError("unreachable")

    # -- committing ------------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._commit_cv.wait()
                if not self._pending and self._stopping:
                    return
                deadline = time.monotonic() + self.policy.commit_interval
                while len(self._pending) < COMMIT_BATCH and not self._stopping and not self._flushes \
                        and not self._urgent:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._commit_cv.wait(left)
                self._urgent = False
                batch = list(self._pending.values())
                self._pending.clear()
                self._committing = batch
                self._committing_inos = {p.ino for p in batch}
            try:
                self._commit(batch)
            except Exception:
                log.exception("bug in a commit")
            with self._lock:
                self._committing = []
                self._committing_inos = set()
                self._committed.notify_all()

    def flush(self, timeout: float = 30.0, *, fills: bool = True) -> None:
        """Commit every fill now. With fills, also wait for running fills; without, only for the
        fills waiting for a commit now (new ones may keep coming)."""
        with self._lock:
            self._flushes += 1
            try:
                self._commit_cv.notify_all()
                deadline = time.monotonic() + timeout
                mine = set(self._pending) | {p.ino for p in self._committing}
                while True:
                    waiting = set(self._pending) | {p.ino for p in self._committing}
                    busy = any(j.kind != "evict" for j in self._inflight.values()) or self._verifying
                    if fills and not waiting and not busy:
                        break
                    if not fills and not (mine & waiting):
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    # notified by whatever can end the wait: a fill's end, a commit's, the verifier's
                    self._committed.wait(left)
            finally:
                self._flushes -= 1

    def _commit(self, batch: list[Pending]) -> None:
        """Data durable, then the state log, then the marks go: a crash anywhere costs a refetch at most."""
        try:
            syncfs(self.root_fd)
            faults.pause("commit")
            self.log.record([(p.key, state.OP_DIRTY if p.users else state.OP_RESIDENT, p.ctime_ns) for p in batch],
                            durable=True)
        except OSError as e:
            # the data may not be on disk (a write-back error): every file of the batch gets its stub
            # mark back, and its next open compares it with the source and fills what is missing
            log.error("commit of %d files failed: %s; their stub marks are back, and each is compared with the "
                      "source on its next open", len(batch), e)
            self._rearm(batch)
            if self.journal is not None:
                self.journal.committed([p.key for p in batch])
            return
        if self.journal is not None:
            # before any of them can be evicted (begin_evict waits for the batch): an eviction
            # removes the state log's entry, and a successor must not commit an old fill then
            self.journal.committed([p.key for p in batch])
        filled = 0
        faults.pause("commit")
        if self.budget is not None:
            for p in batch:
                try:
                    fd = open_handle(self.root_fd, *state.split_key(p.key), os.O_RDONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    filled += tree.resident_bytes(os.fstat(fd))
                finally:
                    os.close(fd)
        if self.budget is not None:
            self.budget.filled(filled)
        with self._lock:
            self.stats.commits += 1
            self.stats.committed += len(batch)
        if self.log.compact():
            log.info("compacted the state log")
        if self.journal is not None:
            with self._lock:
                idle = not self._pending
            self.journal.compact(idle=idle)

    def _rearm(self, batch: list[Pending]) -> None:
        for p in batch:
            try:
                fd = open_handle(self.root_fd, *state.split_key(p.key), os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue  # removed since
            try:
                self.marks.stub(fd)
            except OSError as e:
                log.critical("ALARM: cannot put the stub mark back on %s: %s; if its data did not reach the disk it "
                             "may read as zeros once its pages leave the cache", _fd_path(fd), e)
            finally:
                os.close(fd)

    # -- evicting (hsmfs.filler.evict does the work) -------------------------------------------------
    def evict(self, keys: list[Key]) -> list[Outcome]:
        """Evict the files named by keys (hsmfs evict through the control socket); one Outcome each."""
        with self._lock:
            pending = bool(self._pending)
        if pending:
            self.flush(fills=False)  # files waiting for their commit cannot be evicted yet
        out: list[Optional[Outcome]] = [None] * len(keys)
        fds: list[int] = []
        where: list[int] = []
        for i, key in enumerate(keys):
            try:
                fds.append(open_handle(self.root_fd, *state.split_key(key), os.O_RDWR | os.O_NONBLOCK))
                where.append(i)
            except OSError as e:
                out[i] = Outcome(False, IN_USE if e.errno == errno.ETXTBSY else f"cannot open: {e.strerror}")
        try:
            for i, o in zip(where, self.evict_fds(fds)):
                out[i] = o
        finally:
            for fd in fds:
                os.close(fd)
        return [o if o is not None else Outcome(False, "failed") for o in out]

    def evict_fds(self, fds: list[int]) -> list[Outcome]:
        """Evict the files behind fds (O_RDWR through the private root); counted in the stats."""
        with self._evict_lock:
            outcomes = Evictor(self.source, self.paths, self.log, filler=self).evict(fds)
        freed = sum(o.freed for o in outcomes)
        with self._lock:
            self.stats.evictions += sum(o.evicted for o in outcomes)
            self.stats.evicted_bytes += freed
        if self.budget is not None:
            self.budget.freed(freed)
        return outcomes

    def begin_evict(self, fd: int) -> Optional[Job]:
        """Claim the inode behind fd for an eviction; None if it is being filled or awaits its commit."""
        st = os.fstat(fd)
        ino = (st.st_dev, st.st_ino)
        with self._lock:
            if self._busy(ino):
                return None
            job = Job(ino, "evict", state.key_of(fd))
            self._inflight[ino] = job
            return job

    def end_evict(self, job: Job, *, stub: bool) -> None:
        """The eviction of job is over; whoever opened the file meanwhile gets it filled (stub) or allowed."""
        with self._lock:
            waiters = job.waiters
            if not (stub and waiters):
                del self._inflight[job.ino]
                job.waiters = []
            else:
                job.kind, job.rec, job.fd = "demand", None, -1
        if stub and waiters:
            self._submit(DEMAND, lambda: self._fill_job(job))
        else:
            self._answer(waiters, fan.FAN_ALLOW)

    # -- reporting -------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        with self._lock:
            d = self.stats.as_dict()
            d["inflight"] = sum(1 for j in self._inflight.values() if j.kind != "evict")
            d["pending_commit"] = len(self._pending) + len(self._committing)
            d["unverified_left"] = len(self._verify_queue) + (1 if self._verifying and not self._verify_queue else 0)
        d["fill_ahead"] = self.ahead.status()
        d["budget"] = self.budget.status() if self.budget is not None else None
        return d

    def pending_bytes(self) -> int:
        """Bytes of files filled and not committed yet (the space budget's estimate counts them at commit)."""
        with self._lock:
            return sum(p.size for p in self._pending.values()) + sum(p.size for p in self._committing)

    def states(self, keys: list[Key]) -> list[Optional[str]]:
        """FileState.FILLED for files filled and not yet committed, else None (look at the disk)."""
        with self._lock:
            filled = {p.key for p in self._pending.values()} | {p.key for p in self._committing}
        return [FileState.FILLED.value if k in filled else None for k in keys]

    def _describe(self, job: Job) -> str:
        if job.rec is not None:
            try:
                return self.paths.get(job.rec.path_id)
            except (OSError, tree.RecordError):
                pass
        return _fd_path(job.fd) if job.fd >= 0 else f"inode {job.ino[1]}"


def _stop() -> None:
    pass


_STOP: Callable[[], None] = _stop


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


__all__ = ["Filler", "Job", "Pending", "Stats", "Waiter", "Any"]
