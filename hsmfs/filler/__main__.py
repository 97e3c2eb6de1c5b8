"""The filler process: ``python -m hsmfs.filler``, started (and restarted) by the supervisor.

It inherits the group fd, answers what a dead predecessor left pending (journal, then sweep),
and only then reads new events. It never imports typer, rich or pyroute2.

``python -m hsmfs.filler --systemd MOUNTPOINT`` is hsmfs@.service's main process instead: it holds
the group itself, with systemd's fd store as the supervisor (hsmfs.systemd).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Optional

from hsmfs import tree
from hsmfs.errors import HsmfsError, SourceMissing, SystemCallFailed
from hsmfs.filler.service import Serving
from hsmfs.filler.takeover import pin_fd_limit
from hsmfs.policy import load_policy
from hsmfs.process import ReadyPipe, ignore_lease_breaks, oom_score_adj, run_main, setup_logging

log = logging.getLogger("hsmfs.filler")


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
    ap.add_argument("--netns-fd", type=int, help="network namespace to fetch through (policy netns = target)")
    ap.add_argument("--netns-label", default="target")
    args = ap.parse_args(args_in)
    ready = ReadyPipe(args.ready_fd)
    try:
        policy = load_policy(args.config)
        setup_logging(policy.log_level)
        pin_fd_limit()
        oom_score_adj(0)  # the supervisor's -1000 is inherited; a filler is restarted, not protected
        ignore_lease_breaks()
        store = tree.Store.load(args.store)
        if store is None:
            raise SourceMissing(f"{args.store} is not an hsmfs store")
        # netns = "target" comes as an fd from the supervisor; a name or path Serving opens itself
        netns_fd, label = args.netns_fd, args.netns_label if args.netns_fd is not None else "host"
        serving = Serving(args.group_fd, store, args.target, policy, ns=args.ns, restarts=args.restarts,
                          netns_fd=netns_fd, netns_label=label)
    except HsmfsError as e:
        ready.failed(e)  # the supervisor passes it on to hsmfs mount; run_main logs it
        raise
    except OSError as e:
        err = SystemCallFailed.of(e)
        ready.failed(err)
        raise err from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ready.ready()
    stop.wait()
    serving.close()  # every event read has been answered; the supervisor still holds the group
    return 0


if __name__ == "__main__":
    run_main(main)
