"""``hsmfs doctor``: check that this machine can run hsmfs, and say exactly what to fix if not.

Every check is real: it asks the kernel (fanotify_init, fanotify_mark, open_tree, statfs) rather
than guessing from version numbers, and undoes what it did (groups closed, detached mounts dropped).
See docs/doctor.md for what each check means.

    checks = run_checks("/var/lib/hsmfs")
    print(format_checks(checks))   # "ok    kernel           Linux 6.18.44 (...)" and so on
    sys.exit(0 if all(c.ok for c in checks) else os.EX_UNAVAILABLE)
"""

from __future__ import annotations

import errno
import importlib
import os
import pwd
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from hsmfs import trust
from hsmfs.linux import caps, fanotify
from hsmfs.linux import fs as linux_fs
from hsmfs.linux import mount as linux_mount
from hsmfs.names import escape
from hsmfs.session import new_group

MIN_KERNEL = (6, 14)
MIN_PYTHON = (3, 9)
FANOTIFY_SYSCTL_DIR = "/proc/sys/fs/fanotify"


_SUPPORTED = "ext4, xfs or btrfs"
_ROOT_FIX = "run as root: sudo hsmfs doctor"
_NOT_DIR_FIX = "choose a directory for the store: hsmfs doctor --store /srv/hsmfs"
_KERNEL_FIX = "boot Linux 6.14 or later with CONFIG_FANOTIFY=y and CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y"


