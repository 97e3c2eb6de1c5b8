"""Errors users see. Each class carries its exit code (BSD sysexits, see docs/exit-codes.md).

The message is what the user reads; ``hint`` says what to do about it. Every hsmfs process turns
these into its exit status in one place, :func:`hsmfs.process.run_main`; tracebacks appear only
with ``--debug`` (and, for an error that is not one of these, in the log, as a bug).

``restart_cannot_fix`` marks the failures that starting the same process again cannot fix (a bad
policy, a damaged store, a missing kernel feature): ``RestartPreventExitStatus=`` of
hsmfs/data/units/hsmfs@.service lists exactly their codes (:func:`restart_prevent_exit_status`; a test checks).

A process that fails for another (its parent, waiting for "ready") sends the error itself, not
text to parse: :func:`to_wire` and :func:`from_wire` (hsmfs.process.ReadyPipe).
"""

from __future__ import annotations

import os
from typing import Any, Optional


class HsmfsError(Exception):
    """hsmfs failed."""

    exit_code = os.EX_SOFTWARE  # 70
    restart_cannot_fix = False

    def __init__(self, message: str, *, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(HsmfsError):
    """A command-line argument is wrong."""

    exit_code = os.EX_USAGE  # 64
    restart_cannot_fix = True


class DataError(HsmfsError):
    """Data hsmfs keeps (a stub record, hsmfs.json, the state log) is damaged or of another version."""

    exit_code = os.EX_DATAERR  # 65
    restart_cannot_fix = True


class SourceMissing(HsmfsError):
    """The source does not exist or cannot be read."""

    exit_code = os.EX_NOINPUT  # 66
    restart_cannot_fix = True


class NotMounted(HsmfsError):
    """No hsmfs mount matches what was given."""

    exit_code = os.EX_NOINPUT  # 66
    restart_cannot_fix = True


class Unavailable(HsmfsError):
    """The kernel or filesystem lacks something hsmfs needs."""

    exit_code = os.EX_UNAVAILABLE  # 69
    restart_cannot_fix = True


class FillerFailed(HsmfsError):
    """The filler could not start for a reason not covered by another error (its log says why)."""

    exit_code = os.EX_SOFTWARE  # 70


class SystemCallFailed(HsmfsError):
    """An unexpected system call failure; the message names the call and the file."""

    exit_code = os.EX_OSERR  # 71

    @classmethod
    def of(cls, e: OSError) -> SystemCallFailed:
        return cls(describe_oserror(e))


class CannotCreate(HsmfsError):
    """The store or target cannot be created or used."""

    exit_code = os.EX_CANTCREAT  # 73
    restart_cannot_fix = True


class SomeFailed(HsmfsError):
    """Part of the work could not be done (each failure was named); the rest was done."""

    exit_code = os.EX_IOERR  # 74


class Busy(HsmfsError):
    """Something is in use; trying later may work."""

    exit_code = os.EX_TEMPFAIL  # 75
    # for hsmfs@.service: its target is a mount point already, or a mount of that name runs; a
    # restart every 500 ms would not change that
    restart_cannot_fix = True


class NotPermitted(HsmfsError):
    """hsmfs needs root (CAP_SYS_ADMIN) for this."""

    exit_code = os.EX_NOPERM  # 77
    restart_cannot_fix = True


class ConfigError(HsmfsError):
    """The policy file is invalid."""

    exit_code = os.EX_CONFIG  # 78
    restart_cannot_fix = True


class Interrupted(HsmfsError):
    """Interrupted (Ctrl-C)."""

    exit_code = 130


def need_root(what: str) -> None:
    """NotPermitted unless this process runs as root; what: the command, "hsmfs mount"."""
    if os.geteuid() != 0:
        raise NotPermitted(f"{what} needs root (CAP_SYS_ADMIN for mounts and fanotify)",
                           hint=f"run it as root: sudo hsmfs {what.split()[-1]} ...")


def describe_oserror(e: OSError) -> str:
    """An OSError as one line that names the file(s) it was about: "open /x/y: No such file or directory"."""
    what = e.strerror or str(e)
    names = [os.fsdecode(n) for n in (e.filename, e.filename2) if n is not None]
    if not names:
        return what if e.strerror else str(e)
    return f"{' -> '.join(str(n) for n in names)}: {what}"


def _classes(base: type[HsmfsError] = HsmfsError) -> list[type[HsmfsError]]:
    out = [base]
    for sub in base.__subclasses__():
        out += _classes(sub)
    return out


def restart_prevent_exit_status() -> list[int]:
    """The exit codes that a restart cannot fix (hsmfs@.service's RestartPreventExitStatus=).

    The classes of this module decide; a subclass elsewhere (RecordError, UnsafeStore...) has its
    base's code and says nothing new. A code is listed only if no class with that code says a restart
    could fix it.
    """
    mine = [c for c in _classes() if c.__module__ == __name__]
    fixable = {c.exit_code for c in mine if not c.restart_cannot_fix}
    return sorted({c.exit_code for c in mine if c.restart_cannot_fix} - fixable)


def to_wire(e: HsmfsError) -> dict[str, Any]:
    """The error as a JSON-able object: its class, exit code, message and hint."""
    return {"type": type(e).__name__, "exit_code": e.exit_code, "message": e.message, "hint": e.hint}


def with_code(code: int, message: str, *, hint: Optional[str] = None) -> HsmfsError:
    """An error of this module's class for an exit code another process reported (HsmfsError if none)."""
    for cls in _classes():
        if cls.__module__ == __name__ and cls.exit_code == code:
            return cls(message, hint=hint)
    err = HsmfsError(message, hint=hint)
    err.exit_code = code
    return err


def from_wire(d: dict[str, Any]) -> HsmfsError:
    """The error :func:`to_wire` described: of the same class when this process knows it, else of the
    base class with the same exit code (the code is what counts)."""
    message, hint = str(d.get("message") or "failed"), d.get("hint")
    hint = str(hint) if hint is not None else None
    code = d.get("exit_code")
    known = _classes()
    for cls in known:
        if cls.__name__ == d.get("type") and cls.exit_code == code:
            return cls(message, hint=hint)
    return with_code(code if isinstance(code, int) else HsmfsError.exit_code, message, hint=hint)
