"""Small things many tests do: wait for a condition, read a file in a process of its own, make a
source tree of random files. Fixtures live in conftest.py; this module has plain functions."""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Callable


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
