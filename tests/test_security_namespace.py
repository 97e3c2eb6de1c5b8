"""Views in other mount namespaces: nothing of that namespace ever runs as root, a namespace that
another user namespace owns is refused, a pid names one process only, and a view ends with its
namespace (a container that stops takes its view with it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Callable

import pytest
from conftest import LoopFS, View, hsmfs
from helpers import wait_for
from test_view import make_source, sha

from hsmfs.places import record_path

NOBODY = 65534


def _mounted_in(pid: int, target: str) -> bool:
    """Whether target is a mount point in the mount namespace of pid (read from the host: nothing runs there)."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _own_namespace(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    except FileNotFoundError:
        return False


@pytest.fixture
def holders() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """new(argv) -> a process in a mount namespace of its own, killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def new(argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        procs.append(p)
        wait_for(lambda: _own_namespace(p.pid) or p.poll() is not None, "the new mount namespace", timeout=10)
        assert p.poll() is None, f"{argv} exited with {p.returncode}"
        return p

    yield new
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_umount_runs_nothing_from_the_namespace(loopfs: LoopFS, make_view: Callable[..., View],
                                                holders: Callable[..., subprocess.Popen[bytes]]) -> None:
    """A namespace whose umount, nsenter and mount binaries are someone else's script: hsmfs mount and
    umount of a view there never run them (they used to run its umount as host root)."""
    src = make_source(loopfs.fresh_dir("src"))
    work = loopfs.fresh_dir("ns")
    marker = os.path.join(work, "ran-as-root")
    script = os.path.join(work, "evil")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\nexit 0\n")
    os.chmod(script, 0o755)
    binds = " && ".join(f"mount --bind {script} {b}" for b in
                        ("/usr/bin/umount", "/usr/bin/nsenter", "/usr/bin/findmnt", "/usr/bin/mount"))  # mount last
    holder = holders(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{binds} && exec sleep 600"])
    wait_for(lambda: _mounted_in(holder.pid, "/usr/bin/umount"), "the namespace's fake binaries", timeout=10)
    v = make_view(src, "--namespace", str(holder.pid), mount=False)
    v.mount()
    assert _mounted_in(holder.pid, v.target) and not _mounted_in(os.getpid(), v.target)
    # the view serves real bytes there (read from the host through the namespace's root)
    assert _read(f"/proc/{holder.pid}/root{v.target}/big.bin") == _read(os.path.join(src, "big.bin"))
    hsmfs("umount", v.name)
    v.mounted = False
    assert not os.path.exists(marker), f"hsmfs ran a binary of the namespace: {_read(marker)!r}"
    assert not _mounted_in(holder.pid, v.target)


def test_namespace_of_another_user_namespace_refused(loopfs: LoopFS, make_view: Callable[..., View],
                                                     holders: Callable[..., subprocess.Popen[bytes]]) -> None:
    """An unprivileged user's own user and mount namespace (unshare -Urm) is refused before anything
    changes: its owner controls its mounts and binaries."""
    src = make_source(loopfs.fresh_dir("src"))
    holder = holders(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                      "unshare", "-Urm", "sleep", "600"])
    v = make_view(src, "--namespace", str(holder.pid), mount=False)
    r = hsmfs("mount", "--name", v.name, "--store", v.store, "--namespace", str(holder.pid), src, v.target,
              check=False)
    v.mounted = r.returncode == 0  # a wrongly accepted mount is still cleaned up
    assert r.returncode == 77, r.stderr
    assert "another user namespace" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(v.store), "a refused mount created its store"
    assert not _mounted_in(holder.pid, v.target)
    assert not os.path.exists(record_path(v.name))


def test_bad_namespace_arguments(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = make_source(loopfs.fresh_dir("src"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    not_ns = os.path.join(loopfs.fresh_dir("x"), "plain")
    open(not_ns, "w").close()
    for spec, words in ((str(gone.pid), "no process"), (not_ns, "not a mount namespace"),
                        ("/proc/self/ns/net", "not a mount namespace"), ("/nonexistent", "cannot open")):
        v = make_view(src, mount=False)
        r = hsmfs("mount", "--name", v.name, "--store", v.store, "--namespace", spec, src, v.target, check=False)
        v.mounted = r.returncode == 0
        assert r.returncode == 64, (spec, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (spec, r.stderr)
        assert not os.path.exists(v.store)


def test_view_ends_with_its_namespace(loopfs: LoopFS, make_view: Callable[..., View],
                                      holders: Callable[..., subprocess.Popen[bytes]]) -> None:
    """When the last process of the namespace exits, its mounts go, the view with them, and the
    supervisor and filler stop and say why; hsmfs status no longer lists it."""
    src = make_source(loopfs.fresh_dir("src"))
    holder = holders(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    v = make_view(src, "--namespace", str(holder.pid), mount=False)
    v.mount()
    with open(record_path(v.name)) as f:
        supervisor = json.load(f)["pid"]
    # the target path in that namespace names it too, when it names one view only
    status = json.loads(hsmfs("status", "--json", v.target).stdout)
    assert [s["name"] for s in status] == [v.name]
    assert _read(f"/proc/{holder.pid}/root{v.target}/mid.bin") == _read(os.path.join(src, "mid.bin"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{supervisor}"), "the supervisor to stop", timeout=20)
    v.mounted = False
    assert "is gone: every process in it exited" in v.log, v.log
    assert hsmfs("status", v.name, check=False).returncode == 66  # no longer running (only this name is asked)
    # the store is intact and mounts again, here
    v.extra = ()
    v.mount()
    assert sha(v.path("big.bin")) == sha(os.path.join(src, "big.bin"))
