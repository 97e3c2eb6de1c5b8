"""Views themselves: their mount flags, where they are attached, and who can keep them (issue 11).

- Views are nosuid,nodev unless the policy allows more (item 2).
- A TARGET in a directory a user can write is not redirected through a symlink the user puts there
  (suspected item: onto /etc/cron.d, say).
- A copy of a view in a mount namespace of another (unprivileged) user namespace does not block
  ``hsmfs umount`` (item 9).
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Callable

from conftest import LoopFS, View
from test_security import as_nobody


def _setuid_source(loopfs: LoopFS) -> str:
    """A source with a setuid-root copy of id, a 0666 /dev/zero node and a plain executable."""
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    shutil.copy(shutil.which("id") or "", os.path.join(src, "suid-id"))
    os.chmod(os.path.join(src, "suid-id"), 0o4755)
    shutil.copy(shutil.which("true") or "", os.path.join(src, "true"))
    os.mknod(os.path.join(src, "zero"), stat.S_IFCHR | 0o666, os.makedev(1, 5))
    return src


def test_views_are_nosuid_nodev_by_default(loopfs: LoopFS, views: Callable[..., View]) -> None:
    src = _setuid_source(loopfs)
    # the loop filesystem itself lets both work: only the view's own flags can stop them
    assert as_nobody([os.path.join(src, "suid-id"), "-u"]).out == b"0\n"
    assert as_nobody(["head", "-c", "4", os.path.join(src, "zero")]).out == b"\0\0\0\0"

    v = views(src)
    assert as_nobody([v.path("suid-id"), "-u"]).out == b"65534\n"
    assert as_nobody(["head", "-c", "4", v.path("zero")]).denied
    assert as_nobody([v.path("true")]).rc == 0
    flags = os.statvfs(v.target).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV and not flags & os.ST_NOEXEC, hex(flags)

    # the policy can allow them (never more than the source's mount allows: test_security.py)
    config = os.path.join(loopfs.fresh_dir("policy"), "allow.toml")
    with open(config, "w") as f:
        f.write("allow_suid = true\nallow_devices = true\n")
    allowed = views(src, "--config", config)
    flags = os.statvfs(allowed.target).f_flag
    assert not flags & (os.ST_NOSUID | os.ST_NODEV), hex(flags)
    assert as_nobody([allowed.path("suid-id"), "-u"]).out == b"0\n"
    assert as_nobody(["head", "-c", "4", allowed.path("zero")]).out == b"\0\0\0\0"
