"""A real network path to an origin, for hsmfs's remote tests and benchmark (no hsmfs imports).

- :class:`Lab`: two network namespaces made with pyroute2, ``PREFIX-srv`` (the origin) and
  ``PREFIX-cli`` (where hsmfs fetches from, policy ``netns = "/run/netns/PREFIX-cli"``), joined by a
  veth pair ``169.254.77.1/30`` (srv) -- ``169.254.77.2/30`` (cli). Optional ``tbf`` shaping on
  both ends (this kernel has no netem, hence the delay line below). Removing the namespaces
  removes the veth pair; nothing touches the host's own network namespace.
- ``python netlab.py origin --root DIR --port N [--faults FILE]``: a threaded HTTP/1.1 server with
  keep-alive and Range support, serving DIR. FILE (JSON, re-read on every request) maps a URL path
  to a fault: ``{"status": 403}``, ``{"close_after": 1000}`` (closes mid-body), ``{"delay": 5}``
  (a slow server: waits before the headers), ``{"short": 100}`` (Content-Length as asked, body
  100 bytes short, then closes), ``{"long": 100}`` (Content-Length 100 bytes too many),
  ``{"corrupt": true}`` (one byte flipped), ``{"fail_times": 2, "status": 503}`` (fails twice).
  ``--cert PEM`` serves HTTPS instead.
  Requests are counted per path in ``FILE.count`` when FILE is given.
- ``python netlab.py delay --listen ADDR:PORT --to ADDR:PORT --delay S``: a TCP proxy that delays
  every chunk by S seconds in each direction without serializing them (a queue of
  ``(deadline, chunk)``): round-trip time + 2 S, throughput unchanged.

Every process it starts writes a ready file once listening; :func:`start` waits for it. Request
loops are bounded by their clients; the processes stop when their tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

SRV_ADDR = "169.254.77.1"
CLI_ADDR = "169.254.77.2"
HERE = os.path.abspath(__file__)


class Lab:
    """Two network namespaces joined by a veth pair; removed by close()."""

    def __init__(self, prefix: str, *, rate: Optional[str] = None) -> None:
        from pyroute2 import IPRoute, netns

        self.srv, self.cli = f"{prefix}-srv", f"{prefix}-cli"
        self.cli_path = f"/run/netns/{self.cli}"
        self.procs: list[Any] = []
        for ns in (self.srv, self.cli):
            if os.path.exists(f"/run/netns/{ns}"):
                netns.remove(ns)  # a crashed run's
            netns.create(ns)
        try:
            with IPRoute(netns=self.srv) as ipr:
                ipr.link("add", ifname="vs0", kind="veth", peer={"ifname": "vc0", "net_ns_fd": self.cli})
                self._setup(ipr, "vs0", SRV_ADDR, rate)
            with IPRoute(netns=self.cli) as ipr:
                self._setup(ipr, "vc0", CLI_ADDR, rate)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _setup(ipr: Any, ifname: str, addr: str, rate: Optional[str]) -> None:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")
        (idx,) = ipr.link_lookup(ifname=ifname)
        ipr.addr("add", index=idx, address=addr, prefixlen=30)
        ipr.link("set", index=idx, state="up")
        if rate:
            ipr.tc("add", "tbf", index=idx, handle="1:", rate=rate, burst=128 * 1024, latency=200000)

    def link(self, up: bool) -> None:
        """Bring the client's end of the veth up or down (a lost route, seen from the client)."""
        from pyroute2 import IPRoute

        with IPRoute(netns=self.cli) as ipr:
            (idx,) = ipr.link_lookup(ifname="vc0")
            ipr.link("set", index=idx, state="up" if up else "down")

    def start(self, ns: str, args: list[str], *, ready: str, env: Optional[dict[str, str]] = None,
              timeout: float = 30) -> Any:
        """A process in namespace ns (NSPopen); waits for the file ready to appear."""
        from pyroute2 import NSPopen

        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        p = NSPopen(ns, args, stdin=None, env=env)
        self.procs.append(p)
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not get ready (exit {p.poll()})")
            time.sleep(0.05)
        return p

    def run_in(self, ns: str, args: list[str], *, env: Optional[dict[str, str]] = None, timeout: float = 120) -> int:
        """Run a command in namespace ns to its end; its exit status."""
        from pyroute2 import NSPopen

        p = NSPopen(ns, args, stdin=None, env=env)
        try:
            deadline = time.monotonic() + timeout
            while p.poll() is None:
                if time.monotonic() > deadline:
                    p.kill()
                    p.wait()
                    raise RuntimeError(f"{args} took more than {timeout} s")
                time.sleep(0.05)
            return int(p.returncode)
        finally:
            p.release()

    def close(self) -> None:
        from pyroute2 import netns

        for p in self.procs:
            try:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    deadline = time.monotonic() + 5
                    while p.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if p.poll() is None:
                        p.kill()
                p.wait()
            except Exception:
                pass
            try:
                p.release()
            except Exception:
                pass
        self.procs.clear()
        for ns in (self.srv, self.cli):
            try:
                netns.remove(ns)
            except (OSError, FileNotFoundError):
                pass


