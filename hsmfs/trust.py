"""Who besides root can change where a path leads: the checks behind the store, the source root and
the target (docs/security.md).

hsmfs runs as root; a path it is given is only as trustworthy as every directory on the way to it.
Whoever can write to one of them (or owns it, and so can make it writable) can rename what is
below it and put a symlink or another directory in its place: a store they prepared, a source
root that is now root's private directory, a target that is now ``/etc/cron.d``.

A directory on the way is **safe** when it is owned by root and nobody else can write to it: no
write bit for others, unless the sticky bit is set (``/tmp``, ``/var/tmp``: others may add names
there but not rename or remove root's), no write bit for a group other than root's, and no POSIX
ACL entry that lets another user or group write. A symlink on the way is followed only when it is
owned by root (its own directory is checked like any other).

:func:`weaknesses` lists what is not safe on the way to a path; :func:`check_store` refuses a store
with any; :func:`open_source_root` opens a store's source root and checks that it is still the
directory the store was built from (device and inode, recorded in ``hsmfs.json``).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from typing import Optional

from hsmfs import tree
from hsmfs.errors import CannotCreate, SourceMissing
from hsmfs.names import escape

ACL_ACCESS = "system.posix_acl_access"
# include/uapi/linux/posix_acl_xattr.h: a 4-byte header (version 2), then (tag u16, perm u16, id u32)
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
ACL_USER, ACL_GROUP, ACL_MASK = 0x02, 0x08, 0x10
ACL_WRITE = 0x02
MAX_SYMLINKS = 40  # as the kernel's path walk


@dataclass(frozen=True)
class Weakness:
    """A directory or symlink on the way to a path that someone other than root can change."""

    path: str
    why: str
    symlink: bool = False  # a symlink that is not root's, rather than a directory

    def __str__(self) -> str:
        return f"{escape(self.path)} ({self.why})"


def _acl_writers(path: str) -> list[str]:
    """Named users and groups other than root that the directory's access ACL lets write."""
    try:
        raw = os.getxattr(path, ACL_ACCESS, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return []
        raise
    entries = [_ACL_ENTRY.unpack_from(raw, off) for off in range(_ACL_HEADER.size, len(raw), _ACL_ENTRY.size)]
    mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), 0o7)
    return [f"{'uid' if tag == ACL_USER else 'gid'} {uid}" for tag, perm, uid in entries
            if tag in (ACL_USER, ACL_GROUP) and uid != 0 and perm & mask & ACL_WRITE]


