"""Small things many tests do: wait for a condition, read a file in a process of its own, make a
source tree of random files, run a function as another user, make a loop-mounted filesystem.
Fixtures live in conftest.py; this module has plain functions and classes, and imports nothing of
hsmfs: the benchmarks in contrib/bench use it too."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2
_libc = ctypes.CDLL(None, use_errno=True)


def unlink_quietly(path: str) -> None:
    """Remove path if it is there (a log a test's mount leaves behind, say)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def wait_for(pred: Callable[[], bool], what: str, *, timeout: float = 30, step: float = 0.05) -> None:
    """Poll pred until it holds; fail the test naming what was awaited after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def cat(path: str, *, prefix: Sequence[str] = ()) -> bytes:
    """The file's bytes, read by cat in its own process under a timeout: a hung fill fails the
    test, not the suite. prefix: a command to run cat under (``nsenter -t PID -m``)."""
    return subprocess.run([*prefix, "cat", path], capture_output=True, timeout=60, check=True).stdout


def make_source(root: str, sizes: Mapping[str, int], *, seed: int = 0,
                name: str = "src") -> tuple[str, dict[str, bytes]]:
    """root/NAME with one file of random bytes per relative path and size (directories made as
    needed); returns its path and each file's bytes."""
    rnd = random.Random(seed)
    src = os.path.join(root, name)
    os.makedirs(src, exist_ok=True)
    data: dict[str, bytes] = {}
    for rel, size in sizes.items():
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data[rel] = rnd.randbytes(size)
        with open(path, "wb") as f:
            f.write(data[rel])
    return src, data


class AsUser:
    """fn(*args) run by a forked child as uid (gid, supplementary groups); .result() is its return
    value, which goes back as JSON. The child dies by SIGALRM after limit seconds.

    keep_caps: the child keeps root's effective capabilities (SECBIT_NO_SETUID_FIXUP), so only
    checks made on its uid, not on its capabilities, refuse it."""

    def __init__(self, uid: int, fn: Callable[..., Any], *args: Any, gid: Optional[int] = None,
                 groups: Sequence[int] = (), limit: int = 120, keep_caps: bool = False) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(r)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(limit)
                if keep_caps and _libc.prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECUREBITS)")
                g = uid if gid is None else gid
                os.setgroups(list(groups))
                os.setresgid(g, g, g)
                os.setresuid(uid, uid, uid)
                os.chdir("/")
                data = json.dumps({"result": fn(*args)}).encode()
                code = 0
            except BaseException:
                data = json.dumps({"error": traceback.format_exc()}).encode()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self._fd = pid, r

    def result(self) -> Any:
        with os.fdopen(self._fd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(self.pid, 0)
        reply = json.loads(data) if data else {"error": f"the child died: wait status {status:#x}"}
        assert "error" not in reply, reply["error"]
        return reply["result"]


def mount_points() -> list[str]:
    """Every mount point of this namespace, from mountinfo (os.path.ismount misses same-fs bind mounts)."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].encode().decode("unicode_escape") for line in f]


def is_mount_point(path: str) -> bool:
    return os.path.abspath(path) in mount_points()


class LoopImage:
    """A sparse image file of size bytes, formatted with fstype (mkfs: other mkfs commands) and
    mounted at mnt through a loop device of its own. close() unmounts it (lazily if it stays busy),
    detaches the device and deletes the image.

    direct_io: the loop device reads and writes the image with O_DIRECT, so the host's page cache
    holds no second copy that dropping caches would have to empty (the benchmarks); self.direct_io
    says whether the host allowed it."""

    def __init__(self, image: str, mnt: str, fstype: str, size: int, *, direct_io: bool = False,
                 mkfs: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        self.image, self.mnt, self.fstype = image, os.path.abspath(mnt), fstype
        self.dev: Optional[str] = None
        with open(image, "wb") as f:
            f.truncate(size)
        try:
            self.direct_io = direct_io and self._attach(["--direct-io=on"])
            if self.dev is None:
                self._attach([])
            assert self.dev is not None
            subprocess.run([*(mkfs or MKFS)[fstype], self.dev], check=True, capture_output=True)
            os.makedirs(self.mnt, exist_ok=True)
            subprocess.run(["mount", self.dev, self.mnt], check=True, capture_output=True)
        except BaseException:
            self.close()
            raise

    def _attach(self, options: list[str]) -> bool:
        r = subprocess.run(["losetup", "--find", "--show", *options, self.image], capture_output=True, text=True)
        if r.returncode != 0:
            if options:
                return False
            raise RuntimeError(f"losetup {self.image} failed: {r.stderr.strip()}")
        self.dev = r.stdout.strip()
        if not options:
            return True
        try:  # losetup may fall back to buffered I/O silently: ask the kernel
            with open(f"/sys/block/{os.path.basename(self.dev)}/loop/dio") as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    def close(self) -> None:
        if is_mount_point(self.mnt) and subprocess.run(["umount", self.mnt], capture_output=True).returncode != 0:
            time.sleep(1)
            if subprocess.run(["umount", self.mnt], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        if self.dev is not None:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass
