"""The network a remote source is fetched through, and whether the origin is reachable from it.

Policy ``netns`` (docs/netns.md): ``"host"`` (the filler's own network), ``"target"`` (the network
namespace of the process a view was mounted for with ``--namespace PID``), a name (``/run/netns/NAME``,
as ``ip netns`` makes them) or a path to a network namespace file.

:class:`NetNamespace` runs the few calls whose result belongs to a network namespace (``socket()``,
``getaddrinfo``) in one thread that entered the namespace with ``setns(CLONE_NEWNET)``; a socket
keeps the namespace it was made in, so connecting, reading and writing happen in any thread, and
the filler itself never leaves its own namespace. Traffic then goes by that namespace's routes and
firewall, and is accounted to it (a container's interfaces and cgroup-free counters).

:class:`RouteWatch` follows the namespace's routing table with pyroute2's netlink monitor: once no
route leads to the origin, :attr:`RouteWatch.down` says why, every fetch fails at once and the
connections in flight are shut down, instead of each fill waiting out ``fill_timeout``; when a
route comes back, fetches go again. pyroute2 is imported in the watch's own thread, only when a
remote source is served: local mounts and the CLI never pay its import.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import threading
import time
import weakref
from typing import Any, Callable, Optional, TypeVar

from hsmfs.errors import UsageError
from hsmfs.linux.mount import setns
from hsmfs.linux.ns import CLONE_NEWNET, is_net_ns

log = logging.getLogger("hsmfs.netns")
T = TypeVar("T")
NETNS_DIR = "/run/netns"


def open_netns(spec: str) -> Optional[int]:
    """An fd of the network namespace the policy's netns names (None for "host"; "target" is the
    caller's business: it needs the view's process). UsageError if it names none."""
    if spec == "host":
        return None
    path = spec if "/" in spec else os.path.join(NETNS_DIR, spec)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"netns {spec!r}: cannot open {path}: {e.strerror}",
                         hint="give \"host\", \"target\", a name from 'ip netns list' or a path to a network "
                         "namespace file (/proc/PID/ns/net)") from None
    if not is_net_ns(fd):
        os.close(fd)
        raise UsageError(f"netns {spec!r}: {path} is not a network namespace")
    return fd


class NetNamespace:
    """Runs calls in a thread inside one network namespace (or here, for the host's)."""

    def __init__(self, fd: Optional[int], label: str = "host") -> None:
        self.label = label
        self.fd = fd
        self._jobs: queue.Queue[Optional[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]]]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # made for fetches, for shutdown
        if fd is not None:
            started: queue.Queue[Optional[OSError]] = queue.Queue()
            self._thread = threading.Thread(target=self._loop, args=(started,), name="netns", daemon=True)
            self._thread.start()
            err = started.get()
            if err is not None:
                raise err

    def _loop(self, started: queue.Queue[Optional[OSError]]) -> None:
        assert self.fd is not None
        try:
            setns(self.fd, CLONE_NEWNET)  # this thread only: a network namespace is per thread
        except OSError as e:
            started.put(e)
            return
        started.put(None)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, reply = job
            try:
                reply.put((True, fn()))
            except BaseException as e:
                reply.put((False, e))

    def run(self, fn: Callable[[], T]) -> T:
        """fn() in the namespace's thread (here for the host's)."""
        if self._thread is None:
            return fn()
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue(1)
        self._jobs.put((fn, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def connect(self, host: str, port: int, timeout: Optional[float]) -> socket.socket:
        """A TCP connection to host:port made in the namespace (name resolved there too)."""
        infos = self.run(lambda: socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        err: Optional[OSError] = None
        for family, type_, proto, _name, addr in infos:
            sock = self.run(lambda f=family, t=type_, p=proto: socket.socket(f, t, p))  # type: ignore[misc]
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(timeout)
                sock.connect(addr)
            except OSError as e:
                sock.close()
                err = e
                continue
            self.sockets.add(sock)
            return sock
        raise err or OSError(errno.EHOSTUNREACH, f"no address for {host}")

    def resolve(self, host: str) -> list[str]:
        infos = self.run(lambda: socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM))
        return sorted({str(i[4][0]) for i in infos})

    def shutdown_all(self) -> int:
        """Shut down every connection made here that is still open: reads blocked on them end now."""
        n = 0
        for s in list(self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
                n += 1
            except OSError:
                pass
        return n

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class RouteWatch:
    """Whether the namespace has a route to the origin's addresses, kept current from netlink events."""

    def __init__(self, ns: NetNamespace, host: str, on_down: Callable[[str], None]) -> None:
        self.ns = ns
        self.host = host
        self.on_down = on_down
        self.down: Optional[str] = None  # why the origin is unreachable, None while a route exists
        self.since = time.time()
        self.changes = 0
        self._stop = threading.Event()
        self._ipr: Any = None
        self._mon: Any = None
        self._addrs: list[str] = []
        self._thread = threading.Thread(target=self._run, name="route-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            from pyroute2 import IPRoute  # ~230 ms: paid here, in the background, only for remote sources

            self._addrs = list(self.ns.resolve(self.host))
            # pyroute2's objects belong to the thread that made them: this one, which enters the
            # namespace itself (a network namespace is per thread). One socket bound to the link,
            # address and route groups for events, one for the lookups they trigger.
            if self.ns.fd is not None:
                setns(self.ns.fd, CLONE_NEWNET)
            self._mon = IPRoute()
            self._mon.bind()
            self._ipr = IPRoute()
        except Exception as e:  # the watch is an optimisation: fetches still time out on their own
            log.warning("cannot watch the routes to %s (%s); a lost route shows as fetch timeouts", self.host, e)
            return
        self._check()
        while not self._stop.is_set():
            try:
                msgs = self._mon.get()
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            if any(m.get("event") in ("RTM_NEWROUTE", "RTM_DELROUTE", "RTM_NEWLINK", "RTM_DELLINK",
                                      "RTM_NEWADDR", "RTM_DELADDR") for m in msgs):
                self._check()

    def _reason(self) -> Optional[str]:
        for addr in self._addrs:
            try:
                routes = self._ipr.route("get", dst=addr)
            except Exception as e:
                code = getattr(e, "code", 0)
                return f"no route to {addr} ({os.strerror(code) if code else e})"
            for r in routes:
                flags = r.get("flags", 0)
                oif = r.get_attr("RTA_OIF")
                if flags & 0x10:  # RTNH_F_LINKDOWN
                    return f"the route to {addr} is down (link down)"
                if oif:
                    links = self._ipr.get_links(oif)
                    state = links[0].get_attr("IFLA_OPERSTATE") if links else None
                    if state in ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT"):
                        return f"the route to {addr} goes through {links[0].get_attr('IFLA_IFNAME')}, which is down"
        return None

    def _check(self) -> None:
        why = self._reason()
        if why == self.down:
            return
        self.changes += 1
        self.since = time.time()
        was = self.down
        self.down = why
        if why is not None:
            log.error("origin %s unreachable from network namespace %s: %s; fills fail at once until a route "
                      "returns", self.host, self.ns.label, why)
            self.on_down(why)
        elif was is not None:
            log.warning("origin %s reachable again from network namespace %s: fills resume", self.host, self.ns.label)

    def close(self) -> None:
        self._stop.set()
        for sock in (self._mon, self._ipr):
            if sock is not None:
                try:
                    sock.close()
                except Exception:
                    pass
        self._thread.join(timeout=2)
