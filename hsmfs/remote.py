"""Remote sources: which kind a SOURCE argument is, fetching its manifest, and the source object the
filler fills from (docs/remote.md).

``hsmfs mount https://host/path/manifest TARGET`` and ``hsmfs mount s3://bucket/prefix TARGET``
populate from the manifest alone (no listing of the origin); the store records the URL as its
source, the manifest it was populated (or last refreshed) from in ``STORE/manifest.json`` and
each object's sha256 in ``STORE/hashes`` (docs/store-format.md).
"""

from __future__ import annotations

import errno
import os
import urllib.parse
from typing import Optional

from hsmfs import manifest as mf
from hsmfs import tree
from hsmfs.errors import HsmfsError, NotPermitted, SourceMissing, Unavailable, UsageError
from hsmfs.netns import NetNamespace
from hsmfs.policy import Policy
from hsmfs.sources.http import FetchError, FetchSettings, HttpSource, Signer, Transport

MANIFEST_LIMIT = 1 << 30


def kind(source: str) -> str:
    """"local", "http" or "s3"."""
    if source.startswith(("http://", "https://")):
        return "http"
    if source.startswith("s3://"):
        return "s3"
    return "local"


def normalize(source: str) -> str:
    """The URL as the store records it; UsageError if it cannot name a manifest."""
    if kind(source) == "s3":
        from hsmfs.sources.s3 import split_s3

        bucket, prefix = split_s3(source)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    p = urllib.parse.urlsplit(source)
    if not p.hostname or p.query or p.fragment or not p.path or p.path.endswith("/") or p.username:
        raise UsageError(f"{source!r} does not name a manifest: give its URL, such as https://host/tree/manifest "
                         "(no credentials, query or fragment in it)")
    return urllib.parse.urlunsplit((p.scheme, p.netloc, p.path, "", ""))


def settings(policy: Policy) -> FetchSettings:
    return FetchSettings(timeout=policy.fetch_timeout, retries=policy.fetch_retries,
                         connections=policy.fetch_connections, part_size=policy.fetch_part_size,
                         deadline=policy.fill_timeout)


def manifest_url(source: str) -> tuple[str, Optional[Signer]]:
    if kind(source) == "s3":
        from hsmfs.sources.s3 import s3_manifest_url

        url, signer = s3_manifest_url(source)
        return url, signer
    return source, None


def fetch_manifest(source: str, policy: Policy, ns: Optional[NetNamespace] = None) -> tuple[mf.Manifest, bytes]:
    """The manifest source names, fetched and checked; errors say why, with exit codes."""
    url, signer = manifest_url(source)
    p = urllib.parse.urlsplit(url)
    t = Transport(f"{p.scheme}://{p.netloc}", settings(policy), ns=ns, signer=signer)
    try:
        data = t.get_all(url, limit=MANIFEST_LIMIT)
    except FetchError as e:
        if e.status in (404, 410):
            raise SourceMissing(f"manifest {source}: {e}", hint="publish the tree first: hsmfs publish SRC DEST") \
                from None
        if e.status in (401, 403):
            raise NotPermitted(f"manifest {source}: {e}", hint="check the credentials and the bucket's or server's "
                               "access rules") from None
        raise Unavailable(f"manifest {source}: {e}", hint="check that the origin is reachable from the network "
                          "namespace of policy 'netns'") from None
    finally:
        t.pool.clear()
        t.parts.shutdown(wait=False)
    return mf.parse(data, where=source), data


def stored_manifest(store: tree.Store) -> Optional[mf.Manifest]:
    try:
        with open(os.path.join(store.path, "manifest.json"), "rb") as f:
            return mf.parse(f.read(), where=os.path.join(store.path, "manifest.json"))
    except FileNotFoundError:
        return None


def open_source(store: tree.Store, policy: Policy, *, netns_fd: Optional[int] = None,
                netns_label: str = "host") -> HttpSource:
    """The filler's source for a remote store (a network namespace thread when netns_fd is given)."""
    url, signer = manifest_url(store.source)
    ns = NetNamespace(netns_fd, netns_label)
    try:
        hashes = tree.HashTable(store.path)
    except OSError as e:
        ns.close()
        raise HsmfsError(f"{store.path}: cannot open the hash table: {e.strerror}") from None
    return HttpSource(url, hashes, settings(policy), ns=ns, watch_routes=policy.route_watch, signer=signer)


__all__ = ["errno", "kind", "normalize", "fetch_manifest", "open_source", "stored_manifest"]
