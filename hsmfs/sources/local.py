"""A local directory as a source.

Every object is opened beneath the source root without following any symlink (openat2
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``), first as ``O_PATH`` so that nothing about opening it can
act: a FIFO that would block, a device that would do something on open, a lease that would stall
us for the lease-break time. Only a regular file that is still the object the stub was made from
(its inode number and ctime, which its owner cannot set, besides size and mtime) is then opened
for reading, non-blocking, through that O_PATH fd.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Optional

from hsmfs.linux.fs import open_beneath
from hsmfs.sources import SourceError
from hsmfs.tree import Record
from hsmfs.trust import same_source, source_identity

CHUNK = 1 << 20
_NO_COPY_FILE_RANGE = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


class LocalFile:
    def __init__(self, fd: int, st: os.stat_result, source: LocalSource) -> None:
        self.fd = fd
        self.st = st
        self.source = source

    def data_regions(self) -> list[tuple[int, int]]:
        size = self.st.st_size
        if size == 0:
            return []
        if self.st.st_blocks * 512 >= size:  # fully allocated: no hole to look for
            return [(0, size)]
        return data_regions(self.fd, size)

    def copy_to(self, dst_fd: int, start: int, end: int) -> None:
        self.source.copy(self.fd, dst_fd, start, end, src_dev=self.st.st_dev)

    def same(self, dst_fd: int, start: int, end: int) -> bool:
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            if os.pread(dst_fd, n, pos) != os.pread(self.fd, n, pos):
                return False
            pos += n
        return True

    def verify(self, dst_fd: int) -> None:
        pass  # the object was checked at open (inode, ctime, size, mtime) and copied by the kernel

    def close(self) -> None:
        os.close(self.fd)


class LocalSource:
    """Reads objects beneath one directory, never following symlinks out of it.

    ``quick``: a fill takes about as long as reading the file from a local disk, so the filler
    may fill a small file in its event reader instead of handing it to a worker thread.

    identity: (st_dev, st_ino, f_fsid) the root must have (the store's record, hsmfs.trust). A root
    replaced since the store was built is never read from: every open fails (ESTALE), so each fill
    fails with the policy's error and says why, and the filler still answers every reader.
    """

    quick = True

    def __init__(self, root: str, *, identity: Optional[tuple[int, int, int]] = None) -> None:
        self.root = os.path.abspath(root)
        self._rootfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._replaced = identity is not None and not same_source(identity, source_identity(self._rootfd))
        if self._replaced:
            os.close(self._rootfd)
            self._rootfd = -1
        self._no_cfr: set[int] = set()  # source devs whose files copy_file_range refused to copy to the store

    def describe(self) -> str:
        return self.root

    def open(self, rel: str, rec: Record) -> LocalFile:
        if self._replaced:
            raise SourceError(f"the source root {self.root} is not the directory the store was built from "
                              "(replaced?)", errno.ESTALE)
        try:
            pfd = open_beneath(self._rootfd, rel, os.O_PATH)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise SourceError("source file is gone", e.errno) from None
            if e.errno in (errno.ELOOP, errno.EXDEV):
                raise SourceError("source path now goes through a symlink", e.errno) from None
            raise SourceError(f"cannot open the source file: {e.strerror}", e.errno or 0) from None
        try:
            st = os.fstat(pfd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError("source path is no longer a regular file")
            why = rec.same_object(st)
            if why is not None:
                raise SourceError(why)
            try:
                fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise SourceError("another process holds a lease on the source file", e.errno) from None
                raise SourceError(f"cannot open the source file: {e.strerror}", e.errno or 0) from None
        finally:
            os.close(pfd)
        return LocalFile(fd, st, self)  # the same inode: reopened through its own O_PATH fd

    def copy(self, src_fd: int, dst_fd: int, start: int, end: int, *, src_dev: int = -1) -> None:
        """[start, end) of src_fd into dst_fd at the same offsets, in the kernel.

        copy_file_range reflinks where both files share a btrfs/xfs filesystem; across filesystems
        (EXDEV), sendfile copies without passing the bytes through Python. A source filesystem
        whose copy_file_range to the store was refused once is not asked again (a source object
        serves one store).
        """
        off = start
        if src_dev not in self._no_cfr:
            try:
                while off < end:
                    n = os.copy_file_range(src_fd, dst_fd, end - off, off, off)
                    if n == 0:
                        raise OSError(errno.EIO, f"source ended at {off} bytes, expected {end}")
                    off += n
                return
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE:
                    raise
                if src_dev != -1:  # one store per source object: its filesystem pairs are known then
                    self._no_cfr.add(src_dev)
        while off < end:
            os.lseek(dst_fd, off, os.SEEK_SET)
            n = os.sendfile(dst_fd, src_fd, off, min(end - off, 1 << 30))
            if n == 0:
                raise OSError(errno.EIO, f"source ended at {off} bytes, expected {end}")
            off += n

    def close(self) -> None:
        if self._rootfd >= 0:
            os.close(self._rootfd)


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of data (non-hole) regions of fd below size, by SEEK_DATA/SEEK_HOLE."""
    regions = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end))
        pos = end
    return regions
