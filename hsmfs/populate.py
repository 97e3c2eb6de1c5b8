"""Source directory -> stub tree.

:func:`populate` mirrors a local source directory into ``store.tree``: every directory, regular file,
symlink, hardlink, fifo, socket and device node, with its mode, owner, times, ``user.*`` xattrs and
POSIX ACLs. Regular files become *stubs*: sparse files of the source's size (no data blocks) carrying
the ``trusted.hsmfs`` record, whose source path is in ``STORE/paths`` (see :mod:`hsmfs.tree`).

The steps:

1. **Scan** the source (directory fds, ``lstat``, xattrs and link targets of each name, never
   following symlinks, each directory's names sorted). The scan is the only step that reads the
   source: the total is known after it, and the walk order, which decides the first name of each
   hardlinked inode, is the same on every run.
2. **Directories** are made under their final names, mode 0700, parents first. Those an earlier run
   made are listed, and its leftover temporaries removed.
3. **Paths** of the stubs to make are appended to ``STORE/paths`` in one go and synced, so no stub
   that reaches its final name can point past the table's durable end.
4. **Entries** (all but directories and the second names of hardlinks) are made under a temporary
   name (:data:`hsmfs.tree.TMP_PREFIX`) in their directory, fully set up (size, owner, xattrs, ACLs,
   record, mode, times), then renamed into place: a name in the tree is always a complete entry.
   Two processes share this step (see :func:`_run`).
5. **Hardlinks**: the other names of an inode are linked to its first name.
6. **Directory metadata** (owner, xattrs, ACLs, mode, times) once nothing will be added to them,
   so their mtimes stay the source's.
7. ``syncfs`` of the tree, then ``populated: true`` is saved in ``hsmfs.json``.

The source belongs to its users, who may change it while populate reads it (docs/security.md):

- **No path walks.** Every source directory is opened relative to its parent's fd, one name at a
  time, with ``O_NOFOLLOW|O_DIRECTORY``, and must be the very directory its parent listed (device
  and inode) on the source root's mount. Names, metadata, xattrs, ACLs and link targets are read
  relative to those fds, one name deep. A directory swapped for a symlink (or for another
  directory) mid-scan is left out, never followed; paths longer than ``PATH_MAX`` work
  (:class:`_Walker`; the stub tree is made through directory fds too).
- **Mount points are not crossed.** A directory on which something is mounted is shown as an empty
  directory with the mounted directory's owner, mode and times (as ``rsync -x`` does), and a file
  with something mounted on it is left out; both are logged. A submount may be nosuid or nodev,
  and its setuid binaries and devices must not reach a view that is not.
- **Entries that vanish are skipped.** A name that is gone, or is no longer a directory, when the
  scan comes to it (a temporary file in a 1777 directory) is logged and counted
  (``PopulateStats.vanished``), and populate goes on. One that vanishes after the scan still gets
  its stub: populate does not follow changes, and a fill of it fails (EIO) like that of any file
  the source lost.

Resuming: a run that was interrupted (SIGKILL, power cut) is finished by running populate again.
Names already in the tree are kept as they are, leftover temporaries are removed, missing entries
and hardlink names are made, directory metadata is applied again. Populate completes a tree; it does
not follow changes of the source: kept entries are not compared with it, and names the source lost
stay in the tree.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import stat
import struct
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, NoReturn, Optional

from hsmfs import tree
from hsmfs.errors import CannotCreate, HsmfsError, SourceMissing
from hsmfs.linux import die_with_parent
from hsmfs.linux.fs import Statx, statx, syncfs
from hsmfs.names import escape
from hsmfs.trust import SourceReplaced, same_source, source_identity

log = logging.getLogger("hsmfs.populate")

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"

WORKERS = 2  # processes making entries, at most one per CPU; see _run
_CHUNK = 128  # entries per job: small enough to share the work and report progress, large enough to be cheap
_PROGRESS_INTERVAL = 0.1  # seconds
_PATHS_BUFFER = 1 << 20  # bytes per write to STORE/paths
_MAX_HELD = 256  # directory fds a walker keeps open at most (a deeper tree reopens some ancestors)
_NAMED_SKIPS = 50  # skipped entries named in the log; the rest are counted only

_COUNTS = struct.Struct("<cQQ")  # b"C", created, kept: a worker's progress
_ERROR = struct.Struct("<cI")  # b"E", length of the JSON error that follows

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
# the name is gone, or is no longer what the scan saw (a directory became a symlink or a file)
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)

Xattrs = tuple[tuple[str, bytes], ...]
Job = Callable[[], tuple[int, int]]  # makes part of the tree, returns (created, kept)


@dataclass
class PopulateStats:
    """What the tree holds after populate, and what this run did.

    ``files``, ``symlinks`` and ``specials`` count inodes (a hardlinked file once), ``hardlinks``
    the extra names of those inodes, ``dirs`` the directories below the root, ``bytes`` the sizes
    of the regular files (each inode once). ``created`` counts the names this run made, ``kept``
    those an earlier run had made. ``vanished`` counts the names a directory listed that were gone
    (or a directory no longer) when the scan came to them: they are not in the tree.
    ``submounts`` counts the mount points left out (each an empty directory, or no name).
    """

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    bytes: int = 0
    created: int = 0
    kept: int = 0
    vanished: int = 0
    submounts: int = 0


class _Entry(NamedTuple):
    """What populate keeps of a source entry: its lstat (less than half of an os.stat_result's memory),
    its copied xattrs, its link target."""

    name: str
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    rdev: int
    dev: int  # with ino: which directory the parent listed, checked when it is opened
    ino: int
    ctime_ns: int  # with ino: the object a stub stands for (its record; docs/security.md)
    xattrs: Xattrs = ()
    target: str = ""  # a symlink's


def _entry(name: str, st: Statx | os.stat_result, xattrs: Xattrs = (), target: str = "") -> _Entry:
    if isinstance(st, os.stat_result):
        return _Entry(name, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_rdev,
                      st.st_dev, st.st_ino, st.st_ctime_ns, xattrs, target)
    return _Entry(name, st.mode, st.uid, st.gid, st.size, st.atime_ns, st.mtime_ns, st.rdev, st.dev, st.ino,
                  st.ctime_ns, xattrs, target)


class _Dir:
    """One source directory and its copy in the tree."""

    __slots__ = ("rel", "meta", "parent", "xattrs", "entries", "path_ids", "subdirs", "tmp_names", "existing",
                 "plain", "submount")

    def __init__(self, rel: str, meta: _Entry, parent: Optional[_Dir]) -> None:
        self.rel = rel  # relative to the source root, "" for the root itself
        self.meta = meta
        self.parent = parent
        self.xattrs: Xattrs = ()  # its own, read when the scan opened it
        self.entries: list[_Entry] = []  # made in step 4
        self.path_ids: list[int] = []  # STORE/paths offset of each regular file of entries to make
        self.subdirs: list[_Dir] = []
        self.tmp_names: frozenset[str] = frozenset()  # source names that look like our temporaries
        self.existing: frozenset[str] = frozenset()  # names an earlier run made
        # Made by this run in a plain parent: new entries get our uid and gid, the umask, no
        # inherited ACL. Otherwise (an earlier run's directory, maybe setgid or with a default ACL
        # already) every entry gets an explicit chown, chmod and ACL.
        self.plain = False
        self.submount = False  # a mount point of the source: an empty directory in the tree

    def child(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def chain(self) -> list[_Dir]:
        """The directories from the root down to this one."""
        out: list[_Dir] = []
        d: Optional[_Dir] = self
        while d is not None:
            out.append(d)
            d = d.parent
        out.reverse()
        return out


@dataclass
class _Link:
    dir: _Dir
    name: str
    first: str  # relative path of the inode's first name


class _Walker:
    """Opens the directories of one tree (the source or the stub tree) relative to its root's fd.

    Each directory is opened from its parent's fd by its own name with O_NOFOLLOW|O_DIRECTORY: no
    path is ever walked, so no symlink swapped in anywhere above a name is followed, and paths
    longer than PATH_MAX work. The fds from the root down to the last directory opened are kept,
    so a walk in tree order (parents first, depth first) opens each directory about once; past
    _MAX_HELD levels the shallowest are closed and opened again when needed.

    For the source (mnt_id given), each directory opened must be the one the scan saw (device and
    inode of its _Entry) on the root's mount; otherwise it vanished or was swapped (a symlink, a
    mount point, another directory) and :meth:`open` returns None. The stub tree is root's alone
    (a 0700 store): its directories must simply exist.
    """

    def __init__(self, root: _Dir, root_fd: int, *, mnt_id: Optional[int]) -> None:
        self.mnt_id = mnt_id
        self.held: list[tuple[_Dir, int]] = [(root, root_fd)]  # root_fd is the caller's

    def open(self, d: _Dir) -> Optional[int]:
        """An fd of d's directory, owned by the walker (valid until the next open), or None (source only)."""
        want = d.chain()
        i = 0
        while i < len(self.held) and i < len(want) and self.held[i][0] is want[i]:
            i += 1
        self._close_from(i)
        k = len(self.held) - 1
        while self.held[k][1] < 0:  # closed for _MAX_HELD: reopen from the deepest ancestor still open
            k -= 1
        for j in range(k + 1, len(self.held)):
            fd = self._open_child(self.held[j - 1][1], self.held[j][0])
            if fd is None:
                self._close_from(j)
                return None
            self.held[j] = (self.held[j][0], fd)
            self._limit(j)
        for sub in want[len(self.held):]:
            fd = self._open_child(self.held[-1][1], sub)
            if fd is None:
                return None
            self.held.append((sub, fd))
            self._limit(len(self.held) - 1)
        return self.held[-1][1]

    def _limit(self, last: int) -> None:
        """Keep at most _MAX_HELD fds open: close the shallowest, never the root's nor held[last]."""
        if last < _MAX_HELD:
            return
        opened = [n for n in range(1, last) if self.held[n][1] >= 0]
        for n in opened[:max(0, len(opened) + 2 - _MAX_HELD)]:
            os.close(self.held[n][1])
            self.held[n] = (self.held[n][0], -1)

    def _open_child(self, parent_fd: int, d: _Dir) -> Optional[int]:
        name = d.meta.name
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if self.mnt_id is not None and e.errno in _VANISHED:
                return None
            raise
        if self.mnt_id is None:
            return fd
        try:
            st = statx(fd, "")
        except OSError:
            os.close(fd)
            raise
        if (st.dev, st.ino) != (d.meta.dev, d.meta.ino) or st.mnt_id != self.mnt_id:
            os.close(fd)
            return None
        return fd

    def _close_from(self, i: int) -> None:
        for _, fd in self.held[max(i, 1):]:
            if fd >= 0:
                os.close(fd)
        del self.held[max(i, 1):]

    def close(self) -> None:
        self._close_from(1)


