"""Turning resident files back into stubs without ever losing a byte a user wrote, whatever dies when.

By whoever may change the tree's marks: the filler of a live mount (``hsmfs evict`` through its
control socket, the space budget, a full store), or ``hsmfs evict`` on a store no filler serves
(no marks then: the next session marks stubs). Files go in batches; for each, in this order:

1. It is claimed in the filler's in-flight table: a fill never runs beside its eviction, and
   whoever opens it from now on waits for the eviction to end, then for its refill.
2. The stub mark goes on (``FAN_OPEN_PERM | FAN_PRE_ACCESS``). An open decides when it is made
   whether its fd raises pre-content events (docs/kernel.md#k3), so from here on every open, through
   any path, asks the filler first. It stays on whatever happens next: no mark ever stands aside
   while a file loses data.
3. ``F_SETLEASE F_WRLCK``: granted only if no one else has the file open or mapped (a running
   binary included). Refused: the file is in use and stays. Granted: given back at once when a
   filler serves the tree (new opens already wait on the eviction through the stub mark; see
   Evictor._lease_and_check for why it must not be held), held to the end on a store no filler
   serves.
4. Under the lease, the file is checked again: resident (an unverified one is compared with its
   source byte for byte), not changed since its commit (its ctime), not pinned, and its source
   still holds the same object (or evicting it would lose the only copy).
5. One durable append to the state log says "stub" for the whole batch, **before** any data goes:
   after a power cut a file is then a stub, whose bytes a refill compares with the source and
   whose holes it fills, never a resident file with holes, nor one that looks changed by a user.
6. The data is punched out (to a whole block past EOF), mtime restored, the lease released.

A filler killed anywhere in this leaves files that are resident and marked (its successor finds
nothing to fill and removes the mark on the first open), or stubs that are marked: nothing to
finish and nothing to roll back.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from hsmfs import state, tree
from hsmfs.filler import faults
from hsmfs.filler.fill import punch
from hsmfs.linux.fs import release_lease, take_write_lease
from hsmfs.sources import Source, SourceError, SourceFile
from hsmfs.sources.local import data_regions
from hsmfs.state import FileState, StateLog

if TYPE_CHECKING:
    from hsmfs.filler.core import Filler, Job

log = logging.getLogger("hsmfs.filler")

# Why a file was not evicted (the words hsmfs evict prints)
IN_USE = "in use (open, mapped or running)"
DIRTY = "dirty (changed by a user)"
PINNED = "pinned"
STUB = "already a stub"
LOCAL = "not from the source (made by a user)"
FILLING = "being filled"
SOURCE_CHANGED = "its source changed or is gone: evicting it would lose the only copy"
UNVERIFIED_GONE = "unverified (after a crash) and its old source is gone: it cannot be told from a user's file; kept"
BATCH = 64  # files leased at once, and journaled as stubs with one durable write


@dataclass(frozen=True)
class Outcome:
    evicted: bool
    reason: str = ""  # why not, when not evicted
    freed: int = 0  # bytes of blocks given back to the filesystem

    def as_dict(self) -> dict[str, object]:
        return {"evicted": self.evicted, "reason": self.reason, "freed": self.freed}


@dataclass(eq=False)
class _Candidate:
    i: int
    fd: int
    rec: tree.Record
    key: state.Key
    st: os.stat_result
    job: Optional[Job] = None
    leased: bool = False
    src: Optional[SourceFile] = None


class Evictor:
    """Evicts files of one store; with filler, of a live mount (marks, in-flight table, stats)."""

    def __init__(self, source: Source, paths: tree.PathTable, log_: StateLog, *, filler: Optional[Filler] = None,
                 distrust: bool = False) -> None:
        """distrust: the store's last session ended uncleanly and none has started since, so a
        resident file may hide a user's fdatasync'd write: compare each with its source first."""
        self.source = source
        self.paths = paths
        self.log = log_
        self.filler = filler
        self.distrust = distrust
        self._then: Optional[list[Callable[[int], None]]] = None

    def replace(self, fds: list[int], then: list[Callable[[int], None]]) -> list[Outcome]:
        """Refresh's way out for files whose source changed or went (hsmfs.refresh): each file goes
        through the same steps as an eviction (claim, stub mark, write lease, clean check, durable
        "stub" entry), stubs included, but instead of its data being punched out, then[i](fd) runs
        while the lease is held (a new stub renamed over its name, or its name removed). Its source
        is not asked (it changed on purpose), except to compare an unverified file with it."""
        self._then = then
        try:
            return self.evict(fds)
        finally:
            self._then = None

    def evict(self, fds: list[int]) -> list[Outcome]:
        """Evict the files behind fds (O_RDWR fds on the store, opened where our I/O raises no event;
        the caller closes them). One Outcome each, in order. Raises OSError only when the state
        log cannot be written; every reason to leave a file alone is an Outcome."""
        out: list[Optional[Outcome]] = [None] * len(fds)
        self.log.refresh()  # pins set since by hsmfs pin
        for start in range(0, len(fds), BATCH):
            batch = []
            for i in range(start, min(start + BATCH, len(fds))):
                try:
                    c = self._claim(i, fds[i])
                except OSError as e:
                    out[i] = Outcome(False, f"failed: {e.strerror or e}")
                    continue
                if isinstance(c, Outcome):
                    out[i] = c
                else:
                    batch.append(c)
            for c, o in self._evict_batch(batch):
                out[c.i] = o
        return [o if o is not None else Outcome(False, "failed") for o in out]

    def _claim(self, i: int, fd: int) -> _Candidate | Outcome:
        st = os.fstat(fd)
        rec = tree.read_record(fd) if stat.S_ISREG(st.st_mode) else None
        if rec is None:
            return Outcome(False, LOCAL)
        key = state.key_of(fd)
        why = self._precheck(rec, st, key)
        if why is not None:
            return Outcome(False, why)
        c = _Candidate(i, fd, rec, key, st)
        if self.filler is not None:
            c.job = self.filler.begin_evict(fd)
            if c.job is None:
                return Outcome(False, FILLING)
            self.filler.marks.stub(fd)
        return c

    def _precheck(self, rec: tree.Record, st: os.stat_result, key: state.Key) -> Optional[str]:
        fs = self.log.state(rec, st, key)
        if fs is FileState.STUB and self._then is None:
            return STUB
        if fs is FileState.DIRTY:
            return DIRTY
        if self.log.pinned(key):
            return PINNED
        return None

    def _evict_batch(self, batch: list[_Candidate]) -> list[tuple[_Candidate, Outcome]]:
        done: list[tuple[_Candidate, Outcome]] = []
        ready: list[_Candidate] = []
        try:
            for c in batch:
                why = self._lease_and_check(c)
                if why is None:
                    ready.append(c)
                else:
                    done.append((c, Outcome(False, why)))
            # before any data goes: a crash from here on leaves stubs, never resident files with holes
            self.log.record([(c.key, state.OP_STUB, 0) for c in ready], durable=True)
            for c in ready:
                faults.pause("evict")
                done.append((c, self._punch(c) if self._then is None else self._replace(c)))
        except BaseException:
            for c in ready:
                if all(d is not c for d, _ in done):
                    done.append((c, Outcome(False, "failed (see the log)")))
            raise
        finally:
            stubbed = {id(c) for c in ready}
            for c, _o in done:
                self._release(c, stub=id(c) in stubbed)
        return done

    def _lease_and_check(self, c: _Candidate) -> Optional[str]:
        """Make sure nobody uses the file, and look again; None if the file may go, else why not.

        A write lease is granted only while nobody else has the file open, mapped or running, an
        open in progress included. With a filler, the lease is given back at once: the stub mark is
        on, so from here on every open waits for this eviction in the filler's in-flight table.
        Holding it longer would make the filler's own reader block: the kernel opens the event fd
        of such an open for the filler, and that open breaks the filler's own lease (it waits for
        it), and a filler killed while it waits there leaves the opener with EPERM. Without a filler
        (a store nobody serves) nothing else stops an open, and the lease is held to the end."""
        c.leased = take_write_lease(c.fd)
        if not c.leased:
            return IN_USE
        if self.filler is not None:
            release_lease(c.fd)
            c.leased = False
        # nobody else has it open now, and nobody can open it without waiting for us: look again
        c.st = os.fstat(c.fd)
        why = self._precheck(c.rec, c.st, c.key)
        if why is not None:
            return why
        fs = self.log.state(c.rec, c.st, c.key)
        unsure = fs is FileState.UNVERIFIED or (self.distrust and fs is not FileState.STUB)
        if self._then is not None and not unsure:
            return None  # replaced: the old source object is not needed
        try:
            c.src = self.source.open(self.paths.get(c.rec.path_id), c.rec)
        except (SourceError, tree.RecordError):
            return SOURCE_CHANGED if self._then is None else UNVERIFIED_GONE
        if (fs is FileState.UNVERIFIED or self.distrust) and not c.src.same(c.fd, 0, c.st.st_size):
            self.log.record([(c.key, state.OP_DIRTY, 0)], durable=True)
            return DIRTY
        return None

    def _replace(self, c: _Candidate) -> Outcome:
        assert self._then is not None
        try:
            self._then[c.i](c.fd)
        except OSError as e:
            log.error("refresh of %s stopped half-way: %s; it is a stub of its old version", self._name(c), e)
            return Outcome(False, f"failed: {e.strerror or e}")
        return Outcome(True, freed=c.st.st_blocks * 512)

    def _punch(self, c: _Candidate) -> Outcome:
        assert c.src is not None
        before = c.st.st_blocks * 512
        size = c.st.st_size
        try:
            punch(c.fd, 0, size, size)
            faults.pause("evict")
            # whatever a filesystem kept must still be the source's bytes, or a refill takes it for a user's
            for start, end in data_regions(c.fd, size):
                c.src.copy_to(c.fd, start, end)
            os.utime(c.fd, ns=(c.st.st_atime_ns, c.rec.mtime_ns))  # the punch bumped mtime
        except OSError as e:
            # the state log says stub and the stub mark is on: its next open refills what is missing
            log.error("eviction of %s stopped half-way: %s; it is a stub now", self._name(c), e)
            return Outcome(False, f"failed: {e.strerror or e}")
        return Outcome(True, freed=max(0, before - os.fstat(c.fd).st_blocks * 512))

    def _release(self, c: _Candidate, *, stub: bool) -> None:
        if c.src is not None:
            c.src.close()
            c.src = None
        if not stub and self.filler is not None:
            try:
                self.filler.marks.settle(c.fd)  # still resident: back to no mark
            except OSError as e:
                log.warning("cannot remove the mark of %s: %s", self._name(c), e)
        if c.leased:
            release_lease(c.fd)
            c.leased = False
        if c.job is not None and self.filler is not None:
            self.filler.end_evict(c.job, stub=stub)
            c.job = None

    def _name(self, c: _Candidate) -> str:
        try:
            return self.paths.get(c.rec.path_id)
        except (OSError, tree.RecordError):
            return f"inode {c.st.st_ino}"


def open_for_eviction(root_fd: int, rel: str) -> int:
    """An O_RDWR fd of the file rel beneath root_fd (a tree, or the filler's private root), no symlink followed."""
    from hsmfs.linux.fs import open_beneath

    try:
        return open_beneath(root_fd, rel, os.O_RDWR | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ETXTBSY:
            raise OSError(errno.ETXTBSY, IN_USE) from None
        raise