def dir_weakness(path: str, st: os.stat_result) -> Optional[str]:
    """Why someone other than root can change the directory path (lstat st), or None if nobody can."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}"
    if mode & 0o002 and not mode & stat.S_ISVTX:
        return f"writable by everyone, mode {mode:04o} without the sticky bit"
    if mode & 0o020 and st.st_gid != 0:
        return f"writable by group {st.st_gid}, mode {mode:04o}"
    writers = _acl_writers(path)
    if writers:
        return f"writable by {', '.join(writers)} through its ACL"
    return None


def weaknesses(path: str, *, itself: bool = True) -> tuple[str, list[Weakness]]:
    """(the real path of what exists of path, what is unsafe on the way to it).

    Walks path from / one name at a time as the kernel would, following symlinks, and judges every
    directory it passes through (and, with itself, the last one) and every symlink it follows.
    Without itself, the last name is judged only by who may replace it: in a sticky directory
    others may write to (the one exception above), its owner may. The part of path that does not
    exist yet is left out: whoever makes it decides its owner.
    """
    todo = [p for p in reversed(os.path.abspath(path).split("/")) if p]
    found: list[Weakness] = []
    why = dir_weakness("/", os.lstat("/")) if todo or itself else None
    if why:
        found.append(Weakness("/", why))
    cur = "/"
    hops = 0
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except (FileNotFoundError, NotADirectoryError):
            break
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, f"{path}: {os.strerror(errno.ELOOP)}")
            if st.st_uid != 0:
                found.append(Weakness(nxt, f"a symlink owned by uid {st.st_uid}", symlink=True))
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = "/"
            todo += [p for p in reversed(target.split("/")) if p]
            continue
        parent, cur = cur, nxt
        if stat.S_ISDIR(st.st_mode) and (todo or itself):
            why = dir_weakness(nxt, st)
            if why:
                found.append(Weakness(nxt, why))
        elif not todo and st.st_uid != 0:
            # the last name, not judged itself; in a sticky directory others may write to, its owner
            # may still rename it and put another in its place
            pmode = os.lstat(parent).st_mode
            if pmode & 0o002 and pmode & stat.S_ISVTX:
                found.append(Weakness(nxt, f"owned by uid {st.st_uid} in the sticky directory {escape(parent)}, "
                                      "where the owner of a name may replace it"))
    return cur, found


class UnsafeStore(CannotCreate):
    """The store could be changed by someone other than root (exit 73, EX_CANTCREAT)."""


class SourceReplaced(SourceMissing):
    """The source root is not the directory the store was built from (exit 66, EX_NOINPUT)."""


def check_store(store: str) -> None:
    """Refuse a store (existing or to be made) that anyone but root could change or prepare.

    A store's hsmfs.json and paths say which source file a stub is filled from: whoever can
    rewrite them reads any file root can (issue 11, item 7).
    """
    _real, weak = weaknesses(store)
    if weak:
        raise UnsafeStore(f"store {escape(store)} is not root's alone: " + "; ".join(map(str, weak)),
                          hint="put the store where only root can change it and the directories above it "
                          "(the default /var/lib/hsmfs/NAME is), or make them so: chown root:root DIR && "
                          "chmod go-w DIR")
    if os.path.isdir(store):
        # (the tree's root directory is the source root's copy: its owner and mode are the source's;
        # the store's 0700 keeps users out of it)
        for name in ("hsmfs.json", "paths"):
            path = os.path.join(store, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                raise UnsafeStore(f"store {escape(store)}: {name} is not a regular file owned by root "
                                  f"(uid {st.st_uid}, mode {st.st_mode:o})",
                                  hint="someone else prepared or changed this store: remove it and mount again")


def source_identity(fd: int) -> tuple[int, int, int]:
    """(st_dev, st_ino, f_fsid) of the open directory fd."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, os.fstatvfs(fd).f_fsid


def same_source(recorded: tuple[int, int, int], now: tuple[int, int, int]) -> bool:
    """Whether now is the directory recorded: the same inode on the same filesystem.

    The filesystem is the same if its device number is (st_dev), or its f_fsid is when that is not
    0: a disk that comes back under another device number after a reboot keeps its ext4 or btrfs
    f_fsid (from the filesystem's UUID).
    """
    dev, ino, fsid = recorded
    return ino == now[1] and (dev == now[0] or (fsid != 0 and fsid == now[2]))


def open_source_root(store: tree.Store) -> int:
    """An fd of store's source root, checked against the identity hsmfs.json records.

    A store made before the identity was recorded gets it now (the caller saves the store).
    Raises :class:`SourceReplaced` if the root is another directory than the store was built
    from: a user who could rename it may have put a symlink to a directory only root can read in
    its place, whose files the stubs would then be filled from.
    """
    try:
        fd = os.open(store.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceMissing(f"source {escape(store.source)} cannot be opened: {e.strerror}",
                            hint="give an existing directory as SOURCE") from None
    try:
        now = source_identity(fd)
        if store.source_id is None:
            store.source_id = now
        elif not same_source(store.source_id, now):
            dev, ino, _ = store.source_id
            raise SourceReplaced(
                f"source {escape(store.source)} is not the directory store {escape(store.path)} was built from "
                f"(it was inode {ino} on device {os.major(dev)}:{os.minor(dev)}, it is inode {now[1]} on device "
                f"{os.major(now[0])}:{os.minor(now[0])}): someone may have replaced it, or a symlink on its path",
                hint="if you moved the source on purpose, remove the store (rm -rf STORE) and mount again; it is "
                "built anew")
        return fd
    except BaseException:
        os.close(fd)
        raise
