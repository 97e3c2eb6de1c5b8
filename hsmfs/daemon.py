"""The supervisor behind one hsmfs mount: ``python -m hsmfs.daemon``, started by ``hsmfs mount``.

It owns what must outlive a filler crash: the fanotify group (while any process holds it, pending
events block instead of failing open, kernel-facts §6) and the view. It creates the group, marks
settled files, attaches the marked view, then runs ``python -m hsmfs.filler`` with the group fd and
restarts it whenever it dies; the successor answers what its predecessor left pending before it
reads anything new. The supervisor never reads the group and never touches the tree.

It stops when the view's mount is gone (the mount mark vanishes from the group's fdinfo, which
also covers a lazily detached view whose last user left; SIGTERM unmounts the view) and no other
mount of the tree is left: a bind mount, a copy in a later mount namespace or an overlay over the
view reads stubs through inode marks that only live as long as the group (OtherMountsWatch).
It reports "ready", or the error that stopped it, on --ready-fd (hsmfs.process.ReadyPipe) once the
view is live.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from typing import Optional

from hsmfs import tree
from hsmfs.errors import FillerFailed, HsmfsError, SourceMissing, SystemCallFailed
from hsmfs.filler.takeover import new_session
from hsmfs.policy import load_policy
from hsmfs.process import ReadyPipe, oom_score_adj, read_ready, run_main, setup_logging
from hsmfs.session import Session, attach_view, new_group
from hsmfs.views import detach

log = logging.getLogger("hsmfs.daemon")

BACKOFF_MAX = 5.0


class Supervisor:
    """nsfd: the mount namespace the view goes to (passed by ``hsmfs mount --namespace``, checked
    there); used to attach the view, then closed: the supervisor does not keep the namespace alive,
    so a view ends with its namespace, when the last process in it exits (a container stops)."""

    def __init__(self, store: tree.Store, target: str, config: Optional[str], log_path: str, *,
                 nsfd: Optional[int] = None, namespace: Optional[str] = None, netns_fd: Optional[int] = None) -> None:
        self.store = store
        self.target = target
        self.namespace = namespace
        self.config = config
        self.log_path = log_path
        self.terms = 0
        self._busy_logged = False
        self.group = -1
        self.nsfd = nsfd
        self.ns = os.fstat(nsfd).st_ino if nsfd is not None else None
        # netns = "target": the network namespace of the view's process, kept for every filler start
        self.netns_fd = netns_fd

    def start_filler(self, restarts: int) -> tuple[subprocess.Popen[bytes], int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        cmd = [sys.executable, "-m", "hsmfs.filler", "--group-fd", str(self.group), "--store", self.store.path,
               "--target", self.target, "--ready-fd", str(w), "--restarts", str(restarts)]
        if self.ns is not None:
            cmd += ["--ns", str(self.ns)]
        if self.config:
            cmd += ["--config", self.config]
        fds: tuple[int, ...] = (self.group, w)
        if self.netns_fd is not None:
            cmd += ["--netns-fd", str(self.netns_fd), "--netns-label", f"target ({self.namespace})"]
            fds += (self.netns_fd,)
        proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL, cwd="/")
        os.close(w)
        return proc, r

    def run(self, ready: ReadyPipe) -> int:
        self.group = new_group()
        new_session(self.store.name)
        mnt_id = attach_view(self.group, self.store, self.target, load_policy(self.config), nsfd=self.nsfd,
                             namespace=self.namespace)
        if self.nsfd is not None:
            os.close(self.nsfd)
            self.nsfd = None
        session = Session(self.group, self.store, self.target, view_ns=self.ns, namespace=self.namespace)
        session.begin(mnt_id, self.log_path)
        restarts, backoff = 0, 0.0
        detached = False  # by a SIGTERM
        filler = Filler(self, session, restarts)
        restart_at: Optional[float] = None  # when a dead filler's successor starts
        try:
            while True:
                readable = session.wait(None if restart_at is None else restart_at - time.monotonic())
                if filler.ready_r in readable:
                    filler.read_word()
                    if filler.ready and ready.open:
                        ready.ready()
                code = filler.proc.poll() if restart_at is None else None
                if session.view_gone():
                    break
                if session.terms and not detached and session.view_alive():
                    detached = self._try_umount(lazy=session.terms > 1)
                if code is not None and ready.open:
                    # never live: take the view away before the group goes, or it would fail open
                    log.error("filler could not start (%s); unmounting %s", _how(code), self.target)
                    detach(self.target, lazy=True, ns=self.ns)
                    raise filler.failure or FillerFailed(f"the filler could not start ({_how(code)})",
                                                         hint=f"see {self.log_path}")
                if code is not None:
                    filler.close()
                    # a filler that served restarts at once (readers are waiting); one that dies
                    # while starting is retried with a growing delay
                    backoff = 0.0 if filler.ready else min(max(backoff * 2, 0.1), BACKOFF_MAX)
                    log.error("filler exited (%s); restarting in %.1f s, the group stays held", _how(code), backoff)
                    restart_at = time.monotonic() + backoff
                if restart_at is not None and time.monotonic() >= restart_at:
                    restart_at = None
                    restarts += 1
                    filler = Filler(self, session, restarts)
        finally:
            if filler.proc.poll() is None:
                filler.proc.terminate()  # our own child
                filler.proc.wait()
            filler.close()
            # the filler committed everything it filled
            session.end(clean=filler.proc.poll() == 0 and restart_at is None)
        log.info("stopped")
        return 0

    def _try_umount(self, *, lazy: bool) -> bool:
        """On SIGTERM: unmount the view; while it is busy keep serving (a second SIGTERM detaches it lazily).

        The supervisor stops once the view's mark is gone and no other mount of the tree is left.
        """
        try:
            detach(self.target, lazy=lazy, ns=self.ns)
            return True
        except OSError as e:
            if not self._busy_logged:  # tried again at every wake-up: say it once
                log.warning("SIGTERM: view %s is busy (%s); still serving, SIGTERM again to detach it",
                            self.target, e)
                self._busy_logged = True
            return False


class Filler:
    """One run of ``python -m hsmfs.filler``: the process (a pidfd of it in the session's poll) and
    its ready pipe, until it said "ready" or why not."""

    def __init__(self, supervisor: Supervisor, session: Session, restarts: int) -> None:
        self.session = session
        self.proc, self.ready_r = supervisor.start_filler(restarts)
        self.pidfd = os.pidfd_open(self.proc.pid)
        session.wake.add(self.pidfd)
        session.wake.add(self.ready_r)
        self.ready = False  # it reported ready
        self.failure: Optional[HsmfsError] = None  # what it reported instead

    def read_word(self) -> None:
        word = read_ready(self.ready_r)
        self.ready = word is True
        self.failure = word if isinstance(word, HsmfsError) else None
        self._close_ready()

    def _close_ready(self) -> None:
        if self.ready_r >= 0:
            self.session.wake.remove(self.ready_r)
            os.close(self.ready_r)
            self.ready_r = -1

    def close(self) -> None:
        self._close_ready()
        if self.pidfd >= 0:
            self.session.wake.remove(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1


def _how(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hsmfs.daemon")
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--ns-fd", type=int, help="fd of the mount namespace to attach the view in")
    ap.add_argument("--namespace", help="how the user named that namespace, for messages")
    ap.add_argument("--config")
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--log", default="")
    ap.add_argument("--netns-fd", type=int, help="fd of the network namespace to fetch through (netns = target)")
    args = ap.parse_args(argv)
    ready = ReadyPipe(args.ready_fd)
    try:
        policy = load_policy(args.config)
        setup_logging(policy.log_level)
        oom_score_adj(-1000)
        store = tree.Store.load(args.store)
        if store is None:
            raise SourceMissing(f"{args.store} is not an hsmfs store")
        return Supervisor(store, args.target, args.config, args.log, nsfd=args.ns_fd,
                          namespace=args.namespace, netns_fd=args.netns_fd).run(ready)
    except HsmfsError as e:
        ready.failed(e)  # hsmfs mount reports it; run_main logs it
        raise
    except OSError as e:
        err = SystemCallFailed.of(e)
        ready.failed(err)
        raise err from None


if __name__ == "__main__":
    run_main(main)
