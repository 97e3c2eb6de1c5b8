"""One mount's session: its fanotify group, and what the supervisor (hsmfs.daemon) and
hsmfs@.service (hsmfs.systemd) both do with it: begin the session (hsmfs.json says one runs),
mark the tree and attach the view, watch the view and the other mounts of its tree, end it.

The group is made here and nowhere else; ``hsmfs doctor`` and ``hsmfs mount``'s kernel check
make the same one.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from typing import Optional

from hsmfs import state, tree
from hsmfs.control import RuntimeRecord
from hsmfs.filler.marks import VIEW_MASK, mark_tree
from hsmfs.linux import fanotify as fan
from hsmfs.policy import Policy
from hsmfs.process import start_time
from hsmfs.state import StateLog
from hsmfs.trust import open_source_root
from hsmfs.views import (
    attach,
    find_namespace,
    marked_mount,
    ns_inode,
    open_target,
    other_mounts,
    remote_restrictions,
    view_restrictions,
)

log = logging.getLogger("hsmfs.session")

GROUP_FLAGS = fan.FAN_CLASS_PRE_CONTENT | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_UNLIMITED_QUEUE \
    | fan.FAN_UNLIMITED_MARKS
# read-only: a reader on a read-only mount (overlayfs's lower layer) must get an event fd too; the
# filler writes through its own clone of the tree instead (hsmfs.filler.marks.private_root)
EVENT_FLAGS = os.O_RDONLY | os.O_LARGEFILE
OTHERS_POLL = 1.0  # seconds between looks for other mounts of the tree, once the view is gone


def new_group() -> int:
    """The fanotify group of one hsmfs mount (whoever holds it keeps pending events blocked)."""
    return fan.init(GROUP_FLAGS, EVENT_FLAGS)


def namespace_alive(inode: int) -> bool:
    fd = find_namespace(inode)
    if fd is None:
        return False
    os.close(fd)
    return True


def view_alive(group: int) -> bool:
    """Whether the group still has its mount mark: the view exists, attached or lazily detached."""
    return marked_mount(group) is not None


class OtherMountsWatch:
    """Once the view is gone: whether another mount of the tree still needs the group.

    A bind mount of the view, its copy in a later mount namespace or an overlay over it reads
    stubs through their inode marks, which go with the group (docs/unwatched.md). Looked for at
    most every OTHERS_POLL seconds (a scan reads every namespace's mountinfo); logs what is found.
    """

    def __init__(self, tree: str, target: str, view_ns: int) -> None:
        self.tree = tree
        self.target = target
        self.view_ns = view_ns
        self.next = 0.0
        self.last: Optional[list[str]] = None

    def keep_serving(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return True
        self.next = now + OTHERS_POLL
        try:
            found = [str(m) for m in other_mounts(self.tree, self.target, view_ns=self.view_ns)]
        except (OSError, ValueError) as e:  # never give the group up on a guess
            log.error("cannot look for other mounts of %s (%s); still serving", self.tree, e)
            return True
        if found != self.last:
            if found:
                log.warning("view %s is gone, but its tree is still mounted %s: still serving until they are "
                            "unmounted", self.target, ", ".join(found))
            elif self.last:
                log.info("the last other mount of the tree of %s is gone", self.target)
            self.last = found
        return bool(found)


def begin_session(store: tree.Store) -> int:
    """Record that a session serves the store; after an unclean end, distrust resident files.

    fdatasync and O_DSYNC make a user's bytes durable but not the ctime that tells a resident
    file was written: after a crash a "resident" file may hide user data. The state log is
    rewritten with such files "unverified" (durably, before anything is served): they are
    compared with the source before they are evicted. Returns how many there were.
    """
    log_ = StateLog(store.path, writable=True)
    try:
        downgraded = 0
        if store.mounted:
            downgraded = sum(1 for e in log_.states.values() if e.op == state.OP_RESIDENT)
            log_.compact(distrust=True)
            log.warning("the last session of %s ended uncleanly: %d resident files will be compared with the "
                        "source before they are evicted", store.path, downgraded)
        else:
            log_.compact()
    finally:
        log_.close()
    store.mounted = True
    store.save()
    return downgraded


def end_session(store: tree.Store) -> None:
    """After a clean stop (every fill committed): resident records can be trusted again."""
    fresh = tree.Store.load(store.path) or store
    fresh.mounted = False
    fresh.save()


def attach_view(group: int, store: tree.Store, target: str, policy: Policy, *, nsfd: Optional[int] = None,
                namespace: Optional[str] = None) -> int:
    """Mark the tree, then attach the marked view at target; returns the view's mount id.

    With a space budget the view is strictatime: the budget's recency is the inodes' atime.
    Shared by the supervisor and the systemd service (hsmfs.systemd).
    """
    if tree.is_remote(store.source):
        # no source mount to ask: nosuid and nodev unless the policy allows them (a manifest has no
        # device nodes; its setuid bits are the publisher's)
        restrict = remote_restrictions(allow_suid=policy.allow_suid)
    else:
        src = open_source_root(store)  # the directory the store was built from, not whatever is there now
        try:
            restrict = view_restrictions(src, allow_suid=policy.allow_suid, allow_devices=policy.allow_devices)
        finally:
            os.close(src)
    # the target's directory itself, before anything changes: a symlink put on its path since
    # hsmfs mount checked it is refused, never followed (views.open_target)
    tfd = open_target(target) if nsfd is None else None
    try:
        begin_session(store)
        log_ = StateLog(store.path)
        try:
            stubs, settled = mark_tree(group, store.tree, log_)
        finally:
            log_.close()
        mnt_id = attach(group, store.tree, target, VIEW_MASK, nsfd=nsfd, target_fd=tfd, restrict=restrict,
                        strictatime=policy.max_resident_bytes > 0)
    finally:
        if tfd is not None:
            os.close(tfd)
    where = f"{target} in namespace {namespace}" if namespace else target
    log.info("view of %s live at %s (mount id %d; %d stubs marked, %d files settled)", store.source,
             where, mnt_id, stubs, settled)
    return mnt_id


# --- waiting -------------------------------------------------------------------------------------

# The kernel says nothing when a lazily detached view's mount is finally freed (its last user left),
# nor, in our mountinfo, when a view in another mount namespace goes: those are looked for at this
# interval. Everything else wakes the session at once.
RECHECK = 1.0
# mountinfo reports an unmount before the unmounting process has freed the mount (its last
# reference goes, and the mount's fanotify marks with it, as that process returns from umount2):
# after a mount change the view is looked at again this soon, then RECHECK. Without it every
# `hsmfs umount` took a second longer than it needs.
SOON_AFTER_A_MOUNT_CHANGE = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5)


class Wakeups:
    """One poll() a session waits on: SIGTERM/SIGINT (a signal wake-up fd), mount changes
    (``/proc/self/mountinfo`` raises POLLPRI on every mount or unmount in this namespace, proc(5)),
    and the caller's fds (a child's pidfd, its ready pipe). Main thread only (signal.set_wakeup_fd)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = 0  # how many of them arrived
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._on_signal)
        self._mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)
        self._poll.register(self._mountinfo, select.POLLPRI)
        self._soon: list[float] = []  # the next waits' caps, after a mount change

    def _on_signal(self, *_: object) -> None:
        self.signals += 1

    def add(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)

    def remove(self, fd: int) -> None:
        self._poll.unregister(fd)

    def wait(self, timeout: Optional[float]) -> set[int]:
        """The caller's fds that are readable, after at most timeout seconds (None: no limit)."""
        if self._soon:
            soon = self._soon.pop(0)
            timeout = soon if timeout is None else min(timeout, soon)
        ready = {fd for fd, _ in self._poll.poll(None if timeout is None else max(0, int(timeout * 1000)))}
        if self._mountinfo in ready:
            self._soon = list(SOON_AFTER_A_MOUNT_CHANGE)
        if self._r in ready:
            try:
                while os.read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
        # mountinfo needs no read: poll itself takes note of the change it reports
        return ready - {self._r, self._mountinfo}

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for fd in (self._r, self._w, self._mountinfo):
            os.close(fd)


