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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, sig: int = 9) -> None:
    """Have the kernel send sig to this process when its parent thread ends (prctl
    PR_SET_PDEATHSIG), instead of polling getppid(); exit at once if parent is gone already."""
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    check(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)