def _skipped(stats: PopulateStats, rel: str) -> None:
    stats.vanished += 1
    if stats.vanished <= _NAMED_SKIPS:
        log.warning("left out %s: it vanished or changed while populate read the source", rel)
    elif stats.vanished == _NAMED_SKIPS + 1:
        log.warning("more entries vanished or changed while populate read the source: they are counted, not named")


def _copied(name: str) -> bool:
    # trusted.* and security.* are never copied: they belong to the tree (our record, LSM labels).
    return name.startswith("user.") or name in (ACL_ACCESS, ACL_DEFAULT)


def _read_xattrs(target: int | str) -> Xattrs:
    """The xattrs that populate copies (user.* and the two POSIX ACLs, raw) of an open directory, or
    of the name a path ``/proc/self/fd/DIRFD/NAME`` gives (not followed if a symlink, not opened:
    a device does nothing, a fifo does not block, and no path is walked but DIRFD's one name)."""
    follow = isinstance(target, int)
    out = []
    for name in os.listxattr(target, follow_symlinks=follow):
        if _copied(name):
            try:
                out.append((name, os.getxattr(target, name, follow_symlinks=follow)))
            except OSError as e:
                if e.errno != errno.ENODATA:  # removed between list and get
                    raise
    return tuple(out)


def _remove_xattr(target: int | str, key: str) -> None:
    try:
        if isinstance(target, int):
            os.removexattr(target, key)
        else:
            os.removexattr(target, key, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise


def _source_error(path: str, e: OSError) -> SourceMissing:
    return SourceMissing(f"cannot read source {escape(path)}: {e.strerror or e}",
                         hint="make the source complete and readable, then run again: populate resumes")


def _tree_error(path: str, e: OSError) -> CannotCreate:
    hint = None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space or inodes on the store's filesystem, then run again: populate resumes"
    elif e.errno == errno.EOPNOTSUPP:
        hint = "the store's filesystem must support trusted and user xattrs and POSIX ACLs"
    return CannotCreate(f"cannot create {escape(path)} in the stub tree: {e.strerror or e}", hint=hint)


def _umask() -> Optional[int]:
    """The process umask, read without changing it (Linux 4.7+), None if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _open_root(root: str) -> tuple[int, Statx]:
    """An fd of the source root (given by the admin: a symlink to it is followed) and its statx."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise SourceMissing(f"source {escape(root)} is not a directory",
                            hint="give a directory as the source") from None
    except OSError as e:
        raise SourceMissing(f"source {escape(root)} does not exist or cannot be read: {e.strerror}",
                            hint="give an existing directory as the source") from None
    try:
        return fd, statx(fd, "")
    except OSError as e:
        os.close(fd)
        raise _source_error(root, e) from None


