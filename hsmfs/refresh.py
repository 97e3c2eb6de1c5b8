"""``hsmfs refresh``: make a stub tree follow its source (docs/refresh.md).

The source's new state is a list of entries: the manifest its URL names now (remote), or a rescan
of the directory (local, hsmfs.scan). The tree is compared with it name by name:

- **new entries** appear: stubs (a new record; with a running filler, its stub mark goes on
  before the name exists), directories, symlinks, hardlinks;
- **deleted entries** go: stubs and clean resident files through the eviction path (below),
  symlinks, and directories once empty (one that still holds a user's or a dirty file stays);
- **changed files** (another size, mtime, content hash, or, for a local source, another inode or
  ctime: its record no longer describes the source object) are replaced by a new stub under the
  same name, stubs and clean resident files alike, through the eviction path;
- **metadata** (mode, owner, xattrs) of files whose content did not change is applied in place,
  under a write lease; a resident file's state log entry then moves to its new ctime, so the
  change is not taken for a user's;
- **dirty files** (changed by a user) are kept and reported, never overwritten; a file a user made
  where the source now has one too is kept as well.

The eviction path (hsmfs.filler.evict, ``Evictor.replace``) claims the file (an open meanwhile
waits), puts the stub mark on, takes a write lease (refused while anyone has it open: the file is
reported in use and the next refresh does it), checks under the lease that it is still clean,
journals it "stub", and only then renames the new stub over its name (or removes the name).
Readers who had the file open keep the inode they opened: a remote one's old version is still
fetched by its hash; a local one's old bytes are gone from the source, so its refill fails (EIO).

Runs inside the filler of a running mount (control op ``refresh``, and every ``refresh_interval``
seconds), through its private root, or on a store no mount serves (``hsmfs refresh STORE``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from hsmfs import manifest as mf
from hsmfs import state, tree
from hsmfs.errors import HsmfsError
from hsmfs.filler.evict import Evictor, Outcome
from hsmfs.linux.fs import release_lease, syncfs, take_write_lease
from hsmfs.state import FileState, StateLog
from hsmfs.stubs import (
    Meta,
    add_hashes,
    add_paths,
    make_file,
    make_symlink,
    meta_of,
    open_dir,
    remote_record,
    set_dir_meta,
    set_meta,
)

if TYPE_CHECKING:
    from hsmfs.filler.core import Filler
    from hsmfs.filler.service import Serving
    from hsmfs.policy import Policy
    from hsmfs.sources import Source

log = logging.getLogger("hsmfs.refresh")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclass
class Report:
    version: str = ""
    added: int = 0
    removed: int = 0
    replaced: int = 0  # stubs given a new record
    restubbed: int = 0  # resident files made stubs of the new version
    metadata: int = 0
    dirty_kept: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # users' files where the source has a name now
    errors: list[str] = field(default_factory=list)
    error_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Want:
    """One entry of the source's new state."""

    path: str
    type: str  # dir, file, symlink, hardlink, special
    meta: Meta
    ident: tuple[object, ...] = ()  # files: what the record must say for the file to be unchanged
    target: str = ""  # hardlink: first name
    entry: Optional[mf.Entry] = None  # remote files: the manifest entry (its hash)
    st: Optional[os.stat_result] = None  # local files: the source lstat


def wants_from_manifest(m: mf.Manifest) -> list[Want]:
    out = []
    for e in m.entries:
        if e.type == "hardlink":
            out.append(Want(e.path, "hardlink", Meta("file", 0, 0, 0, 0, 0), target=e.target))
        else:
            out.append(Want(e.path, e.type, meta_of(e), ("sha", e.size, e.mtime_ns, e.sha256), entry=e))
    return out


def wants_from_directory(root: str) -> list[Want]:
    from hsmfs.scan import scan

    out = []
    for f in scan(root):
        st = f.st
        m = Meta("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "symlink",
                 stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns, st.st_size,
                 f.xattrs, f.target)
        if f.first:
            out.append(Want(f.path, "hardlink", m, target=f.first))
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            out.append(Want(f.path, m.type, m))
        elif stat.S_ISREG(st.st_mode):
            out.append(Want(f.path, "file", m, ("ino", st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns), st=st))
        else:
            out.append(Want(f.path, "special", m))  # made at populate; kept as they are
    return out


@dataclass
class _Have:
    st: os.stat_result
    rec: Optional[tree.Record]
    path: str  # through the tree's root fd: /proc/self/fd/ROOT/REL


