"""Pauses at the points where a filler killed mid-way would hurt most, for fault tests only.

``HSMFS_FAULT_DELAYS="evict=0.05,commit=0.02"`` makes each named point sleep up to that many
seconds (uniformly at random) before going on, which widens the windows a SIGKILL must hit: the
model-based fault test (tests/test_model.py) sets it; nothing else does. Unset, a point costs one
dict lookup.
"""

from __future__ import annotations

import os
import random
import time

POINTS = ("evict", "commit", "fill")


def _parse(spec: str) -> dict[str, float]:
    out = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() in POINTS and value:
            out[name.strip()] = float(value)
    return out


_DELAYS = _parse(os.environ.get("HSMFS_FAULT_DELAYS", ""))


def pause(point: str) -> None:
    delay = _DELAYS.get(point)
    if delay:
        time.sleep(random.uniform(0, delay))
