"""Security: users reach files only through views, with the source's permissions; the store and the
control socket are root's alone; a source path never leads out of the source.

Unprivileged checks run as uid/gid 65534 ("nobody") in two ways: small commands from /usr/bin under
``setpriv`` (the interpreter lives under /root, which nobody cannot exec), and a forked child of this
process that drops to 65534 after importing what it needs, for exact errnos. Every outcome on a view
is compared with the same operation, by the same user, on the source itself.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import stat
import subprocess
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

from conftest import LoopFS, View, hsmfs
from helpers import AsUser

from hsmfs.linux.fs import fs_type
from hsmfs.places import LOG_DIR, RUN_DIR, STORE_ROOT
from hsmfs.views import is_mountpoint

NOBODY = 65534
GROUP = 4242  # a group nobody is not in, unless a check adds it

CAP_DAC_OVERRIDE = 1

# The source of the permission tests: (path, kind, mode, uid, gid).
ENTRIES = (
    ("", "dir", 0o755, 0, 0),
    ("pub", "file", 0o644, 0, 0),
    ("priv", "file", 0o600, 0, 0),
    ("grp", "file", 0o640, 0, GROUP),
    ("grpw", "file", 0o660, 0, GROUP),
    ("mine", "file", 0o600, NOBODY, NOBODY),
    ("mine-ro", "file", 0o444, NOBODY, NOBODY),
    ("closed", "dir", 0o700, 0, 0),
    ("closed/inner", "file", 0o644, 0, 0),
    ("nobodys", "dir", 0o755, NOBODY, NOBODY),
    ("nobodys/f", "file", 0o644, NOBODY, NOBODY),
)
FILES = [p for p, kind, *_ in ENTRIES if kind == "file"]
DIRS = [p for p, kind, *_ in ENTRIES if kind == "dir"]
IDENTITIES = {"nobody": (), f"nobody+{GROUP}": (GROUP,)}  # supplementary groups


# -- running things as nobody --------------------------------------------------------------------


class Outcome(NamedTuple):
    rc: int
    out: bytes
    err: str

    @property
    def denied(self) -> bool:
        return "Permission denied" in self.err  # strerror(EACCES)


def as_nobody(cmd: Sequence[str], groups: Sequence[int] = ()) -> Outcome:
    """Run a command from /usr/bin as uid/gid 65534 with exactly the supplementary groups given."""
    grp = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *grp, *cmd],
                       capture_output=True, timeout=60, cwd="/")
    return Outcome(r.returncode, r.stdout, r.stderr.decode(errors="replace"))


def in_child(fn: Callable[..., Any], *args: Any, groups: Sequence[int] = (), keep_caps: bool = False) -> Any:
    """Return fn(*args) as run by a forked child as uid/gid 65534 (its result goes back as JSON).

    keep_caps: the child keeps root's effective capabilities (SECBIT_NO_SETUID_FIXUP), so only
    checks made on its uid, not on its capabilities, refuse it: it passes the 0600 control socket's
    permission check and reaches the SO_PEERCRED check behind it.
    """
    return AsUser(NOBODY, fn, *args, groups=groups, limit=60, keep_caps=keep_caps).result()


def attempt(op: Callable[..., object], *args: Any) -> int:
    """0 if op(*args) succeeds, else its errno."""
    try:
        op(*args)
        return 0
    except OSError as e:
        return e.errno or -1


def open_close(path: str, flags: int) -> None:
    os.close(os.open(path, flags | os.O_CLOEXEC, 0o644))


def append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_state(path: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(hsmfs("stat", "--json", path).stdout)[0]
    return info


# -- fixtures ------------------------------------------------------------------------------------


def make_source(loopfs: LoopFS) -> str:
    """The source of ENTRIES, each file with its own bytes (not page-aligned: a real fill)."""
    src = loopfs.fresh_dir("src")
    rnd = random.Random(7)
    for rel, kind, _mode, _uid, _gid in ENTRIES:
        path = os.path.join(src, rel)
        if kind == "dir":
            os.makedirs(path, exist_ok=True)
        else:
            with open(path, "wb") as f:
                f.write(rel.encode() + b":" + rnd.randbytes(5000 + len(rel)))
    for rel, _kind, mode, uid, gid in reversed(ENTRIES):  # children before the parents close
        path = os.path.join(src, rel)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    return src


# -- non-root users see the source's permissions, through views only -----------------------------


def test_views_apply_the_source_permissions(loopfs: LoopFS, views: Callable[..., View]) -> None:
    src = make_source(loopfs)
    v = views(src)
    expected = {rel: read_bytes(os.path.join(src, rel)) for rel in FILES}

    readable = set()
    for who, groups in IDENTITIES.items():
        for rel in FILES + DIRS:
            is_file = rel in FILES
            fmt = "%A %u %g %s" if is_file else "%A %u %g"
            for cmd in (["cat"] if is_file else ["ls", "-a"]), ["stat", "-c", fmt]:
                on_source = as_nobody([*cmd, os.path.join(src, rel)], groups)
                on_view = as_nobody([*cmd, v.path(rel)], groups)
                what = f"{who}: {' '.join(cmd)} {rel or '.'}"
                assert (on_view.rc, on_view.denied) == (on_source.rc, on_source.denied), what
                assert on_view.out == on_source.out, what
                if cmd[0] == "cat" and on_view.rc == 0:
                    assert on_view.out == expected[rel], what
                    readable.add((who, rel))
    # the comparison has teeth: some reads were allowed, some refused, and the group mattered
    assert ("nobody", "pub") in readable and ("nobody", "mine") in readable
    assert ("nobody", "priv") not in readable and ("nobody", "closed/inner") not in readable
    assert ("nobody", "grp") not in readable and (f"nobody+{GROUP}", "grp") in readable
    # root still sees every byte the source has, and the nobody reads filled what they could reach
    for rel in FILES:
        assert read_bytes(v.path(rel)) == expected[rel], rel

    # writes: refused exactly where the source's modes refuse them
    wflags = os.O_WRONLY | os.O_APPEND

    def try_writes(tag: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for rel in FILES:
            on_source = attempt(open_close, os.path.join(src, rel), wflags)  # opens, writes nothing

            out[rel] = [on_source, attempt(append, v.path(rel), f"+{tag}\n".encode())]
        for rel in DIRS:
            on_source = 0 if os.access(os.path.join(src, rel), os.W_OK | os.X_OK) else errno.EACCES
            new = os.path.join(v.path(rel), f"new-by-{tag}")
            out[rel + "/"] = [on_source, attempt(open_close, new, os.O_WRONLY | os.O_CREAT | os.O_EXCL)]
        return out

    appended: dict[str, bytes] = {rel: b"" for rel in FILES}
    for who, groups in IDENTITIES.items():
        tag = who.replace("+", "-")
        results = in_child(try_writes, tag, groups=groups)
        for rel, (on_source, on_view) in results.items():
            assert on_view == on_source, (who, rel, errno.errorcode.get(on_view), errno.errorcode.get(on_source))
            if on_view == 0 and not rel.endswith("/"):
                appended[rel] += f"+{tag}\n".encode()
        assert results["priv"][1] == errno.EACCES and results["mine-ro"][1] == errno.EACCES
        assert results["mine"][1] == 0 and results["nobodys/"][1] == 0 and results["/"][1] == errno.EACCES
    assert appended["grpw"] == f"+nobody-{GROUP}\n".encode()  # group write, for the group's member only
    for rel in FILES:  # the view holds the source's bytes plus the allowed writes; the source is untouched
        assert read_bytes(v.path(rel)) == expected[rel] + appended[rel], rel
        assert read_bytes(os.path.join(src, rel)) == expected[rel], rel
    assert sorted(os.listdir(v.path("nobodys"))) == ["f", "new-by-nobody", f"new-by-nobody-{GROUP}"]
    assert os.stat(v.path("nobodys/new-by-nobody")).st_uid == NOBODY
    assert sorted(os.listdir(os.path.join(src, "nobodys"))) == ["f"]


# -- the store is root's alone ----------------------------------------------------------------------


def assert_store_unreachable(store: str, view: View, *, stat_store_denied: bool) -> None:
    assert os.path.isdir(os.path.join(store, "tree"))
    st = os.stat(store)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
    # pub is filled (through the view) and readable through the view: not through the store
    assert as_nobody(["cat", view.path("pub")]).out == read_bytes(os.path.join(view.source, "pub"))
    size = os.stat(view.path("pub")).st_size
    assert file_state(view.path("pub"))["resident_bytes"] == size
    checks = [
        ["ls", store], ["ls", os.path.join(store, "tree")], ["stat", os.path.join(store, "tree")],
        ["cat", os.path.join(store, "tree", "pub")], ["stat", os.path.join(store, "tree", "pub")],
        ["ls", os.path.join(store, "tree", "nobodys")], ["cat", os.path.join(store, "tree", "mine")],
        ["cat", os.path.join(store, "hsmfs.json")], ["cat", os.path.join(store, "paths")],
        ["cat", os.path.join(LOG_DIR, view.name + ".log")], ["cat", os.path.join(RUN_DIR, view.name + ".json")],
    ]
    if stat_store_denied:
        checks.append(["stat", store])
    for cmd in checks:
        for groups in IDENTITIES.values():
            r = as_nobody(cmd, groups)
            assert r.rc != 0 and r.denied and not r.out, (cmd, groups, r)
    # exact errnos: EACCES, never ENOENT or success
    store_paths = [store, os.path.join(store, "tree"), os.path.join(store, "tree", "pub")]

    def probe() -> list[list[int]]:
        return [[attempt(os.listdir, p), attempt(os.stat, p), attempt(open_close, p, os.O_RDONLY)] for p in store_paths]

    eacces = errno.EACCES
    assert in_child(probe) == [[eacces, eacces if stat_store_denied else 0, eacces], [eacces] * 3, [eacces] * 3]


def test_custom_store_unreachable(loopfs: LoopFS, views: Callable[..., View]) -> None:
    v = views(make_source(loopfs))  # --store on the loop filesystem, whose root directory is 0755
    assert_store_unreachable(v.store, v, stat_store_denied=False)


def test_default_store_unreachable(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """mount --name only: the store is /var/lib/hsmfs/NAME (a bind mount of a directory of the loop
    filesystem when /var/lib/hsmfs is on another filesystem)."""
    v = views(make_source(loopfs), mount=False)
    store = os.path.join(STORE_ROOT, v.name)
    assert not os.path.exists(store), f"{store} exists already (left by an earlier run): rm -r {store}"
    made_root = not os.path.isdir(STORE_ROOT)
    bound = False
    try:
        if fs_type(STORE_ROOT if os.path.isdir(STORE_ROOT) else os.path.dirname(STORE_ROOT)) != loopfs.fstype:
            if made_root:
                os.mkdir(STORE_ROOT, 0o700)  # as hsmfs mount makes it
            os.mkdir(store, 0o700)
            subprocess.run(["mount", "--bind", loopfs.fresh_dir("default-store"), store], check=True)
            bound = True
        hsmfs("mount", "--name", v.name, v.source, v.target)
        v.mounted = True
        assert fs_type(store) == loopfs.fstype
        assert v.status()["store"] == store
        st = os.stat(STORE_ROOT)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == 0, \
            (f"{STORE_ROOT} is mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}"
             + ("" if made_root else f" (so it was on this machine already: chown root: {STORE_ROOT}; chmod 700 "
                f"{STORE_ROOT})"))
        assert_store_unreachable(store, v, stat_store_denied=True)
    finally:
        v.close()
        if bound:
            subprocess.run(["umount", store], check=False)
        if not is_mountpoint(store):
            shutil.rmtree(store, ignore_errors=True)
        if made_root:
            try:
                os.rmdir(STORE_ROOT)  # as it was: absent (unless hsmfs was used meanwhile)
            except OSError:
                pass
    assert not os.path.exists(store)


# -- the control socket answers root only -----------------------------------------------------------


def test_control_socket_root_only(loopfs: LoopFS, views: Callable[..., View]) -> None:
    v = views(make_source(loopfs))
    path = os.path.join(RUN_DIR, v.name + ".sock")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert stat.S_IMODE(os.stat(RUN_DIR).st_mode) & 0o077 == 0

    def ask(*requests: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for req in requests:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                try:
                    s.connect(path)
                except OSError as e:
                    out.append(e.errno)
                    continue
                try:
                    s.sendall(json.dumps(req).encode() + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a refused peer's request may go unread: the reply is there all the same
                out.append(json.loads(s.makefile("rb").readline()))
        return out

    status = {"op": "status"}
    umount = {"op": "umount", "lazy": True}
    # plain nobody: the path is closed to them (0600 socket in a 0700 directory)
    assert in_child(ask, status, umount) == [errno.EACCES, errno.EACCES]
    assert in_child(ask, status, groups=(0,)) == [errno.EACCES]  # even in root's group

    # uid 65534 with root's capabilities: the path lets it through, SO_PEERCRED must not
    def ask_with_caps() -> dict[str, Any]:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {"uids": fields["Uid"].split(), "caps": int(fields["CapEff"], 16), "replies": ask(status, umount)}

    got = in_child(ask_with_caps, keep_caps=True)
    assert got["uids"] == [str(NOBODY)] * 4 and got["caps"] & (1 << CAP_DAC_OVERRIDE), got
    assert got["replies"] == [{"ok": False, "error": "root only"}] * 2, got
    # nothing happened: the view is still mounted and the filler answers root
    assert is_mountpoint(v.target)
    reply = ask(status)[0]
    assert isinstance(reply, dict) and reply.get("ok") is True, reply
    assert read_bytes(v.path("pub")) == read_bytes(os.path.join(v.source, "pub"))


# -- symlinks are copied, never followed ------------------------------------------------------------


def test_source_symlinks_stay_symlinks(loopfs: LoopFS, views: Callable[..., View]) -> None:
    outside = loopfs.fresh_dir("outside")
    os.chmod(outside, 0o755)
    secret = b"outside the source: " + random.Random(3).randbytes(3000)
    os.makedirs(os.path.join(outside, "sub"))
    for p in ("secret", "sub/secret"):
        with open(os.path.join(outside, p), "wb") as f:
            f.write(secret)
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    with open(os.path.join(src, "inside"), "wb") as f:
        f.write(b"inside bytes")
    links = {
        "abs": os.path.join(outside, "secret"),
        "rel": os.path.join("..", os.path.basename(outside), "secret"),
        "dir": os.path.join(outside, "sub"),
        "dangling": "/nonexistent/hsmfs/secret",
        "in": "inside",
    }
    for name, target in links.items():
        os.symlink(target, os.path.join(src, name))
        os.lchown(os.path.join(src, name), NOBODY, NOBODY)
    v = views(src)

    for name, target in links.items():
        st = os.lstat(v.path(name))
        assert stat.S_ISLNK(st.st_mode), name
        assert os.readlink(v.path(name)) == target, name
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    # the tree holds a regular file for each regular source file and nothing else: no stub of a target
    tree = os.path.join(v.store, "tree")
    regular = []
    for dirpath, _dirs, names in os.walk(tree):
        for n in names:
            p = os.path.join(dirpath, n)
            if stat.S_ISREG(os.lstat(p).st_mode):
                regular.append(os.path.relpath(p, tree))
                assert os.lstat(p).st_size != len(secret), p
    assert regular == ["inside"]

    # reading through a link resolves it in the reader's namespace, like any symlink: to the outside
    # file itself, which is no stub, so the filler is not involved
    fills = v.status()["filler"]["fills"]
    assert read_bytes(v.path("abs")) == secret
    assert read_bytes(v.path("dir/secret")) == secret
    assert v.status()["filler"]["fills"] == fills
    assert read_bytes(v.path("in")) == b"inside bytes"  # a link to a stub fills the stub
    assert v.status()["filler"]["fills"] == fills + 1


# -- a source path never leads out of the source ----------------------------------------------------


def test_source_path_cannot_escape(loopfs: LoopFS, views: Callable[..., View]) -> None:
    outside = loopfs.fresh_dir("outside")
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    rnd = random.Random(5)
    mine = {"d/f": rnd.randbytes(9000), "g": rnd.randbytes(7000)}
    theirs = {rel: b"O" * len(data) for rel, data in mine.items()}  # same sizes: only the path can tell
    for root, content in ((src, mine), (outside, theirs)):
        os.makedirs(os.path.join(root, "d"))
        for rel, data in content.items():
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
    v = views(src)

    # after the view is live, a directory on the stub's path and another stub's file become symlinks out
    os.rename(os.path.join(src, "d"), os.path.join(src, "d.orig"))
    os.symlink(os.path.join(outside, "d"), os.path.join(src, "d"))
    os.rename(os.path.join(src, "g"), os.path.join(src, "g.orig"))
    os.symlink(os.path.join("..", os.path.basename(outside), "g"), os.path.join(src, "g"))
    assert read_bytes(os.path.join(src, "d", "f")) == theirs["d/f"]  # a path walk would follow them
    assert read_bytes(os.path.join(src, "g")) == theirs["g"]

    for rel in mine:
        for who in ("root", "nobody"):
            cmd = ["cat", v.path(rel)]
            if who == "root":
                r = subprocess.run(cmd, capture_output=True, timeout=60)
                o = Outcome(r.returncode, r.stdout, r.stderr.decode(errors="replace"))
            else:
                o = as_nobody(cmd)
            assert o.rc != 0 and o.out == b"" and "Input/output error" in o.err, (who, rel, o.rc, o.out[:40], o.err)
        assert f"cannot fill {rel}" in v.log, v.log
        info = file_state(v.path(rel))
        assert info["state"] == "stub" and info["resident_bytes"] == 0, (rel, info)
    assert v.status()["filler"]["fills"] == 0

    # the source made whole again: d/f's directory is back, and d/f itself was never touched, so its
    # stub fills with the source's bytes; g was renamed away and back, which changed its ctime: it is
    # not provably the object its stub was made from any more, and stays refused (a refresh of the
    # store would make it a stub of the file as it is now)
    for rel in ("d", "g"):
        os.unlink(os.path.join(src, rel))
        os.rename(os.path.join(src, rel + ".orig"), os.path.join(src, rel))
    assert as_nobody(["cat", v.path("d/f")]).out == mine["d/f"]
    o = as_nobody(["cat", v.path("g")])
    assert o.rc != 0 and o.out == b"" and "Input/output error" in o.err
    assert "source file changed since the stub was made" in v.log


# -- holes these tests found, fixed: views inherit the source mount's restrictions, fills check mtime --


def test_view_keeps_source_mount_restrictions(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """A source on a nosuid,nodev,noexec mount (an untrusted disk or export): its setuid binaries,
    device nodes and executables must stay as inert through the view as they are on the source."""
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    for name, mode in (("suid-id", 0o4755), ("true", 0o755)):
        shutil.copy(shutil.which(name.split("-")[-1]) or "", os.path.join(src, name))
        os.chmod(os.path.join(src, name), mode)
    os.mknod(os.path.join(src, "zero"), stat.S_IFCHR | 0o666, os.makedev(1, 5))
    subprocess.run(["mount", "--bind", src, src], check=True)
    v = None
    try:
        subprocess.run(["mount", "-o", "remount,bind,nosuid,nodev,noexec", src, src], check=True)
        v = views(src)
        for cmd in (["{}/suid-id", "-u"], ["head", "-c", "4", "{}/zero"], ["{}/true"]):
            on_source = as_nobody([c.format(src) for c in cmd])
            on_view = as_nobody([c.format(v.target) for c in cmd])
            assert (on_view.rc, on_view.out, on_view.denied) == (on_source.rc, on_source.out, on_source.denied), \
                (cmd, on_source, on_view)
    finally:
        if v is not None:
            v.close()  # the filler holds the source open: it goes first
        subprocess.run(["umount", src], check=True)


def test_source_rewritten_private_after_mount(loopfs: LoopFS, views: Callable[..., View]) -> None:
    """The owner makes a file private and puts a secret in it (same size): nobody must not read the secret."""
    src = loopfs.fresh_dir("src")
    os.chmod(src, 0o755)
    path = os.path.join(src, "notes")
    with open(path, "wb") as f:
        f.write(b"public notes....")
    os.chmod(path, 0o644)
    v = views(src)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"password=hunter2")
    assert as_nobody(["cat", path]).denied
    on_view = as_nobody(["cat", v.path("notes")])
    assert on_view.rc != 0 and b"hunter2" not in on_view.out, on_view
