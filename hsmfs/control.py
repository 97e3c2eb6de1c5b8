"""The filler's control socket, root only.

Protocol (version 1): the client connects to ``/run/hsmfs/NAME.sock`` (AF_UNIX, SOCK_STREAM),
sends one JSON object on one line, and reads one JSON object on one line back; then both close.

Requests:

- ``{"op": "status"}``: the filler's counters (and the space budget's, if any).
- ``{"op": "umount", "lazy": false}``: unmount the view.
- ``{"op": "evict", "handles": [[TYPE, "HEX"], ...]}``: evict the files named by their file
  handles (``name_to_handle_at`` on the store's filesystem; at most about 1,000 per request, the
  line is limited to 64 KiB). The reply's ``results`` has one ``{"evicted": bool, "reason": str,
  "freed": bytes}`` per handle, in order.

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "message", "errno": N}``; a failure
that is an hsmfs error (a damaged stub record) has ``"exit_code"``: the code the command exits with.
Peers whose SO_PEERCRED uid is not 0 get ``{"ok": false, "error": "root only"}``.
Runtime records ``/run/hsmfs/NAME.json`` name each running mount (see RuntimeRecord).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from hsmfs.errors import HsmfsError
from hsmfs.places import RUN_DIR, journal_path, record_path, socket_path
from hsmfs.process import start_time, wait_exit
from hsmfs.tree import atomic_write

RECONNECT_WAIT = 15.0  # seconds a client waits for a restarting filler's socket

Handler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class RuntimeRecord:
    """/run/hsmfs/NAME.json: one running hsmfs mount."""

    name: str
    pid: int
    store: str
    source: str
    target: str
    namespace: Optional[str]
    mnt_id: int
    log: str
    started: Optional[int] = None  # pid's start time (hsmfs.process.start_time); None: an older hsmfs wrote it

    @property
    def socket(self) -> str:
        return socket_path(self.name)

    def save(self) -> None:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        atomic_write(record_path(self.name), json.dumps(asdict(self)).encode())

    def remove(self) -> None:
        for p in (record_path(self.name), self.socket, journal_path(self.name)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def alive(self) -> bool:
        """Whether the process that wrote this record (the supervisor, or hsmfs@.service's main
        process) still runs: its pid, started when the record says."""
        if self.started is not None:
            return start_time(self.pid) == self.started
        try:  # a record an older hsmfs wrote, without a start time: the pid must still run hsmfs
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return False
        return b"hsmfs.daemon" in argv or (b"hsmfs.filler" in argv and b"--systemd" in argv)

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to timeout seconds for that process to end; whether it has."""
        return not self.alive() or wait_exit(self.pid, self.started, timeout)


def runtime_records() -> list[RuntimeRecord]:
    out = []
    try:
        names = sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []
    for n in names:
        if n.endswith(".json"):
            try:
                with open(os.path.join(RUN_DIR, n)) as f:
                    out.append(RuntimeRecord(**json.load(f)))
            except (OSError, ValueError, TypeError):
                continue
    return out


class Server:
    """Answers requests on a thread; never touches the view or the tree."""

    def __init__(self, name: str, handler: Handler) -> None:
        self.path = socket_path(name)
        self.handler = handler
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._one(conn)
                except HsmfsError as e:  # a damaged record met on the way (65), ...
                    _send(conn, {"ok": False, "error": e.message, "exit_code": e.exit_code})
                except Exception as e:  # a bad client must not kill the filler
                    _send(conn, {"ok": False, "error": f"internal error: {e}"})

    def _one(self, conn: socket.socket) -> None:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", cred)
        conn.settimeout(10)
        line = conn.makefile("rb").readline(1 << 16)  # read first: a refused client's send must not EPIPE
        if uid != 0:
            _send(conn, {"ok": False, "error": "root only"})
            return
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as e:
            _send(conn, {"ok": False, "error": f"bad request: {e}"})
            return
        _send(conn, self.handler(req))


def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def request(name: str, req: dict[str, Any], *, timeout: float = 30.0, wait: float = RECONNECT_WAIT) -> dict[str, Any]:
    """Send one request to the filler of mount NAME and return its reply.

    While a filler restarts its socket is gone or refuses connections for a moment: connecting is
    retried for up to wait seconds. A filler that does not answer, or dies before its reply is
    complete, raises Busy (75) saying so; what it did with the request is then unknown.
    """
    from hsmfs.errors import Busy

    deadline = time.monotonic() + wait
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect(socket_path(name))
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if time.monotonic() >= deadline:
                raise Busy(f"the filler of mount {name} is not answering ({e.strerror}); it may be restarting",
                           hint="try again in a moment; 'hsmfs status' shows the mount") from None
            time.sleep(0.1)
        except BaseException:
            s.close()
            raise
    with s:
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            data = s.makefile("rb").readline()
        except (socket.timeout, ConnectionError) as e:
            raise Busy(f"the filler of mount {name} did not answer: {e}; what it did is not known",
                       hint="try again; 'hsmfs status' shows the mount") from None
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError:
        raise Busy(f"the filler of mount {name} stopped before it answered (it is restarting); what it did with "
                   "this request is not known", hint="run the command again") from None
    return reply
