"""One filler at work: the filler, its private root, its journal and its control socket.

The supervisor's child (``python -m hsmfs.filler``) and hsmfs@.service's main process share it.
Construction answers what a dead predecessor left pending (journal, then sweep) and only then
starts reading new events.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Optional

from hsmfs import state, tree
from hsmfs.control import Server
from hsmfs.filler.core import Filler
from hsmfs.filler.marks import private_root
from hsmfs.filler.takeover import Journal
from hsmfs.places import RUN_DIR, journal_path
from hsmfs.policy import Policy
from hsmfs.sources.store import store_source
from hsmfs.views import detach, marked_mount, ns_inode, other_mounts

log = logging.getLogger("hsmfs.filler")


class Serving:
    def __init__(self, group: int, store: tree.Store, target: str, policy: Policy, *,
                 ns: Optional[int] = None, restarts: int = 0, netns_fd: Optional[int] = None,
                 netns_label: str = "host") -> None:
        self.group = group
        self.tree = store.tree
        self.target = target
        self.ns = ns  # the inode of the view's mount namespace, None for ours
        self.view_ns = ns_inode() if ns is None else ns
        self.restarts = restarts
        self.store = store
        self.policy = policy
        self.netns_fd = -1
        if netns_fd is None and tree.is_remote(store.source) and policy.netns not in ("host", "target"):
            from hsmfs.netns import open_netns

            netns_fd = open_netns(policy.netns)  # a name or path: opened anew by every filler
            netns_label = policy.netns
            self.netns_fd = netns_fd if netns_fd is not None else -1
        self.source = store_source(store, policy, netns_fd=netns_fd, netns_label=netns_label)
        self.paths = tree.PathTable(store.path)
        self.log = state.StateLog(store.path, writable=True)
        self.root_fd = private_root(group, store.tree)
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        self.journal = Journal(journal_path(store.name))
        self.filler = Filler(group, self.root_fd, store.tree, self.paths, self.log, self.source, policy, self.journal)
        self.filler.take_over()
        self.server = Server(store.name, self.handle)
        self.server.start()
        self.refresher: Optional[Any] = None
        if policy.refresh_interval > 0:
            from hsmfs.refresh import Refresher

            self.refresher = Refresher(self, policy.refresh_interval)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            view = marked_mount(self.group)
            src = getattr(self.source, "status", None)
            return {"ok": True, "filler_pid": os.getpid(), "restarts": self.restarts, "filler": self.filler.status(),
                    "source": src() if src is not None else None, "view_mounted": view is not None,
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
            try:
                detach(self.target, lazy=lazy, ns=self.ns)
            except OSError as e:
                return {"ok": False, "errno": e.errno, "error": str(e)}
            # whoever holds the group sees the view go and stops us once no other mount is left
            return {"ok": True, "other_mounts": others, "foreign_mounts": foreign}
        if op == "evict":
            keys = [state.make_key(int(t), bytes.fromhex(h)) for t, h in req.get("handles", [])]
            return {"ok": True, "results": [o.as_dict() for o in self.filler.evict(keys)]}
        if op == "states":
            keys = [state.make_key(int(t), bytes.fromhex(h)) for t, h in req.get("handles", [])]
            return {"ok": True, "states": self.filler.states(keys)}
        if op == "refresh":
            from hsmfs.refresh import refresh_live

            return {"ok": True, "report": refresh_live(self).as_dict()}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def other_mounts(self, view_id: Optional[int]) -> list[str]:
        """The tree's mounts other than the view (views.other_mounts: reads /proc only, never the tree)."""
        return [str(m) for m in other_mounts(self.tree, self.target, view_ns=self.view_ns, view_id=view_id)]

    def close(self) -> None:
        """Answer every event read, commit what is filled; the group stays open (it is not ours)."""
        if self.refresher is not None:
            self.refresher.stop()
        self.server.close()
        self.filler.stop()
        self.journal.close()
        os.unlink(self.journal.path)  # every event read was answered: nothing for a successor
        os.close(self.root_fd)
        self.log.close()
        self.paths.close()
        self.source.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
        log.info("filler stopped: %s", self.filler.status())
