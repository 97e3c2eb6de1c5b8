"""Making single entries of a stub tree, and populating a tree from a manifest.

Each entry is made as populate makes them (hsmfs.populate): under a temporary name in its
directory (:data:`hsmfs.tree.TMP_PREFIX`), fully set up (size, owner, xattrs, record, mode,
times), then renamed into place, so a name in the tree is always a complete entry. ``mark`` (the
running filler's stub mark, for refresh) is put on a new stub before its name exists. Every call
works relative to a directory fd of the tree; the tree is root's alone (a 0700 store), and a
manifest's paths were checked by :func:`hsmfs.manifest.parse` (no "..", no absolute path, parents
are directories of the manifest), and are opened one name at a time with ``O_NOFOLLOW``.

:func:`populate_manifest` builds a whole tree from a manifest: no listing of the origin, one pass
over the entries: cost of the same order as a local populate.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from hsmfs import manifest as mf
from hsmfs import tree
from hsmfs.errors import CannotCreate
from hsmfs.linux.fs import syncfs
from hsmfs.names import escape

log = logging.getLogger("hsmfs.stubs")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_tmp_seq = itertools.count()


@dataclass(frozen=True)
class Meta:
    """What a tree entry gets from its source entry."""

    type: str  # "dir", "file", "symlink"
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    size: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    target: str = ""


def meta_of(e: mf.Entry) -> Meta:
    return Meta(e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.mtime_ns, e.size, e.xattrs, e.target)


def tmp_name() -> str:
    return f"{tree.TMP_PREFIX}r{os.getpid()}.{next(_tmp_seq)}"


def open_dir(root_fd: int, rel: str) -> int:
    """An fd of the tree directory rel (relative to root_fd), one name at a time, no symlink followed."""
    fd = os.dup(root_fd)
    if not rel:
        return fd
    try:
        for part in rel.split("/"):
            nfd = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _apply_xattrs(target: int, xattrs: Sequence[tuple[str, bytes]]) -> None:
    wanted = dict(xattrs)
    for key in os.listxattr(target):
        if (key.startswith("user.") or key in mf.XATTR_NAMES) and key not in wanted:
            try:
                os.removexattr(target, key)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
    for key, value in xattrs:
        os.setxattr(target, key, value)


def make_file(dfd: int, name: str, m: Meta, rec: tree.Record, *, mark: Optional[Callable[[int], None]] = None) -> None:
    """A stub named name in dfd (replacing whatever file or symlink had that name)."""
    tmp = tmp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
    try:
        try:
            if m.size:
                os.ftruncate(fd, m.size)  # sparse: no data blocks
            os.fchown(fd, m.uid, m.gid)
            _apply_xattrs(fd, m.xattrs)
            tree.write_record(fd, rec)
            os.fchmod(fd, m.mode)
            os.utime(fd, ns=(m.atime_ns, m.mtime_ns))
            if mark is not None:
                mark(fd)  # watched before its name exists: no one can open it unwatched
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise


def make_symlink(dfd: int, name: str, m: Meta) -> None:
    tmp = tmp_name()
    os.symlink(m.target, tmp, dir_fd=dfd)
    try:
        os.chown(tmp, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
        os.utime(tmp, ns=(m.atime_ns, m.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise


def set_dir_meta(fd: int, m: Meta) -> None:
    os.fchown(fd, m.uid, m.gid)
    _apply_xattrs(fd, m.xattrs)
    os.fchmod(fd, m.mode)
    os.utime(fd, ns=(m.atime_ns, m.mtime_ns))


def set_meta(fd: int, m: Meta) -> bool:
    """Give the file behind fd m's mode, owner and xattrs (not its times or data); whether anything changed."""
    st = os.fstat(fd)
    changed = False
    if (st.st_uid, st.st_gid) != (m.uid, m.gid):
        os.fchown(fd, m.uid, m.gid)  # clears setuid/setgid: the mode comes after
        changed = True
    now = {k: os.getxattr(fd, k) for k in os.listxattr(fd) if k.startswith("user.") or k in mf.XATTR_NAMES}
    if now != dict(m.xattrs):
        _apply_xattrs(fd, m.xattrs)
        changed = True
    if changed or (st.st_mode & 0o7777) != m.mode:
        os.fchmod(fd, m.mode)
        changed = True
    return changed


def add_hashes(store_path: str, digests: list[bytes]) -> int:
    table = tree.HashTable(store_path, writable=True)
    try:
        first = table.add_many(digests) if digests else 0
        table.sync()
    finally:
        table.close()
    return first