# -- the origin ---------------------------------------------------------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = "."
    faults: Optional[str] = None
    lock = threading.Lock()
    counts: dict[str, int] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body are two writes: without this, Nagle holds the body for the peer's delayed ACK
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _fault(self) -> dict[str, Any]:
        if not self.faults:
            return {}
        with self.lock:
            self.counts[self.path] = self.counts.get(self.path, 0) + 1
            n = self.counts[self.path]
            try:
                with open(self.faults + ".count.tmp", "w") as f:
                    json.dump(self.counts, f)
                os.replace(self.faults + ".count.tmp", self.faults + ".count")
            except OSError:
                pass
        try:
            with open(self.faults) as f:
                rule: dict[str, Any] = json.load(f).get(self.path, {})
        except (OSError, ValueError):
            return {}
        if "fail_times" in rule and n > int(rule["fail_times"]):
            return {}
        return rule

    def do_GET(self) -> None:
        rule = self._fault()
        if rule.get("delay"):
            time.sleep(float(rule["delay"]))
        if rule.get("status"):
            body = b"fault injected\n"
            self.send_response(int(rule["status"]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        path = os.path.join(self.root, self.path.lstrip("/").split("?")[0])
        if ".." in self.path or not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start, end = 0, size
        rng = self.headers.get("Range")
        status = 200
        if rng:
            m = _RANGE.match(rng)
            if not m:
                self.send_error(416)
                return
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if rule.get("corrupt") and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        length = len(data) + int(rule.get("long", 0))
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if rule.get("close_after") is not None:
            self.wfile.write(data[:int(rule["close_after"])])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if rule.get("short"):
            self.wfile.write(data[:max(0, len(data) - int(rule["short"]))])
            self.close_connection = True
            return
        self.wfile.write(data)


def serve_origin(root: str, host: str, port: int, faults: Optional[str], ready: str,
                 cert: Optional[str] = None) -> None:
    _Origin.root = root
    _Origin.faults = faults
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer((host, port), _Origin)
    if cert:  # HTTPS with this certificate (key in the same PEM file)
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown).start())
    open(ready, "w").close()
    srv.serve_forever()


# -- the delay line ---------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def sender() -> None:
        while True:
            deadline, chunk = await q.get()
            wait = deadline - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                writer.close()
                return
            writer.write(chunk)
            await writer.drain()

    task = asyncio.ensure_future(sender())
    try:
        while True:
            chunk = await reader.read(1 << 16)
            await q.put((time.monotonic() + delay, chunk))
            if not chunk:
                break
        await task
    except (ConnectionError, OSError):
        task.cancel()
        writer.close()


async def _delay_main(listen: tuple[str, int], to: tuple[str, int], delay: float, ready: str) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*to)
        except OSError:
            w.close()
            return
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        uw.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pipe(r, uw, delay), _pipe(ur, w, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, *listen, backlog=256)
    open(ready, "w").close()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="netlab.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("origin")
    o.add_argument("--root", required=True)
    o.add_argument("--host", default="0.0.0.0")
    o.add_argument("--port", type=int, required=True)
    o.add_argument("--faults")
    o.add_argument("--ready", required=True)
    o.add_argument("--cert", help="serve HTTPS with this PEM (certificate and key)")
    d = sub.add_parser("delay")
    d.add_argument("--listen", required=True)
    d.add_argument("--to", required=True)
    d.add_argument("--delay", type=float, required=True)
    d.add_argument("--ready", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "origin":
        serve_origin(args.root, args.host, args.port, args.faults, args.ready, args.cert)
    else:
        asyncio.run(_delay_main(_addr(args.listen), _addr(args.to), args.delay, args.ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
