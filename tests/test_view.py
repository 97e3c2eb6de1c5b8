"""Reading and writing through a live view: real bytes from real kernel events, on ext4, xfs, btrfs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Callable

import pytest
from conftest import LoopFS, View, hsmfs

from hsmfs.views import is_mountpoint

SIZES = {"empty": 0, "one": 1, "page-1": 4095, "page": 4096, "page+1": 4097, "mid.bin": 300_000,
         "big.bin": 5 * 1024 * 1024 + 17}


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_source(root: str) -> str:
    rnd = random.Random(42)
    src = os.path.join(root, "src")
    os.makedirs(os.path.join(src, "dir", "deeper"))
    for name, size in SIZES.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(rnd.randbytes(size))
    with open(os.path.join(src, "sparse.bin"), "wb") as f:
        f.seek(3 * 1024 * 1024)
        f.write(b"tail")
    with open(os.path.join(src, "dir", "deeper", "text.txt"), "w") as f:
        f.write("hello from the source\n" * 1000)
    shutil.copy2("/bin/true", os.path.join(src, "true-bin"))
    pkg = os.path.join(src, "lazypkg")
    os.mkdir(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("from lazypkg.mod import VALUE\n")
    with open(os.path.join(pkg, "mod.py"), "w") as f:
        f.write("VALUE = sum(range(1000))\n")
    os.symlink("dir/deeper/text.txt", os.path.join(src, "link"))
    return src


def source_files(src: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(src):
        for n in files:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(os.path.relpath(p, src))
    return sorted(out)


@pytest.fixture
def view(loopfs: LoopFS, make_view: Callable[..., View]) -> View:
    return make_view(make_source(loopfs.fresh_dir("src")))


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Readers are separate processes under a timeout: a hung fill fails the test, not the suite."""
    return subprocess.run(cmd, capture_output=True, timeout=60, check=True, **kw)  # type: ignore[call-overload, no-any-return]


def py(code: str) -> str:
    return run([sys.executable, "-c", code]).stdout.decode()


def test_cat_gives_source_bytes(view: View) -> None:
    for rel in source_files(view.source):
        out = run(["cat", view.path(rel)]).stdout
        with open(os.path.join(view.source, rel), "rb") as f:
            assert out == f.read(), rel


def test_python_reads_and_stat_match(view: View) -> None:
    code = ("import hashlib,os,sys,json\n"
            "r={}\n"
            "for p in sys.argv[1:]:\n"
            "  with open(p,'rb') as f: f.seek(0); r[p]=hashlib.sha256(f.read()).hexdigest()\n"
            "print(json.dumps(r))")
    files = source_files(view.source)
    out = run([sys.executable, "-c", code, *[view.path(f) for f in files]]).stdout
    got = json.loads(out)
    for f in files:
        assert got[view.path(f)] == sha(os.path.join(view.source, f)), f
        s, v = os.lstat(os.path.join(view.source, f)), os.lstat(view.path(f))
        assert (v.st_size, v.st_mode, v.st_uid, v.st_gid, v.st_mtime_ns) == \
            (s.st_size, s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns), f


def test_mmap_random_pages(view: View) -> None:
    code = ("import mmap,sys,random\n"
            "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
            "rnd=random.Random(7); out=[]\n"
            "for _ in range(64):\n"
            "  o=rnd.randrange(0,len(m)-100); out.append(m[o:o+100].hex())\n"
            "print(' '.join(out))")
    got = py_args(code, view.path("big.bin"))
    want = py_args(code, os.path.join(view.source, "big.bin"))
    assert got == want


def py_args(code: str, *args: str) -> str:
    return run([sys.executable, "-c", code, *args]).stdout.decode()


def test_execve_stubbed_binary(view: View) -> None:
    r = subprocess.run([view.path("true-bin")], timeout=60)
    assert r.returncode == 0
    assert sha(view.path("true-bin")) == sha(os.path.join(view.source, "true-bin"))


def test_import_stubbed_package(view: View) -> None:
    out = run([sys.executable, "-c", "import lazypkg; print(lazypkg.VALUE)"], cwd=view.target).stdout
    assert out.strip() == b"499500"


