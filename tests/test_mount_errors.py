"""Bad input gets a clear message, a documented exit code (docs/exit-codes.md), and changes nothing."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator

import pytest
from conftest import LoopFS, hsmfs
from helpers import unlink_quietly

from hsmfs.places import log_path, record_path
from hsmfs.views import is_mountpoint


@pytest.fixture
def setup(loopfs: LoopFS) -> Iterator[tuple[str, str, str]]:
    src = loopfs.fresh_dir("src")
    with open(os.path.join(src, "f"), "w") as f:
        f.write("data")
    target = tempfile.mkdtemp(prefix="target-", dir=loopfs.base)
    store = os.path.join(loopfs.fresh_dir("stores"), "store")
    yield src, target, store
    if is_mountpoint(target):  # only if a test failed to refuse
        subprocess.run(["umount", "-l", target], check=False)
    os.rmdir(target)


def refused(code: int, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True, text=True, timeout=60,
                       cwd="/")
    assert r.returncode == code, (r.returncode, r.stderr)
    return _clear_error(r.stderr)


def _clear_error(stderr: str) -> str:
    assert stderr.startswith("hsmfs: error: "), stderr
    assert "Traceback" not in stderr
    return stderr


def refused_as_nobody(code: int, *args: str) -> str:
    """Run the CLI as uid 65534 in a forked child (the interpreter under /root is not theirs to exec)."""
    from hsmfs import cli, mounting  # noqa: F401 (mount imports it when it runs)

    # load every module the CLI will need now: uid 65534 cannot read the interpreter's tree under /root
    with contextlib.redirect_stdout(io.StringIO()):
        cli.app(["mount", "--help"], standalone_mode=False)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            os.dup2(w, 2)
            sys.stderr = os.fdopen(2, "w")  # pytest's capture object is not fd 2
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.chdir("/")
            sys.argv = ["hsmfs", *args]
            cli.main()
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == code, (st, err)
    return _clear_error(err)


def assert_unchanged(target: str, store: str, name: str) -> None:
    assert not os.path.exists(store), "a refused mount created the store"
    assert not is_mountpoint(target)
    assert os.listdir(target) == []
    assert not os.path.exists(record_path(name))


def test_store_on_tmpfs(setup: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    src, target, _ = setup
    tmpfs = str(tmp_path_factory.mktemp("tmpfs"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", tmpfs], check=True)
    try:
        store = os.path.join(tmpfs, "store")
        err = refused(69, "mount", "--name", "e-tmpfs", "--store", store, src, target)
        assert "tmpfs" in err and "ext4, xfs or btrfs" in err
        assert_unchanged(target, store, "e-tmpfs")
    finally:
        subprocess.run(["umount", tmpfs], check=True)


def test_missing_source(setup: tuple[str, str, str]) -> None:
    src, target, store = setup
    err = refused(66, "mount", "--name", "e-src", "--store", store, src + "-missing", target)
    assert "does not exist" in err
    assert_unchanged(target, store, "e-src")


def test_source_is_a_file(setup: tuple[str, str, str]) -> None:
    src, target, store = setup
    err = refused(66, "mount", "--name", "e-srcf", "--store", store, os.path.join(src, "f"), target)
    assert "not a directory" in err
    assert_unchanged(target, store, "e-srcf")


def test_target_missing_or_not_a_directory(setup: tuple[str, str, str]) -> None:
    src, target, store = setup
    err = refused(73, "mount", "--name", "e-t1", "--store", store, src, target + "-missing")
    assert "does not exist" in err and "mkdir -p" in err
    assert not os.path.exists(target + "-missing")
    err = refused(73, "mount", "--name", "e-t2", "--store", store, src, os.path.join(src, "f"))
    assert "not a directory" in err
    assert_unchanged(target, store, "e-t2")


def test_target_busy(setup: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    src, target, store = setup
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    try:
        err = refused(75, "mount", "--name", "e-busy", "--store", store, src, target)
        assert "already a mount point" in err
        assert not os.path.exists(store)
    finally:
        subprocess.run(["umount", target], check=True)
    assert_unchanged(target, store, "e-busy")


def test_bad_toml(setup: tuple[str, str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    src, target, store = setup
    conf = os.path.join(str(tmp_path_factory.mktemp("conf")), "bad.toml")
    with open(conf, "w") as f:
        f.write("# policy\nworkers = 4\ncommit_interval = \"soon\"\n")
    err = refused(78, "mount", "--name", "e-toml", "--store", store, "--config", conf, src, target)
    assert f"{conf}:3" in err and "commit_interval" in err
    assert_unchanged(target, store, "e-toml")
    with open(conf, "w") as f:
        f.write("workers = [\n")
    err = refused(78, "mount", "--name", "e-toml2", "--store", store, "--config", conf, src, target)
    assert conf in err
    assert_unchanged(target, store, "e-toml2")


def test_not_root(setup: tuple[str, str, str]) -> None:
    src, target, store = setup
    err = refused_as_nobody(77, "mount", "--name", "e-user", "--store", store, src, target)
    assert "root" in err
    assert_unchanged(target, store, "e-user")


@pytest.mark.root
def test_umount_of_nothing() -> None:
    err = refused(66, "umount", "/nonexistent/view")
    assert "no running hsmfs mount" in err


def test_happy_path_for_contrast(setup: tuple[str, str, str]) -> None:
    """The same arguments without the fault do mount: the refusals above are about the fault."""
    src, target, store = setup
    hsmfs("mount", "--name", "e-ok", "--store", store, src, target)
    try:
        assert is_mountpoint(target)
        assert subprocess.run(["cat", os.path.join(target, "f")], capture_output=True,
                              timeout=30).stdout == b"data"
    finally:
        hsmfs("umount", target)
        unlink_quietly(log_path("e-ok"))
    assert not is_mountpoint(target)
