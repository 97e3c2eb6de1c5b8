"""A local directory as a source."""

from __future__ import annotations

import errno
import os
from typing import Optional

from hsmfs.linux.fs import open_beneath
from hsmfs.trust import same_source, source_identity


class LocalSource:
    """Reads objects beneath one directory, never following symlinks out of it.

    identity: (st_dev, st_ino, f_fsid) the root must have (the store's record, hsmfs.trust). A root
    replaced since the store was built is never read from: every open fails (ESTALE), so each fill
    fails with the policy's error and says why, and the filler still answers every reader.
    """

    def __init__(self, root: str, *, identity: Optional[tuple[int, int, int]] = None) -> None:
        self.root = os.path.abspath(root)
        self._rootfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._replaced = identity is not None and not same_source(identity, source_identity(self._rootfd))
        if self._replaced:
            os.close(self._rootfd)
            self._rootfd = -1

    def describe(self) -> str:
        return self.root

    def open(self, rel: str) -> int:
        """A read-only fd for the object rel, opened beneath the root without following symlinks."""
        if self._replaced:
            raise OSError(errno.ESTALE, f"the source root {self.root} is not the directory the store was built "
                          "from (replaced?)")
        return open_beneath(self._rootfd, rel, os.O_RDONLY)

    def close(self) -> None:
        if self._rootfd >= 0:
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
