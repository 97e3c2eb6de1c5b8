"""Process capabilities, read from /proc (capabilities(7)); no capget(2) needed for a yes/no."""

from __future__ import annotations

# include/uapi/linux/capability.h
CAP_SYS_ADMIN = 21


def effective(status_path: str = "/proc/self/status") -> int:
    """The effective capability set (CapEff) as a bit mask."""
    with open(status_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split(":", 1)[1].strip(), 16)
    raise OSError(f"{status_path} has no CapEff line")


def has_effective(cap: int, status_path: str = "/proc/self/status") -> bool:
    """Whether capability number cap (e.g. CAP_SYS_ADMIN) is in the effective set."""
    return bool(effective(status_path) >> cap & 1)
