"""What a new user reads on the quick start: hsmfs status and hsmfs stat, in words."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from typing import Callable

import pytest
from conftest import LoopFS, View, hsmfs

from hsmfs.control import RuntimeRecord
from hsmfs.places import RUN_DIR
from hsmfs.process import start_time


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


def test_a_runtime_record_names_one_process() -> None:
    """A mount's record names its process by pid and start time: a pid that another process got
    since is not the mount's, an exited one (a zombie) neither; umount waits on a pidfd."""
    p = subprocess.Popen(["sleep", "30"])
    try:
        rec = RuntimeRecord(name="x", pid=p.pid, store="/s", source="/src", target="/t", namespace=None, mnt_id=1,
                            log="/l", started=start_time(p.pid))
        assert rec.started is not None and rec.alive()
        assert not replace(rec, started=rec.started - 1).alive(), "another process with the same pid"
        t0 = time.monotonic()
        assert not rec.wait_exit(0.2) and time.monotonic() - t0 >= 0.2
        p.kill()
        assert rec.wait_exit(5)
        assert not rec.alive(), "a zombie is not alive"
    finally:
        p.kill()
        p.wait()
    assert not rec.alive() and rec.wait_exit(0)
