"""Errors users see. Each class carries its exit code (BSD sysexits, see docs/exit-codes.md).

The message is what the user reads; ``hint`` says what to do about it. The CLI turns these into
exit codes in exactly one place (hsmfs.cli.main); tracebacks appear only with --debug.
"""

from __future__ import annotations

import os
from typing import Optional


class HsmfsError(Exception):
    """hsmfs failed."""

    exit_code = 70  # EX_SOFTWARE

    def __init__(self, message: str, *, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(HsmfsError):
    """A command-line argument is wrong."""

    exit_code = os.EX_USAGE  # 64


class DataError(HsmfsError):
    """Data hsmfs keeps (a stub record, hsmfs.json, the state log) is damaged or of another version."""

    exit_code = os.EX_DATAERR  # 65


class SourceMissing(HsmfsError):
    """The source does not exist or cannot be read."""

    exit_code = os.EX_NOINPUT  # 66


class Unavailable(HsmfsError):
    """The kernel or filesystem lacks something hsmfs needs."""

    exit_code = os.EX_UNAVAILABLE  # 69


class CannotCreate(HsmfsError):
    """The store or target cannot be created or used."""

    exit_code = os.EX_CANTCREAT  # 73


class Busy(HsmfsError):
    """Something is in use; trying later may work."""

    exit_code = os.EX_TEMPFAIL  # 75


class NotPermitted(HsmfsError):
    """hsmfs needs root (CAP_SYS_ADMIN) for this."""

    exit_code = os.EX_NOPERM  # 77


class ConfigError(HsmfsError):
    """The policy file is invalid."""

    exit_code = os.EX_CONFIG  # 78


class NotMounted(HsmfsError):
    """No hsmfs mount matches what was given."""

    exit_code = os.EX_NOINPUT  # 66
