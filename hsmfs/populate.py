"""Source directory -> stub tree.

:func:`populate` mirrors a local source directory into ``store.tree``: every directory, regular file,
symlink, hardlink, fifo, socket and device node, with its mode, owner, times, ``user.*`` xattrs and
POSIX ACLs. Regular files become *stubs*: sparse files of the source's size (no data blocks) carrying
the ``trusted.hsmfs`` record, whose source path is in ``STORE/paths`` (see :mod:`hsmfs.tree`).

The steps:

1. **Scan** the source (``scandir`` + ``lstat``, never following symlinks, each directory's names
   sorted) so the total is known and the walk order, which decides the first name of each hardlinked
   inode, is the same on every run.
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
from hsmfs.linux.fs import syncfs

log = logging.getLogger("hsmfs.populate")

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"

WORKERS = 2  # processes making entries, at most one per CPU; see _run
_CHUNK = 128  # entries per job: small enough to share the work and report progress, large enough to be cheap
_PROGRESS_INTERVAL = 0.1  # seconds
_PATHS_BUFFER = 1 << 20  # bytes per write to STORE/paths

_COUNTS = struct.Struct("<cQQ")  # b"C", created, kept: a worker's progress
_ERROR = struct.Struct("<cI")  # b"E", length of the JSON error that follows

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW

Xattrs = list[tuple[str, bytes]]
Job = Callable[[], tuple[int, int]]  # makes part of the tree, returns (created, kept)


@dataclass
class PopulateStats:
    """What the tree holds after populate, and what this run did.

    ``files``, ``symlinks`` and ``specials`` count inodes (a hardlinked file once), ``hardlinks``
    the extra names of those inodes, ``dirs`` the directories below the root, ``bytes`` the sizes
    of the regular files (each inode once). ``created`` counts the names this run made, ``kept``
    those an earlier run had made.
    """

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    bytes: int = 0
    created: int = 0
    kept: int = 0


class _Entry(NamedTuple):
    """What populate keeps of a source lstat (less than half of an os.stat_result's memory)."""

    name: str
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    rdev: int
    ino: int
    ctime_ns: int


def _entry(name: str, st: os.stat_result) -> _Entry:
    return _Entry(name, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_rdev,
                  st.st_ino, st.st_ctime_ns)


class _Dir:
    """One source directory and its copy in the tree."""

    __slots__ = ("rel", "meta", "entries", "path_ids", "subdirs", "tmp_names", "existing", "plain")

    def __init__(self, rel: str, meta: _Entry) -> None:
        self.rel = rel  # relative to the source root, "" for the root itself
        self.meta = meta
        self.entries: list[_Entry] = []  # made in step 4
        self.path_ids: list[int] = []  # STORE/paths offset of each regular file of entries to make
        self.subdirs: list[_Dir] = []
        self.tmp_names: frozenset[str] = frozenset()  # source names that look like our temporaries
        self.existing: frozenset[str] = frozenset()  # names an earlier run made
        # Made by this run in a plain parent: new entries get our uid and gid, the umask, no
        # inherited ACL. Otherwise (an earlier run's directory, maybe setgid or with a default ACL
        # already) every entry gets an explicit chown, chmod and ACL.
        self.plain = False

    def child(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name


@dataclass
class _Link:
    dir: _Dir
    name: str
    first: str  # relative path of the inode's first name


def _copied(name: str) -> bool:
    # trusted.* and security.* are never copied: they belong to the tree (our record, LSM labels).
    return name.startswith("user.") or name in (ACL_ACCESS, ACL_DEFAULT)


def _read_xattrs(path: str, *, follow: bool = False) -> Xattrs:
    """The xattrs of path that populate copies: user.* and the two POSIX ACLs, raw."""
    out: Xattrs = []
    for name in os.listxattr(path, follow_symlinks=follow):
        if _copied(name):
            try:
                out.append((name, os.getxattr(path, name, follow_symlinks=follow)))
            except OSError as e:
                if e.errno != errno.ENODATA:  # removed between list and get
                    raise
    return out


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
    return SourceMissing(f"cannot read source {path}: {e.strerror or e}",
                         hint="make the source complete and readable, then run again: populate resumes")


def _tree_error(path: str, e: OSError) -> CannotCreate:
    hint = None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space or inodes on the store's filesystem, then run again: populate resumes"
    elif e.errno == errno.EOPNOTSUPP:
        hint = "the store's filesystem must support trusted and user xattrs and POSIX ACLs"
    return CannotCreate(f"cannot create {path} in the stub tree: {e.strerror or e}", hint=hint)


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


def _scan(root: str) -> tuple[list[_Dir], list[_Link], PopulateStats]:
    """Walk the source: directories parents first, each one's names sorted, its own before its subdirectories'."""
    try:
        root_st = os.stat(root)  # the root itself may be given through a symlink
    except OSError as e:
        raise SourceMissing(f"source {root} does not exist or cannot be read: {e.strerror}",
                            hint="give an existing directory as the source") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise SourceMissing(f"source {root} is not a directory", hint="give a directory as the source")
    stats = PopulateStats()
    dirs: list[_Dir] = []
    links: list[_Link] = []
    first: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of a hardlinked inode -> its first name
    stack = [_Dir("", _entry("", root_st))]
    while stack:
        d = stack.pop()
        dirs.append(d)
        path = os.path.join(root, d.rel) if d.rel else root
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as e:
            raise _source_error(path, e) from None
        try:
            # scandir of an fd: DirEntry.stat is fstatat(fd, name), no path walk per entry
            with os.scandir(fd) as it:
                found = sorted(it, key=lambda e: e.name)
            for entry in found:
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise _source_error(f"{path}/{name}", e) from None
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    d.subdirs.append(_Dir(d.child(name), _entry(name, st)))
                    stats.dirs += 1
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in first:
                        links.append(_Link(d, name, first[key]))
                        stats.hardlinks += 1
                        continue
                    first[key] = d.child(name)
                d.entries.append(_entry(name, st))
                if stat.S_ISREG(mode):
                    stats.files += 1
                    stats.bytes += st.st_size
                elif stat.S_ISLNK(mode):
                    stats.symlinks += 1
                else:
                    stats.specials += 1
        except OSError as e:
            raise _source_error(path, e) from None
        finally:
            os.close(fd)
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

    def source_path(self, rel: str) -> str:
        return os.path.join(self.source, rel) if rel else self.source

    # -- step 2: directories -------------------------------------------------------------------

    def make_root(self, top: _Dir) -> None:
        for path in (self.store.path, self.tree):
            try:
                os.makedirs(path, 0o700)
                os.chmod(path, 0o700)  # whatever the umask
            except FileExistsError:
                if path == self.tree:
                    self._list(top)  # an earlier run's: resume
                    return
            except OSError as e:
                raise _tree_error(path, e) from None
        try:
            st = os.lstat(self.tree)
            inherited = ACL_DEFAULT in os.listxattr(self.tree)
        except OSError as e:
            raise _tree_error(self.tree, e) from None
        top.plain = not st.st_mode & stat.S_ISGID and not inherited

    def make_dirs(self, dirs: list[_Dir]) -> None:
        for d in dirs:
            if not d.subdirs:
                continue
            created = kept = 0
            path = self.tree_path(d.rel)
            try:
                fd = os.open(path, _DIR_FLAGS)
            except OSError as e:
                raise _tree_error(path, e) from None
            try:
                for sub in d.subdirs:
                    name = sub.meta.name
                    if name in d.existing:
                        self._check_dir(fd, sub)
                        self._list(sub)
                        kept += 1
                        continue
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except OSError as e:
                        raise _tree_error(self.tree_path(sub.rel), e) from None
                    sub.plain = d.plain  # mkdir inherits setgid and a default ACL from the parent
                    created += 1
            finally:
                os.close(fd)
            self.count(created, kept)
            self.report()

    def _check_dir(self, fd: int, sub: _Dir) -> None:
        try:
            st = os.stat(sub.meta.name, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            raise _tree_error(self.tree_path(sub.rel), e) from None
        if not stat.S_ISDIR(st.st_mode):
            raise CannotCreate(f"{self.tree_path(sub.rel)} is in the stub tree but is not a directory",
                               hint="the source changed since the last populate: remove the store and start again")

    def _list(self, d: _Dir) -> None:
        """Note what an earlier run made in d's tree copy and remove its leftover temporaries."""
        path = self.tree_path(d.rel)
        try:
            names = os.listdir(path)
        except OSError as e:
            raise _tree_error(path, e) from None
        keep = set()
        for name in names:
            if name.startswith(tree.TMP_PREFIX) and name not in d.tmp_names:
                log.debug("removing leftover %s", os.path.join(path, name))
                try:
                    os.unlink(os.path.join(path, name))
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
        tpath = self.tree_path(d.rel)
        spath = self.source_path(d.rel)
        created = kept = 0
        try:
            tfd = os.open(tpath, _DIR_FLAGS)
        except OSError as err:
            raise _tree_error(tpath, err) from None
        try:
            for i in range(start, stop):
                e = d.entries[i]
                if e.name in d.existing:
                    kept += 1
                    continue
                tmp = f"{tree.TMP_PREFIX}{i}"  # unique in d: i is e's index
                while tmp in d.tmp_names:
                    tmp += "_"
                if stat.S_ISREG(e.mode):
                    self._make_file(d, tfd, e, tmp, spath, d.path_ids[i])
                elif stat.S_ISLNK(e.mode):
                    self._make_symlink(d, tfd, e, tmp, spath)
                else:
                    self._make_special(d, tfd, e, tmp, spath)
                created += 1
        finally:
            os.close(tfd)
        return created, kept

    def _xattrs(self, spath: str, name: str) -> Xattrs:
        path = f"{spath}/{name}"
        try:
            return _read_xattrs(path)
        except OSError as e:
            raise _source_error(path, e) from None

    def _fail(self, d: _Dir, tfd: int, e: _Entry, tmp: str, err: OSError) -> CannotCreate:
        try:
            os.unlink(tmp, dir_fd=tfd)
        except OSError:
            pass
        return _tree_error(self.tree_path(d.child(e.name)), err)

    def _make_file(self, d: _Dir, tfd: int, e: _Entry, tmp: str, spath: str, path_id: int) -> None:
        xattrs = self._xattrs(spath, e.name)
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
                for key, value in xattrs:
                    os.setxattr(fd, key, value)
                if not plain and not any(k == ACL_ACCESS for k, _ in xattrs):
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

    def _make_symlink(self, d: _Dir, tfd: int, e: _Entry, tmp: str, spath: str) -> None:
        try:
            target = os.readlink(f"{spath}/{e.name}")
        except OSError as err:
            raise _source_error(f"{spath}/{e.name}", err) from None
        try:
            os.symlink(target, tmp, dir_fd=tfd)
        except OSError as err:
            raise _tree_error(self.tree_path(d.child(e.name)), err) from None
        try:
            # Linux symlinks have no mode of their own and take no user xattrs or ACLs.
            os.chown(tmp, e.uid, e.gid, dir_fd=tfd, follow_symlinks=False)
            os.utime(tmp, ns=(e.atime_ns, e.mtime_ns), dir_fd=tfd, follow_symlinks=False)
            os.rename(tmp, e.name, src_dir_fd=tfd, dst_dir_fd=tfd)
        except OSError as err:
            raise self._fail(d, tfd, e, tmp, err) from None

    def _make_special(self, d: _Dir, tfd: int, e: _Entry, tmp: str, spath: str) -> None:
        xattrs = self._xattrs(spath, e.name)  # ACLs: user.* is refused on special files
        try:
            os.mknod(tmp, stat.S_IFMT(e.mode) | 0o600, e.rdev, dir_fd=tfd)
        except OSError as err:
            raise _tree_error(self.tree_path(d.child(e.name)), err) from None
        # Never open a special file (a fifo blocks, a device acts): use the path, which only root can
        # reach (the store is 0700) and which mknod just made, so it is no symlink.
        path = f"{self.tree_path(d.rel)}/{tmp}"
        try:
            os.chown(tmp, e.uid, e.gid, dir_fd=tfd, follow_symlinks=False)
            for key, value in xattrs:
                os.setxattr(path, key, value, follow_symlinks=False)
            if not d.plain and not any(k == ACL_ACCESS for k, _ in xattrs):
                _remove_xattr(path, ACL_ACCESS)
            os.chmod(tmp, stat.S_IMODE(e.mode), dir_fd=tfd)
            os.utime(tmp, ns=(e.atime_ns, e.mtime_ns), dir_fd=tfd, follow_symlinks=False)
            os.rename(tmp, e.name, src_dir_fd=tfd, dst_dir_fd=tfd)
        except OSError as err:
            raise self._fail(d, tfd, e, tmp, err) from None

    # -- step 5: hardlinks -------------------------------------------------------------------

    def make_links(self, links: list[_Link]) -> None:
        for ln in links:
            if ln.name in ln.dir.existing:
                self.count(0, 1)
            else:
                dst = self.tree_path(ln.dir.child(ln.name))
                try:
                    os.link(self.tree_path(ln.first), dst, follow_symlinks=False)
                except OSError as e:
                    raise _tree_error(dst, e) from None
                self.count(1, 0)
            self.report()

    # -- step 6: directory metadata ------------------------------------------------------------

    def dir_meta(self, dirs: Sequence[_Dir]) -> tuple[int, int]:
        for d in dirs:
            self._dir_meta(d)
        return 0, 0

    def _dir_meta(self, d: _Dir) -> None:
        spath = self.source_path(d.rel)
        try:
            xattrs = _read_xattrs(spath, follow=not d.rel)  # the root may be given through a symlink
        except OSError as e:
            raise _source_error(spath, e) from None
        tpath = self.tree_path(d.rel)
        m = d.meta
        try:
            fd = os.open(tpath, _DIR_FLAGS)
            try:
                os.fchown(fd, m.uid, m.gid)
                wanted = {k for k, _ in xattrs}
                for key in os.listxattr(fd):  # inherited ACLs, or an earlier run's xattrs
                    if _copied(key) and key not in wanted:
                        _remove_xattr(fd, key)
                for key, value in xattrs:
                    os.setxattr(fd, key, value)
                os.fchmod(fd, stat.S_IMODE(m.mode))
                os.utime(fd, ns=(m.atime_ns, m.mtime_ns))
            finally:
                os.close(fd)
        except OSError as e:
            raise _tree_error(tpath, e) from None


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
        created = kept = 0
        last = time.monotonic()
        for job in jobs:
            if os.getppid() != parent:  # populate was killed
                os._exit(1)
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
        raise CannotCreate(f"the store {store.path} and the source {source} must not contain each other")
    nworkers = min(WORKERS, _cpus()) if workers is None else max(1, workers)
    dirs, links, stats = _scan(source)
    total = stats.dirs + stats.files + stats.symlinks + stats.specials + stats.hardlinks
    run = _Populate(source, store, stats, total, progress)
    run.report(force=True)

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
    run.make_links(links)
    step = _CHUNK // 4
    _run([partial(run.dir_meta, dirs[i:i + step]) for i in range(0, len(dirs), step)], nworkers, run)

    try:
        fd = os.open(store.tree, _DIR_FLAGS)
        try:
            syncfs(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _tree_error(store.tree, e) from None
    store.populated = True
    store.save()
    run.report(force=True)
    log.info("populated %s from %s: %d files (%d bytes), %d dirs, %d symlinks, %d hardlinks, %d special; "
             "%d made, %d kept", store.tree, source, stats.files, stats.bytes, stats.dirs, stats.symlinks,
             stats.hardlinks, stats.specials, stats.created, stats.kept)
    return stats
