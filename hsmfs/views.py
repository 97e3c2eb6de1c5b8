"""Attaching and detaching views: marked while detached, so no process ever sees one unwatched."""

from __future__ import annotations

import errno
import os
import re
import select
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from hsmfs.errors import CannotCreate, NotPermitted, UsageError
from hsmfs.linux import fanotify as fan
from hsmfs.linux.fs import RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2
from hsmfs.linux.mount import (
    AT_FDCWD,
    MOUNT_ATTR__ATIME,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_STRICTATIME,
    mount_setattr,
    move_mount_to_fd,
    open_tree_clone,
    setns,
    umount,
)
from hsmfs.linux.ns import is_mount_ns, mount_ns_of_pid, owner_userns_inode
from hsmfs.names import escape


@dataclass(frozen=True)
class Namespace:
    """A mount namespace named on the command line (``--namespace PID|NSFILE``), opened and checked."""

    fd: int  # an fd of the namespace (the caller closes it)
    inode: int  # what names it from now on: no pid, no path
    label: str  # for messages: "pid 1234" or the file given


def open_namespace(spec: str) -> Namespace:
    """Open the mount namespace named by spec, a pid or a namespace file, and check that hsmfs may use it.

    A pid is resolved through a pidfd (no recycled pid can redirect it). The namespace must be
    owned by hsmfs's own user namespace: in one owned by another user namespace its owner, often
    an unprivileged user, controls every mount and every binary, and can unmount, cover or copy
    the view at will (docs/security.md).
    """
    label = f"pid {spec}" if spec.isdigit() else spec
    try:
        fd = mount_ns_of_pid(int(spec)) if spec.isdigit() else os.open(spec, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        what = "no process" if e.errno == errno.ESRCH else f"cannot open its mount namespace ({e.strerror})"
        raise UsageError(f"--namespace {spec}: {what}",
                         hint="give the pid of a running process, or a mount namespace file such as "
                         "/proc/PID/ns/mnt") from None
    try:
        if not is_mount_ns(fd):
            raise UsageError(f"--namespace {spec}: not a mount namespace",
                             hint="give a pid, or a file such as /proc/PID/ns/mnt")
        if owner_userns_inode(fd) != os.stat("/proc/self/ns/user").st_ino:
            raise NotPermitted(f"--namespace {spec}: that mount namespace belongs to another user namespace "
                               "(a rootless container or 'unshare -U'); its owner controls its mounts and "
                               "binaries, so hsmfs does not put views there",
                               hint="attach the view on the host and bind-mount it into the container instead")
        return Namespace(fd, os.fstat(fd).st_ino, label)
    except BaseException:
        os.close(fd)
        raise


def find_namespace(inode: int) -> Optional[int]:
    """An fd of the live mount namespace with that inode number, or None once no process is left in it.

    Looked up among /proc/PID/ns/mnt and checked on the opened fd, so a pid that is reused meanwhile
    can only make the lookup miss, never open another namespace.
    """
    for pid in filter(str.isdigit, os.listdir("/proc")):
        path = f"/proc/{pid}/ns/mnt"
        try:
            if os.stat(path).st_ino != inode:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_ino == inode:
            return fd
        os.close(fd)
    return None


def mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id in fdinfo of fd {fd}")


def view_restrictions(source_fd: int, *, allow_suid: bool = False, allow_devices: bool = False) -> int:
    """The MOUNT_ATTR_NOSUID/NODEV/NOEXEC a view of the source (its root's fd) gets.

    A view is a clone of the store's mount, and populate made every setuid file and device node of
    the source there as root. nosuid and nodev unless the policy allows them (allow_suid,
    allow_devices), and in any case each of nosuid, nodev, noexec that the source's mount has:
    without these a setuid binary or a device node from a nosuid/nodev source would work through
    the view and hand its powers to any user. Populate does not cross the source's mount points,
    so the source root's mount is the only one whose files a view shows.
    """
    flags = os.fstatvfs(source_fd).f_flag
    return ((MOUNT_ATTR_NOSUID if flags & os.ST_NOSUID or not allow_suid else 0)
            | (MOUNT_ATTR_NODEV if flags & os.ST_NODEV or not allow_devices else 0)
            | (MOUNT_ATTR_NOEXEC if flags & os.ST_NOEXEC else 0))


def remote_restrictions(*, allow_suid: bool = False) -> int:
    """The attributes of a view of a remote source: nodev always (a manifest holds no device nodes),
    nosuid unless the policy allows setuid bits (the publisher's)."""
    return MOUNT_ATTR_NODEV | (0 if allow_suid else MOUNT_ATTR_NOSUID)


_TARGET_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
_TARGET_RESOLVE = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


def open_target(target: str) -> int:
    """An O_PATH fd of the directory target, reached from / without following any symlink.

    hsmfs mount resolved the target (symlinks only if root's, hsmfs.trust) and checked it. A user
    who can write to a directory on its path could since have put a symlink there (to /etc/cron.d,
    say): the view is attached onto this fd, so it lands on the directory found here or nowhere.
    """
    try:
        return openat2(AT_FDCWD, target, _TARGET_FLAGS, _TARGET_RESOLVE)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EXDEV):
            raise CannotCreate(f"target {escape(target)} is no longer the directory hsmfs mount checked: "
                               f"{e.strerror} on its path (someone replaced it, or a directory above it, by a "
                               "symlink?)", hint="give the target's real path, in a directory users cannot "
                               "write to") from None
        raise