class Session:
    """One mount's session, whoever holds its group: the supervisor (hsmfs.daemon.Supervisor) or
    hsmfs@.service (hsmfs.systemd.Service).

    ``begin`` publishes the runtime record (/run/hsmfs/NAME.json) and takes SIGTERM/SIGINT; ``wait``
    sleeps on one poll() until something happens; ``view_gone`` says when the view and every other
    mount of its tree are gone (then the session ends); ``end`` removes the record, closes the group
    (only then: while any process holds it, pending events wait) and, after a clean stop, records
    that no session runs.
    """

    def __init__(self, group: int, store: tree.Store, target: str, *, view_ns: Optional[int] = None,
                 namespace: Optional[str] = None) -> None:
        self.group = group
        self.store = store
        self.target = target
        self.view_ns = view_ns  # the view's mount namespace, when not ours
        self.namespace = namespace
        self.wake = Wakeups()
        self.others = OtherMountsWatch(store.tree, target, view_ns if view_ns is not None else ns_inode())
        self.record: Optional[RuntimeRecord] = None

    @property
    def terms(self) -> int:
        """SIGTERMs (and SIGINTs) received."""
        return self.wake.signals

    def begin(self, mnt_id: int, log_: str) -> None:
        self.record = RuntimeRecord(name=self.store.name, pid=os.getpid(), store=self.store.path,
                                    source=self.store.source, target=self.target, namespace=self.namespace,
                                    mnt_id=mnt_id, log=log_, started=start_time(os.getpid()))
        self.record.save()

    def view_alive(self) -> bool:
        return view_alive(self.group)

    def view_gone(self) -> bool:
        """The view and every other mount of its tree are gone (logged once, with why)."""
        if self.view_alive() or self.others.keep_serving():
            return False
        if self.view_ns is not None and not namespace_alive(self.view_ns):
            log.info("the mount namespace of view %s (%s) is gone: every process in it exited; stopping",
                     self.target, self.namespace)
        else:
            log.info("view %s is gone; stopping", self.target)
        return True

    def wait(self, timeout: Optional[float] = None) -> set[int]:
        """Until a signal, a mount change, one of the fds added to self.wake, or timeout (capped at
        RECHECK: see there)."""
        return self.wake.wait(RECHECK if timeout is None else min(timeout, RECHECK))

    def end(self, *, clean: bool) -> None:
        if self.record is not None:
            self.record.remove()
        self.wake.close()
        # only now: closing the last holder of the group allows whatever is still pending
        os.close(self.group)
        if clean:
            end_session(self.store)
