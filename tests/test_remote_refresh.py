"""hsmfs refresh: a new manifest version (HTTP origin in its own network namespace) or a rescanned local
directory; new, deleted, changed, chmod'ed, dirty and in-use files; on ext4, xfs and btrfs stores."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from conftest import LoopFS, View, ext4_only, hsmfs
from test_remote import Origin, _need_netns, content

from hsmfs import manifest as mf

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    _need_netns()
    o = Origin(f"h2f{os.getpid()}")
    try:
        yield o
    finally:
        o.close()


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def wait_settled(view: View, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = view.status()["filler"]
        if f["pending_commit"] == 0 and f["inflight"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("fills did not commit")


def states(*paths: str) -> list[str]:
    return [r["state"] for r in json.loads(hsmfs("stat", "--json", *paths).stdout)]


def refresh(target: str, *extra: str) -> tuple[int, dict[str, Any]]:
    r = hsmfs("refresh", "--json", *extra, target, check=False)
    assert r.returncode in (0, 75), r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.slow
def test_refresh_follows_a_new_version(origin: Origin, loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = tempfile.mkdtemp(prefix="src-", dir=loopfs.mnt)
    names = ("keep", "change_stub", "change_res", "meta_res", "gone_stub", "gone_res", "dirty", "busy", "dir2/y")
    for n in names:
        write(os.path.join(src, n), f"v1 {n}\n".encode() * 100)
    write(os.path.join(src, "hl"), b"v1 hardlinked\n")
    os.link(os.path.join(src, "hl"), os.path.join(src, "hl2"))
    sub = f"f-{loopfs.fstype}"
    url = origin.publish(src, sub)
    v1 = mf.parse(content(os.path.join(origin.root, sub, "manifest")), where="v1").id
    cfg = origin.policy(loopfs.base)
    view = make_view(url, "--config", cfg)
    for n in ("change_res", "meta_res", "gone_res", "dirty", "busy"):
        assert content(view.path(n)) == f"v1 {n}\n".encode() * 100
    with open(view.path("dirty"), "r+b") as f:
        f.write(b"USER")
    wait_settled(view)
    assert states(view.path("meta_res"), view.path("dirty")) == ["resident", "dirty"]
    fetched = view.status()["origin"]["bytes_fetched"]

    # version 2
    write(os.path.join(src, "new"), b"brand new\n")
    write(os.path.join(src, "newdir/z"), b"zzz\n")
    for n in ("change_stub", "change_res", "dirty", "busy"):
        write(os.path.join(src, n), f"v2 {n}!\n".encode() * 50)
    write(os.path.join(src, "hl"), b"v2 hardlinked, both names\n")  # the same inode: both names change
    os.chmod(os.path.join(src, "meta_res"), 0o600)
    os.setxattr(os.path.join(src, "meta_res"), "user.tag", b"2")
    for n in ("gone_stub", "gone_res"):
        os.unlink(os.path.join(src, n))
    shutil.rmtree(os.path.join(src, "dir2"))
    out = hsmfs("publish", src, os.path.join(origin.root, sub)).stderr
    assert f"(parent {v1[:12]})" in out and "7 written" in out  # only the changed and new contents
    busy = os.open(view.path("busy"), os.O_RDONLY)
    try:
        code, report = refresh(view.target)
        assert code == 75 and report["busy"] == ["busy"]
        # a reader with the file open keeps the version it opened
        assert os.pread(busy, 8, 0) == b"v1 busy\n"
    finally:
        os.close(busy)
    assert report["dirty_kept"] == ["dirty"]
    assert report["added"] == 3 and report["removed"] == 4  # new, newdir, newdir/z; gone_*, dir2/y, dir2
    assert report["replaced"] == 3 and report["restubbed"] == 1 and report["metadata"] == 1  # stub, hl, hl2
    assert sorted(os.listdir(view.target)) == sorted(["keep", "change_stub", "change_res", "meta_res", "dirty", "busy",
                                                      "new", "newdir", "hl", "hl2"])
    assert os.stat(view.path("hl")).st_ino == os.stat(view.path("hl2")).st_ino
    st = os.stat(view.path("meta_res"))
    assert stat.S_IMODE(st.st_mode) == 0o600 and os.getxattr(view.path("meta_res"), "user.tag") == b"2"
    assert states(view.path("meta_res"), view.path("change_res"), view.path("dirty")) == ["resident", "stub", "dirty"]
    assert view.status()["origin"]["bytes_fetched"] == fetched  # nothing fetched by the refresh itself
    assert content(view.path("dirty"))[:4] == b"USER"  # never overwritten
    assert content(view.path("hl2")) == b"v2 hardlinked, both names\n"
    assert content(view.path("new")) == b"brand new\n"
    assert content(view.path("newdir/z")) == b"zzz\n"
    assert content(view.path("change_stub")) == b"v2 change_stub!\n" * 50
    assert content(view.path("change_res")) == b"v2 change_res!\n" * 50
    assert content(view.path("meta_res")) == b"v1 meta_res\n" * 100
    code, report = refresh(view.target)  # the file is closed now
    assert code == 0 and report["restubbed"] == 1 and report["busy"] == []
    assert content(view.path("busy")) == b"v2 busy!\n" * 50

    # a store no mount serves is refreshed too; its next session marks the new stubs
    view.close()
    write(os.path.join(src, "offline"), b"made while unmounted\n")
    hsmfs("publish", src, os.path.join(origin.root, sub))
    code, report = refresh(view.store, "--config", cfg)
    assert code == 0 and report["added"] == 1
    os.mkdir(view.target)  # close() removed it
    view.mount()
    assert content(view.path("offline")) == b"made while unmounted\n"


def test_refresh_of_a_local_source(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """A source file touched after populate gave EIO forever and a chmod was never seen: refresh
    (here every second, policy refresh_interval) closes both."""
    src = tempfile.mkdtemp(prefix="src-", dir=loopfs.mnt)
    for n in ("a", "b", "c"):
        write(os.path.join(src, n), f"old {n}\n".encode())
    cfg = os.path.join(loopfs.base, "refresh-local.toml")
    with open(cfg, "w") as f:
        f.write("refresh_interval = 1\n")
    view = make_view(src, "--config", cfg)
    assert content(view.path("a")) == b"old a\n"
    wait_settled(view)
    write(os.path.join(src, "a"), b"new a, longer\n")
    write(os.path.join(src, "b"), b"new b\n")  # same size: only mtime and ctime tell
    os.chmod(os.path.join(src, "c"), 0o604)
    write(os.path.join(src, "d"), b"d\n")
    deadline = time.monotonic() + 15
    while not os.path.exists(view.path("d")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the rest of that refresh
    assert content(view.path("d")) == b"d\n"
    assert content(view.path("a")) == b"new a, longer\n"
    assert content(view.path("b")) == b"new b\n"
    assert stat.S_IMODE(os.stat(view.path("c")).st_mode) == 0o604
    assert content(view.path("c")) == b"old c\n"
    assert "refreshed" in view.log
    # a user's directory where the source now has a file: kept, reported, the rest is done
    os.mkdir(view.path("mine"))
    write(view.path("mine/notes"), b"user's\n")
    write(os.path.join(src, "mine"), b"source's\n")
    write(os.path.join(src, "e"), b"e\n")
    r = hsmfs("refresh", "--json", view.target, check=False)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert "mine" in report["kept"] and content(view.path("mine/notes")) == b"user's\n"
    assert content(view.path("e")) == b"e\n"


@ext4_only
def test_refresh_of_nothing_mounted(loopfs: LoopFS) -> None:
    r = hsmfs("refresh", "/nonexistent-mount", check=False)
    assert r.returncode == 66 and "no running hsmfs mount" in r.stderr