def _walk_tree(root_fd: int) -> dict[str, _Have]:
    """Every name of the tree (lstat, records), "" for its root; no file is opened: no event."""
    base = f"/proc/self/fd/{root_fd}"
    out: dict[str, _Have] = {"": _Have(os.fstat(root_fd), None, base)}
    for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=root_fd):
        rel = "" if dirpath == "." else dirpath[2:]
        for name in dirnames + filenames:
            if name.startswith(tree.TMP_PREFIX):
                continue
            path = f"{rel}/{name}" if rel else name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                rec = tree.read_record(f"/proc/self/fd/{dfd}/{name}") if stat.S_ISREG(st.st_mode) else None
            except (OSError, tree.RecordError):
                continue
            out[path] = _Have(st, rec, f"{base}/{path}")
    return out


class _Apply:
    def __init__(self, store: tree.Store, root_fd: int, log_: StateLog, paths: tree.PathTable, source: Source, *,
                 filler: Optional[Filler] = None, distrust: bool = False) -> None:
        self.store = store
        self.root_fd = root_fd
        self.log = log_
        self.paths = paths
        self.source = source
        self.filler = filler
        self.distrust = distrust
        self.remote = tree.is_remote(store.source)
        self.hashes = tree.HashTable(store.path) if self.remote else None
        self.report = Report()
        self.mark: Optional[Callable[[int], None]] = filler.marks.stub if filler is not None else None

    def close(self) -> None:
        if self.hashes is not None:
            self.hashes.close()

    # -- comparing ---------------------------------------------------------------------------
    def unchanged(self, rec: tree.Record, w: Want) -> bool:
        if w.ident[0] == "sha":
            _, size, mtime, sha = w.ident
            if not rec.flags & tree.FLAG_CONTENT or rec.size != size or rec.mtime_ns != mtime:
                return False
            assert self.hashes is not None
            try:
                return self.hashes.get(rec.src_ino).hex() == sha
            except tree.RecordError:
                return False
        _, size, mtime, ino, ctime = w.ident
        if rec.flags & tree.FLAG_CONTENT or rec.size != size or rec.mtime_ns != mtime:
            return False
        return not rec.flags & tree.FLAG_IDENTITY or (rec.src_ino, rec.src_ctime_ns) == (ino, ctime)

    def state(self, h: _Have) -> FileState:
        key = state.key_at(self._abs(h))
        return self.log.state(h.rec, h.st, key)

    def _abs(self, h: _Have) -> str:
        return h.path

    # -- the run ----------------------------------------------------------------------------
    def run(self, wants: list[Want]) -> Report:
        have = _walk_tree(self.root_fd)
        want_paths = {w.path for w in wants}
        self.log.refresh()
        # 1. names the source no longer has (deepest first), and names whose type changed
        gone = [p for p in have if p and p not in want_paths]
        by_path = {w.path: w for w in wants}
        for p, h in have.items():
            w = by_path.get(p)
            if w is not None and p and not _same_type(h.st, w):
                gone.append(p)
        removed_dirs: set[str] = set()
        files_to_go: list[tuple[str, _Have, Optional[Want]]] = []
        order = sorted(set(gone), key=lambda x: x.count("/"), reverse=True)
        for p in order:
            h = have[p]
            if stat.S_ISDIR(h.st.st_mode):
                continue
            if stat.S_ISREG(h.st.st_mode) and h.rec is not None:
                files_to_go.append((p, h, None))
            elif stat.S_ISREG(h.st.st_mode):
                self.report.kept.append(p)  # a user's file
            else:
                with _Parent(self.root_fd, p) as (dfd, name):
                    os.unlink(name, dir_fd=dfd)
                self.report.removed += 1
        self._through_eviction(files_to_go)
        for p in order:  # directories last, deepest first: those left holding a user's file stay
            if not stat.S_ISDIR(have[p].st.st_mode):
                continue
            try:
                with _Parent(self.root_fd, p) as (dfd, name):
                    os.rmdir(name, dir_fd=dfd)
                self.report.removed += 1
                removed_dirs.add(p)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    self.report.errors.append(f"{p}: {e.strerror}")
                elif p not in want_paths:
                    self.report.kept.append(p + "/")
        # 2. directories, parents first
        for w in wants:
            if w.type == "dir" and w.path and (w.path not in have or w.path in removed_dirs):
                try:
                    with _Parent(self.root_fd, w.path) as (dfd, name):
                        os.mkdir(name, 0o700, dir_fd=dfd)
                    self.report.added += 1
                except FileExistsError:
                    pass
                except OSError as e:
                    self.report.errors.append(f"{w.path}: {e.strerror or e}")
        # 3. files
        new: list[Want] = []
        changed: list[tuple[str, _Have, Optional[Want]]] = []
        meta: list[tuple[str, _Have, Want]] = []
        for w in wants:
            if w.type != "file":
                continue
            hf = have.get(w.path)
            if hf is None or w.path in gone:
                new.append(w)
            elif hf.rec is None:
                self.report.kept.append(w.path)  # a user's file where the source now has one
            elif not self.unchanged(hf.rec, w):
                changed.append((w.path, hf, w))
            elif _meta_differs(hf.st, w.meta, hf):
                meta.append((w.path, hf, w))
        made = self._new_stubs(new + [w for _p, _h, w in changed if w is not None], prepare_only=True)
        for w in new:
            try:
                with _Parent(self.root_fd, w.path) as (dfd, name):
                    make_file(dfd, name, w.meta, made[w.path], mark=self.mark)
                self.report.added += 1
            except OSError as e:
                if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    self.report.kept.append(w.path)  # a user's directory where the source now has a file
                else:
                    self.report.errors.append(f"{w.path}: {e.strerror or e}")
        self._through_eviction(changed, made)
        for p, h, w in meta:
            self._metadata(p, h, w)
        # 4. symlinks and hardlinks
        for w in wants:
            hv = have.get(w.path)
            fresh = hv is None or w.path in gone
            if w.type == "symlink":
                if hv is None or fresh or os.readlink(hv.path) != w.meta.target:
                    try:
                        with _Parent(self.root_fd, w.path) as (dfd, name):
                            make_symlink(dfd, name, w.meta)
                    except OSError as e:
                        self.report.errors.append(f"{w.path}: {e.strerror or e}")
                        continue
                    self.report.added += fresh
                    self.report.metadata += not fresh
                elif (hv.st.st_uid, hv.st.st_gid, hv.st.st_mtime_ns) != (w.meta.uid, w.meta.gid, w.meta.mtime_ns):
                    with _Parent(self.root_fd, w.path) as (dfd, name):
                        os.chown(name, w.meta.uid, w.meta.gid, dir_fd=dfd, follow_symlinks=False)
                        os.utime(name, ns=(w.meta.atime_ns, w.meta.mtime_ns), dir_fd=dfd, follow_symlinks=False)
                    self.report.metadata += 1
            elif w.type == "hardlink":
                try:
                    self._hardlink(w)
                except OSError as e:
                    self.report.errors.append(f"{w.path}: {e.strerror or e}")
        # 5. directory metadata, deepest first (their entries are all made)
        for w in reversed(wants):
            if w.type == "dir":
                try:
                    fd = open_dir(self.root_fd, w.path)
                except OSError as e:
                    self.report.errors.append(f"{w.path}: {e.strerror or e}")
                    continue
                try:
                    st = os.fstat(fd)
                    if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) != \
                            (w.meta.mode, w.meta.uid, w.meta.gid, w.meta.mtime_ns) or w.path not in have:
                        set_dir_meta(fd, w.meta)
                finally:
                    os.close(fd)
        syncfs(self.root_fd)
        return self.report

    def _new_stubs(self, wants: list[Want], *, prepare_only: bool) -> dict[str, tree.Record]:
        """Records for new stubs: their paths (and hashes) appended durably first."""
        if not wants:
            return {}
        ids = add_paths(self.store.path, [w.path for w in wants])
        out = {}
        if self.remote:
            first = add_hashes(self.store.path, [bytes.fromhex(w.entry.sha256) for w in wants])  # type: ignore[union-attr]
            for i, w in enumerate(wants):
                assert w.entry is not None
                out[w.path] = remote_record(ids[i], w.entry, first + i)
        else:
            for i, w in enumerate(wants):
                assert w.st is not None
                out[w.path] = tree.Record(path_id=ids[i], size=w.st.st_size, mtime_ns=w.st.st_mtime_ns,
                                          src_ino=w.st.st_ino, src_ctime_ns=w.st.st_ctime_ns)
        return out

    def _through_eviction(self, items: list[tuple[str, _Have, Optional[Want]]],
                          made: Optional[dict[str, tree.Record]] = None, *, relink: str = "") -> None:
        """Replace (want given) or remove (None) source files, stubs or resident, under a write lease."""
        todo: list[tuple[str, Optional[Want], FileState]] = []
        fds: list[int] = []
        then: list[Callable[[int], None]] = []
        for p, h, w in items:
            fs = self.state(h)
            if fs is FileState.DIRTY:
                self.report.dirty_kept.append(p)
                continue
            try:
                fd = os.open(self._abs(h), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ETXTBSY:
                    self.report.busy.append(p)
                else:
                    self.report.errors.append(f"{p}: {e.strerror}")
                continue
            fds.append(fd)
            todo.append((p, w, fs))
            then.append(self._replacer(p, w, made, relink))
        if not fds:
            return
        try:
            if self.filler is not None:
                with self.filler._evict_lock:
                    outcomes = Evictor(self.source, self.paths, self.log, filler=self.filler).replace(fds, then)
            else:
                outcomes = Evictor(self.source, self.paths, self.log, distrust=self.distrust).replace(fds, then)
        finally:
            for fd in fds:
                os.close(fd)
        for (p, w, fs), o in zip(todo, outcomes):
            self._count(p, w, fs, o)

    def _count(self, p: str, w: Optional[Want], fs: FileState, o: Outcome) -> None:
        if o.evicted:
            if w is None:
                self.report.removed += 1
            elif fs is FileState.STUB or w.type == "hardlink":
                self.report.replaced += 1
            else:
                self.report.restubbed += 1
        elif o.reason.startswith("in use") or o.reason.startswith("being filled"):
            self.report.busy.append(p)
        elif o.reason.startswith("dirty") or o.reason.startswith("unverified"):
            self.report.dirty_kept.append(p)
        else:
            self.report.errors.append(f"{p}: {o.reason}")

    def _replacer(self, p: str, w: Optional[Want], made: Optional[dict[str, tree.Record]],
                  relink: str = "") -> Callable[[int], None]:
        def run(_fd: int) -> None:
            with _Parent(self.root_fd, p) as (dfd, name):
                if relink:
                    tmp = f"{tree.TMP_PREFIX}l{os.getpid()}"
                    with _Parent(self.root_fd, relink) as (sdfd, sname):
                        os.link(sname, tmp, src_dir_fd=sdfd, dst_dir_fd=dfd, follow_symlinks=False)
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                elif w is None:
                    os.unlink(name, dir_fd=dfd)
                else:
                    assert made is not None
                    make_file(dfd, name, w.meta, made[p], mark=self.mark)
        return run

    def _metadata(self, p: str, h: _Have, w: Want) -> None:
        """Mode, owner, xattrs of a file whose content did not change, under a write lease; a resident
        file's log entry follows its new ctime (the change is the source's, not a user's)."""
        fs = self.state(h)
        if fs is FileState.DIRTY:
            self.report.dirty_kept.append(p)
            return
        try:
            fd = os.open(self._abs(h), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self.report.busy.append(p) if e.errno == errno.ETXTBSY else self.report.errors.append(f"{p}: {e}")
            return
        job = None
        leased = False
        try:
            if self.filler is not None:
                job = self.filler.begin_evict(fd)
                if job is None:
                    self.report.busy.append(p)
                    return
            leased = take_write_lease(fd)
            if not leased:
                self.report.busy.append(p)
                return
            key = state.key_of(fd)
            st = os.fstat(fd)
            fs = self.log.state(h.rec, st, key)
            if fs is FileState.DIRTY:
                self.report.dirty_kept.append(p)
                return
            if set_meta(fd, w.meta):
                if fs in (FileState.RESIDENT, FileState.UNVERIFIED):
                    op = state.OP_RESIDENT if fs is FileState.RESIDENT else state.OP_UNVERIFIED
                    self.log.record([(key, op, os.fstat(fd).st_ctime_ns)], durable=True)
                self.report.metadata += 1
        finally:
            if leased:
                release_lease(fd)
            if job is not None and self.filler is not None:
                self.filler.end_evict(job, stub=False)
            os.close(fd)

    def _hardlink(self, w: Want) -> None:
        try:
            first = os.stat(w.target, dir_fd=self.root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        try:
            now = os.stat(w.path, dir_fd=self.root_fd, follow_symlinks=False)
        except FileNotFoundError:
            with _Parent(self.root_fd, w.target) as (sdfd, sname), _Parent(self.root_fd, w.path) as (ddfd, dname):
                os.link(sname, dname, src_dir_fd=sdfd, dst_dir_fd=ddfd, follow_symlinks=False)
            self.report.added += 1
            return
        if (now.st_dev, now.st_ino) == (first.st_dev, first.st_ino):
            return
        path = f"/proc/self/fd/{self.root_fd}/{w.path}"
        rec = tree.read_record(path) if stat.S_ISREG(now.st_mode) else None
        if rec is None:
            self.report.kept.append(w.path)  # a user's file holds the name
            return
        # the name still holds the group's old inode (its first name got a new stub): relinked
        # through the eviction path, like any changed file (never a dirty or open one)
        self._through_eviction([(w.path, _Have(now, rec, path), w)], relink=w.target)

class _Parent:
    """(fd of the directory that holds path in the tree, its last name)."""

    def __init__(self, root_fd: int, path: str) -> None:
        self.root_fd = root_fd
        self.path = path
        self.fd = -1

    def __enter__(self) -> tuple[int, str]:
        head, _, name = self.path.rpartition("/")
        self.fd = open_dir(self.root_fd, head)
        return self.fd, name

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def _same_type(st: os.stat_result, w: Want) -> bool:
    if w.type == "dir":
        return stat.S_ISDIR(st.st_mode)
    if w.type in ("file", "hardlink"):
        return stat.S_ISREG(st.st_mode)
    if w.type == "symlink":
        return stat.S_ISLNK(st.st_mode)
    return not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode))


def _meta_differs(st: os.stat_result, m: Meta, h: _Have) -> bool:
    if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (m.mode, m.uid, m.gid):
        return True
    path = h.path
    try:
        now = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)
               if k.startswith("user.") or k in mf.XATTR_NAMES}
    except OSError:
        return False
    return now != dict(m.xattrs)


