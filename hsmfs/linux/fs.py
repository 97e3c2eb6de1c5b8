"""Filesystem-level calls: statfs type, syncfs, reflink clone."""

from __future__ import annotations

import ctypes
import fcntl
import os

from hsmfs.linux import check, libc

# include/uapi/linux/magic.h
FS_MAGIC = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x794C7630: "overlayfs",
    0x65735546: "fuse",
    0x73717368: "squashfs",
    0xE0F5E1E2: "erofs",
    0x6969: "nfs",
}
# kernel-facts §2: only these opt in to pre-content marks (FS_ALLOW_HSM)
HSM_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs"})

FICLONE = 0x40049409  # include/uapi/linux/fs.h: _IOW(0x94, 9, int)

libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
libc.syncfs.argtypes = [ctypes.c_int]


def fs_type(path: str) -> str:
    """Name of the filesystem holding path ('ext4', 'tmpfs', ..., or 'unknown (0x...)')."""
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86_64; f_type comes first
    check(libc.statfs(os.fsencode(path), buf), f"statfs {path}")
    magic = int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF
    return FS_MAGIC.get(magic, f"unknown (0x{magic:x})")


def syncfs(fd: int) -> None:
    """Flush every dirty page and the journal of the filesystem holding fd."""
    check(libc.syncfs(fd), "syncfs")


def clone_file(src_fd: int, dst_fd: int) -> None:
    """Share src's extents with dst (reflink); OSError EXDEV/EOPNOTSUPP/EINVAL where impossible."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


# openat2(2): x86_64 syscall 437; include/uapi/linux/openat2.h
NR_openat2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """Open path relative to dirfd without leaving it and without following any symlink.

    A source path can never escape the source root this way, whatever the tree's records say.
    """
    how = _OpenHow(flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    return check(
        libc.syscall(NR_openat2, ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                     ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))),
        f"open {path}",
    )
