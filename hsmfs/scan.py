"""A local tree read as a list of entries: what ``hsmfs publish`` publishes and ``hsmfs refresh`` of a
local source compares the stub tree with.

Directories are opened relative to their parent's fd by name with ``O_NOFOLLOW | O_DIRECTORY`` (no
path is walked, no symlink followed); mount points below the root are not crossed (as populate,
they show as empty directories); names that vanish while the scan runs are left out. Entries come
sorted by path bytes, parents first (manifest order).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from hsmfs.errors import SourceMissing
from hsmfs.names import escape

log = logging.getLogger("hsmfs.scan")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_COPIED = ("system.posix_acl_access", "system.posix_acl_default")


@dataclass(frozen=True)
class Found:
    path: str  # relative to the root, "" for the root
    st: os.stat_result
    xattrs: tuple[tuple[str, bytes], ...] = ()
    target: str = ""  # a symlink's
    first: str = ""  # for the second and later names of a hardlinked file: its first name


def _xattrs(target: int | str) -> tuple[tuple[str, bytes], ...]:
    follow = isinstance(target, int)
    out = []
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOENT):
            return ()
        raise
    for name in sorted(names):
        if name.startswith("user.") or name in _COPIED:
            try:
                out.append((name, os.getxattr(target, name, follow_symlinks=follow)))
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
    return tuple(out)


def scan(root: str) -> list[Found]:
    """Every entry below root (and root itself, path ""), sorted by path bytes."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceMissing(f"source {escape(root)} cannot be read: {e.strerror}",
                            hint="give an existing, readable directory") from None
    out: list[Found] = []
    first: dict[tuple[int, int], str] = {}
    try:
        st = os.fstat(fd)
        out.append(Found("", st, _xattrs(fd)))
        out.extend(_walk(fd, "", st.st_dev, first))
    finally:
        os.close(fd)
    out.sort(key=lambda f: f.path.encode("utf-8", "surrogateescape"))
    # the first name of a hardlinked inode is the first in manifest order
    byino: dict[tuple[int, int], str] = {}
    fixed = []
    for f in out:
        if f.first or (stat.S_ISREG(f.st.st_mode) and f.st.st_nlink > 1):
            key = (f.st.st_dev, f.st.st_ino)
            if key in byino:
                fixed.append(Found(f.path, f.st, f.xattrs, f.target, byino[key]))
                continue
            byino[key] = f.path
            fixed.append(Found(f.path, f.st, f.xattrs, f.target))
            continue
        fixed.append(f)
    return fixed


def _walk(dfd: int, rel: str, dev: int, first: dict[tuple[int, int], str]) -> Iterator[Found]:
    try:
        names = sorted(os.listdir(dfd))
    except OSError as e:
        raise SourceMissing(f"cannot list {escape(rel or '.')} in the source: {e.strerror}") from None
    for name in names:
        path = f"{rel}/{name}" if rel else name
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != dev:
                log.warning("left out what is mounted on %s: mount points are not crossed", escape(path))
                yield Found(path, st)
                continue
            try:
                sub = os.open(name, _DIR, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue
                raise
            try:
                yield Found(path, os.fstat(sub), _xattrs(sub))
                yield from _walk(sub, path, dev, first)
            finally:
                os.close(sub)
        elif stat.S_ISLNK(st.st_mode):
            try:
                yield Found(path, st, target=os.readlink(name, dir_fd=dfd))
            except OSError:
                continue
        elif stat.S_ISREG(st.st_mode):
            yield Found(path, st, _xattrs(f"/proc/self/fd/{dfd}/{name}"))
        else:
            yield Found(path, st)  # fifos, sockets, devices: the caller decides
