"""A local directory as a source."""

from __future__ import annotations

import errno
import os

from hsmfs.linux.fs import open_beneath


class LocalSource:
    """Reads objects beneath one directory, never following symlinks out of it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._rootfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def describe(self) -> str:
        return self.root

    def open(self, rel: str) -> int:
        """A read-only fd for the object rel, opened beneath the root without following symlinks."""
        return open_beneath(self._rootfd, rel, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._rootfd)


def copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    """Copy [start, end) from src_fd to the same offsets of dst_fd, in the kernel.

    copy_file_range reflinks where both files share a btrfs/xfs filesystem; across filesystems
    that refuse it (EXDEV), sendfile still copies without passing the bytes through Python.
    """
    off = start
    try:
        while off < end:
            n = os.copy_file_range(src_fd, dst_fd, end - off, off, off)
            if n == 0:
                raise OSError(errno.EIO, f"source ended at {off} bytes, expected {end}")
            off += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    while off < end:
        os.lseek(dst_fd, off, os.SEEK_SET)
        n = os.sendfile(dst_fd, src_fd, off, min(end - off, 1 << 30))
        if n == 0:
            raise OSError(errno.EIO, f"source ended at {off} bytes, expected {end}")
        off += n
