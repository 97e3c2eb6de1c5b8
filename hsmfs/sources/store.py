"""The source a store is filled from, whatever kind it is (the filler, refresh and hsmfs stat use it)."""

from __future__ import annotations

from typing import Optional

from hsmfs import tree
from hsmfs.policy import Policy
from hsmfs.sources import Source
from hsmfs.sources.local import LocalSource


def store_source(store: tree.Store, policy: Policy, *, netns_fd: Optional[int] = None, netns_label: str = "host",
                 watch_routes: bool = True) -> Source:
    """The source a store is filled from: its local directory (never a replaced root), or its
    HTTP/S3 origin through the policy's network namespace (hsmfs.remote; urllib3 and the route
    watch's pyroute2 are imported only then)."""
    if not tree.is_remote(store.source):
        return LocalSource(store.source, identity=store.source_id)
    from dataclasses import replace

    from hsmfs.remote import open_source

    return open_source(store, policy if watch_routes else replace(policy, route_watch=False), netns_fd=netns_fd,
                       netns_label=netns_label)
