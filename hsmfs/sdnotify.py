"""The service manager's side channel, in pure Python: sd_notify(3) and sd_listen_fds(3).

The protocol is stable and small enough that a dependency (python-systemd needs a compiler) is
not worth it; gunicorn, Synapse and the systemd man page itself reimplement it the same way.

* :func:`notify` sends one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated
  ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (``/path``, or ``@name`` for an abstract socket),
  with file descriptors as ``SCM_RIGHTS`` (``FDSTORE=1`` puts them in the unit's fd store;
  without it the manager closes them at once).
* :func:`listen_fds` takes back what the fd store (or socket activation) passed: fds 3… as
  announced by ``$LISTEN_PID``, ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES`` (colon-separated).
* :func:`watchdog_usec` reads ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is ours); send
  ``WATCHDOG=1`` at half that period.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from typing import Optional

LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


def booted() -> bool:
    """Whether systemd is the init system (sd_booted(3): the directory exists only then)."""
    return os.path.isdir("/run/systemd/system")


def notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send state (e.g. ``"READY=1"``) and fds to the service manager; False if there is none.

    Errors of a manager that is there (socket gone, message refused) raise OSError.
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":  # abstract namespace
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        raise OSError(f"NOTIFY_SOCKET={addr!r}: only AF_UNIX sockets are supported")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        if fds:
            s.sendmsg([state.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        else:
            s.sendall(state.encode())
    return True


def listen_fds(*, unset: bool = True) -> dict[str, list[int]]:
    """File descriptors passed to this process by name (``"unknown"`` when unnamed); CLOEXEC set.

    With unset (the default) the ``LISTEN_*`` variables are removed, so children do not take the
    fds for theirs.
    """
    env = os.environ
    try:
        ours = int(env.get("LISTEN_PID", "")) == os.getpid()
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        ours, n = False, 0
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for k in _LISTEN_VARS:
            env.pop(k, None)
    out: dict[str, list[int]] = {}
    if not ours or n <= 0:
        return out
    for i in range(n):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(fd)
    return out


def watchdog_usec() -> Optional[int]:
    """The watchdog period in µs if the manager expects pings from this process, else None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec if usec > 0 else None