@pytest.mark.parametrize("copier", [
    ["cp"], ["cp", "--sparse=always"], ["cp", "-a"], ["tar", "-S"], ["rsync", "-a"], ["rsync", "-aS"],
])
def test_hole_aware_copiers_get_data(view: View, copier: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    dest = str(tmp_path_factory.mktemp("copy"))
    files = ["big.bin", "mid.bin", "page+1", "dir/deeper/text.txt", "sparse.bin"]
    for rel in files:
        out = os.path.join(dest, rel.replace("/", "_"))
        if copier[0] == "tar":
            tarball = out + ".tar"
            run(["tar", "-S", "-cf", tarball, "-C", view.target, rel])
            run(["tar", "-xf", tarball, "-C", dest])
            out = os.path.join(dest, rel)
        else:
            run([*copier, view.path(rel), out])
        assert sha(out) == sha(os.path.join(view.source, rel)), (copier, rel)


def test_ops_on_unfilled_stubs(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """The same writes on stubs and on plain copies leave identical files."""
    src = loopfs.fresh_dir("src")
    ops = ("pwrite", "append", "trunc_open", "shrink", "extend", "all")
    rnd = random.Random(1)
    os.makedirs(os.path.join(src, "s"))
    for op in ops:
        with open(os.path.join(src, "s", op), "wb") as f:
            f.write(rnd.randbytes(300_000))
    v = make_view(src)
    plain = loopfs.fresh_dir("plain")
    for op in ops:
        shutil.copyfile(os.path.join(src, "s", op), os.path.join(plain, op))
        for target in (os.path.join(plain, op), v.path(os.path.join("s", op))):
            run([sys.executable, "-c", WRITE_OPS, target, op])
        assert sha(v.path(os.path.join("s", op))) == sha(os.path.join(plain, op)), op
    time.sleep(0.2)
    # the view's files are the users' now; the source is untouched
    with open(os.path.join(src, "s", "pwrite"), "rb") as f:
        assert b"MIDDLE" not in f.read()


WRITE_OPS = (
    "import os,sys\n"
    "p=sys.argv[1]; op=sys.argv[2]\n"
    "if op=='pwrite':\n"
    "  fd=os.open(p,os.O_WRONLY); os.pwrite(fd,b'MIDDLE'*100,150000); os.pwrite(fd,b'x',4095); os.close(fd)\n"
    "elif op=='append':\n"
    "  fd=os.open(p,os.O_WRONLY|os.O_APPEND); os.write(fd,b'appended'*1000); os.close(fd)\n"
    "elif op=='trunc_open':\n"
    "  fd=os.open(p,os.O_WRONLY|os.O_TRUNC); os.write(fd,b'new content'); os.close(fd)\n"
    "elif op=='shrink':\n"
    "  fd=os.open(p,os.O_RDWR); os.ftruncate(fd,12345); os.close(fd)\n"
    "elif op=='extend':\n"
    "  fd=os.open(p,os.O_RDWR); n=os.fstat(fd).st_size+70000; os.ftruncate(fd,n)\n"
    "  os.pwrite(fd,b'end',n-3); os.close(fd)\n"
    "elif op=='all':\n"
    "  fd=os.open(p,os.O_RDWR); os.pwrite(fd,b'A'*10,5000); os.ftruncate(fd,100000); os.ftruncate(fd,400000)\n"
    "  os.close(fd); fd=os.open(p,os.O_WRONLY|os.O_APPEND); os.write(fd,b'Z'*5); os.close(fd)\n"
)


def test_metadata_changes_before_fill(view: View) -> None:
    """rename, hardlink, chmod, chown of stubs before their fill: the fill still finds them."""
    os.rename(view.path("mid.bin"), view.path("dir/renamed.bin"))
    os.link(view.path("big.bin"), view.path("dir/big-link"))
    os.chmod(view.path("page+1"), 0o600)
    os.chown(view.path("page"), 4321, 8765)
    assert run(["cat", view.path("dir/renamed.bin")]).stdout == _src_bytes(view, "mid.bin")
    assert run(["cat", view.path("dir/big-link")]).stdout == _src_bytes(view, "big.bin")
    assert run(["cat", view.path("big.bin")]).stdout == _src_bytes(view, "big.bin")
    assert run(["cat", view.path("page+1")]).stdout == _src_bytes(view, "page+1")
    assert run(["cat", view.path("page")]).stdout == _src_bytes(view, "page")
    assert os.stat(view.path("page+1")).st_mode & 0o777 == 0o600
    st = os.stat(view.path("page"))
    assert (st.st_uid, st.st_gid) == (4321, 8765)
    # one inode, one fill, however many names
    assert os.stat(view.path("dir/big-link")).st_ino == os.stat(view.path("big.bin")).st_ino


def _src_bytes(view: View, rel: str) -> bytes:
    with open(os.path.join(view.source, rel), "rb") as f:
        return f.read()


def test_sixteen_readers_one_fetch(view: View) -> None:
    before = view.status()["filler"]["fills"]
    procs = [subprocess.Popen(["sha256sum", view.path("big.bin")], stdout=subprocess.PIPE) for _ in range(16)]
    outs = [p.communicate(timeout=60)[0].split()[0].decode() for p in procs]
    assert outs == [sha(os.path.join(view.source, "big.bin"))] * 16
    assert view.status()["filler"]["fills"] - before == 1


def test_fill_restores_source_times(view: View) -> None:
    run(["cat", view.path("dir/deeper/text.txt")])
    s, v = os.stat(os.path.join(view.source, "dir/deeper/text.txt")), os.stat(view.path("dir/deeper/text.txt"))
    assert v.st_mtime_ns == s.st_mtime_ns


def test_resident_after_commit_and_ignored(view: View) -> None:
    commits = view.status()["filler"]["commits"]
    run(["cat", view.path("mid.bin")])
    deadline = time.monotonic() + 10
    while view.status()["filler"]["commits"] == commits and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(hsmfs("stat", "--json", view.path("mid.bin")).stdout)[0]["state"] == "resident"
    events = view.status()["filler"]["events"]
    for _ in range(20):
        run(["cat", view.path("mid.bin")])
    # the ignore mark went on after the commit: reads of a resident file raise no events. Without it
    # each cat raises at least 3 (open, read, read at EOF). A cache drop elsewhere on the machine may
    # evict the inode and its evictable mark: the one event that follows re-marks it.
    assert view.status()["filler"]["events"] - events <= 1


def test_source_file_deleted(view: View) -> None:
    os.unlink(os.path.join(view.source, "mid.bin"))
    r = subprocess.run(["cat", view.path("mid.bin")], capture_output=True, timeout=60)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert "mid.bin" in view.log and "gone" in view.log
    info = json.loads(hsmfs("stat", "--json", view.path("mid.bin")).stdout)[0]
    assert info["state"] == "stub" and info["resident_bytes"] == 0
    assert view.status()["filler"]["fill_errors"] >= 1


def test_source_file_unreadable_then_back(view: View) -> None:
    """A source directory replaced by a symlink cannot be read through (symlinks are never followed): EIO;
    once the directory is back, the stub, which stayed a stub, fills."""
    d = os.path.join(view.source, "dir")
    os.rename(d, d + ".moved")
    os.symlink("dir.moved", d)
    r = subprocess.run(["cat", view.path("dir/deeper/text.txt")], capture_output=True, timeout=60)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert "cannot fill dir/deeper/text.txt" in view.log and "symlink" in view.log
    os.unlink(d)
    os.rename(d + ".moved", d)
    assert run(["cat", view.path("dir/deeper/text.txt")]).stdout == _src_bytes(view, "dir/deeper/text.txt")


def test_source_file_changed_size(view: View) -> None:
    with open(os.path.join(view.source, "page-1"), "ab") as f:
        f.write(b"more")
    r = subprocess.run(["cat", view.path("page-1")], capture_output=True, timeout=60)
    assert r.returncode != 0 and b"Input/output error" in r.stderr
    assert "changed size" in view.log


def test_view_in_other_mount_namespace(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = make_source(loopfs.fresh_dir("src"))
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        v = make_view(src, "--namespace", str(holder.pid), mount=False)
        v.mount()
        assert not is_mountpoint(v.target)  # not on the host
        out = run(["nsenter", "-t", str(holder.pid), "-m", "sha256sum", v.path("big.bin")]).stdout
        assert out.split()[0].decode() == sha(os.path.join(src, "big.bin"))
        mounts = run(["nsenter", "-t", str(holder.pid), "-m", "findmnt", "-n", v.target]).stdout
        assert v.target.encode() in mounts
        hsmfs("umount", v.name)
        v.mounted = False
        r = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "findmnt", "-n", v.target],
                           capture_output=True)
        assert r.returncode != 0
    finally:
        holder.kill()
        holder.wait()