def source_wants(store: tree.Store, policy: Policy, ns: Any = None) -> tuple[list[Want], Optional[mf.Manifest]]:
    if tree.is_remote(store.source):
        from hsmfs.remote import fetch_manifest

        m, _raw = fetch_manifest(store.source, policy, ns)
        return wants_from_manifest(m), m
    return wants_from_directory(store.source), None


def _run(store: tree.Store, root_fd: int, source: Source, policy: Policy, *, filler: Optional[Filler] = None,
         ns: Any = None, distrust: bool = False) -> Report:
    try:
        if not tree.is_remote(store.source):
            from hsmfs.trust import open_source_root

            os.close(open_source_root(store))  # never a replaced root
        wants, m = source_wants(store, policy, ns)
    except HsmfsError as e:
        log.error("refresh of %s: %s", store.tree, e)
        return Report(errors=[str(e)], error_code=e.exit_code)
    paths = tree.PathTable(store.path)
    log_ = filler.log if filler is not None else StateLog(store.path, writable=True)
    a = _Apply(store, root_fd, log_, paths, source, filler=filler, distrust=distrust)
    try:
        report = a.run(wants)
    finally:
        a.close()
        paths.close()
        if filler is None:
            log_.close()
    if m is not None:
        tree.atomic_write(os.path.join(store.path, "manifest.json"), m.dumps())
        report.version = m.id
    else:
        report.version = f"rescan of {store.source}"
    log.info("refreshed %s to %s: %d added, %d removed, %d stubs replaced, %d resident made stubs, %d metadata; "
             "%d dirty kept, %d in use, %d errors", store.tree, report.version, report.added, report.removed,
             report.replaced, report.restubbed, report.metadata, len(report.dirty_kept), len(report.busy),
             len(report.errors))
    for p in report.dirty_kept:
        log.warning("refresh kept %s: dirty (changed by a user); the source's new version is not applied", p)
    return report


