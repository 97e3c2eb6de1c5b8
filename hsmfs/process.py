"""What every hsmfs background process sets up: logging and limits."""

from __future__ import annotations

import logging
import resource
import sys


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")


def raise_fd_limit() -> None:
    """Held event fds (one per fill awaiting its commit) can outnumber the default soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
