"""Taking over from a dead filler: the in-flight journal, the sweep, the replay.

A filler that dies leaves the events it read pending in the kernel, matched by fd number only
(docs/kernel.md#k7), and their event fds, the files' identities, die with it. So before
work starts on an event the filler appends ``R <fd> <key hex>`` to ``/run/hsmfs/NAME.journal``
(key: the file's handle), and ``A <fd>`` once it is answered; several lines go in one write. Its
successor, before it reads any event (``Filler.take_over``):

1. answers ``EAGAIN`` to every other fd number below :data:`FD_LIMIT` (an error, never a stub's
   holes; the process's fd limit is pinned to that number, so no event fd can lie above it);
2. holds each journaled number with a dup of /dev/null, so that no new event can take it;
3. starts reading; fills each journaled file (by handle, through its own clone of the tree) and
   allows its numbers; then lets the numbers go.

Events answered at once by the reader thread (files already filled) are not journaled: a crash in
that window leaves them to the sweep, which answers EAGAIN. A fill appends ``F <key hex> <ctime>
<users>``: its file has no mark any more, so a successor commits what its predecessor filled and
did not commit. A commit appends ``C <key hex>`` for each file of its batch once the state log has
it (or once its mark is back, if the commit failed): such a fill is no longer the successor's to
commit. The state log alone cannot tell: an eviction after the commit removes the file's entry,
and a stale ``F`` taken for an uncommitted fill would make a punched stub "resident".
"""

from __future__ import annotations

import os
import resource
import threading

from hsmfs.linux import fanotify as fan
from hsmfs.places import journal_path
from hsmfs.state import Key

FD_LIMIT = 65536  # RLIMIT_NOFILE of every filler; the sweep answers exactly the numbers below it
COMPACT_AT = 1 << 20  # bytes: truncate when nothing is outstanding and the file is this big


def pin_fd_limit() -> None:
    """Soft and hard RLIMIT_NOFILE = FD_LIMIT (lower only if the hard limit is lower and cannot be raised).

    Held fds (fills waiting for their commit) can outnumber a default soft limit of 1024; a limit
    above FD_LIMIT (systemd's 524288) would let event fds escape the sweep.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FD_LIMIT), min(hard, FD_LIMIT)))


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_session(name: str) -> None:
    """Forget a journal left by an earlier session of mount NAME; called by whoever makes a new group.

    A journal speaks of one group: its events died with that group, and its fills may not have
    reached the disk if the store went down with it (they are stubs again in the state log, and
    the new session marks them so). Adopting them would record a ctime the file may no longer
    have, or a "resident" file over holes."""
    try:
        os.unlink(journal_path(name))
    except FileNotFoundError:
        pass


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._lock = threading.Lock()
        self._outstanding = 0
        self._size = os.fstat(self.fd).st_size

    def pending(self) -> tuple[dict[int, Key], dict[Key, tuple[int, bool]]]:
        """What a predecessor left: events it read and did not answer (fd number -> file key), and
        files it filled and did not commit (key -> (ctime right after the fill, whether the file was
        a user's))."""
        data = os.pread(self.fd, self._size, 0)
        events: dict[int, Key] = {}
        fills: dict[Key, tuple[int, bool]] = {}
        for line in data.split(b"\n")[:-1]:  # a torn last line has no newline: ignore it
            parts = line.split()
            try:
                if parts[0] == b"R" and len(parts) == 3:
                    events[int(parts[1])] = bytes.fromhex(parts[2].decode())
                elif parts[0] == b"A" and len(parts) == 2:
                    events.pop(int(parts[1]), None)
                elif parts[0] == b"F" and len(parts) == 4:
                    fills[bytes.fromhex(parts[1].decode())] = (int(parts[2]), parts[3] == b"1")
                elif parts[0] == b"C" and len(parts) == 2:
                    fills.pop(bytes.fromhex(parts[1].decode()), None)
            except (ValueError, IndexError):
                continue
        return events, fills

    def reset(self) -> None:
        with self._lock:
            os.ftruncate(self.fd, 0)
            self._size = 0
            self._outstanding = 0

    def read(self, events: list[tuple[int, Key]]) -> None:
        self._append(b"".join(b"R %d %s\n" % (fd, key.hex().encode()) for fd, key in events), len(events))

    def answered(self, fds: list[int]) -> None:
        self._append(b"".join(b"A %d\n" % fd for fd in fds), -len(fds))

    def filled(self, fills: list[tuple[Key, int, bool]]) -> None:
        """Files filled and not committed yet: a successor commits them (their marks are gone)."""
        self._append(b"".join(b"F %s %d %d\n" % (key.hex().encode(), ctime, users) for key, ctime, users in fills),
                      0)

    def committed(self, keys: list[Key]) -> None:
        """Fills the committer is done with (in the state log, or their marks back): not to adopt."""
        self._append(b"".join(b"C %s\n" % key.hex().encode() for key in keys), 0)

    def compact(self, *, idle: bool) -> None:
        """Start afresh if nothing is outstanding: no event read and unanswered and, idle, no fill
        waiting for its commit (the committer says)."""
        with self._lock:
            if idle and self._outstanding <= 0 and self._size >= COMPACT_AT:
                os.ftruncate(self.fd, 0)
                self._size = 0
                self._outstanding = 0

    def _append(self, data: bytes, delta: int) -> None:
        if not data:
            return
        with self._lock:
            os.write(self.fd, data)
            self._size += len(data)
            self._outstanding += delta

    def close(self) -> None:
        os.close(self.fd)


def sweep(group: int, keep: dict[int, Key]) -> int:
    """Answer EAGAIN to every pending fd number below the fd limit but those in keep; returns how many."""
    again = fan.deny_errno(11)  # EAGAIN
    swept = 0
    for n in range(fd_limit()):
        if n in keep:
            continue
        try:
            fan.respond(group, n, again)
            swept += 1
        except OSError:
            pass  # ENOENT: nothing pending under that number
    return swept


def reserve(numbers: dict[int, Key]) -> list[int]:
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
