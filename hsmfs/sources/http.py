"""A published tree on a web server as a source (``https://host/prefix/manifest``); S3 builds on it.

The HTTP client is urllib3 (2.x): pure Python, kept by the same people for fifteen years, it is
what requests and botocore stand on, so it is installed with ``hsmfs[s3]`` anyway; it gives
keep-alive connection pools, per-request connect and read timeouts, streamed bodies with their
length enforced, and verified TLS by default (certifi or the system store), without an event loop
in the filler. Retries are hsmfs's own (below) so that each one is counted and bounded by the
fill's deadline; urllib3's are switched off.

Fetching one object:

- **Range GETs**: a fill asks for exactly the bytes it lacks (``Range: bytes=A-B``), and a body
  must be a 206 with the matching ``Content-Range`` (or a 200 of exactly the object's size for a
  request of all of it); anything else is refused before a byte is written.
- **Parallel parts**: a range larger than ``fetch_part_size`` is split in parts fetched at once on
  several pooled connections (at most ``fetch_connections`` in all).
- **Retries** on 5xx, 429, connection resets, short bodies and timeouts, with exponential backoff
  and full jitter (0.1 s doubling to 2 s, times a random factor), at most ``fetch_retries`` times
  and never past the fill's ``fill_timeout``; a retry asks only for the bytes still missing. 4xx
  answers are not retried: the log line names the URL, the status and the cause.
- **Integrity**: once a file's bytes are all written, its sha256 (from the manifest, in
  ``STORE/hashes``) is checked by reading the file back; a mismatch raises :class:`IntegrityError`
  (EIO), and the fill gives back every byte it wrote, so the stub stays a stub.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError

from hsmfs.netns import NetNamespace, RouteWatch
from hsmfs.sources import IntegrityError, SourceError
from hsmfs.tree import FLAG_CONTENT, HashTable, Record

log = logging.getLogger("hsmfs.source")

CHUNK = 1 << 20
RETRYABLE = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
USER_AGENT = "hsmfs/0.1"


class FetchError(SourceError):
    """A fetch failed for good: status (0 without a response) and cause are in the message."""

    def __init__(self, message: str, err: int = errno.EIO, status: int = 0) -> None:
        super().__init__(message, err)
        self.status = status


@dataclass
class FetchSettings:
    timeout: float = 10.0  # connect and read timeout of one request
    retries: int = 4
    connections: int = 16
    part_size: int = 8 << 20
    deadline: float = 60.0  # fill_timeout: no retry starts past it
    verify_tls: bool = True


@dataclass
class FetchStats:
    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    failures: int = 0
    hash_failures: int = 0
    connections: int = 0
    fast_fails: int = 0  # fetches refused at once because the route to the origin was gone
    last_error: str = ""
    last_error_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


Signer = Callable[[str, str, dict[str, str]], dict[str, str]]  # (method, url, headers) -> headers to add


class Transport:
    """One origin's connection pool, in a network namespace, with retries, stats and a route watch."""

    def __init__(self, origin: str, settings: FetchSettings, *, ns: Optional[NetNamespace] = None,
                 signer: Optional[Signer] = None, watch_routes: bool = False) -> None:
        self.origin = origin  # scheme://host[:port], for messages
        self.settings = settings
        self.ns = ns or NetNamespace(None)
        self.signer = signer
        self.stats = FetchStats()
        transport = self

        class _Conn(HTTPConnection):
            def _new_conn(self) -> Any:
                transport.stats.add(connections=1)
                return transport.ns.connect(self._dns_host, self.port, self.timeout)

        class _TLSConn(HTTPSConnection):
            def _new_conn(self) -> Any:
                transport.stats.add(connections=1)
                return transport.ns.connect(self._dns_host, self.port, self.timeout)

        class _Pool(HTTPConnectionPool):
            ConnectionCls = _Conn

        class _TLSPool(HTTPSConnectionPool):
            ConnectionCls = _TLSConn

        kw: dict[str, Any] = {"maxsize": settings.connections, "block": True, "retries": False}
        if not settings.verify_tls:
            kw["cert_reqs"] = "CERT_NONE"
        self.pool = urllib3.PoolManager(num_pools=4, **kw)
        self.pool.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        self.pool.key_fn_by_scheme = dict(self.pool.key_fn_by_scheme)
        self.parts = ThreadPoolExecutor(max_workers=settings.connections, thread_name_prefix="fetch")
        self.watch: Optional[RouteWatch] = None
        if watch_routes:
            host = urllib.parse.urlsplit(origin).hostname or ""
            self.watch = RouteWatch(self.ns, host, self._route_lost)

    def _route_lost(self, why: str) -> None:
        n = self.ns.shutdown_all()
        if n:
            log.error("shut down %d connections to %s: %s", n, self.origin, why)

    def _check_route(self, url: str) -> None:
        if self.watch is not None and self.watch.down is not None:
            self.stats.add(fast_fails=1)
            raise FetchError(f"GET {url}: not tried: {self.watch.down}", errno.ENETUNREACH)

    def get_all(self, url: str, *, limit: int = 1 << 30) -> bytes:
        """The whole body of url (a manifest), with retries; FetchError if it cannot be had."""
        out = bytearray()

        def sink(off: int, data: bytes) -> None:
            del out[off:]  # a retry without a range starts again from the first byte
            out.extend(data)
            if len(out) > limit:
                raise FetchError(f"GET {url}: body larger than {limit} bytes")

        self.fetch(url, 0, None, sink, deadline=time.monotonic() + self.settings.deadline)
        return bytes(out)

    def fetch(self, url: str, start: int, end: Optional[int], sink: Callable[[int, bytes], None], *,
              deadline: float) -> None:
        """Bytes [start, end) of url (end None: to its end, no Range) given to sink(offset, data) in order.

        Retries resume at the first byte not yet given. Raises FetchError (a SourceError) when the
        origin refuses, the retries are spent or the deadline passed.
        """
        pos = start
        attempt = 0
        while True:
            self._check_route(url)
            why: str
            status = 0
            try:
                pos = self._one(url, pos, end, sink)
                return
            except _StoreError as e:
                raise e.error from None
            except _Refused as e:
                self.stats.add(failures=1)
                self._note(str(e))
                raise FetchError(str(e), e.err, e.status) from None
            except _Retry as e:
                why, status = str(e), e.status
                pos = e.pos
            except (HTTPError, OSError) as e:
                why = f"GET {url}: {_cause(e)}"
            self._check_route(url)
            attempt += 1
            sleep = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** (attempt - 1))) * random.random()
            if attempt > self.settings.retries or time.monotonic() + sleep >= deadline:
                self.stats.add(failures=1)
                spent = "retries spent" if attempt > self.settings.retries else "fill_timeout reached"
                self._note(why)
                raise FetchError(f"{why} ({spent} after {attempt} tries)", errno.EIO, status)
            self.stats.add(retries=1)
            log.warning("%s; retry %d in %.2f s", why, attempt, sleep)
            time.sleep(sleep)

    def _note(self, why: str) -> None:
        with self.stats.lock:
            self.stats.last_error, self.stats.last_error_at = why, time.time()

    def _one(self, url: str, pos: int, end: Optional[int], sink: Callable[[int, bytes], None]) -> int:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if end is not None:
            if pos >= end:
                return pos
            headers["Range"] = f"bytes={pos}-{end - 1}"
        if self.signer is not None:
            headers.update(self.signer("GET", url, headers))
        timeout = urllib3.Timeout(connect=self.settings.timeout, read=self.settings.timeout)
        self.stats.add(requests=1)
        resp = self.pool.request("GET", url, headers=headers, preload_content=False, redirect=False,
                                 timeout=timeout, retries=False)
        got = pos
        clean = False  # the body was read to its end: the connection may be reused
        try:
            st = resp.status
            if st in RETRYABLE:
                raise _Retry(f"GET {url}: HTTP {st} {resp.reason or ''}".rstrip(), pos, st)
            if st not in (200, 206):
                err = errno.ENOENT if st in (404, 410) else errno.EACCES if st in (401, 403) else errno.EIO
                raise _Refused(f"GET {url}: HTTP {st} {resp.reason or ''}".rstrip() + _body_hint(resp), err, st)
            if end is not None:
                want = end - pos
                if st == 206:
                    cr = resp.headers.get("Content-Range", "")
                    if not cr.startswith(f"bytes {pos}-{end - 1}/"):
                        raise _Refused(f"GET {url}: asked for bytes {pos}-{end - 1}, got Content-Range {cr!r}")
                elif pos != 0:
                    raise _Refused(f"GET {url}: asked for bytes {pos}-{end - 1}, got the whole object (HTTP 200)")
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != want:
                    raise _Refused(f"GET {url}: body of {length} bytes, expected {want}: the object is not the "
                                   "one the manifest describes")
            for data in resp.stream(CHUNK, decode_content=False):
                if end is not None and got + len(data) > end:
                    raise _Refused(f"GET {url}: body longer than the {end - pos} bytes asked for")
                try:
                    sink(got, data)
                except OSError as e:  # the store's (ENOSPC...), not the network's: not retried
                    raise _StoreError(e) from None
                got += len(data)
                self.stats.add(bytes_fetched=len(data))
            clean = True
            if end is not None and got != end:
                raise _Retry(f"GET {url}: body ended after {got - pos} of {end - pos} bytes", got)
            length = resp.headers.get("Content-Length")
            if end is None and length is not None and length.isdigit() and got - pos != int(length):
                raise _Retry(f"GET {url}: body ended after {got - pos} of {length} bytes", pos)
            return got
        except (HTTPError, OSError) as e:
            # a short body or a reset after some bytes: the retry asks for the bytes still missing
            # (without a range, for all of them again)
            raise _Retry(f"GET {url}: {_cause(e)}", got if end is not None else pos) from None
        finally:
            if not clean:
                resp.close()  # never hand a connection with an unread body back to the pool
            resp.release_conn()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.parts.shutdown(wait=False)
        self.pool.clear()
        self.ns.close()