@dataclass(frozen=True)
class Check:
    """The outcome of one check. ``fix`` says what to do; it is empty when ``ok`` and not ``warning``.

    A warning (``ok`` and ``warning``) is something hsmfs works with but an admin should know: it
    does not change the doctor's exit status.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False


def run_checks(store_dir: str, sources: Sequence[str] = ()) -> list[Check]:
    """Run every check for a store at store_dir (which need not exist yet), in a fixed order; one
    "source path" check per source given."""
    store = os.path.abspath(os.fspath(store_dir))
    probe_dir = _nearest_dir(store)
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("kernel", check_kernel),
        ("privileges", check_privileges),
        ("fanotify", lambda: check_fanotify(probe_dir)),
        ("store fs", lambda: check_store_fs(store)),
        ("mount API", lambda: check_mount_api(probe_dir)),
        ("store privacy", lambda: check_store_privacy(store)),
        ("store path", lambda: check_store_path(store)),
        ("fanotify limits", check_fanotify_limits),
        ("python", check_python),
    ]
    steps += [("source path", partial(check_source_path, os.path.abspath(src))) for src in sources]
    return [_guarded(name, step) for name, step in steps]


def format_checks(checks: Sequence[Check]) -> str:
    """Aligned lines, one per check; a failed check or a warning is followed by an indented ``fix:`` line."""
    width = max((len(c.name) for c in checks), default=0) + 2
    lines = []
    for c in checks:
        label = "FAIL" if not c.ok else "WARN" if c.warning else "ok"
        lines.append(f"{label:<6}{c.name:<{width}}{c.detail}".rstrip())
        if (not c.ok or c.warning) and c.fix:
            lines.append(f"{'':<{6 + width}}fix: {c.fix}")
    return "\n".join(lines)


# -- the checks ---------------------------------------------------------------------------------


def check_kernel(release: Optional[str] = None) -> Check:
    """Pre-content events (FAN_PRE_ACCESS) were merged in Linux 6.14."""
    release = os.uname().release if release is None else release
    need = f"pre-content events need {MIN_KERNEL[0]}.{MIN_KERNEL[1]}+"
    m = re.match(r"(\d+)\.(\d+)", release)
    if m is None:
        return Check("kernel", False, f"cannot read a version from kernel release {release!r} ({need})",
                     _KERNEL_FIX)
    if (int(m.group(1)), int(m.group(2))) < MIN_KERNEL:
        return Check("kernel", False, f"Linux {release} is too old ({need})", _KERNEL_FIX)
    return Check("kernel", True, f"Linux {release} ({need})")


def check_privileges(status_path: str = "/proc/self/status") -> Check:
    """hsmfs needs uid 0 (the store is root's) and CAP_SYS_ADMIN (fanotify permission events, mounts)."""
    euid = os.geteuid()
    has_admin = caps.has_effective(caps.CAP_SYS_ADMIN, status_path)
    if euid != 0:
        try:
            user = f"uid {euid} ({pwd.getpwuid(euid).pw_name})"
        except KeyError:
            user = f"uid {euid}"
        user += "" if has_admin else " without CAP_SYS_ADMIN"
        return Check("privileges", False, f"running as {user}; hsmfs needs root", _ROOT_FIX)
    if not has_admin:
        return Check("privileges", False,
                     "running as uid 0, but CAP_SYS_ADMIN is not in the effective set "
                     "(a container or a service with CapabilityBoundingSet=?)",
                     "give hsmfs CAP_SYS_ADMIN: run it on the host, in a container started with "
                     "--cap-add SYS_ADMIN, or in a unit without a CapabilityBoundingSet= that drops it")
    return Check("privileges", True, "uid 0 with CAP_SYS_ADMIN")


def check_fanotify(probe_dir: str) -> Check:
    """A pre-content group can be made, and the kernel knows FAN_PRE_ACCESS.

    fanotify_init(FAN_CLASS_PRE_CONTENT) alone also works on kernels older than 6.14, so this also
    puts a FAN_PRE_ACCESS mark on probe_dir: an old kernel rejects the unknown mask bit with EINVAL
    before looking at the path; EOPNOTSUPP means the kernel knows it and only that filesystem does
    not opt in (the "store fs" check's business).
    """
    stage, err = _probe_pre_content_mark(probe_dir)
    if stage == "init":
        detail = f"fanotify_init(FAN_CLASS_PRE_CONTENT) failed: {_errname(err)}"
        if err == errno.EPERM:
            return Check("fanotify", False, f"{detail}: permission events need root", _ROOT_FIX)
        if err == errno.EINVAL:
            return Check("fanotify", False,
                         f"{detail}: this kernel has no fanotify permission events "
                         "(CONFIG_FANOTIFY_ACCESS_PERMISSIONS is off)", _KERNEL_FIX)
        if err == errno.ENOSYS:
            return Check("fanotify", False, f"{detail}: this kernel has no fanotify (CONFIG_FANOTIFY is off)",
                         _KERNEL_FIX)
        if err == errno.EMFILE:
            return Check("fanotify", False, f"{detail}: this user has too many fanotify groups",
                         "stop unused fanotify listeners, or raise the limit: "
                         "sysctl -w fs.fanotify.max_user_groups=256")
        return Check("fanotify", False, detail,
                     "free some memory or file descriptors and run hsmfs doctor again")
    if stage == "mark" and err == errno.EINVAL:
        return Check("fanotify", False,
                     "a pre-content group works, but the kernel rejects FAN_PRE_ACCESS (EINVAL): "
                     "it predates pre-content events", _KERNEL_FIX)
    return Check("fanotify", True,
                 "pre-content group (unlimited queue and marks) works; FAN_PRE_ACCESS known")


def check_store_fs(store_dir: str) -> Check:
    """The store is on a filesystem that accepts pre-content marks, and a real mark on it works."""
    store = os.path.abspath(store_dir)
    anchor = _nearest_existing(store)
    subject = store if anchor == store else f"{anchor} (where {store} will be made)"
    if not os.path.isdir(anchor):
        return Check("store fs", False, f"{anchor} is not a directory", _NOT_DIR_FIX)
    try:
        fstype = linux_fs.fs_type(anchor)
    except PermissionError:
        return Check("store fs", False, f"cannot look at {subject}: permission denied", _ROOT_FIX)
    if fstype.startswith("unknown"):
        fstype = "an unknown filesystem" + fstype[len("unknown"):]
    stage, err = _probe_pre_content_mark(anchor)
    if fstype not in linux_fs.HSM_FILESYSTEMS:
        if stage == "ok":
            detail = (f"{subject} is on {fstype}: it takes pre-content marks, "
                      f"but hsmfs supports only {_SUPPORTED}")
        else:
            tried = f" (fanotify_mark: {_errname(err)})" if stage == "mark" else ""
            detail = f"{subject} is on {fstype}, which does not support fanotify pre-content marks{tried}"
        return Check("store fs", False, detail, _fs_fix())
    if stage == "init":
        if err == errno.EPERM:
            return Check("store fs", True, f"{subject} is on {fstype} (a test mark needs root: not tried)")
        return Check("store fs", False,
                     f"{subject} is on {fstype}, but no fanotify group for a test mark: {_errname(err)}",
                     "fix the fanotify check first")
    if stage == "mark":
        if err == errno.EINVAL:
            return Check("store fs", False,
                         f"{subject} is on {fstype}, but the kernel rejects FAN_PRE_ACCESS (EINVAL)",
                         _KERNEL_FIX)
        return Check("store fs", False,
                     f"{subject} is on {fstype}, but a FAN_PRE_ACCESS mark on it fails: {_errname(err)}",
                     _fs_fix())
    return Check("store fs", True, f"{subject} is on {fstype}; a FAN_PRE_ACCESS mark on it works")


def check_mount_api(probe_dir: str) -> Check:
    """Views are detached clones (open_tree(OPEN_TREE_CLONE)) marked before they are attached."""
    try:
        fd = linux_mount.open_tree_clone(probe_dir)
    except OSError as e:
        detail = f"open_tree(OPEN_TREE_CLONE) of {probe_dir} failed: {_errname(e.errno or 0)}"
        if e.errno == errno.EPERM:
            return Check("mount API", False, f"{detail}: cloning mounts needs CAP_SYS_ADMIN", _ROOT_FIX)
        if e.errno == errno.ENOSYS:
            return Check("mount API", False, f"{detail}: this kernel has no new mount API", _KERNEL_FIX)
        if e.errno == errno.EINVAL:
            return Check("mount API", False,
                         f"{detail}: the mount holding it cannot be cloned (unbindable?)",
                         "make its mount bindable: "
                         f"mount --make-private $(findmnt -no TARGET -T {probe_dir})")
        return Check("mount API", False, detail, "run hsmfs doctor again; report this if it persists")
    os.close(fd)  # a detached clone is dissolved when its last fd closes: nothing stays mounted
    return Check("mount API", True, f"open_tree(OPEN_TREE_CLONE) of {probe_dir} works")


def check_store_privacy(store_dir: str) -> Check:
    """Ordinary users must not reach the store: stubs read there are zeros with no event (§13)."""
    store = os.path.abspath(store_dir)
    try:
        st = os.stat(store)
    except FileNotFoundError:
        return Check("store privacy", True,
                     f"{store} does not exist yet; make it private: mkdir -m 700 {store}")
    except NotADirectoryError:
        return Check("store privacy", False,
                     f"{store} cannot exist: {_nearest_existing(store)} is not a directory", _NOT_DIR_FIX)
    path = os.path.realpath(store)
    while True:
        pst = os.stat(path)
        if _closed_to_users(path, pst):
            what = store if path == os.path.realpath(store) else path
            return Check("store privacy", True,
                         f"{store} is closed to non-root users ({what} is mode {pst.st_mode & 0o7777:04o}, "
                         "owner root)")
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    fix = f"chmod 700 {store}" if st.st_uid == 0 else f"chown root:root {store} && chmod 700 {store}"
    return Check("store privacy", False,
                 f"{store} is reachable by non-root users (mode {st.st_mode & 0o7777:04o}, "
                 "and every directory above it is searchable by others)", fix)


def check_store_path(store_dir: str) -> Check:
    """Only root can change the store and every directory above it (hsmfs mount refuses it otherwise).

    Whoever could rename one of them could put a store of their own making in its place, whose
    records name which source file each stub is filled from (docs/security.md).
    """
    store = os.path.abspath(store_dir)
    _real, weak = trust.weaknesses(store)
    if not weak:
        return Check("store path", True, f"only root can change {escape(store)} and the directories above it")
    return Check("store path", False, f"{escape(store)}: others can change what it is: "
                 + "; ".join(map(str, weak)) + " (hsmfs mount refuses such a store)",
                 "put the store where only root can change it (the default /var/lib/hsmfs is), or make "
                 "those directories root's: chown root:root DIR && chmod go-w DIR")


def check_source_path(source: str) -> Check:
    """A warning when someone other than root can change a directory above a source, or a symlink
    on the way to it: they can put another directory in the source root's place.

    hsmfs refuses to mount or serve a source root that is not the directory its store was built
    from (exit 66; docs/security.md), so this is a warning: such a user can stop the mount, not
    redirect it. The source directory itself may well be writable by its users.
    """
    src = os.path.abspath(source)
    _real, weak = trust.weaknesses(src, itself=False)
    if not weak:
        return Check("source path", True, f"only root can replace {escape(src)}")
    return Check("source path", True, f"{escape(src)}: others can replace it: " + "; ".join(map(str, weak))
                 + " (a replaced source root is refused, exit 66)",
                 "keep sources in directories only root can change, or make those directories root's: "
                 "chown root:root DIR && chmod go-w DIR (chmod +t keeps others' names in a shared one)",
                 warning=True)


def check_fanotify_limits(sysctl_dir: str = FANOTIFY_SYSCTL_DIR) -> Check:
    """Each hsmfs mount needs one fanotify group; its marks are unlimited (FAN_UNLIMITED_MARKS)."""
    try:
        groups = _read_int(os.path.join(sysctl_dir, "max_user_groups"))
        marks = _read_int(os.path.join(sysctl_dir, "max_user_marks"))
    except FileNotFoundError:
        return Check("fanotify limits", False, f"{sysctl_dir} does not exist: this kernel has no fanotify",
                     _KERNEL_FIX)
    detail = f"max_user_groups {groups} (one per hsmfs mount), max_user_marks {marks}"
    if groups < 2:
        return Check("fanotify limits", False, f"{detail}: too few groups",
                     "sysctl -w fs.fanotify.max_user_groups=128, and keep it in /etc/sysctl.d/hsmfs.conf")
    return Check("fanotify limits", True, detail)


def check_python(version: Optional[Sequence[int]] = None,
                 toml_modules: Sequence[str] = ("tomllib", "tomli")) -> Check:
    """Python 3.9+ with a TOML reader (tomllib from 3.11, the tomli package before)."""
    ver = tuple(sys.version_info[:3] if version is None else version)
    shown = ".".join(str(v) for v in ver)
    if ver[:2] < MIN_PYTHON:
        return Check("python", False, f"Python {shown} is too old (hsmfs needs 3.9+)",
                     "install Python 3.9 or later and reinstall hsmfs with it")
    for name in toml_modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return Check("python", True, f"Python {shown}, TOML reader {name}")
    return Check("python", False, f"Python {shown} has no TOML reader ({' or '.join(toml_modules)})",
                 f"{sys.executable} -m pip install tomli")


# -- helpers ------------------------------------------------------------------------------------


def _guarded(name: str, step: Callable[[], Check]) -> Check:
    """Run one check; an OSError nobody foresaw fails that check instead of the whole doctor."""
    try:
        return step()
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return Check(name, False, f"could not check: {e}", _ROOT_FIX)
        return Check(name, False, f"could not check: {e}", "unexpected: report it with this output")


def _probe_pre_content_mark(path: str) -> tuple[str, int]:
    """Make a filler-like group and put a FAN_PRE_ACCESS inode mark on path, then close the group.

    Returns ("ok", 0), ("init", errno) or ("mark", errno). No FAN_EVENT_ON_CHILD and a directory
    raises no pre-content events of its own (kernel-facts §1), so nobody can block on this group;
    closing it drops the mark (and would allow anything pending, §6).
    """
    try:
        group = new_group()  # the filler's own (hsmfs.session)
    except OSError as e:
        return "init", e.errno or 0
    try:
        fanotify.mark(group, fanotify.FAN_MARK_ADD, fanotify.FAN_PRE_ACCESS, path=path)
    except OSError as e:
        return "mark", e.errno or 0
    finally:
        os.close(group)
    return "ok", 0


def _nearest_existing(path: str) -> str:
    """path itself if it exists, else its nearest existing ancestor (permission errors propagate)."""
    p = os.path.abspath(path)
    while True:
        try:
            os.stat(p)
            return p
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(p)
            if parent == p:
                return p
            p = parent


def _nearest_dir(path: str) -> str:
    """The nearest directory at or above path that exists and can be looked at."""
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def _closed_to_users(path: str, st: os.stat_result) -> bool:
    """No non-root user can search the directory: owned by root, no x for others, and no x for the
    group unless that group is root's and no ACL names other users (with an ACL, group bits are the mask)."""
    if st.st_uid != 0 or st.st_mode & 0o001:
        return False
    return not (st.st_mode & 0o010) or (st.st_gid == 0 and not _has_acl(path))


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False  # ENODATA: no ACL; EOPNOTSUPP: the filesystem has none
    return True


def _fs_fix() -> str:
    """Where to put stores instead: hsmfs mount --store takes one directory per mount."""
    root = _suggest_store_root()
    if root is None:
        return (f"no {_SUPPORTED} filesystem is mounted: make one (mkfs.ext4 DEVICE && "
                "mkdir -m 700 /srv/hsmfs && mount DEVICE /srv/hsmfs && chmod 700 /srv/hsmfs), "
                "then hsmfs mount --store /srv/hsmfs/NAME SOURCE TARGET")
    return (f"put the store on {_SUPPORTED}: hsmfs mount --store {root}/NAME SOURCE TARGET "
            f"(check first: hsmfs doctor --store {root})")


def _suggest_store_root() -> Optional[str]:
    """A place for stores on a mounted, writable ext4/xfs/btrfs: /srv/hsmfs if / is one."""
    mounts = []
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                writable = len(fields) >= 4 and "ro" not in fields[3].split(",")
                if writable and fields[2] in linux_fs.HSM_FILESYSTEMS:
                    mounts.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
    except OSError:
        return None
    for mp in sorted(set(mounts), key=len):
        candidate = "/srv/hsmfs" if mp == "/" else os.path.join(mp, "hsmfs")
        try:
            if linux_fs.fs_type(_nearest_existing(candidate)) in linux_fs.HSM_FILESYSTEMS:
                return candidate
        except OSError:
            continue
    return None


def _read_int(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return int(f.read().strip())


def _errname(err: int) -> str:
    """'EOPNOTSUPP (Operation not supported)' for 95 (errorcode calls it ENOTSUP, the man pages don't)."""
    name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, f"errno {err}")
    return f"{name} ({os.strerror(err)})"