def add_paths(store_path: str, paths: list[str]) -> list[int]:
    """Append paths to STORE/paths in one write, synced; their path_ids."""
    table = tree.PathTable(store_path, writable=True)
    try:
        end = os.fstat(table.fd).st_size
        ids = []
        blob = []
        for p in paths:
            data = os.fsencode(p) + b"\0"
            ids.append(end)
            end += len(data)
            blob.append(data)
        data = b"".join(blob)
        view = memoryview(data)
        while view:
            view = view[os.write(table.fd, view):]
        table.sync()
    finally:
        table.close()
    return ids


def remote_record(path_id: int, e: mf.Entry, slot: int) -> tree.Record:
    return tree.Record(path_id=path_id, size=e.size, mtime_ns=e.mtime_ns, src_ino=slot, src_ctime_ns=0,
                       flags=tree.FLAG_CONTENT)


@dataclass
class ManifestStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    created: int = 0
    kept: int = 0


def populate_manifest(m: mf.Manifest, store: tree.Store, *,
                      progress: Optional[Callable[[int, int], None]] = None) -> ManifestStats:
    """Build (or finish building) store.tree from manifest m; a rerun after a crash resumes."""
    stats = ManifestStats()
    total = len(m.entries)
    try:
        os.makedirs(store.tree, mode=0o700, exist_ok=True)
        os.chmod(store.tree, 0o700)
        root = os.open(store.tree, _DIR)
    except OSError as err:
        raise CannotCreate(f"cannot create {escape(store.tree)}: {err.strerror}") from None
    dirs: dict[str, int] = {"": root}
    last = 0.0
    try:
        existing: dict[str, set[str]] = {}

        def listing(rel: str) -> set[str]:
            if rel not in existing:
                names = set()
                for n in os.listdir(dirs[rel]):
                    if n.startswith(tree.TMP_PREFIX):
                        os.unlink(n, dir_fd=dirs[rel])  # a crashed run's leftover
                    else:
                        names.add(n)
                existing[rel] = names
            return existing[rel]

        # directories first (manifest order: parents first), then files' paths and hashes in one
        # durable write each, then the entries themselves, hardlinks, directory metadata last
        for e in m.entries:
            if e.type != "dir" or e.path == "":
                continue
            pfd = dirs[e.parent]
            if e.name not in listing(e.parent):
                os.mkdir(e.name, 0o700, dir_fd=pfd)
                stats.created += 1
            else:
                stats.kept += 1
            dirs[e.path] = os.open(e.name, _DIR, dir_fd=pfd)
            stats.dirs += 1
        files = [e for e in m.entries if e.type == "file" and e.name not in listing(e.parent)]
        ids = add_paths(store.path, [e.path for e in files])
        first = add_hashes(store.path, [bytes.fromhex(e.sha256) for e in files])
        for i, e in enumerate(files):
            make_file(dirs[e.parent], e.name, meta_of(e), remote_record(ids[i], e, first + i))
            stats.created += 1
            if progress is not None and time.monotonic() - last > 0.1:
                last = time.monotonic()
                progress(i + 1, total)
        for e in m.entries:
            if e.type == "file":
                stats.files += 1
                stats.bytes += e.size
            elif e.type == "symlink":
                stats.symlinks += 1
                if e.name not in listing(e.parent):
                    make_symlink(dirs[e.parent], e.name, meta_of(e))
                    stats.created += 1
            elif e.type == "hardlink":
                stats.hardlinks += 1
                if e.name not in listing(e.parent):
                    src = m.by_path[e.target]
                    os.link(src.name, e.name, src_dir_fd=dirs[src.parent], dst_dir_fd=dirs[e.parent],
                            follow_symlinks=False)
                    stats.created += 1
        for e in reversed(m.entries):
            if e.type == "dir":
                set_dir_meta(dirs[e.path], meta_of(e))
        syncfs(root)
    except OSError as err:
        raise CannotCreate(f"cannot build the stub tree in {escape(store.tree)}: {err}",
                           hint="free space or inodes on the store's filesystem, then mount again: it resumes") \
            from None
    finally:
        for fd in dirs.values():
            os.close(fd)
    tree.atomic_write(os.path.join(store.path, "manifest.json"), m.dumps())
    store.populated = True
    store.save()
    if progress is not None:
        progress(total, total)
    return stats
