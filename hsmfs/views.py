"""Attaching and detaching views: marked while detached, so no process ever sees one unwatched."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Callable, Optional

from hsmfs.linux import fanotify as fan
from hsmfs.linux.mount import (
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    mount_setattr,
    move_mount,
    open_tree_clone,
    setns,
    umount,
)


def ns_path(namespace: str) -> str:
    """--namespace PID|NSFILE -> the mount namespace file."""
    return f"/proc/{namespace}/ns/mnt" if namespace.isdigit() else namespace


def mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id in fdinfo of fd {fd}")


def source_restrictions(source: str) -> int:
    """MOUNT_ATTR_NOSUID/NODEV/NOEXEC for each of nosuid, nodev, noexec the source's mount has.

    A view is a clone of the store's mount: without these, a setuid binary or a device node from a
    nosuid/nodev source would work through the view and hand its powers to any user.
    """
    flags = os.statvfs(source).f_flag
    return ((MOUNT_ATTR_NOSUID if flags & os.ST_NOSUID else 0) | (MOUNT_ATTR_NODEV if flags & os.ST_NODEV else 0)
            | (MOUNT_ATTR_NOEXEC if flags & os.ST_NOEXEC else 0))


def attach(group: int, tree: str, target: str, mask: int, *, nsfd: Optional[int] = None,
           restrict: int = 0) -> int:
    """Clone tree's mount, mark the clone, then move it to target; return the view's mount id.

    With nsfd, the move happens in that mount namespace, from a forked child: setns(CLONE_NEWNS)
    needs a single-threaded caller, and the caller (the daemon before its threads start) stays
    in its own namespace.
    """
    mfd = open_tree_clone(tree)
    try:
        if restrict:
            mount_setattr(mfd, restrict)
        fan.mark(group, fan.FAN_MARK_ADD | fan.FAN_MARK_MOUNT, mask, mfd, ".")
        mnt = mount_id(mfd)
        if nsfd is None:
            move_mount(mfd, target)
        else:
            _in_namespace(nsfd, lambda: move_mount(mfd, target))
        return mnt
    finally:
        os.close(mfd)


def _in_namespace(nsfd: int, action: Callable[[], None]) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
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
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        err, _, text = msg.partition(":")
        raise OSError(int(err) if err.isdigit() else 5, text or f"namespace helper failed ({status})")


def detach(target: str, *, lazy: bool = False, ns_file: Optional[str] = None) -> None:
    """Unmount a view. In another namespace this runs nsenter(1): the daemon has threads by now."""
    if ns_file is None:
        umount(target, lazy=lazy)
        return
    cmd = ["nsenter", f"--mount={ns_file}", "umount", *(["-l"] if lazy else []), target]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = 16 if "busy" in r.stderr else 5  # EBUSY / EIO
        raise OSError(err, r.stderr.strip() or f"umount {target} failed")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mountpoint(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether something is mounted at path. os.path.ismount misses bind mounts within one filesystem."""
    path = os.path.realpath(path)
    with open(mountinfo) as f:
        return any(_unescape(line.split(" ", 5)[4]) == path for line in f)
