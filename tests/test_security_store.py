"""The store is root's alone, and the source root stays the directory the store was built from
(issue 11, item 7, and the suspected "swapping the source root itself").

A user (uid 65534) who could prepare the store rewrote its hsmfs.json and paths and, after a filler
restart, read root's 0600 file. A user who can rename the source root can put a symlink to a
directory only root can read in its place: the stubs would be filled from there. Each refused
mount exits with its documented code, says what to do, and changes nothing on disk.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from typing import Callable

from conftest import LoopFS, View, hsmfs
from test_security import NOBODY, as_nobody

from hsmfs.views import is_mountpoint


def snapshot(top: str) -> dict[str, tuple[int, int, int, bytes]]:
    """path -> (mode, uid, size, bytes of regular files) of everything under top."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirs + files)]:
            st = os.lstat(n)
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(n, "rb") as f:
                    data = f.read()
            out[n] = (st.st_mode, st.st_uid, st.st_size, data)
    return out


def refused(v: View, code: int, *words: str) -> str:
    r = hsmfs("mount", "--name", v.name, "--store", v.store, *v.extra, v.source, v.target, check=False)
    v.mounted = r.returncode == 0
    assert r.returncode == code, (r.returncode, r.stderr)
    for w in words:
        assert w in r.stderr, r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not is_mountpoint(v.target)
    return r.stderr


def public_source(loopfs: LoopFS) -> str:
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    with open(os.path.join(src, "notes"), "wb") as f:
        f.write(b"public notes")
    os.chmod(os.path.join(src, "notes"), 0o644)
    return src


def test_store_a_user_prepared_is_refused(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """A store directory, or one above it, that a user owns or may write is refused (73)."""
    src = public_source(loopfs)
    shared = loopfs.fresh_dir("stores")  # a place anyone may make directories in, like /var/tmp
    os.chmod(shared, 0o1777)
    v = views(src, mount=False)
    v.store = os.path.join(shared, "mine")
    assert as_nobody(["mkdir", "-m", "755", v.store]).rc == 0  # the user makes it first
    before = snapshot(shared)
    err = refused(v, 73, "is not root's alone", f"{v.store} (owned by uid {NOBODY})")
    assert snapshot(shared) == before, "a refused mount changed the store"

    # a directory above the store that others may write (no sticky bit), or that a user owns
    for mode, owner, why in ((0o777, 0, "writable by everyone, mode 0777 without the sticky bit"),
                             (0o755, NOBODY, f"owned by uid {NOBODY}"), (0o775, 0, "writable by group")):
        parent = loopfs.fresh_dir("parent")
        os.chown(parent, owner, 4242 if why.startswith("writable by group") else 0)
        os.chmod(parent, mode)
        v = views(src, mount=False)
        v.store = os.path.join(parent, "store")
        err = refused(v, 73, f"{parent} ({why}")
        assert os.listdir(parent) == [], err

    # the same under a root-owned sticky directory (as /var/tmp) is fine: others cannot rename root's
    v = views(src, mount=False)
    v.store = os.path.join(shared, "roots")
    v.mount()
    assert os.stat(v.store).st_uid == 0
    assert as_nobody(["cat", v.path("notes")]).out == b"public notes"


def test_store_files_must_be_roots_and_no_symlinks(loopfs: LoopFS, views: Callable[..., View]) -> None:
    src = public_source(loopfs)
    v = views(src)
    hsmfs("umount", v.target)
    v.mounted = False
    meta = os.path.join(v.store, "hsmfs.json")
    # hsmfs.json as a symlink to a file of the user's: never followed
    theirs = os.path.join(loopfs.fresh_dir("theirs"), "fake.json")
    with open(meta) as f:
        real = f.read()
    with open(theirs, "w") as f:
        f.write(real)
    os.chown(theirs, NOBODY, NOBODY)
    os.rename(meta, meta + ".real")
    os.symlink(theirs, meta)
    before = snapshot(v.store)
    refused(v, 73, "hsmfs.json is not a regular file owned by root")
    assert snapshot(v.store) == before
    os.unlink(meta)
    os.rename(meta + ".real", meta)
    # the paths table owned by a user
    path = os.path.join(v.store, "paths")
    os.chown(path, NOBODY, NOBODY)
    refused(v, 73, "paths is not a regular file owned by root")
    os.chown(path, 0, 0)
    v.mount()
    assert as_nobody(["cat", v.path("notes")]).out == b"public notes"


def test_source_root_replaced_by_a_user(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """nobody owns the directory holding the source, mounted by root; then nobody puts a symlink to
    root's 0700 directory (with the same names, one of them 0600) in the source's place."""
    base = loopfs.fresh_dir("home")
    os.chmod(base, 0o755)
    home = os.path.join(base, "nobody")
    os.mkdir(home)
    os.chown(home, NOBODY, NOBODY)
    assert as_nobody(["mkdir", "-m", "755", os.path.join(home, "share")]).rc == 0
    src = os.path.join(home, "share")
    assert as_nobody(["sh", "-c", f"echo 'public notes' > {src}/notes"]).rc == 0
    secret = os.path.join(base, "root-only")
    os.mkdir(secret, 0o700)
    with open(os.path.join(secret, "notes"), "wb") as f:
        f.write(b"root secrets\n")
    os.chmod(os.path.join(secret, "notes"), 0o600)
    # the same size and mtime as nobody's file (a user can time their file to match a known one):
    # only the source root's identity tells them apart
    st = os.stat(os.path.join(src, "notes"))
    os.utime(os.path.join(secret, "notes"), ns=(st.st_atime_ns, st.st_mtime_ns))

    v = views(src)
    src_st = os.stat(src)
    # while the view is live: nobody swaps the source root, and the filler restarts (a crash)
    assert as_nobody(["sh", "-c", f"mv {src} {src}.old && ln -s {secret} {src}"]).rc == 0
    filler = v.status()["filler_pid"]
    os.kill(filler, signal.SIGKILL)  # the filler our mount started; its supervisor starts another
    deadline = time.monotonic() + 30
    while v.status().get("filler_pid") in (None, filler) and time.monotonic() < deadline:
        time.sleep(0.1)
    got = as_nobody(["cat", v.path("notes")])
    assert b"secret" not in got.out, f"the view served root's 0600 file to nobody: {got}"
    assert got.rc != 0 and "Input/output error" in got.err, got
    assert "is not the directory the store was built from" in v.log, v.log[-2000:]
    hsmfs("umount", v.target)
    v.mounted = False

    # mounting again with the replaced root: refused (66), nothing changed
    before = snapshot(v.store)
    err = refused(v, 66, "is not the directory store", "someone may have replaced it")
    assert snapshot(v.store) == before, err
    # the real source back in place: the store mounts again
    assert as_nobody(["sh", "-c", f"rm {src} && mv {src}.old {src}"]).rc == 0
    v.mount()
    assert as_nobody(["cat", v.path("notes")]).out == b"public notes\n"
    with open(os.path.join(v.store, "hsmfs.json")) as f:
        meta = json.load(f)
    assert (meta["source_dev"], meta["source_ino"]) == (src_st.st_dev, src_st.st_ino), meta
