"""The process behind one hsmfs mount: owns the fanotify group, attaches the view, runs the filler.

Started by ``hsmfs mount`` as ``python -m hsmfs.daemon``; never imports typer, rich or pyroute2.
It reports "ready" (or why it failed) on the fd given by --ready-fd, once the view is live.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import signal
import stat
import sys
import threading
from typing import Any, Optional

from hsmfs import tree
from hsmfs.control import RuntimeRecord, Server
from hsmfs.errors import HsmfsError
from hsmfs.filler import IGNORE, MASK, Filler
from hsmfs.linux import fanotify as fan
from hsmfs.policy import Policy, load_policy
from hsmfs.sources.local import LocalSource
from hsmfs.views import attach, detach, is_mounted, ns_path

log = logging.getLogger("hsmfs.daemon")

GROUP_FLAGS = fan.FAN_CLASS_PRE_CONTENT | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_UNLIMITED_QUEUE \
    | fan.FAN_UNLIMITED_MARKS
EVENT_FLAGS = os.O_RDWR | os.O_LARGEFILE  # fills are written through the event fd (kernel-facts §4)


def mark_settled_files(group: int, root: str) -> int:
    """Ignore marks on every file that needs no fill (resident, dirty, local); returns their number."""
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if tree.file_state(tree.read_record(path), st) == "stub":
                    continue
                fan.mark(group, IGNORE, MASK, fan.AT_FDCWD, path)
                n += 1
            except (OSError, tree.RecordError) as e:
                log.warning("not pre-marking %s: %s", path, e)
    return n


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Daemon:
    def __init__(self, store: tree.Store, target: str, namespace: Optional[str], policy: Policy,
                 log_path: str) -> None:
        self.store = store
        self.target = target
        self.namespace = namespace
        self.policy = policy
        self.log_path = log_path
        self.stop_event = threading.Event()
        self.nsfd: Optional[int] = None
        self.unmounted = False

    def run(self, ready_fd: int) -> int:
        raise_fd_limit()
        source = LocalSource(self.store.source)
        group = fan.init(GROUP_FLAGS, EVENT_FLAGS)
        store_fd = os.open(self.store.tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.namespace is not None:
            self.nsfd = os.open(ns_path(self.namespace), os.O_RDONLY | os.O_CLOEXEC)
        marked = mark_settled_files(group, self.store.tree)
        mnt_id = attach(group, self.store.tree, self.target, MASK, nsfd=self.nsfd)
        log.info("view of %s live at %s%s (mount id %d, %d settled files marked)", self.store.source,
                 self.target, f" in namespace {self.namespace}" if self.namespace else "", mnt_id, marked)
        rt = RuntimeRecord(name=self.store.name, pid=os.getpid(), store=self.store.path,
                           source=self.store.source, target=self.target, namespace=self.namespace,
                           mnt_id=mnt_id, log=self.log_path)
        paths = tree.PathTable(self.store.path)
        filler = Filler(group, store_fd, paths, source, self.policy)
        filler.start()
        server = Server(self.store.name, lambda req: self.handle(req, filler))
        server.start()
        rt.save()
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        while not self.stop_event.wait(1.0):
            if self.namespace is None and not self.unmounted and not is_mounted(mnt_id):
                log.info("view %s was unmounted; stopping", self.target)
                break
        server.close()
        filler.stop()
        os.close(group)  # after every event read has been answered
        os.close(store_fd)
        paths.close()
        source.close()
        rt.remove()
        log.info("stopped: %s", filler.status())
        return 0

    def handle(self, req: dict[str, Any], filler: Filler) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "pid": os.getpid(), "filler": filler.status()}
        if op == "umount":
            lazy = bool(req.get("lazy"))
            ns_file = f"/proc/{os.getpid()}/fd/{self.nsfd}" if self.nsfd is not None else None
            filler.flush()
            try:
                detach(self.target, lazy=lazy, ns_file=ns_file)
            except OSError as e:
                return {"ok": False, "errno": e.errno, "error": str(e)}
            self.unmounted = True
            self.stop_event.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hsmfs.daemon")
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--namespace")
    ap.add_argument("--config")
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--log", default="")
    args = ap.parse_args(argv)
    ready_fd: int = args.ready_fd
    try:
        policy = load_policy(args.config)
        logging.basicConfig(level=policy.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
        store = tree.Store.load(args.store)
        if store is None:
            raise HsmfsError(f"{args.store} is not an hsmfs store")
        return Daemon(store, args.target, args.namespace, policy, args.log).run(ready_fd)
    except (HsmfsError, OSError) as e:
        code = e.exit_code if isinstance(e, HsmfsError) else 71  # EX_OSERR
        msg = str(e) if not isinstance(e, OSError) else f"{e.strerror or e}"
        if isinstance(e, OSError) and e.errno == errno.EBADF:
            msg = f"{msg} (did the daemon lose its ready fd?)"
        log.error("%s", msg)
        try:
            os.write(ready_fd, f"error {code} {msg}\n".encode())
        except OSError:
            pass
        return code


if __name__ == "__main__":
    sys.exit(main())
