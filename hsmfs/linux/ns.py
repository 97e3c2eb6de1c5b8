"""Namespaces: name one without a race, ask what kind it is and which user namespace owns it.

ioctl numbers from include/uapi/linux/nsfs.h (NSIO 0xb7) and include/uapi/linux/pidfd.h
(PIDFS_IOCTL_MAGIC 0xff), both _IO(type, nr) = type << 8 | nr.
"""

from __future__ import annotations

import errno
import fcntl
import os

from hsmfs.linux.mount import CLONE_NEWNS

NS_GET_USERNS = 0xB701  # an fd of the user namespace that owns the namespace fd refers to
NS_GET_NSTYPE = 0xB703  # the CLONE_NEW* type of the namespace fd refers to
PIDFD_GET_MNT_NAMESPACE = 0xFF03  # Linux 6.11+: the mount namespace of a pidfd's process
PIDFD_GET_NET_NAMESPACE = 0xFF04  # Linux 6.11+: its network namespace
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


def mount_ns_of_pid(pid: int) -> int:
    """An fd of the mount namespace of process pid, taken through a pidfd.

    The pidfd names the process itself, not its number: if pid exits and the number is reused
    between the lookup and the ioctl, the ioctl fails (ESRCH) instead of naming the newcomer's
    namespace.
    """
    pidfd = os.pidfd_open(pid)
    try:
        return fcntl.ioctl(pidfd, PIDFD_GET_MNT_NAMESPACE)
    finally:
        os.close(pidfd)


def net_ns_of_pid(pid: int) -> int:
    """An fd of the network namespace of process pid, taken through a pidfd (see mount_ns_of_pid)."""
    pidfd = os.pidfd_open(pid)
    try:
        return fcntl.ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)
    finally:
        os.close(pidfd)


def is_net_ns(fd: int) -> bool:
    try:
        return ns_type(fd) == CLONE_NEWNET
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            return False
        raise


def ns_type(fd: int) -> int:
    """CLONE_NEWNS, CLONE_NEWNET, ... for a namespace fd; OSError ENOTTY for any other file."""
    return fcntl.ioctl(fd, NS_GET_NSTYPE)


def is_mount_ns(fd: int) -> bool:
    try:
        return ns_type(fd) == CLONE_NEWNS
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            return False
        raise


def owner_userns_inode(fd: int) -> int:
    """The inode number of the user namespace that owns the namespace fd refers to."""
    u = fcntl.ioctl(fd, NS_GET_USERNS)
    try:
        return os.fstat(u).st_ino
    finally:
        os.close(u)
