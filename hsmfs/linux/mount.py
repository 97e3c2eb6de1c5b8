"""The new mount API (open_tree, move_mount), umount2 and namespace calls."""

from __future__ import annotations

import ctypes
import os

from hsmfs.linux import check, libc

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl); glibc 2.36 has no wrappers
NR_open_tree = 428
NR_move_mount = 429

# include/uapi/linux/mount.h
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_FDCWD = -100
AT_RECURSIVE = 0x8000

# include/linux/fs.h (umount2 flags)
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

CLONE_NEWNS = 0x00020000

libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def open_tree_clone(path: str) -> int:
    """A detached clone of the mount at path (an O_PATH fd to its root)."""
    return check(
        libc.syscall(NR_open_tree, ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
                     ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)),
        "open_tree",
    )


def move_mount_to_fd(from_fd: int, to_fd: int) -> None:
    """Attach the detached mount from_fd on the directory to_fd (an O_PATH fd) itself, wherever it is
    now: no path is looked up, so nothing can redirect the mount between a check and the move."""
    check(
        libc.syscall(NR_move_mount, ctypes.c_int(from_fd), ctypes.c_char_p(b""), ctypes.c_int(to_fd),
                     ctypes.c_char_p(b""), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)),
        "move_mount",
    )


def umount(path: str, *, lazy: bool = False) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    check(libc.umount2(os.fsencode(path), flags), "umount2")


def setns(fd: int, nstype: int = CLONE_NEWNS) -> None:
    """setns(2). CLONE_NEWNS needs a single-threaded caller (EINVAL otherwise)."""
    check(libc.setns(fd, nstype), "setns")


# mount_setattr(2): x86_64 syscall 442; include/uapi/linux/mount.h
NR_mount_setattr = 442
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70  # the atime bits: clear them to set one of the below
MOUNT_ATTR_STRICTATIME = 0x20


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0) -> None:
    """Set and clear mount attributes (MOUNT_ATTR_*) on the mount fd refers to (an open_tree fd)."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    check(libc.syscall(NR_mount_setattr, ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_uint(AT_EMPTY_PATH),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")
