"""Typed wrappers for the Linux interfaces hsmfs needs; the only package that imports ctypes.

Constants carry the header they come from. x86_64 syscall numbers are used where glibc 2.36 has no
wrapper (fanotify_mark has one, open_tree/move_mount do not).
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(result: int, what: str) -> int:
    """Raise OSError with errno if a libc call returned a negative value."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