class _StoreError(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Retry(Exception):
    def __init__(self, message: str, pos: int, status: int = 0) -> None:
        super().__init__(message)
        self.pos = pos
        self.status = status


class _Refused(Exception):
    def __init__(self, message: str, err: int = errno.EIO, status: int = 0) -> None:
        super().__init__(message)
        self.err = err
        self.status = status


def _cause(e: BaseException) -> str:
    """The innermost reason of a urllib3 error, for the log: "connection reset", "read timed out"."""
    seen = e
    while seen.__context__ is not None and isinstance(seen, HTTPError):
        seen = seen.__context__
    text = str(seen) or type(seen).__name__
    if "timed out" in text.lower() or isinstance(seen, TimeoutError):
        return f"timed out ({text})"
    return text


def _body_hint(resp: Any) -> str:
    try:
        body = resp.read(512, decode_content=False)
    except Exception:
        return ""
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return f" ({text[:200]})" if text else ""


class RemoteFile:
    """One remote object, named by its hash: its bytes are fetched straight into the stub."""

    def __init__(self, source: HttpSource, rel: str, rec: Record, digest: bytes, url: str) -> None:
        self.source = source
        self.rel = rel
        self.rec = rec
        self.digest = digest
        self.url = url
        self.deadline = time.monotonic() + source.settings.deadline

    def data_regions(self) -> list[tuple[int, int]]:
        return [(0, self.rec.size)] if self.rec.size else []

    def copy_to(self, dst_fd: int, start: int, end: int) -> None:
        t = self.source.transport
        part = t.settings.part_size
        ranges = [(a, min(a + part, end)) for a in range(start, end, part)]

        def one(a: int, b: int) -> None:
            t.fetch(self.url, a, b, lambda off, data: _pwrite_all(dst_fd, data, off), deadline=self.deadline)

        if len(ranges) == 1:
            one(*ranges[0])
            return
        futures = [t.parts.submit(one, a, b) for a, b in ranges]
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def same(self, dst_fd: int, start: int, end: int) -> bool:
        if start == 0 and end == self.rec.size:
            # the whole file: its hash says it, with no fetch (after an unclean end, every unverified
            # file is compared like this, in the background and before an eviction)
            return self._digest(dst_fd) == self.digest
        ok = [True]

        def compare(off: int, data: bytes) -> None:
            if ok[0] and os.pread(dst_fd, len(data), off) != data:
                ok[0] = False

        self.source.transport.fetch(self.url, start, end, compare, deadline=self.deadline)
        return ok[0]

    def _digest(self, fd: int) -> bytes:
        h = hashlib.sha256()
        pos = 0
        while pos < self.rec.size:
            data = os.pread(fd, min(CHUNK * 4, self.rec.size - pos), pos)
            if not data:
                break
            h.update(data)
            pos += len(data)
        return h.digest()

    def verify(self, dst_fd: int) -> None:
        digest = self._digest(dst_fd)
        if digest != self.digest:
            self.source.transport.stats.add(hash_failures=1)
            raise IntegrityError(f"INTEGRITY: {self.url}: the fetched bytes hash to {digest.hex()}, the manifest "
                                 f"says {self.digest.hex()}: refused, nothing of it is kept", errno.EIO)

    def close(self) -> None:
        pass


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


class HttpSource:
    """Objects of a published tree at base (the URL of the manifest's directory, ending in "/")."""

    remote = True  # fill-ahead stays off (hsmfs.filler.ahead)

    def __init__(self, manifest_url: str, hashes: HashTable, settings: FetchSettings, *,
                 ns: Optional[NetNamespace] = None, watch_routes: bool = False,
                 signer: Optional[Signer] = None) -> None:
        self.manifest_url = manifest_url
        self.base = manifest_url.rsplit("/", 1)[0] + "/"
        self.hashes = hashes
        self.settings = settings
        parts = urllib.parse.urlsplit(self.base)
        self.transport = Transport(f"{parts.scheme}://{parts.netloc}", settings, ns=ns, signer=signer,
                                   watch_routes=watch_routes)

    def describe(self) -> str:
        return self.manifest_url

    def object_url(self, sha256: str) -> str:
        from hsmfs.manifest import object_key

        return self.base + object_key(sha256)

    def open(self, rel: str, rec: Record) -> RemoteFile:
        if not rec.flags & FLAG_CONTENT:
            raise SourceError("the stub record names no remote object (made from another kind of source)")
        digest = self.hashes.get(rec.src_ino)
        return RemoteFile(self, rel, rec, digest, self.object_url(digest.hex()))

    def status(self) -> dict[str, object]:
        s = self.transport.stats
        w = self.transport.watch
        with s.lock:
            d: dict[str, object] = {k: v for k, v in s.__dict__.items() if k != "lock"}
        d["origin"] = self.transport.origin
        d["netns"] = self.transport.ns.label
        d["origin_state"] = "unreachable: " + w.down if w is not None and w.down else \
            ("failing: " + s.last_error if s.last_error and time.time() - s.last_error_at < 60 else "ok")
        return d

    def close(self) -> None:
        self.transport.close()
        self.hashes.close()
