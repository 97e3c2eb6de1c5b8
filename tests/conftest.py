"""Shared fixtures: real loop-mounted ext4, xfs and btrfs images, cleaned up pass or fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

FILESYSTEMS = ("ext4", "xfs", "btrfs")
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}
IMAGE_SIZE = 1 << 30  # sparse


def _skip_unless_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop mounts and fanotify pre-content marks")


class LoopFS:
    """One loop-mounted filesystem image for the whole test session."""

    def __init__(self, fstype: str, base: str) -> None:
        self.fstype = fstype
        self.base = base
        self.image = os.path.join(base, f"{fstype}.img")
        self.mnt = os.path.join(base, fstype)
        mkfs = MKFS[fstype]
        if shutil.which(mkfs[0]) is None:
            pytest.fail(f"{mkfs[0]} is missing: install {'xfsprogs' if fstype == 'xfs' else 'btrfs-progs'}")
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        subprocess.run([*mkfs, self.image], check=True, capture_output=True)
        os.mkdir(self.mnt)
        subprocess.run(["mount", "-o", "loop", self.image, self.mnt], check=True)

    def fresh_dir(self, prefix: str = "t") -> str:
        return tempfile.mkdtemp(prefix=prefix + "-", dir=self.mnt)

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            r = subprocess.run(["umount", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], check=False)
        os.unlink(self.image)


@pytest.fixture(scope="session")
def loopfs_base() -> Iterator[str]:
    # not under /tmp: it may be tmpfs on other machines, and images there cost memory
    base = tempfile.mkdtemp(prefix="hsmfs-test-", dir="/var/tmp")
    yield base
    shutil.rmtree(base, ignore_errors=True)


_loopfs: dict[str, LoopFS] = {}


@pytest.fixture(scope="session")
def loopfs_all(loopfs_base: str) -> Iterator[dict[str, LoopFS]]:
    yield _loopfs
    for fs in list(_loopfs.values()):
        fs.close()
    _loopfs.clear()


@pytest.fixture(params=FILESYSTEMS)
def loopfs(request: pytest.FixtureRequest, loopfs_all: dict[str, LoopFS], loopfs_base: str) -> LoopFS:
    """A mounted ext4, xfs or btrfs image (the test runs once per filesystem)."""
    _skip_unless_root()
    fstype: str = request.param
    if fstype not in loopfs_all:
        loopfs_all[fstype] = LoopFS(fstype, loopfs_base)
    return loopfs_all[fstype]