def _scan(source: str, root: _Dir, walker: _Walker) -> tuple[list[_Dir], list[_Link], PopulateStats]:
    """Read the source: directories parents first, each one's names sorted, its own before its subdirectories'."""
    stats = PopulateStats()
    dirs: list[_Dir] = []
    links: list[_Link] = []
    first: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of a hardlinked inode -> its first name
    stack = [root]
    while stack:
        d = stack.pop()
        if d.submount:
            dirs.append(d)
            continue
        path = os.path.join(source, d.rel) if d.rel else source
        try:
            fd = walker.open(d)
            if fd is not None:
                d.xattrs = _read_xattrs(fd)
        except OSError as e:
            raise _source_error(path, e) from None
        if fd is None:  # gone, or swapped for a symlink or another directory since its parent was read
            _skipped(stats, d.rel)
            stats.dirs -= 1
            assert d.parent is not None  # the root is open already
            d.parent.subdirs.remove(d)
            continue
        dirs.append(d)
        try:
            with os.scandir(fd) as it:  # a dup of fd: its position is not the walker's business
                found = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise _source_error(path, e) from None
        for entry in found:
            name = entry.name
            try:
                # fstatat(fd, name): no path walk; a mount point is told apart below
                st = entry.stat(follow_symlinks=False)
                # Something mounted on a name shows the mounted root's inode, not the one the
                # directory lists (d_ino), or another device: only then ask statx for its mount.
                # A directory's mount is checked again when it is opened (_Walker).
                mounted = (st.st_ino != entry.inode() or st.st_dev != d.meta.dev) \
                    and statx(fd, name).mnt_id != walker.mnt_id
                mode = st.st_mode
                xattrs: Xattrs = ()
                target = ""
                if stat.S_ISLNK(mode):
                    target = os.readlink(name, dir_fd=fd)  # readlinkat: this name, no path walk
                elif not stat.S_ISDIR(mode) and not mounted:
                    xattrs = _read_xattrs(f"/proc/self/fd/{fd}/{name}")
            except OSError as e:
                if e.errno in _VANISHED or e.errno == errno.EINVAL:  # EINVAL: readlink of a non-symlink
                    _skipped(stats, d.child(name))
                    continue
                raise _source_error(f"{path}/{name}", e) from None
            if mounted:
                stats.submounts += 1
                if stat.S_ISDIR(mode):
                    log.warning("left out what is mounted on %s: populate does not cross mount points; it "
                                "is an empty directory in the tree", d.child(name))
                    sub = _Dir(d.child(name), _entry(name, st), d)
                    sub.submount = True
                    d.subdirs.append(sub)
                    stats.dirs += 1
                else:
                    log.warning("left out %s: something is mounted on it, and populate does not cross mount "
                                "points", d.child(name))
                continue
            if stat.S_ISDIR(mode):
                d.subdirs.append(_Dir(d.child(name), _entry(name, st), d))
                stats.dirs += 1
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in first:
                    links.append(_Link(d, name, first[key]))
                    stats.hardlinks += 1
                    continue
                first[key] = d.child(name)
            d.entries.append(_entry(name, st, xattrs, target))
            if stat.S_ISREG(mode):
                stats.files += 1
                stats.bytes += st.st_size
            elif stat.S_ISLNK(mode):
                stats.symlinks += 1
            else:
                stats.specials += 1
        d.tmp_names = frozenset(e.name for e in found if e.name.startswith(tree.TMP_PREFIX))
        stack.extend(reversed(d.subdirs))
    return dirs, links, stats


