"""The state log (STORE/state): what it keeps, how it survives torn writes, concurrent writers and
compaction, and the rule it serves: a user's change to a resident file always makes it dirty,
whatever the user sets back afterwards (real files on ext4, xfs and btrfs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LoopFS

from hsmfs import state, tree
from hsmfs.state import FileState, StateLog


def _key(n: int) -> state.Key:
    return state.make_key(1, n.to_bytes(8, "little"))


def test_entries_round_trip_and_last_one_wins(tmp_path: Path) -> None:
    d = str(tmp_path)
    w = StateLog(d, writable=True)
    w.record([(_key(1), state.OP_RESIDENT, 11), (_key(2), state.OP_DIRTY, 0), (_key(1), state.OP_PIN, 0)])
    w.record([(_key(3), state.OP_UNVERIFIED, 33), (_key(2), state.OP_STUB, 0), (_key(1), state.OP_RESIDENT, 12)])
    r = StateLog(d)
    assert r.get(_key(1)) == state.Entry(state.OP_RESIDENT, 12)
    assert r.get(_key(2)) is None and r.get(_key(3)) == state.Entry(state.OP_UNVERIFIED, 33)
    assert r.pinned(_key(1)) and not r.pinned(_key(3))
    w.record([(_key(1), state.OP_UNPIN, 0)])
    r.refresh()
    assert not r.pinned(_key(1))


def test_torn_tail_is_dropped_and_cut_before_the_next_append(tmp_path: Path) -> None:
    d = str(tmp_path)
    w = StateLog(d, writable=True)
    w.record([(_key(1), state.OP_RESIDENT, 1)])
    with open(os.path.join(d, "state"), "ab") as f:  # a crash in the middle of an append
        f.write(state._encode(_key(2), state.OP_RESIDENT, 2)[:30])
    assert StateLog(d).get(_key(2)) is None
    w2 = StateLog(d, writable=True)
    w2.record([(_key(3), state.OP_DIRTY, 0)])
    r = StateLog(d)
    assert r.get(_key(1)) is not None and r.get(_key(3)) is not None and r.get(_key(2)) is None
    assert os.path.getsize(os.path.join(d, "state")) == len(state.HEADER) + 2 * state.ENTRY_SIZE


def test_concurrent_appenders_and_a_compaction_lose_nothing(tmp_path: Path) -> None:
    """Four processes append 2,000 entries each while this one compacts the log again and again."""
    d = str(tmp_path)
    StateLog(d, writable=True).close()
    code = ("import sys; from hsmfs import state\n"
            "w = state.StateLog(sys.argv[1], writable=True); base = int(sys.argv[2])\n"
            "for i in range(2000):\n"
            "    key = state.make_key(1, (base + i).to_bytes(8, 'little'))\n"
            "    w.record([(key, state.OP_RESIDENT, i)], durable=False)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, d, str(k * 100000)]) for k in range(4)]
    w = StateLog(d, writable=True)
    while any(p.poll() is None for p in procs):
        w.compact(force=True)
    assert all(p.wait() == 0 for p in procs)
    r = StateLog(d)
    assert len(r.states) == 8000
    assert all(r.get(_key(k * 100000 + i)) == state.Entry(state.OP_RESIDENT, i) for k in range(4) for i in (0, 1999))


def test_compaction_with_distrust_turns_resident_unverified(tmp_path: Path) -> None:
    d = str(tmp_path)
    w = StateLog(d, writable=True)
    w.record([(_key(1), state.OP_RESIDENT, 5), (_key(2), state.OP_DIRTY, 0), (_key(3), state.OP_PIN, 0)])
    w.compact(distrust=True)
    r = StateLog(d)
    assert r.get(_key(1)) == state.Entry(state.OP_UNVERIFIED, 5) and r.get(_key(2)).op == state.OP_DIRTY  # type: ignore[union-attr]
    assert r.pinned(_key(3))
    assert os.path.getsize(os.path.join(d, "state")) == len(state.HEADER) + 3 * state.ENTRY_SIZE


def test_not_a_state_log_is_a_clear_error(tmp_path: Path) -> None:
    d = str(tmp_path)
    with open(os.path.join(d, "state"), "wb") as f:
        f.write(b"something else entirely")
    with pytest.raises(state.DataError, match="not an hsmfs state log"):
        StateLog(d)


CHANGES = {
    "write": lambda p: _w(p, lambda fd: os.pwrite(fd, b"x", 10)),
    "write same bytes": lambda p: _w(p, lambda fd: os.pwrite(fd, os.pread(fd, 1, 10), 10)),
    "truncate and extend back": lambda p: (os.truncate(p, 0), os.truncate(p, 8192)),
    "punch": lambda p: subprocess.run(["fallocate", "-p", "-o", "0", "-l", "4096", p], check=True),
    "chmod": lambda p: os.chmod(p, 0o640),
    "xattr": lambda p: os.setxattr(p, "user.note", b"1"),
    "mtime set back": lambda p: _w(p, lambda fd: (os.pwrite(fd, b"y", 0), os.utime(fd, ns=(0, 1234)))),
}


def _w(path: str, op: object) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        op(fd)  # type: ignore[operator]
    finally:
        os.close(fd)


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_after_the_commit_makes_a_file_dirty(loopfs: LoopFS, change: str) -> None:
    """Recorded resident at its ctime; every change a user can make moves the ctime, even one that
    puts mtime back or writes the same bytes (Linux 6.13+ multigrain timestamps)."""
    d = loopfs.fresh_dir("state")
    path = os.path.join(d, "f")
    with open(path, "wb") as f:
        f.write(os.urandom(8192))
    st = os.stat(path)
    rec = tree.Record(0, st.st_size, st.st_mtime_ns)
    tree.write_record(path, rec)
    w = StateLog(d, writable=True)
    key = state.key_at(path)
    w.record([(key, state.OP_RESIDENT, os.stat(path).st_ctime_ns)])
    assert state.state_of_path(path, w) is FileState.RESIDENT
    CHANGES[change](path)
    assert state.state_of_path(path, StateLog(d)) is FileState.DIRTY