def attach(group: int, tree: str, target: str, mask: int, *, nsfd: Optional[int] = None,
           target_fd: Optional[int] = None, restrict: int = 0, strictatime: bool = False) -> int:
    """Clone tree's mount, mark the clone, then move it onto target; return the view's mount id.

    The move is onto an fd of target (target_fd, else :func:`open_target`), never onto a path
    looked up anew. With nsfd it happens in that mount namespace (:func:`in_namespace`), onto the
    target opened there the same way.
    """
    mfd = open_tree_clone(tree)
    try:
        if restrict:
            mount_setattr(mfd, restrict)
        if strictatime:  # every read records its time: the space budget evicts least recently used first
            mount_setattr(mfd, MOUNT_ATTR_STRICTATIME, MOUNT_ATTR__ATIME)
        fan.mark(group, fan.FAN_MARK_ADD | fan.FAN_MARK_MOUNT, mask, mfd, ".")
        mnt = mount_id(mfd)
        if nsfd is not None:
            try:
                in_namespace(nsfd, lambda: _move_onto(mfd, target))
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EXDEV):
                    raise CannotCreate(f"target {escape(target)} in that mount namespace: {e.strerror} on its path",
                                       hint="give the target's real path in that namespace") from None
                raise
            return mnt
        tfd = open_target(target) if target_fd is None else target_fd
        try:
            move_mount_to_fd(mfd, tfd)
        finally:
            if target_fd is None:
                os.close(tfd)
        return mnt
    finally:
        os.close(mfd)


def _move_onto(mfd: int, target: str) -> None:
    """In the namespace helper: only system calls, OSError on failure."""
    tfd = openat2(AT_FDCWD, target, _TARGET_FLAGS, _TARGET_RESOLVE)
    try:
        move_mount_to_fd(mfd, tfd)
    finally:
        os.close(tfd)


