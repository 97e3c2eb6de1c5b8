"""What every hsmfs background process sets up: logging and limits."""

from __future__ import annotations

import logging
import os
import signal
import sys

from hsmfs.names import EscapingFormatter


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if journal_stderr():
        # the journal stamps time, pid and unit itself; <N> sets each line's priority
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def ignore_lease_breaks() -> None:
    """Eviction holds write leases: an open by anyone else sends the holder SIGIO, whose default
    action would kill it. hsmfs releases its leases within milliseconds anyway."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


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
