"""The data path's costs, as events counted by the filler: one event per first open at most, none
for a file once it is filled (committed or not), none for resident files after a cache drop or a
remount; fill-ahead fills a directory's small stubs and leaves its large ones; a filler killed
between a fill and its commit leaves the fill to its successor to commit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from typing import Callable

from conftest import LoopFS, View, hsmfs
from helpers import cat as read
from helpers import wait_for

from hsmfs import state
from hsmfs.places import record_path


def make_tree(root: str, rnd: random.Random, *, dirs: int = 3, files: int = 8, big: int = 0) -> dict[str, bytes]:
    out = {}
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"d{d}"))
        for i in range(files):
            rel = f"d{d}/f{i}"
            out[rel] = rnd.randbytes(rnd.randrange(1, 40000))
        for i in range(big):
            out[f"d{d}/big{i}"] = rnd.randbytes((2 << 20) + 5)
    for rel, data in out.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return out


def policy(loopfs: LoopFS, text: str) -> str:
    path = os.path.join(loopfs.base, f"policy-{abs(hash(text))}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def events(v: View) -> int:
    return int(v.status()["filler"]["events"])


def state_of(v: View, rel: str) -> str:
    return state.state_in_store(os.path.join(v.store, "tree", rel)).value


def test_one_event_per_first_open_none_after(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """No fill-ahead, commits 30 s apart: the first read of each file costs its open's event, and
    nothing else; reading a filled file again, before its commit, costs nothing."""
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(1))
    v = make_view(src, "--config", policy(loopfs, "fill_ahead = false\ncommit_interval = 30\n"))
    for rel, want in data.items():
        assert read(v.path(rel)) == want
    assert events(v) == len(data), v.status()["filler"]
    before = events(v)
    for rel, want in data.items():
        for _ in range(3):
            assert read(v.path(rel)) == want
    assert events(v) == before, "a filled file raised events before its commit"
    assert v.status()["filler"]["pending_commit"] == len(data)
    states = json.loads(hsmfs("stat", "--json", *[v.path(r) for r in data]).stdout)
    assert {s["state"] for s in states} == {"filled"}


def test_fill_ahead_fills_the_directory_small_files_only(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(2), big=1)
    v = make_view(src, "--config", policy(loopfs, "commit_interval = 0.05\n"))
    assert read(v.path("d1/f0")) == data["d1/f0"]
    small = [r for r in data if r.startswith("d1/f")]
    wait_for(lambda: all(state_of(v, r) == "resident" for r in small), "d1's small files to be filled ahead")
    assert state_of(v, "d1/big0") == "stub"  # larger than fill_ahead_max_size
    assert all(state_of(v, r) == "stub" for r in data if not r.startswith("d1/")), "another directory filled"
    f = v.status()["filler"]
    assert f["fills"] == 1 and f["ahead_fills"] == len(small) - 1, f
    before = events(v)
    for r in small:
        assert read(v.path(r)) == data[r]
    assert events(v) == before, "files filled ahead raised events"


def test_resident_files_raise_no_event_after_remount_and_cache_drop(loopfs: LoopFS,
                                                                    make_view: Callable[..., View]) -> None:
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(3))
    v = make_view(src, "--config", policy(loopfs, "commit_interval = 0.05\n"))
    for rel in data:
        read(v.path(rel))
    wait_for(lambda: v.status()["filler"]["pending_commit"] == 0, "the commits")
    hsmfs("umount", v.target)
    v.mounted = False
    v.mount()
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    for rel, want in data.items():
        assert read(v.path(rel)) == want
    assert events(v) == 0, v.status()["filler"]


def test_fill_committed_by_the_successor(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """A filler killed after a fill and before its commit: the file is filled and has no mark; the
    successor finds the fill in the journal and commits it (it becomes resident, not a stub that
    holds data nobody will ever commit)."""
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(4), dirs=1, files=3)
    v = make_view(src, "--config", policy(loopfs, "fill_ahead = false\ncommit_interval = 60\n"))
    assert read(v.path("d0/f1")) == data["d0/f1"]
    assert state_of(v, "d0/f1") == "stub" and v.status()["filler"]["pending_commit"] == 1
    with open(record_path(v.name)) as f:
        sup = json.load(f)["pid"]
    with open(f"/proc/{sup}/task/{sup}/children") as f:
        filler = int(f.read().split()[0])
    os.kill(filler, signal.SIGKILL)
    wait_for(lambda: state_of(v, "d0/f1") == "resident", "the successor to commit the fill")
    assert read(v.path("d0/f1")) == data["d0/f1"]
    assert "took over 1 fills of a dead filler" in v.log


def test_successor_never_commits_a_fill_evicted_since(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """A fill, its commit, an eviction, then the filler dies: the journal still names the fill, and
    the state log no longer names the file (an eviction removes its entry). The successor must not
    take the fill for an uncommitted one: that made the punched stub "resident" with no mark, and
    it read as zeros (the model-based test found it: 2,168 zero reads of one file in 300 s)."""
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(5), dirs=1, files=3)
    v = make_view(src, "--config", policy(loopfs, "fill_ahead = false\ncommit_interval = 0.05\n"))
    assert read(v.path("d0/f2")) == data["d0/f2"]
    wait_for(lambda: state_of(v, "d0/f2") == "resident", "the commit")
    hsmfs("evict", v.path("d0/f2"))
    assert state_of(v, "d0/f2") == "stub"
    with open(f"/run/hsmfs/{v.name}.journal", "rb") as f:
        assert b"F " in f.read(), "the journal no longer names the fill: this test tests nothing"
    with open(f"/run/hsmfs/{v.name}.json") as f:
        sup = json.load(f)["pid"]
    with open(f"/proc/{sup}/task/{sup}/children") as f:
        filler = int(f.read().split()[0])
    os.kill(filler, signal.SIGKILL)

    def successor() -> bool:
        with open(f"/proc/{sup}/task/{sup}/children") as f:
            kids = [int(x) for x in f.read().split()]
        return bool(kids) and kids[0] != filler

    wait_for(successor, "a successor")
    v.status()  # it answers: its takeover is done
    assert read(v.path("d0/f2")) == data["d0/f2"]
    assert "took over 1 fills" not in v.log, v.log[-3000:]


def test_a_new_session_ignores_an_old_journal(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """A journal left by an earlier session (its supervisor killed, its store cut) names fills that
    may never have reached the disk. A new mount must not commit them: one taken at its word made
    a stub "dirty" at a ctime it never had, and the stub read as zeros (test_crash's
    test_cut_during_user_writes saw the "dirty" side of it)."""
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(6), dirs=1, files=2)
    v = make_view(src, "--config", policy(loopfs, "fill_ahead = false\n"))
    hsmfs("umount", v.target)
    v.mounted = False
    fd = os.open(os.path.join(v.store, "tree", "d0/f1"), os.O_RDONLY)
    try:
        key = state.key_of(fd)
    finally:
        os.close(fd)
    with open(f"/run/hsmfs/{v.name}.journal", "w") as f:
        f.write(f"F {key.hex()} 12345 0\n")
    v.mount()
    assert read(v.path("d0/f1")) == data["d0/f1"]
    assert state_of(v, "d0/f1") in ("stub", "resident")
    assert "took over" not in v.log


def test_tar_of_a_cold_view_sees_no_file_change(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """GNU tar compares a file's ctime before and after it reads it ("file changed as we read it",
    exit 1). Fills, fill-ahead and commits run while tar reads a cold view; none of them may change
    a file tar has started on (commits once rewrote the stub record: 1 run in 4 failed)."""
    import tarfile

    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(7), dirs=4, files=30)
    v = make_view(src, "--config", policy(loopfs, "commit_interval = 0.01\n"))
    out = os.path.join(loopfs.base, f"{v.name}.tar")
    try:
        r = subprocess.run(["tar", "-cSf", out, "-C", v.target, "."], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        with tarfile.open(out) as t:
            for rel, want in data.items():
                f = t.extractfile("./" + rel)
                assert f is not None and f.read() == want, rel
    finally:
        if os.path.exists(out):
            os.unlink(out)


def test_each_file_is_filled_once_while_commits_run(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """Fill-ahead reaches files whose commit is running (slowed here, as a slow syncfs would): it
    must leave them alone. Filling one again would compare all its bytes with the source for
    nothing and give it a ctime its commit does not record (after a power cut: dirty, not resident;
    and a user's write racing that second fill, which no mark holds back, could be overwritten)."""
    src = os.path.join(loopfs.fresh_dir("dp"), "src")
    data = make_tree(src, random.Random(7), dirs=2, files=300)
    v = make_view(src, "--config", policy(loopfs, "commit_interval = 0.01\n"), mount=False)
    v.env = dict(os.environ, HSMFS_FAULT_DELAYS="commit=0.3")
    v.mount()
    for rel in sorted(data, reverse=True):  # against fill-ahead's order (by name): they meet midway
        assert read(v.path(rel)) == data[rel]
    wait_for(lambda: (lambda f: f["pending_commit"] == 0 and f["inflight"] == 0)(v.status()["filler"]),
             "every fill to be committed")
    f = v.status()["filler"]
    assert f["fills"] + f["ahead_fills"] == len(data), f"files filled more than once: {f}"
    assert {state_of(v, r) for r in data} == {"resident"}
