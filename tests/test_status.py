"""What a new user reads on the quick start: hsmfs status and hsmfs stat, in words."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import pytest
from conftest import LoopFS, View, hsmfs

from hsmfs.places import RUN_DIR


@pytest.mark.root
def test_status_with_nothing_running_is_one_line() -> None:
    """In a mount namespace of its own, with an empty /run/hsmfs: one line, newline-terminated."""
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f'mount -t tmpfs -o mode=0700 hsmfs-test "{RUN_DIR}" && exec "$0" -m hsmfs status',
                        sys.executable], capture_output=True, text=True, timeout=60, cwd="/")
    assert (r.returncode, r.stdout, r.stderr) == (0, "no hsmfs mounts are running\n", "")


@pytest.mark.parametrize("loopfs", ["ext4"], indirect=True)
def test_status_before_a_fill_and_stat_of_a_filled_file(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = loopfs.fresh_dir("src")
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"x" * 10_000)
    policy = os.path.join(loopfs.base, "slow-commit.toml")
    with open(policy, "w") as f:
        f.write("fill_ahead = false\ncommit_interval = 30\n")
    v = make_view(src, "--config", policy)
    before = hsmfs("status", v.name).stdout
    assert "no fills yet" in before and "None" not in before, before
    with open(v.path("f"), "rb") as f:
        assert f.read() == b"x" * 10_000
    line = hsmfs("stat", v.path("f")).stdout
    assert line.startswith("filled, commit pending "), line  # until the commit, 30 s away
    after = hsmfs("status", v.name).stdout
    assert "fill latency p50 " in after and "None" not in after, after


def test_mount_names_the_supervisor_pid(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """`hsmfs mount` says which process holds the mount: the supervisor, whose pid the runtime
    record and `hsmfs status` give (it used to call that pid the filler's)."""
    import json
    import re

    src = loopfs.fresh_dir("st")
    with open(os.path.join(src, "f"), "w") as f:
        f.write("x")
    v = make_view(src, mount=False)
    r = v.mount()
    m = re.search(r"\(supervisor pid (\d+), log ", r.stderr)
    assert m, r.stderr
    with open(os.path.join(RUN_DIR, v.name + ".json")) as f:
        assert int(m.group(1)) == json.load(f)["pid"]
    assert "filler pid" not in r.stderr
