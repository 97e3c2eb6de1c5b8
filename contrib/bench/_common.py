"""Helpers shared by the benchmarks in contrib/bench (bench.py, marks.py, evict.py).

Kept free of hsmfs imports: the benchmarks run hsmfs only in subprocesses, from the package that
``set_hsmfs_path`` names (bench.py's and evict.py's ``--pythonpath``; this checkout by default).
"""

from __future__ import annotations

import os
import runpy
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TREES = ["/usr/include", "/usr/lib/python3.11", "/usr/share/doc"]
IMAGE_SIZE = 4 << 30
# hsmfs/places.py read as a file: it defines the directories and imports nothing of hsmfs
_PLACES = runpy.run_path(os.path.join(REPO, "hsmfs", "places.py"))
RUN_DIR: str = _PLACES["RUN_DIR"]
LOG_DIR: str = _PLACES["LOG_DIR"]
# tests/helpers.py, read as a file (it imports nothing of hsmfs): loop images, mkfs commands
_HELPERS = runpy.run_path(os.path.join(REPO, "tests", "helpers.py"))
MKFS: dict[str, list[str]] = _HELPERS["MKFS"]
_LoopImage: Any = _HELPERS["LoopImage"]
HSMFS = [sys.executable, "-m", "hsmfs"]
HSMFS_PATH = REPO  # where subprocesses import hsmfs from


def set_hsmfs_path(path: str) -> str:
    global HSMFS_PATH
    HSMFS_PATH = os.path.abspath(path)
    return HSMFS_PATH


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = HSMFS_PATH + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = True, timeout: Optional[float] = None,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or '').strip()[-2000:]}")
    return r


def drop_caches(passes: int = 1) -> None:
    """sync; echo 3 > drop_caches (a second pass frees inodes whose dentries the first one freed)."""
    os.sync()
    for _ in range(passes):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


mount_points: Callable[[], list[str]] = _HELPERS["mount_points"]
is_mount_point: Callable[[str], bool] = _HELPERS["is_mount_point"]


def leftover_mounts(base: str) -> list[str]:
    return [mp for mp in mount_points() if mp == base or mp.startswith(base + "/")]


def du_bytes(path: str) -> int:
    return int(run(["du", "-s", "--block-size=1", path]).stdout.split()[0])


def fs_used(path: str) -> int:
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def cpu_busy() -> float:
    """CPU-seconds the whole machine spent busy since boot (all CPUs; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: Optional[int]) -> float:
    """CPU-seconds (user + system) of a live process and all its descendants, living or reaped.

    The pid of a mount's runtime record is its supervisor; the filler is a child of it.
    """
    if pid is None:
        return 0.0
    stats: dict[int, list[str]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stats[int(d)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                pass
    if pid not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for p, v in stats.items():
        children.setdefault(int(v[1]), []).append(p)
    total = sum(int(x) for x in stats[pid][11:15])  # utime stime cutime cstime: reaped children count
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        total += sum(int(x) for x in stats[p][11:15])
        todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def summary(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs,
            "spread_pct": 100.0 * (max(xs) - min(xs)) / statistics.median(xs) if statistics.median(xs) else 0.0}


class LoopFS(_LoopImage):  # type: ignore[misc]
    """A sparse image on a loop device of its own (direct I/O when the host allows it), formatted and
    mounted at BASE/LABEL (tests/helpers.py's LoopImage)."""

    def __init__(self, base: str, label: str, fstype: str, size: int = IMAGE_SIZE,
                 mkfs: Optional[dict[str, list[str]]] = None) -> None:
        self.label = label
        super().__init__(os.path.join(base, f"{label}.img"), os.path.join(base, label), fstype, size,
                         direct_io=True, mkfs=mkfs)

    def trim(self) -> None:
        run(["fstrim", self.mnt], check=False)
