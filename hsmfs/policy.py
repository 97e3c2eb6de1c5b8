"""The policy file: TOML in, a frozen and validated :class:`Policy` out.

The file holds flat top-level keys only (docs/config.md documents each one)::

    workers = 4
    commit_interval = 0.5
    source_error = "EIO"
    log_level = "info"
    fill_timeout = 60.0
    max_resident_bytes = "20G"
    high_watermark = 0.9
    low_watermark = 0.8
    fill_ahead = true
    fill_ahead_max_size = "1M"
    fill_ahead_bytes = "64M"
    allow_suid = false
    allow_devices = false
    fetch_timeout = 10.0
    fetch_retries = 4
    fetch_connections = 16
    fetch_part_size = "8M"
    refresh_interval = 0
    netns = "host"
    route_watch = true

Every mistake is a :class:`~hsmfs.errors.ConfigError` naming the file, the line and the key, and
saying what is expected; unknown keys are mistakes too, so a typo never silently means a default.
"""

from __future__ import annotations

import errno
import json
import math
import re
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:
    # mypy checks this branch (python_version = 3.9) even where only tomllib is installed
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from hsmfs.errors import ConfigError

# The kernel takes only EPERM, EIO, EAGAIN, EBUSY, ETXTBSY, ENOSPC and EDQUOT in a fanotify response
# (fs/notify/fanotify/fanotify_user.c, fanotify_is_valid_errno). ETXTBSY, ENOSPC and EDQUOT would tell
# a reader something false about its own file, so they are not offered.
SOURCE_ERRORS: dict[str, int] = {
    "EIO": errno.EIO,
    "EAGAIN": errno.EAGAIN,
    "EPERM": errno.EPERM,
    "EBUSY": errno.EBUSY,
}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOW_BELOW_HIGH = "must be below high_watermark"
MAX_WORKERS = 256
MAX_COMMIT_INTERVAL = 60.0


class _Invalid(Exception):
    """A value is wrong; the message says what was expected."""


def _describe(value: object) -> str:
    """A value as the user wrote it in TOML, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # date, time, datetime


def _one_of(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(json.dumps(c) for c in choices)


def _check_workers(value: object) -> int:
    # bool is an int subclass: `workers = true` is a mistake, not 1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise _Invalid(f"expected an integer from 1 to {MAX_WORKERS}")


def _check_fills_per_user(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WORKERS:
        return value
    raise _Invalid(f"expected an integer from 0 (one less than workers) to {MAX_WORKERS}")


def _seconds(value: object) -> Optional[float]:
    """value as float seconds if it is a finite TOML integer or float, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            f = float(value)
        except OverflowError:
            return None
        if math.isfinite(f):
            return f
    return None


def _check_commit_interval(value: object) -> float:
    f = _seconds(value)
    if f is not None and 0 < f <= MAX_COMMIT_INTERVAL:
        return f
    raise _Invalid(f"expected a number of seconds greater than 0 and at most {MAX_COMMIT_INTERVAL:g}")


def _check_fill_timeout(value: object) -> float:
    f = _seconds(value)
    if f is not None and f > 0:
        return f
    raise _Invalid("expected a finite number of seconds greater than 0")


def _check_source_error(value: object) -> str:
    if isinstance(value, str) and value in SOURCE_ERRORS:
        return value
    raise _Invalid("expected " + _one_of(tuple(SOURCE_ERRORS)))


def _check_log_level(value: object) -> str:
    if isinstance(value, str) and value in LOG_LEVELS:
        return value
    raise _Invalid("expected " + _one_of(LOG_LEVELS))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def _check_max_resident_bytes(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is not None:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise _Invalid('expected a number of bytes (0 for no budget), as an integer or a string such as "500M" or '
                   '"20G" (K, M, G, T are powers of 1024)')


def _check_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is not None:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise _Invalid('expected a number of bytes, as an integer or a string such as "1M" or "64M" (K, M, G, T are '
                   'powers of 1024)')


def _check_fetch_retries(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20:
        return value
    raise _Invalid("expected an integer from 0 to 20")


def _check_fetch_connections(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
        return value
    raise _Invalid("expected an integer from 1 to 256")


def _check_part_size(value: object) -> int:
    n = _check_size(value)
    if n >= 1 << 20:
        return n
    raise _Invalid('expected a number of bytes of at least 1M, as an integer or a string such as "8M"')


def _check_refresh_interval(value: object) -> float:
    f = _seconds(value)
    if f is not None and (f == 0 or f >= 1):
        return f
    raise _Invalid("expected a number of seconds: 0 (never) or at least 1")


def _check_netns(value: object) -> str:
    if isinstance(value, str) and value and "\0" not in value and (value in ("host", "target") or "/" in value
                                                                   or re.fullmatch(r"[A-Za-z0-9._-]+", value)):
        return value
    raise _Invalid('expected "host", "target", a network namespace name (ip netns) or a path to a network '
                   'namespace file')


def _check_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid("expected true or false")


def _check_watermark(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise _Invalid("expected a fraction of max_resident_bytes greater than 0 and at most 1")


_CHECKS: dict[str, Callable[[object], Any]] = {
    "workers": _check_workers,
    "fills_per_user": _check_fills_per_user,
    "commit_interval": _check_commit_interval,
    "source_error": _check_source_error,
    "log_level": _check_log_level,
    "fill_timeout": _check_fill_timeout,
    "max_resident_bytes": _check_max_resident_bytes,
    "high_watermark": _check_watermark,
    "low_watermark": _check_watermark,
    "fill_ahead": _check_bool,
    "fill_ahead_max_size": _check_size,
    "fill_ahead_bytes": _check_size,
    "allow_suid": _check_bool,
    "allow_devices": _check_bool,
    "fetch_timeout": _check_fill_timeout,
    "fetch_retries": _check_fetch_retries,
    "fetch_connections": _check_fetch_connections,
    "fetch_part_size": _check_part_size,
    "refresh_interval": _check_refresh_interval,
    "netns": _check_netns,
    "route_watch": _check_bool,
}


@dataclass(frozen=True)
class Policy:
    """How one hsmfs mount's filler behaves. Field meanings, ranges and defaults: docs/config.md.

    Constructing one validates it (``Policy(workers=0)`` raises :class:`ConfigError`), so a
    Policy in hand is always a valid one, whether it came from a file or from code.
    """

    workers: int = 4
    fills_per_user: int = 0
    commit_interval: float = 0.5
    source_error: str = "EIO"
    log_level: str = "info"
    fill_timeout: float = 60.0
    max_resident_bytes: int = 0
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    fill_ahead: bool = True
    fill_ahead_max_size: int = 1 << 20
    fill_ahead_bytes: int = 64 << 20
    allow_suid: bool = False
    allow_devices: bool = False
    fetch_timeout: float = 10.0
    fetch_retries: int = 4
    fetch_connections: int = 16
    fetch_part_size: int = 8 << 20
    refresh_interval: float = 0.0
    netns: str = "host"
    route_watch: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                checked = _CHECKS[f.name](value)
            except _Invalid as e:
                raise ConfigError(f"{f.name}: {e}, got {_describe(value)}") from None
            object.__setattr__(self, f.name, checked)  # 1 -> 1.0 for float fields
        if self.low_watermark >= self.high_watermark:
            raise ConfigError(f"low_watermark: {LOW_BELOW_HIGH} ({self.high_watermark:g}), got {self.low_watermark:g}")

    @property
    def user_fills(self) -> int:
        """How many fill workers one user's reads may hold at once (fills_per_user; 0: workers - 1)."""
        return max(1, min(self.workers, self.fills_per_user or self.workers - 1))

    @property
    def source_errno(self) -> int:
        """source_error as an errno number, for the fanotify response."""
        return SOURCE_ERRORS[self.source_error]


KEYS = tuple(sorted(f.name for f in fields(Policy)))

_TABLE_HEADER = re.compile(r"^\s*\[")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)")


def _key_line(text: str, key: str) -> Optional[int]:
    """The 1-based line where top-level key is set, or None if it cannot be found simply."""
    name = "(?:" + "|".join(re.escape(k) for k in (key, f'"{key}"', f"'{key}'")) + ")"
    assignment = re.compile(rf"^\s*{name}\s*[=.]")  # `key = ...` or dotted `key.sub = ...`
    table = re.compile(rf"^\s*\[\[?\s*{name}\s*[\].]")  # `[key]`, `[[key]]`, `[key.sub]`
    in_root = True  # top-level keys all come before the first table header
    for number, line in enumerate(text.splitlines(), start=1):
        if _TABLE_HEADER.match(line):
            in_root = False
            if table.match(line):
                return number
        elif in_root and assignment.match(line):
            return number
    return None


def load_policy(path: Optional[str]) -> Policy:
    """Read and validate the policy file at path; None means all defaults.

    >>> load_policy(None) == Policy()
    True

    Raises :class:`ConfigError` (exit code 78) for a missing or unreadable file, bad TOML, an
    unknown key or a bad value; the message is ``FILE:LINE: KEY: what is wrong``.
    """
    if path is None:
        return Policy()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read policy file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{bad_line}: invalid TOML: not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib and tomli end their messages with "(at line N, column M)" or "(at end of document)"
        message = str(e)
        m = _TOML_POSITION.search(message)
        if m is not None:
            message = message[: m.start()] + message[m.end() :]
            raise ConfigError(f"{path}:{m.group(1)}:{m.group(2)}: invalid TOML: {message}") from None
        m = _TOML_AT_END.search(message)
        if m is not None:
            message = message[: m.start()] + " at end of file" + message[m.end() :]
            raise ConfigError(f"{path}:{max(1, len(text.splitlines()))}: invalid TOML: {message}") from None
        raise ConfigError(f"{path}: invalid TOML: {message}") from None

    problems: list[tuple[int, str]] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        line = _key_line(text, key)
        where = f"{path}:{line}" if line is not None else path
        check = _CHECKS.get(key)
        if check is None:
            problems.append((line or 0, f"{where}: {key}: unknown key (known: {', '.join(KEYS)})"))
            continue
        try:
            values[key] = check(value)
        except _Invalid as e:
            problems.append((line or 0, f"{where}: {key}: {e}, got {_describe(value)}"))
    low, high = values.get("low_watermark", Policy.low_watermark), values.get("high_watermark", Policy.high_watermark)
    if low >= high:
        key = "low_watermark" if "low_watermark" in values else "high_watermark"
        line = _key_line(text, key)
        where = f"{path}:{line}" if line is not None else path
        why = f"{LOW_BELOW_HIGH} ({high:g}), got {low:g}" if key == "low_watermark" else \
            f"must be above low_watermark ({low:g}), got {high:g}"
        problems.append((line or 0, f"{where}: {key}: {why}"))
    if problems:
        # every mistake at once, in file order, one per line
        raise ConfigError("\n".join(message for _, message in sorted(problems)))
    return Policy(**values)
