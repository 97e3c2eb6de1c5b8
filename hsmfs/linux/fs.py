"""Filesystem-level calls: statfs type, syncfs, openat2, hole punching, leases, shutdown."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import threading
from typing import NamedTuple

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
# docs/kernel.md#k2: only these opt in to pre-content marks (FS_ALLOW_HSM)
HSM_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs"})


libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
libc.syncfs.argtypes = [ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# include/uapi/asm-generic/fcntl.h (F_LINUX_SPECIFIC_BASE + 0) and the lock types of fcntl(2)
F_SETLEASE = 1024
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2


def fs_type(path: str) -> str:
    """Name of the filesystem holding path ('ext4', 'tmpfs', ..., or 'unknown (0x...)')."""
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86_64; f_type comes first
    check(libc.statfs(os.fsencode(path), buf), f"statfs {path}")
    magic = int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF
    return FS_MAGIC.get(magic, f"unknown (0x{magic:x})")


def syncfs(fd: int) -> None:
    """Flush every dirty page and the journal of the filesystem holding fd."""
    check(libc.syncfs(fd), "syncfs")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset+length) of fd; the size stays, the range reads as a hole."""
    if length > 0:
        check(libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length), "fallocate punch")


def take_write_lease(fd: int) -> bool:
    """F_SETLEASE F_WRLCK: True if granted, False if anyone else has the file open or mapped.

    While it is held a new open of the file by anyone else blocks (the holder gets SIGIO, which
    hsmfs ignores) until the lease is released by closing fd or :func:`release_lease`. It detects
    fds, mmaps whose fd was closed and running binaries (docs/kernel.md#k10).
    """
    try:
        fcntl.fcntl(fd, F_SETLEASE, F_WRLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        raise
    return True


def release_lease(fd: int) -> None:
    fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)


# statx(2): include/uapi/linux/stat.h (struct statx, STATX_*), include/uapi/linux/fcntl.h (AT_*)
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
STATX_BASIC_STATS = 0x7FF
STATX_MNT_ID = 0x1000
STATX_ATTR_MOUNT_ROOT = 0x2000
# mask blksize attributes nlink uid gid mode (pad) ino size blocks attributes_mask, then the atime,
# btime, ctime and mtime timestamps (s64 sec, u32 nsec, pad), rdev, dev (major, minor each), mnt_id
_STATX = struct.Struct("<IIQIIIH2xQQQQ" + "qI4x" * 4 + "IIIIQ")
_STATX_SIZE = 256

libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]


class Statx(NamedTuple):
    """What hsmfs reads of a statx(2) result: lstat's fields plus the mount the file is on."""

    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int  # as os.stat's st_dev
    rdev: int
    mnt_id: int  # the mount the path led to: a mount point's is that of the mount on it
    mount_root: bool  # the file is the root of a mount (STATX_ATTR_MOUNT_ROOT)


_local = threading.local()


def _buffer() -> ctypes.Array[ctypes.c_char]:
    """This thread's statx buffer: allocating one per call cost a third of the call."""
    try:
        buf: ctypes.Array[ctypes.c_char] = _local.statx
    except AttributeError:
        buf = _local.statx = ctypes.create_string_buffer(_STATX_SIZE)
    return buf


def statx(dirfd: int, name: str, *, follow: bool = False) -> Statx:
    """statx(dirfd, name) (name "" for dirfd itself); never follows a last symlink unless follow, never automounts."""
    buf = _buffer()
    raw = os.fsencode(name)
    flags = AT_NO_AUTOMOUNT | (0 if follow else AT_SYMLINK_NOFOLLOW) | (0 if raw else AT_EMPTY_PATH)
    check(libc.statx(dirfd, raw, flags, STATX_BASIC_STATS | STATX_MNT_ID, buf), f"statx {name}")
    (mask, _blksize, attributes, nlink, uid, gid, mode, ino, size, _blocks, attributes_mask,
     a_s, a_ns, _b_s, _b_ns, c_s, c_ns, m_s, m_ns, r_maj, r_min, d_maj, d_min, mnt_id) = _STATX.unpack_from(buf)
    if not mask & STATX_MNT_ID:  # Linux < 5.8: hsmfs needs 6.14 anyway
        raise OSError(errno.ENOSYS, "statx: this kernel reports no mount id")
    return Statx(mode, nlink, uid, gid, size, a_s * 10**9 + a_ns, m_s * 10**9 + m_ns, c_s * 10**9 + c_ns, ino,
                 os.makedev(d_maj, d_min), os.makedev(r_maj, r_min), mnt_id,
                 bool(attributes & attributes_mask & STATX_ATTR_MOUNT_ROOT))


