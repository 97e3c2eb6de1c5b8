"""What every hsmfs process shares: how it logs, how it ends, how it tells its parent it is ready.

- :func:`run_main` is the one place where an exception becomes an exit status, for every entry
  point: the CLI, ``mount.hsmfs``, the supervisor, the filler and hsmfs@.service's main process.
- :func:`setup_logging`: lines with ``<N>`` priority prefixes when stderr is the journal, else
  with time, logger and pid (background processes) or a short prefix (commands).
- :class:`ReadyPipe`: a child started in the background reports "ready", or the
  :class:`~hsmfs.errors.HsmfsError` that stopped it, as one JSON line on an inherited pipe.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
from typing import Callable, NoReturn, Optional, Union

from hsmfs.errors import HsmfsError, Interrupted, SystemCallFailed, from_wire, to_wire
from hsmfs.names import EscapingFormatter

log = logging.getLogger("hsmfs")

DAEMON_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def start_time(pid: int) -> Optional[int]:
    """When process pid started, in clock ticks since boot (proc(5), stat field 22); None if no
    process has that pid, or it has exited (a zombie). A pid and its start time name one process
    for good: a later process given the same pid has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold anything
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def real_uid(pid: int) -> Optional[int]:
    """The real uid of process (or thread) pid, as this process's user namespace sees it; None if it
    is gone. The real uid, not the effective one: a setuid program a user runs counts as theirs.
    (/proc/PID's owner will not do: it is root for any process that changed its ids.)"""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def wait_exit(pid: int, started: Optional[int], timeout: float) -> bool:
    """Wait up to timeout seconds for the process (pid, started) to end; whether it has. Sleeps on
    a pidfd, which becomes readable when its process exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if started is not None and start_time(pid) != started:
            return True  # the pid names another process now: ours is gone
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def setup_logging(level: str, *, fmt: str = DAEMON_FORMAT) -> None:
    """One handler on stderr for the whole process; every message escaped (hsmfs.names)."""
    handler = logging.StreamHandler(sys.stderr)
    if journal_stderr():
        # the journal stamps time, pid and unit itself; <N> sets each line's priority
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(EscapingFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def oom_score_adj(value: int) -> None:
    """Set this process's OOM score adjustment (children inherit it). -1000: never chosen by the
    OOM killer. The supervisor holds the fanotify group: if it and the filler both die, the group
    is released and every stub of a view still mounted reads as holes (docs/kernel.md#k6), so it is
    the one process the OOM killer must not take; the filler, which a supervisor restarts, sets 0."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as e:
        logging.getLogger("hsmfs").warning("cannot set oom_score_adj to %d: %s%s", value, e,
                                           " (lowering it needs CAP_SYS_RESOURCE): the OOM killer may choose "
                                           "this process" if value < 0 else "")


def ignore_lease_breaks() -> None:
    """Eviction holds write leases: an open by anyone else sends the holder SIGIO, whose default
    action would kill it. hsmfs releases its leases within milliseconds anyway."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def default_report(e: HsmfsError) -> None:
    log.error("%s", e)


def run_main(main: Callable[[], Optional[int]], *, report: Callable[[HsmfsError], None] = default_report,
             exit_code: Callable[[HsmfsError], int] = lambda e: e.exit_code,
             debug: Callable[[], bool] = lambda: False) -> NoReturn:
    """Run main and exit: with its return value, or the exit code of the error that ended it.

    HsmfsError: report(e) (one line, with its hint), exit_code(e) (the class's code; mount.hsmfs
    maps it to mount(8)'s). OSError: the same as SystemCallFailed (71), naming the file.
    KeyboardInterrupt: 130. Anything else is a bug: its traceback goes to the log, exit 70.
    debug(): re-raise instead, for the traceback.
    """
    err: Optional[HsmfsError] = None
    try:
        code = main() or 0
    except SystemExit:
        raise
    except HsmfsError as e:
        if debug():
            raise
        err = e
    except OSError as e:
        if debug():
            raise
        err = SystemCallFailed.of(e)
    except KeyboardInterrupt:
        err = Interrupted("interrupted")
    except Exception as e:
        if debug():
            raise
        log.critical("bug: %r", e, exc_info=True)
        err = HsmfsError(f"internal error: {e!r}", hint="this is a bug in hsmfs; --debug shows where")
    if err is not None:
        report(err)
        code = exit_code(err)
    sys.stdout.flush()
    sys.exit(code)


# --- ready ----------------------------------------------------------------------------------------


class ReadyPipe:
    """The write end a background child got (``--ready-fd``): one JSON line, then closed.

    ``{"ready": true}``, or ``{"error": {...}}`` (hsmfs.errors.to_wire). A child that dies before
    it writes leaves end of file: its parent then has only its exit status.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ready(self) -> None:
        self._send({"ready": True})

    def failed(self, e: HsmfsError) -> None:
        self._send({"error": to_wire(e)})

    @property
    def open(self) -> bool:
        return self.fd >= 0

    def _send(self, msg: dict[str, object]) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, json.dumps(msg).encode() + b"\n")
        except OSError:
            pass  # the parent is gone: nobody waits
        finally:
            os.close(self.fd)
            self.fd = -1


Word = Union[bool, HsmfsError, None]  # True: ready; an error; None: end of file without a word


def read_ready(fd: int) -> Word:
    """The child's word on the read end of its ready pipe (call once it polls readable)."""
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    if not data:
        return None
    try:
        msg = json.loads(data)
        if msg.get("ready") is True:
            return True
        return from_wire(msg["error"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return HsmfsError(f"unreadable word from a child process: {data[:200]!r}")


def wait_ready(fd: int, pidfd: int, timeout: float) -> Word:
    """Wait for the word on fd from the child whose pidfd is given; None if it exited without one
    (or timeout passed: then the child is still running)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    p.register(pidfd, select.POLLIN)
    events = dict(p.poll(int(timeout * 1000)))
    if fd in events:
        return read_ready(fd)
    return None


# --- journald ---------------------------------------------------------------------------------------


def journal_stderr() -> bool:
    """Whether stderr is connected to journald: $JOURNAL_STREAM is stderr's "dev:ino".

    systemd.exec(5): checking that the variable is set is not enough, stderr may have been
    redirected by a child's parent since.
    """
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_priority(levelno: int) -> int:
    """syslog priority of a logging level (sd-daemon(3): <3> SD_ERR … <7> SD_DEBUG)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(EscapingFormatter):
    """Prefixes every line with ``<N>``: journald makes one entry per line, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())