class _Populate:
    def __init__(self, source: str, store: tree.Store, stats: PopulateStats, total: int,
                 progress: Optional[Callable[[int, int], None]]) -> None:
        self.source = source
        self.store = store
        self.tree = store.tree
        self.stats = stats
        self.total = total
        self.progress = progress
        self.done = 0
        self.last_report = 0.0
        self.uid = os.geteuid()
        self.gid = os.getegid()
        umask = _umask()
        self.umask = 0o7777 if umask is None else umask  # unknown: chmod everything
        self.dst: Optional[_Walker] = None  # the stub tree's directories, once its root exists (make_root)
        self.tree_fd = -1

    def count(self, created: int, kept: int) -> None:
        self.stats.created += created
        self.stats.kept += kept
        self.done += created + kept

    def report(self, *, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self.last_report >= _PROGRESS_INTERVAL:
            self.last_report = now
            self.progress(self.done, self.total)

    def tree_path(self, rel: str) -> str:
        return os.path.join(self.tree, rel) if rel else self.tree

    def tree_dir(self, d: _Dir, walker: Optional[_Walker] = None) -> int:
        """An fd of d's directory in the tree (the walker's: valid until its next open)."""
        w = walker or self.dst
        assert w is not None
        try:
            fd = w.open(d)
        except OSError as e:
            raise _tree_error(self.tree_path(d.rel), e) from None
        assert fd is not None  # only the source's walker answers None
        return fd

    def close(self) -> None:
        if self.dst is not None:
            self.dst.close()
        if self.tree_fd >= 0:
            os.close(self.tree_fd)

    # -- step 2: directories -------------------------------------------------------------------

    def make_root(self, top: _Dir) -> None:
        made = True
        for path in (self.store.path, self.tree):
            try:
                os.makedirs(path, 0o700)
                os.chmod(path, 0o700)  # whatever the umask
            except FileExistsError:
                if path == self.tree:
                    made = False
            except OSError as e:
                raise _tree_error(path, e) from None
        try:
            self.tree_fd = os.open(self.tree, _DIR_FLAGS)
            self.dst = _Walker(top, self.tree_fd, mnt_id=None)
            if not made:
                self._list(top)  # an earlier run's: resume
                return
            st = os.fstat(self.tree_fd)
            inherited = ACL_DEFAULT in os.listxattr(self.tree_fd)
        except OSError as e:
            raise _tree_error(self.tree, e) from None
        top.plain = not st.st_mode & stat.S_ISGID and not inherited

    def make_dirs(self, dirs: list[_Dir]) -> None:
        for d in dirs:
            if not d.subdirs:
                continue
            created = kept = 0
            fd = self.tree_dir(d)
            for sub in d.subdirs:
                name = sub.meta.name
                if name in d.existing:
                    self._check_dir(fd, sub)
                    self._list(sub)
                    fd = self.tree_dir(d)  # _list opened sub: the walker's fd of d may have moved
                    kept += 1
                    continue
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except OSError as e:
                    raise _tree_error(self.tree_path(sub.rel), e) from None
                sub.plain = d.plain  # mkdir inherits setgid and a default ACL from the parent
                created += 1
            self.count(created, kept)
            self.report()

    def _check_dir(self, fd: int, sub: _Dir) -> None:
        try:
            st = os.stat(sub.meta.name, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            raise _tree_error(self.tree_path(sub.rel), e) from None
        if not stat.S_ISDIR(st.st_mode):
            raise CannotCreate(f"{escape(self.tree_path(sub.rel))} is in the stub tree but is not a directory",
                               hint="the source changed since the last populate: remove the store and start again")

    def _list(self, d: _Dir) -> None:
        """Note what an earlier run made in d's tree copy and remove its leftover temporaries."""
        fd = self.tree_dir(d)
        path = self.tree_path(d.rel)
        try:
            names = os.listdir(fd)
        except OSError as e:
            raise _tree_error(path, e) from None
        keep = set()
        for name in names:
            if name.startswith(tree.TMP_PREFIX) and name not in d.tmp_names:
                log.debug("removing leftover %s", os.path.join(path, name))
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise _tree_error(os.path.join(path, name), e) from None
            else:
                keep.add(name)
        d.existing = frozenset(keep)

    # -- step 3: paths -------------------------------------------------------------------------

    def add_paths(self, dirs: list[_Dir], table: tree.PathTable) -> None:
        """Append the source path of every stub to make to STORE/paths, then sync it.

        One write per MiB: PathTable.add's write per path cost 10-20 % of populate's time.
        """
        try:
            end = os.fstat(table.fd).st_size  # O_APPEND: every write lands there
            buf: list[bytes] = []
            size = 0
            for d in dirs:
                ids = d.path_ids
                for e in d.entries:
                    if stat.S_ISREG(e.mode) and e.name not in d.existing:
                        data = os.fsencode(d.child(e.name)) + b"\0"
                        ids.append(end)
                        end += len(data)
                        buf.append(data)
                        size += len(data)
                        if size >= _PATHS_BUFFER:
                            _write_all(table.fd, b"".join(buf))
                            buf.clear()
                            size = 0
                    else:
                        ids.append(-1)
            if buf:
                _write_all(table.fd, b"".join(buf))
            table.sync()
        except OSError as e:
            raise _tree_error(table.path, e) from None

    # -- step 4: entries ---------------------------------------------------------------------

    def make_entries(self, d: _Dir, start: int, stop: int) -> tuple[int, int]:
        created = kept = 0
        tfd = self.tree_dir(d)
        for i in range(start, stop):
            e = d.entries[i]
            if e.name in d.existing:
                kept += 1
                continue
            tmp = f"{tree.TMP_PREFIX}{i}"  # unique in d: i is e's index
            while tmp in d.tmp_names:
                tmp += "_"
            if stat.S_ISREG(e.mode):
                self._make_file(d, tfd, e, tmp, d.path_ids[i])
            elif stat.S_ISLNK(e.mode):
                self._make_symlink(d, tfd, e, tmp)
            else:
                self._make_special(d, tfd, e, tmp)
            created += 1
        return created, kept

    def _fail(self, d: _Dir, tfd: int, e: _Entry, tmp: str, err: OSError) -> CannotCreate:
        try:
            os.unlink(tmp, dir_fd=tfd)
        except OSError:
            pass
        return _tree_error(self.tree_path(d.child(e.name)), err)

    def _make_file(self, d: _Dir, tfd: int, e: _Entry, tmp: str, path_id: int) -> None:
        # the source object's identity: a fill serves this inode, at this ctime, or nothing (docs/security.md)
        record = tree.Record(path_id=path_id, size=e.size, mtime_ns=e.mtime_ns, src_ino=e.ino, src_ctime_ns=e.ctime_ns)
        mode = stat.S_IMODE(e.mode)
        # In a plain directory open() already gives most files the right owner and mode: skip
        # fchown and fchmod, each a journalled inode update.
        plain = d.plain
        chown = not plain or e.uid != self.uid or e.gid != self.gid
        chmod = not plain or mode & ~0o777 or mode & self.umask
        try:
            fd = os.open(tmp, _CREATE_FLAGS, mode & 0o777, dir_fd=tfd)
        except OSError as err:
            raise _tree_error(self.tree_path(d.child(e.name)), err) from None
        try:
            try:
                if e.size:
                    os.ftruncate(fd, e.size)  # sparse: no data blocks
                if chown:
                    os.fchown(fd, e.uid, e.gid)  # before fchmod: chown clears setuid and setgid
                for key, value in e.xattrs:
                    os.setxattr(fd, key, value)
                if not plain and not any(k == ACL_ACCESS for k, _ in e.xattrs):
                    _remove_xattr(fd, ACL_ACCESS)  # inherited from a default ACL
                tree.write_record(fd, record)
                if chmod:
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
            finally:
                os.close(fd)
            os.rename(tmp, e.name, src_dir_fd=tfd, dst_dir_fd=tfd)
        except OSError as err:
            raise self._fail(d, tfd, e, tmp, err) from None

    def _make_symlink(self, d: _Dir, tfd: int, e: _Entry, tmp: str) -> None:
        try:
            os.symlink(e.target, tmp, dir_fd=tfd)
        except OSError as err:
            raise _tree_error(self.tree_path(d.child(e.name)), err) from None
        try:
            # Linux symlinks have no mode of their own and take no user xattrs or ACLs.
            os.chown(tmp, e.uid, e.gid, dir_fd=tfd, follow_symlinks=False)
            os.utime(tmp, ns=(e.atime_ns, e.mtime_ns), dir_fd=tfd, follow_symlinks=False)
            os.rename(tmp, e.name, src_dir_fd=tfd, dst_dir_fd=tfd)
        except OSError as err:
            raise self._fail(d, tfd, e, tmp, err) from None

    def _make_special(self, d: _Dir, tfd: int, e: _Entry, tmp: str) -> None:
        # ACLs only: user.* is refused on special files
        try:
            os.mknod(tmp, stat.S_IFMT(e.mode) | 0o600, e.rdev, dir_fd=tfd)
        except OSError as err:
            raise _tree_error(self.tree_path(d.child(e.name)), err) from None
        # Never open a special file (a fifo blocks, a device acts): name it through the tree
        # directory's fd (no path walk, any depth), as mknod just made it, so it is no symlink.
        path = f"/proc/self/fd/{tfd}/{tmp}"
        try:
            os.chown(tmp, e.uid, e.gid, dir_fd=tfd, follow_symlinks=False)
            for key, value in e.xattrs:
                os.setxattr(path, key, value, follow_symlinks=False)
            if not d.plain and not any(k == ACL_ACCESS for k, _ in e.xattrs):
                _remove_xattr(path, ACL_ACCESS)
            os.chmod(tmp, stat.S_IMODE(e.mode), dir_fd=tfd)
            os.utime(tmp, ns=(e.atime_ns, e.mtime_ns), dir_fd=tfd, follow_symlinks=False)
            os.rename(tmp, e.name, src_dir_fd=tfd, dst_dir_fd=tfd)
        except OSError as err:
            raise self._fail(d, tfd, e, tmp, err) from None

    # -- step 5: hardlinks -------------------------------------------------------------------

    def make_links(self, links: list[_Link], by_rel: dict[str, _Dir]) -> None:
        assert self.dst is not None
        firsts = _Walker(self.dst.held[0][0], self.tree_fd, mnt_id=None)  # the first names' directories
        try:
            for ln in links:
                if ln.name in ln.dir.existing:
                    self.count(0, 1)
                else:
                    head, _, first_name = ln.first.rpartition("/")
                    src_fd = self.tree_dir(by_rel[head], firsts)
                    dst_fd = self.tree_dir(ln.dir)
                    try:
                        os.link(first_name, ln.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                    except OSError as e:
                        raise _tree_error(self.tree_path(ln.dir.child(ln.name)), e) from None
                    self.count(1, 0)
                self.report()
        finally:
            firsts.close()

    # -- step 6: directory metadata ------------------------------------------------------------

    def dir_meta(self, dirs: Sequence[_Dir]) -> tuple[int, int]:
        for d in dirs:
            self._dir_meta(d)
        return 0, 0

    def _dir_meta(self, d: _Dir) -> None:
        # a mount point's xattrs are the mounted filesystem's: not copied (d.xattrs is empty)
        m = d.meta
        fd = self.tree_dir(d)
        try:
            os.fchown(fd, m.uid, m.gid)
            wanted = {k for k, _ in d.xattrs}
            for key in os.listxattr(fd):  # inherited ACLs, or an earlier run's xattrs
                if _copied(key) and key not in wanted:
                    _remove_xattr(fd, key)
            for key, value in d.xattrs:
                os.setxattr(fd, key, value)
            os.fchmod(fd, stat.S_IMODE(m.mode))
            os.utime(fd, ns=(m.atime_ns, m.mtime_ns))
        except OSError as e:
            raise _tree_error(self.tree_path(d.rel), e) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- the workers ----------------------------------------------------------------------------------


@dataclass
class _Child:
    pid: int
    buf: bytes = b""  # an incomplete message


def _run(jobs: Sequence[Job], workers: int, run: _Populate) -> None:
    """Run jobs here and in workers - 1 forked processes, reporting progress meanwhile.

    Processes, not threads: every syscall hands the GIL over, and with two threads on two cores
    populate got slower (a futex wake-up per hand-over), while a second process made step 4 1.7x
    faster. A worker only makes entries, reports counts and errors through a pipe and leaves with
    os._exit. It stops by itself when populate's process is gone (checked between two jobs; writing
    to the pipe fails too), so a killed populate leaves no writer behind for the next run to race.
    """
    workers = min(workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            run.count(*job())
            run.report()
        return
    parent = os.getpid()
    children: dict[int, _Child] = {}  # by the read end of the worker's pipe
    try:
        for k in range(1, workers):
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                with warnings.catch_warnings():
                    # 3.12+ warns about fork() when other threads exist (a caller's progress bar):
                    # the worker takes no lock they could hold, it only makes os calls and exits.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            except OSError as e:  # EAGAIN, ENOMEM: do the rest here
                os.close(r)
                os.close(w)
                log.warning("populate goes on with %d process(es): fork failed: %s", k, e.strerror)
                break
            if pid == 0:  # pragma: no cover - the worker
                os.close(r)
                _worker(jobs[k::workers], w, parent)
            os.close(w)
            os.set_blocking(r, False)
            children[r] = _Child(pid)
        started = len(children)
        for i, job in enumerate(jobs):
            if i % workers == 0 or i % workers > started:
                run.count(*job())
                _collect(children, run, block=False)
                run.report()
        while children:
            _collect(children, run, block=True)
            run.report()
    finally:
        for r, child in children.items():  # populate failed here: stop the workers
            os.kill(child.pid, signal.SIGKILL)
            os.close(r)
            os.waitpid(child.pid, 0)


def _worker(jobs: Sequence[Job], w: int, parent: int) -> NoReturn:  # pragma: no cover - the worker
    code = 0
    try:
        die_with_parent(parent)  # populate killed: its workers go with it
        created = kept = 0
        last = time.monotonic()
        for job in jobs:
            c, k = job()
            created += c
            kept += k
            if time.monotonic() - last >= _PROGRESS_INTERVAL / 2:
                os.write(w, _COUNTS.pack(b"C", created, kept))
                created = kept = 0
                last = time.monotonic()
        os.write(w, _COUNTS.pack(b"C", created, kept))
    except BaseException as e:
        code = 1
        try:
            if isinstance(e, HsmfsError):
                err = {"kind": type(e).__name__, "message": e.message, "hint": e.hint}
            else:
                err = {"kind": "HsmfsError", "message": f"populate worker failed: {e!r}", "hint": None}
            data = json.dumps(err).encode()
            os.write(w, _ERROR.pack(b"E", len(data)) + data)
        except BaseException:
            pass
    os._exit(code)


def _collect(children: dict[int, _Child], run: _Populate, *, block: bool) -> None:
    """Count what the workers reported, reap those that finished, raise a worker's error."""
    if block:
        select.select(list(children), [], [])
    for r, child in list(children.items()):
        while True:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                break
            if chunk:
                child.buf = _parse(child.buf + chunk, run)
                continue
            del children[r]  # end of file: the worker is done
            os.close(r)
            _, status = os.waitpid(child.pid, 0)
            if status != 0:
                how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.WEXITSTATUS(status)}"
                raise HsmfsError(f"populate worker {child.pid} died ({how})")
            break


def _parse(data: bytes, run: _Populate) -> bytes:
    """Act on the complete messages in data; return the incomplete rest."""
    off = 0
    while off < len(data):
        if data[off:off + 1] == b"C":
            if len(data) - off < _COUNTS.size:
                break
            _, created, kept = _COUNTS.unpack_from(data, off)
            run.count(created, kept)
            off += _COUNTS.size
        else:
            if len(data) - off < _ERROR.size:
                break
            _, n = _ERROR.unpack_from(data, off)
            if len(data) - off - _ERROR.size < n:
                break
            err = json.loads(data[off + _ERROR.size:off + _ERROR.size + n])
            kind = {"SourceMissing": SourceMissing, "CannotCreate": CannotCreate}.get(err["kind"], HsmfsError)
            raise kind(err["message"], hint=err["hint"])
    return data[off:]


# -- the entry point ------------------------------------------------------------------------------


def populate(source_root: str, store: tree.Store, *, progress: Optional[Callable[[int, int], None]] = None,
             workers: Optional[int] = None) -> PopulateStats:
    """Build, or finish building, ``store.tree`` from the directory ``source_root``.

    ``progress(done, total)`` is called from the calling thread about every 0.1 s once the source
    was scanned, and at the end; ``total`` counts every name below the root. Raises
    :class:`SourceMissing`, naming the path, when the source or anything in it cannot be read, and
    :class:`CannotCreate` when the tree cannot be written; a later run resumes either way.
    ``workers``: processes making entries (default: :data:`WORKERS`, at most one per CPU).
    """
    source = os.path.abspath(os.fspath(source_root))
    real_src, real_store = os.path.realpath(source), os.path.realpath(store.path)
    if real_store == real_src or real_store.startswith(real_src + os.sep) or real_src.startswith(real_store + os.sep):
        raise CannotCreate(f"the store {escape(store.path)} and the source {escape(source)} must not contain "
                           "each other")
    nworkers = min(WORKERS, _cpus()) if workers is None else max(1, workers)
    root_fd, root_st = _open_root(source)
    now = source_identity(root_fd)
    if store.source_id is not None and not same_source(store.source_id, now):
        os.close(root_fd)
        raise SourceReplaced(f"source {escape(source)} is not the directory store {escape(store.path)} was built from",
                             hint="if you moved the source on purpose, remove the store and mount again")
    store.source_id = store.source_id or now
    top = _Dir("", _entry("", root_st), None)
    src = _Walker(top, root_fd, mnt_id=root_st.mnt_id)
    try:
        dirs, links, stats = _scan(source, top, src)
    finally:
        src.close()
        os.close(root_fd)
    total = stats.dirs + stats.files + stats.symlinks + stats.specials + stats.hardlinks
    run = _Populate(source, store, stats, total, progress)
    run.report(force=True)
    try:
        _build(run, dirs, links, nworkers)
    finally:
        run.close()
    store.populated = True
    store.save()
    run.report(force=True)
    log.info("populated %s from %s: %d files (%d bytes), %d dirs, %d symlinks, %d hardlinks, %d special; "
             "%d made, %d kept, %d vanished while populate ran, %d mount points left out", store.tree, source,
             stats.files, stats.bytes, stats.dirs, stats.symlinks, stats.hardlinks, stats.specials, stats.created,
             stats.kept, stats.vanished, stats.submounts)
    return stats


def _build(run: _Populate, dirs: list[_Dir], links: list[_Link], nworkers: int) -> None:
    """Steps 2 to 6, then the syncfs of step 7."""
    store = run.store
    run.make_root(dirs[0])
    run.make_dirs(dirs)
    try:
        table = tree.PathTable(store.path, writable=True)
    except OSError as e:
        raise _tree_error(os.path.join(store.path, "paths"), e) from None
    try:
        run.add_paths(dirs, table)
    finally:
        table.close()
    _run([partial(run.make_entries, d, i, min(i + _CHUNK, len(d.entries)))
          for d in dirs for i in range(0, len(d.entries), _CHUNK)], nworkers, run)
    run.make_links(links, {d.rel: d for d in dirs})
    step = _CHUNK // 4
    _run([partial(run.dir_meta, dirs[i:i + step]) for i in range(0, len(dirs), step)], nworkers, run)
    try:
        syncfs(run.tree_fd)
    except OSError as e:
        raise _tree_error(store.tree, e) from None
