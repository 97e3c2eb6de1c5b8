"""Paths the view's mount mark does not cover still give real bytes (docs/kernel.md#k11, promise 1)."""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Callable

import helpers
import pytest
from conftest import LoopFS, View


def make_source(root: str) -> tuple[str, dict[str, bytes]]:
    rnd = random.Random(11)
    return helpers.make_source(root, {f"d/f{i}" if i % 2 else f"f{i}": rnd.randrange(1, 300_000) for i in range(12)},
                               seed=11)


@pytest.fixture
def view(loopfs: LoopFS, make_view: Callable[..., View]) -> tuple[View, dict[str, bytes]]:
    src, want = make_source(loopfs.fresh_dir("src"))
    return make_view(src), want


@pytest.fixture
def scratch(loopfs: LoopFS) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="mnt-", dir=loopfs.base)
    yield d
    for m in ("merged", "bind", ""):
        p = os.path.join(d, m)
        while os.path.isdir(p) and subprocess.run(["mountpoint", "-q", p]).returncode == 0:
            subprocess.run(["umount", "-l", p], check=False)
    subprocess.run(["rm", "-rf", d], check=False)


def cat(path: str, *, ns: list[str] | None = None) -> bytes:
    return helpers.cat(path, prefix=ns or [])


def test_copy_of_view_in_a_later_namespace(view: tuple[View, dict[str, bytes]]) -> None:
    """unshare -m after the mount (as any PrivateTmp= service does) copies the view unmarked."""
    v, want = view
    script = "for f in \"$@\"; do sha256sum \"$f\"; done"
    names = sorted(want)
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                          *[v.path(n) for n in names]], capture_output=True, timeout=60, check=True).stdout
    import hashlib

    got = [line.split()[0].decode() for line in out.splitlines()]
    assert got == [hashlib.sha256(want[n]).hexdigest() for n in names]


def test_bind_mount_of_view(view: tuple[View, dict[str, bytes]], scratch: str) -> None:
    v, want = view
    bind = os.path.join(scratch, "bind")
    os.mkdir(bind)
    subprocess.run(["mount", "--bind", v.target, bind], check=True)
    try:
        for rel, data in want.items():
            assert cat(os.path.join(bind, rel)) == data, rel
    finally:
        subprocess.run(["umount", bind], check=True)


def test_overlayfs_with_view_as_lowerdir(view: tuple[View, dict[str, bytes]], scratch: str) -> None:
    v, want = view
    upper, work, merged = (os.path.join(scratch, n) for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        os.mkdir(d)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={v.target},upperdir={upper},workdir={work}",
                    merged], check=True)
    try:
        for rel, data in want.items():
            assert cat(os.path.join(merged, rel)) == data, rel
    finally:
        subprocess.run(["umount", merged], check=True)


def test_store_path_as_root(view: tuple[View, dict[str, bytes]]) -> None:
    v, want = view
    for rel, data in want.items():
        assert cat(os.path.join(v.store, "tree", rel)) == data, rel


def test_resident_files_carry_no_stub_mark(view: tuple[View, dict[str, bytes]]) -> None:
    """Once committed, a file's inode mark is gone: reads through any path are plain reads."""
    v, want = view
    rel = sorted(want)[0]
    assert cat(v.path(rel)) == want[rel]
    import json
    import time

    from conftest import hsmfs

    deadline = time.monotonic() + 10
    while json.loads(hsmfs("stat", "--json", v.path(rel)).stdout)[0]["state"] != "resident":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while v.status()["filler"]["pending_commit"] or v.status()["filler"]["commits"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    events = v.status()["filler"]["events"]
    for _ in range(5):
        assert cat(os.path.join(v.store, "tree", rel)) == want[rel]
    assert v.status()["filler"]["events"] == events
