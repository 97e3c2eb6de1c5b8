"""File handles: name an inode durably across processes (name_to_handle_at, open_by_handle_at)."""

from __future__ import annotations

import ctypes
import os

from hsmfs.linux import check, libc

AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128

libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_int]
libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def handle_of(fd: int) -> tuple[int, bytes]:
    """(handle_type, handle bytes) of the inode behind fd."""
    fh = _FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    check(libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH),
          "name_to_handle_at")
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def open_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """Open the inode named by a handle on the filesystem of mount_fd (needs CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle(len(handle), handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    return check(libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC), "open_by_handle_at")


def handle_at(dirfd: int, name: str) -> tuple[int, bytes]:
    """(handle_type, handle bytes) of name in directory dirfd (or a path, with dirfd AT_FDCWD); a
    symlink is not followed. No open: naming a file this way raises no fanotify event."""
    fh = _FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    check(libc.name_to_handle_at(dirfd, os.fsencode(name), ctypes.byref(fh), ctypes.byref(mount_id), 0),
          f"name_to_handle_at {name}")
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])
