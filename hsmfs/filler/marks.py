"""The marks of one mount's fanotify group, and what each one means.

- **Every stub carries an inode mark** for ``FAN_OPEN_PERM | FAN_PRE_ACCESS`` (not evictable: it
  pins the inode). An inode mark fires whatever path reached the file: the view, a later mount
  namespace's copy of it, a bind mount, overlayfs over it, the store itself (docs/kernel.md#k11).
  ``FAN_OPEN_PERM`` fills a stub before its opener's first look
  (hole-aware copiers ask SEEK_DATA before they read); ``FAN_PRE_ACCESS`` catches what needs no
  open, ``truncate(path)`` of a stub.
- **A filled, resident, dirty or user's file carries no mark at all**: nothing to fill, nothing to
  pay, and nothing to lose when its inode leaves the cache. A filled file's mark goes as soon as
  every byte is in it; if the commit that follows cannot make the data durable (a write-back
  error), the commit puts the stub mark back, so the file's next open compares it with the source
  and fills what is missing. (Keeping the mark until the commit would protect nothing more: an open
  of a file whose fill is done is allowed at once anyway, and it cost an event per file.)
- **The view** carries a mount mark for ``FAN_OPEN_EXEC`` alone. It fills nothing (the stubs'
  inode marks do); it is how the group learns that the view is gone: the kernel destroys the mark
  when the view's mount is freed, once it is unmounted and, after ``umount -l``, its last user is
  gone (``hsmfs.views.marked_mount``). Its events are read and dropped.
- **The filler's own clone of the tree** (:func:`private_root`) carries a mount *ignore* mark for
  both events: the filler reads and writes stubs through it without raising events in its own
  group (a group's ignore masks apply to every mark of the group on the event's objects).
"""

from __future__ import annotations

import errno
import logging
import os

from hsmfs import state, tree
from hsmfs.errors import HsmfsError
from hsmfs.linux import fanotify as fan
from hsmfs.linux.mount import open_tree_clone

log = logging.getLogger("hsmfs.filler")

STUB_MASK = fan.FAN_OPEN_PERM | fan.FAN_PRE_ACCESS
VIEW_MASK = fan.FAN_OPEN_EXEC
_IGNORE = fan.FAN_MARK_ADD | fan.FAN_MARK_MOUNT | fan.FAN_MARK_IGNORE | fan.FAN_MARK_IGNORED_SURV_MODIFY


class Marks:
    """Mark operations on one group; fd arguments are regular fds (not O_PATH) of the file."""

    def __init__(self, group: int) -> None:
        self.group = group

    def stub(self, fd: int) -> None:
        """Watch the file as a stub (opens and accesses wait for the filler)."""
        fan.mark(self.group, fan.FAN_MARK_ADD, STUB_MASK, fd)

    def settle(self, fd: int) -> None:
        """Nothing left to watch: resident, dirty or a user's file."""
        self._remove(fd, STUB_MASK)

    def _remove(self, fd: int, mask: int) -> None:
        try:
            fan.mark(self.group, fan.FAN_MARK_REMOVE, mask, fd)
        except OSError as e:
            if e.errno != errno.ENOENT:  # no mark: nothing to remove
                raise


def private_root(group: int, tree_path: str) -> int:
    """An fd of the root of a detached clone of tree_path's mount, whose accesses raise no event in group.

    The clone is reachable only through this fd (and fds opened beneath it), and it goes when they
    are all closed.
    """
    mfd = open_tree_clone(tree_path)
    try:
        fan.mark(group, _IGNORE, STUB_MASK, mfd, ".")
        # open_by_handle_at needs a real fd of the mount, not the O_PATH fd open_tree gives
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mfd)
    finally:
        os.close(mfd)


class MarkError(HsmfsError):
    """A stub could not be marked: serving the view would show its holes as data."""


def mark_tree(group: int, root: str, log_: state.StateLog) -> tuple[int, int]:
    """Put the stub mark on every stub of the tree at root; returns (stubs, settled files).

    Marks by path: no file is opened, no event is raised. A stub that cannot be marked ends the
    session before any view exists (MarkError): through any path but a marked one its holes
    would read as data.
    """
    stubs = settled = 0
    for f in tree.walk(root):
        try:
            rec = tree.read_record(f.fd_path)
            if rec is None:
                settled += 1
                continue
            if log_.state(rec, f.st, state.key_at(f.name, f.dirfd)) is state.FileState.STUB:
                fan.mark(group, fan.FAN_MARK_ADD | fan.FAN_MARK_DONT_FOLLOW, STUB_MASK, f.dirfd, f.name)
                stubs += 1
            else:
                settled += 1
        except FileNotFoundError:
            continue  # removed meanwhile: a user's business
        except tree.RecordError as e:  # a damaged record: a data error (65), no restart mends it
            raise tree.RecordError(f"cannot mark the stub {f.path}: {e.message}", hint=e.hint) from None
        except OSError as e:
            raise MarkError(f"cannot mark the stub {f.path}: {e.strerror or e}",
                            hint="see 'hsmfs doctor'; a stub left unmarked would read as zeros") from None
    return stubs, settled
