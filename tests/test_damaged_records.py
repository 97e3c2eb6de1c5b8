"""A damaged record (a stub's trusted.hsmfs, the store's hsmfs.json) is a data error: exit 65 and one
line on stderr, never a traceback (docs/exit-codes.md), for mount, pin, prefetch, evict and stat."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import pytest
from conftest import LoopFS, View, hsmfs

from hsmfs import tree

EX_DATAERR = 65


def data_error(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == EX_DATAERR, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    # one line (hsmfs stat names the file instead of "error:"), and maybe a hint
    errors = [line for line in r.stderr.splitlines() if not line.strip().startswith("hint: ")]
    assert len(errors) == 1 and errors[0].startswith("hsmfs: "), (args, r.stderr)
    return errors[0]


@pytest.mark.parametrize("loopfs", ["ext4"], indirect=True)
def test_damaged_records_exit_65(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = loopfs.fresh_dir("src")
    for name in ("a", "b"):
        with open(os.path.join(src, name), "wb") as f:
            f.write(name.encode() * 5000)
    v = make_view(src, "--config", _no_fill_ahead(loopfs))
    stub = os.path.join(v.store, "tree", "a")
    good = os.getxattr(stub, tree.XATTR)
    os.setxattr(stub, tree.XATTR, b"\x09damaged")

    # through the running view
    for args in (["stat", v.path("a")], ["pin", v.path("a")], ["prefetch", v.path("a")], ["evict", v.path("a")]):
        assert "stub record" in data_error(*args)
    hsmfs("umount", v.target)

    # offline, on the store
    for args in (["stat", stub], ["pin", stub], ["evict", stub]):
        assert "stub record" in data_error(*args)
    assert "stub record" in data_error("mount", "--name", v.name, "--store", v.store, src, v.target)
    os.setxattr(stub, tree.XATTR, good)

    with open(os.path.join(v.store, "hsmfs.json"), "w") as f:
        f.write('{"v": 2, "name": ')  # cut short
    for args in (["stat", stub], ["pin", stub], ["evict", stub], ["prefetch", stub],
                 ["mount", "--name", v.name, "--store", v.store, src, v.target]):
        assert "hsmfs.json" in data_error(*args)
    assert not os.path.ismount(v.target)


def _no_fill_ahead(loopfs: LoopFS) -> str:
    path = os.path.join(loopfs.base, "no-fill-ahead.toml")
    with open(path, "w") as f:
        f.write("fill_ahead = false\n")
    return path
