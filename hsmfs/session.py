"""One mount's session: its fanotify group, and what the supervisor (hsmfs.daemon) and
hsmfs@.service (hsmfs.systemd) both do with it.

The group is made here and nowhere else; ``hsmfs doctor`` and ``hsmfs mount``'s kernel check
make the same one.
"""

from __future__ import annotations

import os

from hsmfs.linux import fanotify as fan

GROUP_FLAGS = fan.FAN_CLASS_PRE_CONTENT | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_UNLIMITED_QUEUE \
    | fan.FAN_UNLIMITED_MARKS
# read-only: a reader on a read-only mount (overlayfs's lower layer) must get an event fd too; the
# filler writes through its own clone of the tree instead (hsmfs.filler.marks.private_root)
EVENT_FLAGS = os.O_RDONLY | os.O_LARGEFILE


def new_group() -> int:
    """The fanotify group of one hsmfs mount (whoever holds it keeps pending events blocked)."""
    return fan.init(GROUP_FLAGS, EVENT_FLAGS)