_lock = threading.Lock()  # one refresh at a time per filler


def refresh_live(serving: Serving) -> Report:
    """Refresh the tree a running filler serves (through its private root: no events of its own)."""
    with _lock:
        ns = getattr(serving.source, "transport", None)
        return _run(serving.store, serving.root_fd, serving.source, serving.policy, filler=serving.filler,
                    ns=ns.ns if ns is not None else None)


def refresh_offline(store: tree.Store, policy: Optional[Policy] = None, *, netns_fd: Optional[int] = None,
                    netns_label: str = "host") -> Report:
    """Refresh a store no mount serves (no group: the next session marks the new stubs); fetches go
    through the network namespace netns_fd (the caller's fd, not closed here)."""
    from hsmfs.policy import Policy
    from hsmfs.sources.store import store_source

    policy = policy or Policy()
    source = store_source(store, policy, netns_fd=netns_fd, netns_label=netns_label, watch_routes=False)
    root = os.open(store.tree, _DIR)
    try:
        t = getattr(source, "transport", None)
        return _run(store, root, source, policy, distrust=store.mounted, ns=t.ns if t is not None else None)
    finally:
        os.close(root)
        source.close()


class Refresher:
    """policy refresh_interval: refresh the running filler's tree every so many seconds."""

    def __init__(self, serving: Serving, interval: float) -> None:
        self.serving = serving
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="refresh", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                r = refresh_live(self.serving)
                if r.errors:
                    log.error("periodic refresh: %s", "; ".join(r.errors[:5]))
            except Exception:
                log.exception("periodic refresh failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