def in_namespace(nsfd: int, action: Callable[[], None]) -> None:
    """Run action in the mount namespace nsfd, in a forked child; OSError if it fails there.

    A child, because setns(CLONE_NEWNS) needs a single-threaded caller and the caller stays where it
    is. The child runs nothing but system calls through functions already loaded: no program of
    that namespace, no import (its files are whatever that namespace shows), then _exit.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    with warnings.catch_warnings():  # 3.12+ warns about fork in a threaded process; the child only makes syscalls
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: single-threaded, only syscalls, then _exit
        code = 0
        try:
            os.close(r)
            setns(nsfd)
            action()
        except OSError as e:
            os.write(w, f"{e.errno}:{e}".encode())
            code = 1
        except BaseException:
            code = 2
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        err, _, text = msg.partition(":")
        raise OSError(int(err) if err.isdigit() else errno.EIO, text or f"namespace helper failed ({status})")


def detach(target: str, *, lazy: bool = False, ns: Optional[int] = None) -> None:
    """Unmount a view; ns is the inode of its mount namespace when it is not ours.

    There, umount2 runs in a forked child that joined the namespace (:func:`in_namespace`): never
    a program of that namespace, whose binaries its owner may have replaced. A namespace with no
    process left took its mounts, the view among them, with it: nothing to do.

    The target's directory is reached without following a symlink (:func:`_umount_at`): a user who
    can write to a directory above the view could otherwise point its path at another mount (one
    that hides what is below it, say) and have root unmount that.
    """
    if ns is None or ns == ns_inode():
        _umount_at(target, lazy=lazy, here=True)
        return
    nsfd = find_namespace(ns)
    if nsfd is None:
        return
    try:
        in_namespace(nsfd, lambda: _umount_at(target, lazy=lazy, here=False))
    finally:
        os.close(nsfd)


def _umount_at(target: str, *, lazy: bool, here: bool) -> None:
    """umount2 of the last name of target in its parent directory, opened without following any
    symlink (ELOOP if there is one); the last name is never followed either (UMOUNT_NOFOLLOW).

    here: name the parent through /proc/self/fd (this process may have threads); otherwise (the
    single-threaded namespace helper, whose /proc may be another pid namespace's) fchdir to it.
    """
    head, name = os.path.split(os.path.normpath(target))
    if not name:
        umount(target, lazy=lazy)
        return
    pfd = openat2(AT_FDCWD, head, os.O_PATH | os.O_DIRECTORY, _TARGET_RESOLVE)
    try:
        if here:
            umount(f"/proc/self/fd/{pfd}/{name}", lazy=lazy)
        else:
            os.fchdir(pfd)
            umount(name, lazy=lazy)
    finally:
        os.close(pfd)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mountpoint(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether something is mounted at path. os.path.ismount misses bind mounts within one filesystem."""
    path = os.path.realpath(path)
    with open(mountinfo) as f:
        return any(_unescape(line.split(" ", 5)[4]) == path for line in f)


def wait_mounted(path: str, timeout: float) -> bool:
    """Wait up to timeout seconds for something to be mounted at path; whether it is. Wakes on
    mount changes only: ``/proc/self/mountinfo`` raises POLLPRI on each one (proc(5))."""
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        p = select.poll()
        p.register(fd, select.POLLPRI)  # from the table as it was at the open
        deadline = time.monotonic() + timeout
        while not is_mountpoint(path):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            p.poll(int(left * 1000) + 1)
        return True
    finally:
        os.close(fd)


def marked_mount(group: int) -> Optional[int]:
    """The mount id of the group's view (attached or lazily detached), None once it is gone.

    The kernel destroys a mount's marks when the mount is freed. The view's mark is the mount mark
    with events in its mask; the filler's own clone of the tree carries an ignore mark only
    (fdinfo: ``fanotify mnt_id:ID mflags:F mask:M ignored_mask:I``, in hex).
    """
    with open(f"/proc/self/fdinfo/{group}") as f:
        for line in f:
            if line.startswith("fanotify mnt_id:"):
                fields = dict(kv.split(":", 1) for kv in line.split()[1:] if ":" in kv)
                if int(fields.get("mask", "0"), 16):
                    return int(fields["mnt_id"], 16)
    return None


# --- other mounts of a tree ------------------------------------------------------------------------
#
# The view's mount mark covers the view alone; the stubs' inode marks cover every other path to the
# tree, but only while the group lives (docs/unwatched.md). These find the mounts that reach the
# tree without being the view, in every mount namespace, so that the group is not given up while
# one of them can still read a stub.

Kind = Literal["bind mount", "namespace copy", "overlay"]


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo (proc(5)); paths unescaped."""

    mnt_id: int
    parent: int
    dev: str  # "major:minor" of the filesystem (not st_dev, which differs per btrfs subvolume)
    root: str  # the mount's root within its filesystem
    point: str  # where it is mounted, as the namespace's processes see it
    shared: Optional[int]  # peer group
    master: Optional[int]  # the peer group it receives propagation from
    fstype: str
    options: str  # per-superblock options (overlayfs: its layers)

    @classmethod
    def parse(cls, line: str) -> MountEntry:
        f = line.rstrip("\n").split(" ")
        sep = f.index("-", 6)
        tags = dict(t.partition(":")[::2] for t in f[6:sep])
        return cls(int(f[0]), int(f[1]), f[2], _unescape(f[3]), _unescape(f[4]),
                   int(tags["shared"]) if "shared" in tags else None,
                   int(tags["master"]) if "master" in tags else None, f[sep + 1], f[sep + 3])

    def layers(self) -> list[str]:
        """An overlay's lower, data and upper directories (absolute paths only), as its mounter named them."""
        out: list[str] = []
        for opt in self.options.split(","):  # a comma in a path is escaped as \054
            key, _, value = opt.partition("=")
            if key == "lowerdir":  # lowerdir=a:b::c (\: is a colon in a name)
                out += [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", value) if p]
            elif key in ("lowerdir+", "datadir+", "upperdir"):
                out.append(value)
        return [_unescape(p) for p in out if p.startswith("/")]


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    with open(path) as f:
        return [MountEntry.parse(line) for line in f]


@dataclass(frozen=True)
class OtherMount:
    """A mount other than the view through which a tree's files can be read."""

    kind: Kind
    point: str  # in the namespace of pid
    pid: int  # a process that shows its mount namespace
    here: bool  # in the caller's own mount namespace
    # in a mount namespace that another user namespace owns (unshare -Urm, a rootless container):
    # its owner, any user, made it and can keep it forever; it does not block hsmfs umount
    foreign: bool = False

    def __str__(self) -> str:
        owner = " (owned by another user namespace)" if self.foreign else ""
        where = "" if self.here else f" in the mount namespace of pid {self.pid}{owner}"
        if self.kind == "overlay":
            return f"under an overlay at {self.point}{where}"
        if self.here:
            return f"at {self.point} (bind mount)"
        return f"{where.strip()} at {self.point}"


def ns_inode(ns_file: Optional[str] = None) -> int:
    """The inode number that identifies a mount namespace (default: the caller's)."""
    return os.stat(ns_file or "/proc/self/ns/mnt").st_ino


def other_mounts(tree: str, target: str, *, view_ns: Optional[int] = None,
                 view_id: Optional[int] = None) -> list[OtherMount]:
    """Every mount of tree (a directory on the store) but the view, in every mount namespace.

    Found: mounts of the store's filesystem whose root is tree or beneath it (bind mounts of the
    view, its copies in namespaces made later), and overlays with a layer that reaches the tree:
    through such a mount, through the store's own path, or named target (the view's mount point in
    view_ns, default ours: an overlay keeps its own clone of the view after the view is gone).
    view_id is the live view's mount id: the view, and the copies that propagation will unmount
    with it, are left out. Namespaces are read once each, from the first process that shows one.
    """
    here = ns_inode()
    view_ns = here if view_ns is None else view_ns
    tables: dict[int, tuple[int, list[MountEntry]]] = {here: (os.getpid(), read_mountinfo())}
    foreign: set[int] = set()
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            ns = ns_inode(f"/proc/{pid}/ns/mnt")
            if ns not in tables:
                tables[ns] = (pid, read_mountinfo(f"/proc/{pid}/mountinfo"))
                if _foreign(pid, ns):
                    foreign.add(ns)
        except (OSError, ValueError):  # gone, a kernel thread, or a line we cannot parse
            continue
    real = os.path.realpath(tree)
    store = _containing(tables[here][1], real)
    if store is None:
        raise OSError(f"{real} is on no mount")
    dev, tree_root = store.dev, _join(store.root, os.path.relpath(real, store.point))

    def reaches(m: MountEntry, rel: str = ".") -> bool:
        return m.dev == dev and _beneath(_join(m.root, rel), tree_root)

    views = [m for _ns, (_pid, t) in tables.items() for m in t if m.mnt_id == view_id]
    gone_with_view = _propagation_copies(views[0], tables) if views else set()
    found: dict[tuple[int, int], OtherMount] = {}
    for ns, (pid, table) in tables.items():
        for m in table:
            if reaches(m) and m.mnt_id != view_id and (ns, m.mnt_id) not in gone_with_view:
                found[ns, m.mnt_id] = OtherMount("bind mount" if ns == here else "namespace copy", m.point,
                                                 pid, ns == here, ns in foreign)
        grown = True
        while grown:  # an overlay over an overlay of the tree reaches it too
            grown = False
            for m in table:
                if m.fstype != "overlay" or (ns, m.mnt_id) in found:
                    continue
                for layer in m.layers():
                    under = _containing(table, layer)
                    if (ns == view_ns and _beneath(layer, target)) or (under is not None and (
                            (ns, under.mnt_id) in found or reaches(under, os.path.relpath(layer, under.point)))):
                        found[ns, m.mnt_id] = OtherMount("overlay", m.point, pid, ns == here, ns in foreign)
                        grown = True
                        break
    return list(found.values())


def _foreign(pid: int, ns: int) -> bool:
    """Whether the mount namespace ns (that of pid) is owned by another user namespace than ours.

    Checked on the opened namespace file: a pid reused meanwhile gives another inode, and then,
    as on any error, the answer is False (the mount keeps blocking: never give the group up on a
    guess).
    """
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_ino == ns and owner_userns_inode(fd) != os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return False
    finally:
        os.close(fd)


def _propagation_copies(view: MountEntry, tables: dict[int, tuple[int, list[MountEntry]]]) -> set[tuple[int, int]]:
    """(namespace, mount id) of the copies of the view that unmounting it unmounts too.

    Umount propagates to whatever is mounted at the same place under the peers and slaves of the
    view's parent (sharedsubtree.rst): a namespace made with slave or shared propagation, or a
    shared parent's peer, holds such a copy, and it goes with the view.
    """
    entries = {(ns, m.mnt_id): m for ns, (_pid, t) in tables.items() for m in t}
    masters = {m.shared: m.master for m in entries.values() if m.shared is not None and m.master is not None}
    parent = next((m for (_ns, i), m in entries.items() if i == view.parent), None)
    if parent is None or parent.shared is None:
        return set()
    spot = _join(parent.root, os.path.relpath(view.point, parent.point))

    def receives(m: MountEntry) -> bool:
        if m.shared == parent.shared:
            return True
        group, seen = m.master, set()
        while group is not None and group not in seen:
            if group == parent.shared:
                return True
            seen.add(group)
            group = masters.get(group)
        return False

    out = set()
    for (ns, i), m in entries.items():
        p = entries.get((ns, m.parent))
        if p is not None and p.dev == parent.dev and receives(p) \
                and _join(p.root, os.path.relpath(m.point, p.point)) == spot:
            out.add((ns, i))
    return out


def _containing(table: list[MountEntry], path: str) -> Optional[MountEntry]:
    """The mount that path (absolute, no symlinks) is on: the last one mounted at its deepest mount point."""
    best: Optional[MountEntry] = None
    for m in table:
        if _beneath(path, m.point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def _beneath(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _join(root: str, rel: str) -> str:
    return os.path.normpath(os.path.join(root, rel))
