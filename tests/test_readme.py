"""README's quick start works as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator

import pytest

from hsmfs.places import default_store, log_path
from hsmfs.views import is_mountpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no quick start block"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 2, lines
    return lines


def test_second_line_is_what_ci_runs() -> None:
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert quick_start()[1].strip() in ci


@pytest.fixture
def isolated_bin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A venv first on PATH, so line 1's pip and hsmfs are the venv's, not the machine's."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the quick start mounts a view")
    d = str(tmp_path_factory.mktemp("venv"))
    venv.create(d, system_site_packages=True, with_pip=True)
    yield os.path.join(d, "bin")


@pytest.mark.root
def test_first_line_mounts_a_lazy_view(isolated_bin: str) -> None:
    line = quick_start()[0]
    m = re.search(r"hsmfs mount (\S+) (\S+)$", line)
    assert m, line
    source, target = m.groups()
    assert not is_mountpoint(target), f"{target} is mounted already; unmount it to run this test"
    store = default_store(target.strip("/").replace("/", "-"))
    assert not os.path.exists(store), f"{store} exists already; remove it to run this test"
    made_target = not os.path.exists(target)
    env = dict(os.environ, PATH=isolated_bin + os.pathsep + os.environ["PATH"])
    try:
        r = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert is_mountpoint(target)
        files = [os.path.join(dp, n) for dp, _, ns in os.walk(source) for n in ns]
        files = [f for f in files if os.path.isfile(f) and not os.path.islink(f)][:50]
        assert files
        for f in files:
            got = subprocess.run(["cat", os.path.join(target, os.path.relpath(f, source))],
                                 capture_output=True, timeout=60, check=True).stdout
            with open(f, "rb") as src:
                assert got == src.read(), f
        st = subprocess.run([os.path.join(isolated_bin, "hsmfs"), "status", "--json"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
        assert target in st
    finally:
        subprocess.run([sys.executable, "-m", "hsmfs", "umount", target], capture_output=True, timeout=120)
        if is_mountpoint(target):
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(store, ignore_errors=True)
        if made_target and os.path.isdir(target):
            os.rmdir(target)
        log = log_path(os.path.basename(store))
        if os.path.exists(log):
            os.unlink(log)