# openat2(2): x86_64 syscall 437; include/uapi/linux/openat2.h
NR_openat2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_PATH_CHUNK = 3072  # bytes of a path per openat2: PATH_MAX (4096) bounds one call, not a tree's depth


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) of path relative to dirfd (AT_FDCWD: -100) with O_CLOEXEC added."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    return check(
        libc.syscall(NR_openat2, ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                     ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))),
        f"open {path}",
    )


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """Open path relative to dirfd without leaving it, without following any symlink and without
    crossing a mount point.

    A source path can never escape the source root this way, whatever the tree's records say, nor
    reach into something mounted in the source after populate (which does not cross mount points).
    A path longer than PATH_MAX is opened a few thousand bytes at a time, each part beneath the
    directory the one before it opened.
    """
    resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
    raw = os.fsencode(path)
    fd = dirfd
    try:
        while len(raw) > _PATH_CHUNK:
            cut = raw.rfind(b"/", 0, _PATH_CHUNK)
            if cut <= 0:
                raise OSError(errno.ENAMETOOLONG, f"open {path}: {os.strerror(errno.ENAMETOOLONG)}")
            part = openat2(fd, os.fsdecode(raw[:cut]), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, resolve)
            if fd != dirfd:
                os.close(fd)
            fd, raw = part, raw[cut + 1:]
        return openat2(fd, os.fsdecode(raw), flags | os.O_NOFOLLOW, resolve)
    finally:
        if fd != dirfd:
            os.close(fd)


# Shutting a filesystem down as a power cut would (crash tests, docs/kernel.md#k17).
# asm-generic/ioctl.h: _IOR(type, nr, size) = READ << 30 | size << 16 | type << 8 | nr
_IOC_READ = 2


def _ior(kind: str, nr: int, size: int) -> int:
    return (_IOC_READ << 30) | (size << 16) | (ord(kind) << 8) | nr


# One number for all three: ext4 EXT4_IOC_SHUTDOWN (include/uapi/linux/ext4.h), xfs XFS_IOC_GOINGDOWN
# (fs/xfs/libxfs/xfs_fs.h) and btrfs BTRFS_IOC_SHUTDOWN (include/uapi/linux/btrfs.h, 6.17+), each
# _IOR('X', 125, __u32) = 0x8004587d. The flag values agree too: EXT4_GOING_FLAGS_*,
# XFS_FSOP_GOING_FLAGS_*, BTRFS_SHUTDOWN_FLAGS_* (DEFAULT 0 freezes and syncs first, unlike a power cut).
FS_IOC_SHUTDOWN = _ior("X", 125, 4)
SHUTDOWN_LOGFLUSH = 1  # commit the journal/log, then stop: as if the power failed right after a commit
SHUTDOWN_NOLOGFLUSH = 2  # stop now: what the journal did not commit is lost, as in a power cut
SHUTDOWN_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs"})

libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


def fs_type_of_fd(fd: int) -> str:
    """Name of the filesystem holding the open file fd (see fs_type)."""
    buf = ctypes.create_string_buffer(128)
    check(libc.fstatfs(fd, buf), "fstatfs")
    magic = int.from_bytes(buf.raw[:8], "little") & 0xFFFFFFFF
    return FS_MAGIC.get(magic, f"unknown (0x{magic:x})")


def shutdown(fd: int, *, flush_log: bool = False) -> None:
    """Shut down the filesystem holding fd at once, as a power cut would (root only).

    Every later operation on it fails with EIO; unmount it and mount it again to replay its journal.
    Without flush_log, what the journal has not committed yet is lost; with it, the journal is
    committed first. ext4 and xfs have the ioctl; btrfs only in kernels built with
    CONFIG_BTRFS_EXPERIMENTAL (6.17+): elsewhere it raises OSError ENOTTY, and other filesystems
    raise EOPNOTSUPP (f2fs shares the number with different flags, so it is refused by name).
    """
    kind = fs_type_of_fd(fd)
    if kind not in SHUTDOWN_FILESYSTEMS:
        raise OSError(errno.EOPNOTSUPP, f"shutdown: {kind} has no shutdown ioctl hsmfs knows")
    flags = SHUTDOWN_LOGFLUSH if flush_log else SHUTDOWN_NOLOGFLUSH
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("=I", flags))
    except OSError as e:
        why = " (this kernel's btrfs was built without CONFIG_BTRFS_EXPERIMENTAL)" \
            if kind == "btrfs" and e.errno == errno.ENOTTY else ""
        raise OSError(e.errno, f"shutdown of {kind}: {e.strerror}{why}") from None


def shutdown_supported(fd: int) -> bool:
    """Whether the filesystem holding fd has the shutdown ioctl, without shutting it down.

    Asks with the first invalid flag value (3): ext4, xfs and btrfs check the flags before doing
    anything and answer EINVAL; a filesystem or kernel without the ioctl answers ENOTTY.
    """
    if fs_type_of_fd(fd) not in SHUTDOWN_FILESYSTEMS:
        return False
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("=I", SHUTDOWN_NOLOGFLUSH + 1))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return True
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            return False
        raise
    raise OSError(errno.EIO, "shutdown ioctl accepted an invalid flag: the filesystem may be shut down")
