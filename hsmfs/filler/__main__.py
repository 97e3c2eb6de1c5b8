"""The filler process: ``python -m hsmfs.filler``, started (and restarted) by the supervisor.

It inherits the group fd, answers what a dead predecessor left pending (journal, then sweep),
and only then reads new events. It never imports typer, rich or pyroute2.

``python -m hsmfs.filler --systemd MOUNTPOINT`` is hsmfs@.service's main process instead: it holds
the group itself, with systemd's fd store as the supervisor (hsmfs.systemd).
"""

from __future__ import annotations

import argparse
import errno
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
from hsmfs.policy import Policy, load_policy
from hsmfs.process import ignore_lease_breaks, raise_fd_limit, setup_logging
from hsmfs.sources.local import LocalSource
from hsmfs.views import detach, marked_mount, ns_inode, other_mounts

log = logging.getLogger("hsmfs.filler")


class Serving:
    """A running filler and its control socket; the supervisor's child and the systemd service share it.

    Construction answers what a dead predecessor left pending (journal, then sweep) and only then
    starts reading new events.
    """

    def __init__(self, group: int, store: tree.Store, target: str, policy: Policy, *,
                 ns: Optional[int] = None, restarts: int = 0) -> None:
        self.group = group
        self.tree = store.tree
        self.target = target
        self.ns = ns  # the inode of the view's mount namespace, None for ours
        self.view_ns = ns_inode() if ns is None else ns
        self.restarts = restarts
        self.source = LocalSource(store.source, identity=store.source_id)  # never a replaced root (issue 11, #7)
        self.paths = tree.PathTable(store.path)
        self.tree_fd = os.open(store.tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.journal = Journal(os.path.join(RUN_DIR, store.name + ".journal"))
        self.filler = Filler(group, self.tree_fd, self.paths, self.source, policy, self.journal)
        self.filler.take_over(self.tree_fd)
        self.server = Server(store.name, self.handle)
        self.server.start()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            view = marked_mount(self.group)
            return {"ok": True, "filler_pid": os.getpid(), "restarts": self.restarts, "filler": self.filler.status(),
                    "view_mounted": view is not None,
                    "other_mounts": [] if view is not None else self.other_mounts(None)}
        if op == "umount":
            lazy = bool(req.get("lazy"))
            found = other_mounts(self.tree, self.target, view_ns=self.view_ns, view_id=marked_mount(self.group))
            others = [str(m) for m in found if not m.foreign]
            # copies in namespaces another user namespace owns do not block: any user can make one
            # and keep it forever; they are served until they are gone, as after --lazy
            foreign = [str(m) for m in found if m.foreign]
            if others and not lazy:  # they would read stubs as holes once the group is gone
                return {"ok": False, "errno": errno.EBUSY, "error": "other mounts of the tree exist",
                        "other_mounts": others}
            self.filler.flush()  # event fds held for the commit keep the view busy
            try:
                detach(self.target, lazy=lazy, ns=self.ns)
            except OSError as e:
                return {"ok": False, "errno": e.errno, "error": str(e)}
            # whoever holds the group sees the view go and stops us once no other mount is left
            return {"ok": True, "other_mounts": others, "foreign_mounts": foreign}
        if op == "evict":
            handles = [(int(t), bytes.fromhex(h)) for t, h in req.get("handles", [])]
            return {"ok": True, "results": [o.as_dict() for o in self.filler.evict(handles)]}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def other_mounts(self, view_id: Optional[int]) -> list[str]:
        """The tree's mounts other than the view (views.other_mounts: reads /proc only, never the tree)."""
        return [str(m) for m in other_mounts(self.tree, self.target, view_ns=self.view_ns, view_id=view_id)]

    def close(self) -> None:
        """Answer every event read, commit what is filled; the group stays open (it is not ours)."""
        self.server.close()
        self.filler.stop()
        self.journal.close()
        os.unlink(self.journal.path)  # every event read was answered: nothing for a successor
        os.close(self.tree_fd)
        self.paths.close()
        self.source.close()
        log.info("filler stopped: %s", self.filler.status())


def main(argv: Optional[list[str]] = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--systemd"]:  # hsmfs@.service: this process is the unit's main process
        from hsmfs.systemd import main as service_main

        return service_main(args_in[1:])
    ap = argparse.ArgumentParser(prog="hsmfs.filler")
    ap.add_argument("--group-fd", type=int, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--ns", type=int, help="inode of the view's mount namespace, when not ours")
    ap.add_argument("--config")
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--restarts", type=int, default=0)
    args = ap.parse_args(args_in)
    policy = load_policy(args.config)
    setup_logging(policy.log_level)
    raise_fd_limit()
    ignore_lease_breaks()
    store = tree.Store.load(args.store)
    if store is None:
        log.error("%s is not an hsmfs store", args.store)
        return 66
    serving = Serving(args.group_fd, store, args.target, policy, ns=args.ns, restarts=args.restarts)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    stop.wait()
    serving.close()  # every event read has been answered; the supervisor still holds the group
    return 0


if __name__ == "__main__":
    sys.exit(main())
