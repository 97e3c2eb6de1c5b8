"""The filler process: ``python -m hsmfs.filler``, started (and restarted) by the supervisor.

It inherits the group fd, answers what a dead predecessor left pending (journal, then sweep),
and only then reads new events. It never imports typer, rich or pyroute2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any, Optional

from hsmfs import tree
from hsmfs.control import RUN_DIR, Server
from hsmfs.filler import Filler
from hsmfs.filler.journal import Journal
from hsmfs.policy import load_policy
from hsmfs.process import raise_fd_limit, setup_logging
from hsmfs.sources.local import LocalSource
from hsmfs.views import detach

log = logging.getLogger("hsmfs.filler")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="hsmfs.filler")
    ap.add_argument("--group-fd", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--ns-file")
    ap.add_argument("--config")
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--restarts", type=int, default=0)
    args = ap.parse_args(argv)
    policy = load_policy(args.config)
    setup_logging(policy.log_level)
    raise_fd_limit()
    store = tree.Store.load(args.store)
    if store is None:
        log.error("%s is not an hsmfs store", args.store)
        return 66
    group: int = args.group_fd
    source = LocalSource(store.source)
    paths = tree.PathTable(store.path)
    tree_fd = os.open(store.tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    journal = Journal(os.path.join(RUN_DIR, store.name + ".journal"))
    filler = Filler(group, tree_fd, paths, source, policy, journal)
    filler.take_over(tree_fd)
    stop = threading.Event()

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "filler_pid": os.getpid(), "restarts": args.restarts, "filler": filler.status()}
        if op == "umount":
            filler.flush()  # event fds held for the commit keep the view busy
            try:
                detach(args.target, lazy=bool(req.get("lazy")), ns_file=args.ns_file)
            except OSError as e:
                return {"ok": False, "errno": e.errno, "error": str(e)}
            return {"ok": True}  # the supervisor sees the mount go and stops us
        return {"ok": False, "error": f"unknown op {op!r}"}

    server = Server(store.name, handle)
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    stop.wait()
    server.close()
    filler.stop()  # every event read has been answered; the supervisor still holds the group
    journal.reset()
    journal.close()
    os.close(tree_fd)
    paths.close()
    source.close()
    log.info("filler stopped: %s", filler.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
