#!/usr/bin/env python3
"""What the stubs' inode marks cost: kernel memory, mount time, per-access overhead.

    python3 contrib/bench/marks.py [--files 100000] [--fs ext4[,xfs]] [--mount-mark-only] [--out FILE]

Run as root on Linux 6.14+. docs/unwatched.md says why stubs carry inode marks and shows results.
One filesystem with 100,000 files takes 5-7 minutes. It drops the machine's caches about 30 times:
don't run it beside other benchmarks.

1. Two sparse images under /var/tmp on loop devices (direct I/O when the host allows it): SOURCE
   (ext4, --files files of 1-4 KiB in --files/100 directories) and, per --fs, a fresh STORE.
2. ``hsmfs mount`` (populate + mark + attach), umount; then the marking alone (mark_tree on a
   fresh group, and the same walk without marks) and ``hsmfs mount`` of the populated store,
   each with cold and with warm inode caches.
3. Kernel memory: /proc/meminfo (Slab, SReclaimable, SUnreclaim) and every /proc/slabinfo cache,
   each sampled after ``sync; echo 3 > drop_caches``: unmounted, mounted (the stubs' inodes stay
   pinned by their marks), once every file is resident and committed (marks removed), and after
   the last umount. The marks are counted in the supervisor's /proc/PID/fdinfo.
4. Per access: stat and read of every file through the view (stubs: cold fill; resident: warm;
   resident after a cache drop, when the evictable ignore marks are gone) against the source, and
   once resident against the store's own path. Warm timings are the median of 3 runs.
5. With --mount-mark-only, a second copy of the tree served with the view's mount mark alone (a
   sitecustomize shim for this run's processes makes mark_tree's stub marks no-ops): mount time,
   memory and cold fills without stub marks.

Reads and stats are done by a reader subprocess (this file with ``--reader``) that loads its list,
says "ready" and starts only when told, after the caches were dropped. Runs that another process
disturbed by dropping caches meanwhile (/proc/vmstat drop_* counters) are flagged "noisy".
Everything it makes (images, loop devices, mounts, fillers, logs) is removed in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import _common
from _common import HSMFS, LOG_DIR, REPO, RUN_DIR, child_env, log, mount_points
from _common import LoopFS as _LoopFS

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-i", "8192"], "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"]}
INODE_CACHE = {"ext4": "ext4_inode_cache", "xfs": "xfs_inode", "btrfs": "btrfs_inode"}


# ------------------------------------------------------------------------------------------------
# reader subprocess (run with python3 -S: nothing but builtins)
# ------------------------------------------------------------------------------------------------

def reader_main(mode: str, listfile: str, root: str, other: Optional[str]) -> int:
    """mode read|stat|verify over every path of listfile (NUL-separated, relative) under root.

    Protocol: print "ready", wait for one line on stdin, work, print one JSON line of results.
    verify compares each file's bytes with the same path under other (untimed use only).
    """
    with open(listfile, "rb") as f:
        rels = [r for r in f.read().split(b"\0") if r]
    rootb = os.fsencode(root).rstrip(b"/") + b"/"
    paths = [rootb + r for r in rels]
    otherb = os.fsencode(other).rstrip(b"/") + b"/" if other else b""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    errors: list[str] = []
    nerr = total = mism = zeros = 0
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        try:
            if mode == "stat":
                os.stat(p)
                continue
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks = []
                while True:
                    b = os.read(fd, 65536)
                    if not b:
                        break
                    total += len(b)
                    if mode == "verify":
                        chunks.append(b)
            finally:
                os.close(fd)
            if mode == "verify":
                got = b"".join(chunks)
                with open(otherb + rels[i], "rb") as f:
                    want = f.read()
                if got != want:
                    mism += 1
                    if got and got.count(0) == len(got):
                        zeros += 1
        except OSError as e:
            nerr += 1
            if len(errors) < 10:
                errors.append(f"{os.fsdecode(p)}: {e.strerror}")
    secs = time.perf_counter() - t0
    sys.stdout.write(json.dumps({"secs": secs, "files": len(paths), "bytes": total, "errors": nerr,
                                 "error_samples": errors, "mismatches": mism, "zero_files": zeros}) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

MY_DROPS = [0]


def run(cmd: list[str], *, timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _common.run(cmd, timeout=timeout, **kw)


def vmstat_drops() -> int:
    with open("/proc/vmstat") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("drop_pagecache", "drop_slab")))


def drop_caches() -> None:
    _common.drop_caches(passes=2)  # the second pass frees inodes whose dentries the first one freed
    MY_DROPS[0] += 4  # each write counts once in drop_pagecache and once in drop_slab


class DropWatch:
    """Did another process drop caches while we measured? (/proc/vmstat drop_pagecache + drop_slab)"""

    def __enter__(self) -> DropWatch:
        self.start = vmstat_drops() - MY_DROPS[0]
        self.foreign = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.foreign = (vmstat_drops() - MY_DROPS[0] - self.start) // 2


def slab_aliases() -> dict[str, list[str]]:
    """/proc/slabinfo shows a merged cache under one name: name -> every cache merged with it."""
    groups: dict[str, list[str]] = {}
    base = "/sys/kernel/slab"
    try:
        for n in os.listdir(base):
            p = os.path.join(base, n)
            if os.path.islink(p):
                groups.setdefault(os.path.basename(os.readlink(p)), []).append(n)
    except OSError:
        return {}
    out = {}
    for names in groups.values():
        for n in names:
            out[n] = sorted(names)
    return out


def mem_sample() -> dict[str, Any]:
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("Slab", "SReclaimable", "SUnreclaim", "MemFree", "Cached", "Inactive(file)", "Active(file)"):
                meminfo[k] = int(v.split()[0]) * 1024
    slabs: dict[str, dict[str, int]] = {}
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith(("slabinfo", "#")):
                continue
            p = line.split()
            # name active_objs num_objs objsize objperslab pagesperslab : tunables ... : slabdata active num shared
            slabs[p[0]] = {"active_objs": int(p[1]), "num_objs": int(p[2]), "objsize": int(p[3]),
                           "bytes": int(p[14]) * int(p[5]) * 4096}
    return {"meminfo": meminfo, "slabs": slabs, "t": time.time()}


# the caches a pinned stub can occupy (the row /proc/slabinfo shows may be a merged cache's other name)
FOCUS = ("ext4_inode_cache", "xfs_inode", "btrfs_inode", "dentry", "fanotify_mark", "fsnotify_mark_connector",
         "lsm_inode_cache")


def mem_delta(a: dict[str, Any], b: dict[str, Any], per: int, aliases: dict[str, list[str]], fstype: str,
              top: int = 8) -> dict[str, Any]:
    """b - a: meminfo, the slab caches that moved most (objects x object size), and the FOCUS caches.

    "pinned" sums the FOCUS caches of this store's filesystem: unlike Slab, other filesystems'
    inode caches (other work on the machine) don't count.
    """
    mi = {k: b["meminfo"][k] - a["meminfo"][k] for k in ("Slab", "SReclaimable", "SUnreclaim")}
    focus: dict[str, dict[str, Any]] = {}
    for want in FOCUS:
        row = next((n for n in [want, *aliases.get(want, [])] if n in b["slabs"]), None)
        if row is None:
            continue
        d_objs = b["slabs"][row]["active_objs"] - a["slabs"].get(row, {"active_objs": 0})["active_objs"]
        focus[want] = {"slabinfo_row": row, "objsize": b["slabs"][row]["objsize"], "objects": d_objs,
                       "bytes": d_objs * b["slabs"][row]["objsize"],
                       "per_unit": round(d_objs * b["slabs"][row]["objsize"] / per, 1) if per else None}
    caches = []
    for name, s in b["slabs"].items():
        o = a["slabs"].get(name, {"active_objs": 0, "objsize": s["objsize"], "bytes": 0})
        d_objs = s["active_objs"] - o["active_objs"]
        caches.append({"cache": name, "merged": [x for x in aliases.get(name, []) if x != name][:6],
                       "objsize": s["objsize"], "objects": d_objs, "bytes": d_objs * s["objsize"],
                       "slab_bytes": s["bytes"] - o["bytes"]})
    caches.sort(key=lambda c: -abs(c["bytes"]))
    pinned = sum(c["bytes"] for k, c in focus.items() if k not in set(INODE_CACHE.values()) - {INODE_CACHE[fstype]})
    return {"meminfo": mi, "slab_per_unit": mi["Slab"] / per if per else None, "focus": focus,
            "pinned_bytes": pinned, "pinned_per_unit": pinned / per if per else None, "caches": caches[:top]}


def fdinfo_marks(pid: int) -> dict[str, int]:
    """Inode marks of the fanotify group the supervisor holds: stub marks vs ignore marks."""
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = [ln for ln in f if ln.startswith("fanotify ")]
        except OSError:
            continue
        if not any(ln.startswith("fanotify flags:") for ln in lines):
            continue
        ino = [ln for ln in lines if ln.startswith("fanotify ino:")]
        ignore = 0
        for ln in ino:
            fields = dict(x.split(":", 1) for x in ln.split()[1:] if ":" in x)
            if int(fields.get("mask", "0"), 16) == 0 and int(fields.get("ignored_mask", "0"), 16) != 0:
                ignore += 1
        return {"inode_marks": len(ino), "stub_marks": len(ino) - ignore, "ignore_marks": ignore,
                "mount_marks": sum(ln.startswith("fanotify mnt_id:") for ln in lines),
                "sb_marks": sum(ln.startswith("fanotify sdev:") for ln in lines)}
    raise RuntimeError(f"no fanotify group in /proc/{pid}/fdinfo")


def rss(pid: Optional[int]) -> int:
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def LoopFS(base: str, label: str, fstype: str, size: int) -> _LoopFS:
    return _LoopFS(base, label, fstype, size, mkfs=MKFS)


# code run in a fresh interpreter: the marking alone, as the supervisor does it, on a fresh group
MARK_CODE = r"""
import json, os, stat, sys, time
from hsmfs import state, tree
from hsmfs.session import new_group
from hsmfs.filler.marks import mark_tree
root, what = sys.argv[1:3]
log_ = state.StateLog(os.path.dirname(root))
t = time.perf_counter()
if what == "walk":  # mark_tree without fanotify_mark: walk, lstat, record, state
    n = 0
    for dirpath, _d, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                log_.state(tree.read_record(p), st, state.key_at(p))
                n += 1
    out = {"files": n}
else:
    g = new_group()
    stubs, settled = mark_tree(g, root, log_)
    out = {"stubs": stubs, "settled": settled}
out["secs"] = time.perf_counter() - t
print(json.dumps(out))
"""


# --mount-mark-only: benchmark processes only (PYTHONPATH); mark_tree's stub mark is the one plain FAN_MARK_ADD
SHIM = """\
# written by contrib/bench/marks.py --mount-mark-only: no inode marks on stubs (benchmark only)
from hsmfs.linux import fanotify as _fan

_mark = _fan.mark


def _no_stub_marks(group, flags, mask, dirfd=_fan.AT_FDCWD, path=None):
    if flags & ~_fan.FAN_MARK_DONT_FOLLOW == _fan.FAN_MARK_ADD:
        return None
    return _mark(group, flags, mask, dirfd, path)


_fan.mark = _no_stub_marks
"""


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = tempfile.mkdtemp(prefix="hsmfs-marks-", dir="/var/tmp")
        self.tag = f"marks{os.getpid()}"
        self.fs: list[LoopFS] = []
        self.names: dict[str, str] = {}  # mount name -> view dir, while possibly mounted
        self.used_names: list[str] = []
        self.aliases = slab_aliases()
        self.results: dict[str, Any] = {"files": args.files, "kernel": os.uname().release,
                                        "cpus": os.cpu_count(), "runs": {}}
        self.src: LoopFS
        self.source = ""
        self.listfile = ""

    # -- source --------------------------------------------------------------------------------
    def make_source(self) -> None:
        n = self.args.files
        ndirs = max(1, n // 100)
        size = max(2 << 30, n * 4096 * 3)
        self.src = LoopFS(self.base, "src", "ext4", size)
        self.fs.append(self.src)
        self.source = os.path.join(self.src.mnt, "tree")
        os.mkdir(self.source)
        rnd = random.Random(100)
        blob = os.urandom(1 << 20)
        rels: list[bytes] = []
        total = 0
        t0 = time.perf_counter()
        for i in range(n):
            d = f"d{i % ndirs:04d}"
            if i < ndirs:
                os.mkdir(os.path.join(self.source, d))
            rel = f"{d}/f{i:06d}"
            size = rnd.randrange(1024, 4097)
            off = rnd.randrange(0, len(blob) - size)
            fd = os.open(os.path.join(self.source, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, blob[off:off + size])
            finally:
                os.close(fd)
            rels.append(rel.encode())
            total += size
        os.sync()
        secs = time.perf_counter() - t0
        rels.sort()  # directory order, as a tree walk would read them
        self.listfile = os.path.join(self.base, "list")
        with open(self.listfile, "wb") as f:
            f.write(b"\0".join(rels))
        self.results["source"] = {"files": n, "dirs": ndirs, "bytes": total, "create_secs": round(secs, 1)}
        log(f"source: {n} files, {ndirs} dirs, {total / 2**20:.0f} MiB in {secs:.0f} s")

    # -- hsmfs ---------------------------------------------------------------------------------
    def mount(self, name: str, store: str, env: Optional[dict[str, str]] = None) -> float:
        view = os.path.join(self.base, "view-" + name)
        os.makedirs(view, exist_ok=True)
        self.names[name] = view
        if name not in self.used_names:
            self.used_names.append(name)
        t0 = time.perf_counter()
        run([*HSMFS, "mount", "--name", name, "--store", store, self.source, view], env=env or child_env())
        return time.perf_counter() - t0

    def record(self, name: str) -> dict[str, Any]:
        with open(os.path.join(RUN_DIR, name + ".json")) as f:
            rec: dict[str, Any] = json.load(f)
        return rec

    def filler(self, name: str) -> dict[str, Any]:
        sys.path.insert(0, REPO)
        from hsmfs.control import request

        reply = request(name, {"op": "status"}, timeout=60)
        reply["filler"]["filler_pid"] = reply.get("filler_pid")
        return dict(reply["filler"])

    def wait_committed(self, name: str, timeout: float = 300) -> float:
        t0 = time.perf_counter()
        while True:
            f = self.filler(name)
            if f["pending_commit"] == 0 and f["inflight"] == 0:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"fills not committed after {timeout} s: {f}")
            time.sleep(0.1)

    def marked_line(self, name: str) -> str:
        try:
            with open(os.path.join(LOG_DIR, name + ".log")) as f:
                lines = [ln.strip() for ln in f if "files marked" in ln]
            return lines[-1] if lines else ""
        except OSError:
            return ""

    def umount(self, name: str) -> None:
        if name not in self.names:
            return
        pid = None
        try:
            pid = self.record(name)["pid"]
        except (OSError, ValueError, KeyError):
            pass
        r = run([*HSMFS, "umount", name], env=child_env(), check=False)
        if r.returncode != 0 and pid is not None:
            log(f"WARNING: hsmfs umount {name} failed: {r.stderr.strip()}; trying --lazy")
            run([*HSMFS, "umount", "--lazy", name], env=child_env(), check=False)
        if pid is not None:  # the supervisor this run started
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                log(f"WARNING: supervisor {pid} of {name} still runs; SIGTERM")
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
        view = self.names[name]
        if view in mount_points():
            log(f"WARNING: {view} still mounted; unmounting it directly")
            if run(["umount", view], check=False).returncode != 0:
                run(["umount", "-l", view], check=False)
        del self.names[name]

    def reader(self, mode: str, root: str, *, cold: bool, other: Optional[str] = None) -> dict[str, Any]:
        cmd = [sys.executable, "-S", os.path.abspath(__file__), "--reader", mode, self.listfile, root]
        if other:
            cmd.append(other)
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdin and p.stdout
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("reader did not start")
            if cold:
                drop_caches()
            with DropWatch() as w:
                p.stdin.write("go\n")
                p.stdin.flush()
                line = p.stdout.readline()
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()  # our own child
                p.wait()
        d: dict[str, Any] = json.loads(line)
        d["secs"] = round(d["secs"], 3)
        d["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # other work on the machine shows here
        d["per_file_us"] = round(d["secs"] / max(1, d["files"]) * 1e6, 1)
        if w.foreign:
            d["noisy"] = f"another process dropped caches {w.foreign}x meanwhile"
        if d["errors"]:
            log(f"WARNING: {mode} of {root}: {d['errors']} errors, e.g. {d['error_samples'][:3]}")
        return d

    def warm(self, mode: str, root: str, runs: int = 3) -> dict[str, Any]:
        """A warm measurement is short and noisy: the run with the median time, and all times."""
        results = sorted((self.reader(mode, root, cold=False) for _ in range(runs)), key=lambda d: d["secs"])
        d = dict(results[len(results) // 2])
        d["runs_secs"] = [x["secs"] for x in results]
        return d

    def mark_alone(self, tree_dir: str, what: str, *, cold: bool) -> dict[str, Any]:
        if cold:
            drop_caches()
        with DropWatch() as w:
            r = run([sys.executable, "-c", MARK_CODE, tree_dir, what], env=child_env())
        d: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        d["secs"] = round(d["secs"], 3)
        if w.foreign:
            d["noisy"] = f"another process dropped caches {w.foreign}x meanwhile"
        return d

    def timed_mount(self, name: str, store: str, *, cold: bool, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
        if cold:
            drop_caches()
        with DropWatch() as w:
            secs = self.mount(name, store, env)
        d: dict[str, Any] = {"secs": round(secs, 3), "log": self.marked_line(name)}
        if w.foreign:
            d["noisy"] = f"another process dropped caches {w.foreign}x meanwhile"
        return d

    def sample(self) -> dict[str, Any]:
        drop_caches()
        time.sleep(1.0)  # xfs reclaims inodes in the background: give it a moment, then drop again
        drop_caches()
        time.sleep(0.5)
        return mem_sample()

    # -- one store filesystem --------------------------------------------------------------------
    def run_fs(self, fstype: str) -> dict[str, Any]:
        n = self.args.files
        res: dict[str, Any] = {"store_fs": fstype}
        t_start = time.perf_counter()
        store_fs = LoopFS(self.base, f"store-{fstype}", fstype, max(2 << 30, n * 4096 * 3))
        self.fs.append(store_fs)
        try:
            name = f"{self.tag}-{fstype}"
            store = os.path.join(store_fs.mnt, name)
            tree_dir = os.path.join(store, "tree")
            view = os.path.join(self.base, "view-" + name)

            log(f"[{fstype}] first mount: populate {n} stubs, mark, attach")
            res["mount_first"] = self.timed_mount(name, store, cold=False)
            log(f"[{fstype}]   {res['mount_first']['secs']:.1f} s; {res['mount_first']['log']}")
            self.umount(name)

            log(f"[{fstype}] marking alone (fresh interpreter, fresh group), cold and warm caches")
            res["mark_alone"] = {
                "walk_only_cold": self.mark_alone(tree_dir, "walk", cold=True),
                "walk_only_warm": self.mark_alone(tree_dir, "walk", cold=False),
                "mark_tree_cold": self.mark_alone(tree_dir, "mark", cold=True),
                "mark_tree_warm": self.mark_alone(tree_dir, "mark", cold=False),
            }
            log(f"[{fstype}]   {json.dumps(res['mark_alone'])}")

            log(f"[{fstype}] memory, unmounted, after drop_caches")
            m0 = self.sample()
            log(f"[{fstype}] remount with stubs: cold caches, then warm")
            res["mount_stubs_cold"] = self.timed_mount(name, store, cold=True)
            self.umount(name)
            res["mount_stubs_warm"] = self.timed_mount(name, store, cold=False)
            log(f"[{fstype}]   cold {res['mount_stubs_cold']['secs']:.2f} s, "
                f"warm {res['mount_stubs_warm']['secs']:.2f} s")
            sup = self.record(name)["pid"]
            fill_pid = self.filler(name)["filler_pid"]
            res["marks_mounted"] = fdinfo_marks(sup)
            m1 = self.sample()
            res["marks_mounted_after_drop"] = fdinfo_marks(sup)
            res["mem_mounted"] = mem_delta(m0, m1, n, self.aliases, fstype)
            res["rss_mounted"] = {"supervisor": rss(sup), "filler": rss(fill_pid)}
            log(f"[{fstype}]   marks {res['marks_mounted']}, after drop {res['marks_mounted_after_drop']}; "
                f"slab +{res['mem_mounted']['meminfo']['Slab'] / 2**20:.1f} MiB "
                f"({res['mem_mounted']['slab_per_unit']:.0f} B/stub)")

            log(f"[{fstype}] stat: view (stubs, pinned) vs source, cold then warm")
            res["stat"] = {"view_cold": self.reader("stat", view, cold=True)}
            res["stat"]["view_warm"] = self.warm("stat", view)
            res["stat"]["source_cold"] = self.reader("stat", self.source, cold=True)
            res["stat"]["source_warm"] = self.warm("stat", self.source)
            log(f"[{fstype}] read: source cold, source warm")
            res["read"] = {"source_cold": self.reader("read", self.source, cold=True),
                           "source_warm": self.warm("read", self.source)}
            log(f"[{fstype}] read: view cold (every file a stub: one event and one fill each)")
            before = self.filler(name)
            res["read"]["view_fill"] = self.reader("read", view, cold=True)
            res["commit_wait_secs"] = round(self.wait_committed(name), 3)
            after = self.filler(name)
            res["read"]["view_fill"]["events"] = after["events"] - before["events"]
            res["read"]["view_fill"]["fills"] = after["fills"] - before["fills"]
            res["status_after_fill"] = json.loads(run([*HSMFS, "status", "--json", name],
                                                      env=child_env()).stdout)[0]["states"]
            log(f"[{fstype}] read: view warm (resident, committed, ignore marks)")
            before = self.filler(name)
            res["read"]["view_warm"] = self.warm("read", view)
            res["read"]["view_warm"]["events"] = self.filler(name)["events"] - before["events"]
            # the same inodes without the view's mount mark: the store's own path (no stub marks left)
            res["read"]["store_warm"] = self.warm("read", tree_dir)
            res["marks_resident"] = fdinfo_marks(sup)
            log(f"[{fstype}] memory once every file is resident, after drop_caches")
            m2 = self.sample()
            res["marks_resident_after_drop"] = fdinfo_marks(sup)
            res["mem_resident"] = mem_delta(m0, m2, n, self.aliases, fstype)
            log(f"[{fstype}] read: view of resident files after drop_caches (evictable ignore marks gone)")
            before = self.filler(name)
            res["read"]["view_resident_cold"] = self.reader("read", view, cold=True)
            res["read"]["view_resident_cold"]["events"] = self.filler(name)["events"] - before["events"]
            before = self.filler(name)
            res["read"]["store_resident_cold"] = self.reader("read", tree_dir, cold=True)
            res["read"]["store_resident_cold"]["events"] = self.filler(name)["events"] - before["events"]
            log(f"[{fstype}] verify every file through the view against the source (untimed)")
            res["verify"] = self.reader("verify", view, cold=False, other=self.source)
            self.umount(name)
            m3 = self.sample()
            res["mem_unmounted_again"] = mem_delta(m0, m3, n, self.aliases, fstype)
            res["mem_mounted_vs_unmounted_again"] = mem_delta(m3, m1, n, self.aliases, fstype)

            log(f"[{fstype}] remount with every file resident (evictable ignore marks only), cold")
            res["mount_resident_cold"] = self.timed_mount(name, store, cold=True)
            sup = self.record(name)["pid"]
            res["marks_resident_mount"] = fdinfo_marks(sup)
            m4 = self.sample()
            res["marks_resident_mount_after_drop"] = fdinfo_marks(sup)
            res["mem_resident_mount"] = mem_delta(m0, m4, n, self.aliases, fstype)
            self.umount(name)
            if self.args.mount_mark_only:
                res["mount_mark_only"] = self.run_mount_mark_only(fstype, store_fs)
        finally:
            for nm in list(self.names):
                self.umount(nm)
            store_fs.close()
            self.fs.remove(store_fs)
        res["wall_secs"] = round(time.perf_counter() - t_start, 1)
        return res

    def run_mount_mark_only(self, fstype: str, store_fs: LoopFS) -> dict[str, Any]:
        """The same tree served with the view's mount mark only (the design before stub inode marks).

        Not a product option: a sitecustomize shim on PYTHONPATH (this run's processes only) makes
        the one plain FAN_MARK_ADD call (mark_tree's stub mark) a no-op. Everything else is the
        code under test. Shows what the stub marks themselves cost in mount time, memory and fills.
        """
        n = self.args.files
        res: dict[str, Any] = {}
        shim = os.path.join(self.base, "shim")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
            f.write(SHIM)
        env = child_env()
        env["PYTHONPATH"] = shim + os.pathsep + env["PYTHONPATH"]
        name = f"{self.tag}-{fstype}-mm"
        store = os.path.join(store_fs.mnt, name)
        view = os.path.join(self.base, "view-" + name)
        log(f"[{fstype}] mount mark only: populate a second store")
        res["mount_first"] = self.timed_mount(name, store, cold=False, env=env)
        self.umount(name)
        m0 = self.sample()
        res["mount_stubs_cold"] = self.timed_mount(name, store, cold=True, env=env)
        sup = self.record(name)["pid"]
        res["marks_mounted"] = fdinfo_marks(sup)
        m1 = self.sample()
        res["mem_mounted"] = mem_delta(m0, m1, n, self.aliases, fstype)
        log(f"[{fstype}]   mount {res['mount_stubs_cold']['secs']:.2f} s, marks {res['marks_mounted']}, slab "
            f"{res['mem_mounted']['meminfo']['Slab'] / 2**20:+.1f} MiB")
        log(f"[{fstype}] mount mark only: read view cold (fills)")
        before = self.filler(name)
        res["view_fill"] = self.reader("read", view, cold=True)
        res["commit_wait_secs"] = round(self.wait_committed(name), 3)
        after = self.filler(name)
        res["view_fill"]["events"] = after["events"] - before["events"]
        res["view_fill"]["fills"] = after["fills"] - before["fills"]
        self.umount(name)
        return res

    def close(self) -> None:
        for nm in list(self.names):
            try:
                self.umount(nm)
            except Exception as e:  # keep cleaning up
                log(f"WARNING: cleanup of {nm}: {e}")
        for fs in reversed(self.fs):
            fs.close()
        self.fs.clear()
        for nm in self.used_names:
            for p in (os.path.join(LOG_DIR, nm + ".log"), os.path.join(RUN_DIR, nm + ".journal")):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        left = [mp for mp in mount_points() if mp.startswith(self.base + "/")]
        if left:
            log(f"WARNING: mounts left under {self.base}: {left}; not removing it")
            return
        shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def fmt_table(results: dict[str, Any]) -> str:
    n = results["files"]
    rows = []
    head = ("| store fs | stubs | mount (populated, cold / warm) | mark_tree alone (cold / warm) | walk without marks "
            "(cold / warm) | inode marks (after drop_caches) | kernel memory with stubs marked: Slab delta; "
            "inode, mark, connector, LSM, dentry caches | the same once every file is resident |")
    rows.append(head)
    rows.append("|" + "---|" * (head.count("|") - 1))
    for fs, r in results["runs"].items():
        ma = r["mark_alone"]
        mm = r["mem_mounted"]
        rows.append(
            f"| {fs} | {n} | {r['mount_stubs_cold']['secs']:.2f} s / {r['mount_stubs_warm']['secs']:.2f} s "
            f"| {ma['mark_tree_cold']['secs']:.2f} s / {ma['mark_tree_warm']['secs']:.2f} s "
            f"| {ma['walk_only_cold']['secs']:.2f} s / {ma['walk_only_warm']['secs']:.2f} s "
            f"| {r['marks_mounted']['stub_marks']} stub + {r['marks_mounted']['ignore_marks']} ignore "
            f"({r['marks_mounted_after_drop']['inode_marks']}) "
            f"| {mm['meminfo']['Slab'] / 2**20:+.1f} MiB ({mm['slab_per_unit']:.0f} B/stub); "
            f"{mm['pinned_bytes'] / 2**20:+.1f} MiB ({mm['pinned_per_unit']:.0f} B/stub) "
            f"| {r['mem_resident']['meminfo']['Slab'] / 2**20:+.1f} MiB; "
            f"{r['mem_resident']['pinned_bytes'] / 2**20:+.1f} MiB; "
            f"{r['marks_resident_after_drop']['inode_marks']} marks |")
    out = ["\n".join(rows), ""]
    head = ("| store fs | what (all files) | view | baseline | view / baseline | events |")
    out.append(head)
    out.append("|---|---|---|---|---|---|")
    for fs, r in results["runs"].items():
        rd, st = r["read"], r["stat"]
        pairs = [("stat, cold caches (stubs)", "source", st["source_cold"], st["view_cold"]),
                 ("stat, warm", "source", st["source_warm"], st["view_warm"]),
                 ("read, cold: first read fills", "source", rd["source_cold"], rd["view_fill"])]
        mm = r.get("mount_mark_only")
        if mm:
            pairs.append(("read, cold: first read fills", "mount mark only", mm["view_fill"], rd["view_fill"]))
        pairs += [("read, warm: resident, committed", "source", rd["source_warm"], rd["view_warm"]),
                  ("read, warm: resident, committed", "store path", rd["store_warm"], rd["view_warm"]),
                  ("read, cold caches: resident", "source", rd["source_cold"], rd["view_resident_cold"]),
                  ("read, cold caches: resident", "store path", rd["store_resident_cold"], rd["view_resident_cold"])]
        for what, base, s, v in pairs:
            noisy = " (noisy)" if s.get("noisy") or v.get("noisy") else ""
            bev = f" ({s['events']})" if base == "mount mark only" else ""
            out.append(f"| {fs} | {what}{noisy} | {v['secs']:.2f} s ({v['per_file_us']:.0f} µs/file) "
                       f"| {base}: {s['secs']:.2f} s ({s['per_file_us']:.0f} µs/file) | {v['secs'] / s['secs']:.2f} "
                       f"| {v.get('events', '')}{bev} |")
    out.append("")
    for fs, r in results["runs"].items():
        out.append(f"{fs}: slab caches that grew with {n} stubs marked (after drop_caches):")
        for c in r["mem_mounted"]["caches"]:
            merged = f" (merged: {', '.join(c['merged'])})" if c["merged"] else ""
            out.append(f"  {c['cache']:<28} {c['objects']:>+9} objects x {c['objsize']:>5} B = "
                       f"{c['bytes'] / 2**20:+8.1f} MiB{merged}")
        out.append(f"  per stub, from the caches a pinned stub occupies (objects delta x object size / {n}):")
        for k, c in r["mem_mounted"]["focus"].items():
            row = f" (slabinfo row {c['slabinfo_row']})" if c["slabinfo_row"] != k else ""
            out.append(f"  {k:<28} {c['objects']:>+9} objects x {c['objsize']:>5} B = "
                       f"{c['per_unit']:>7.1f} B/stub{row}")
        mi = r["mem_mounted"]["meminfo"]
        out.append(f"  meminfo: Slab {mi['Slab'] / 2**20:+.1f} MiB (SReclaimable {mi['SReclaimable'] / 2**20:+.1f}, "
                   f"SUnreclaim {mi['SUnreclaim'] / 2**20:+.1f}); mounted vs unmounted again: "
                   f"{r['mem_mounted_vs_unmounted_again']['meminfo']['Slab'] / 2**20:+.1f} MiB")
        out.append(f"  first mount (populate + mark + attach): {r['mount_first']['secs']:.1f} s; "
                   f"remount with every file resident (cold): {r['mount_resident_cold']['secs']:.2f} s, "
                   f"{r['marks_resident_mount']['ignore_marks']} ignore marks, "
                   f"{r['marks_resident_mount_after_drop']['inode_marks']} left after drop_caches, Slab "
                   f"{r['mem_resident_mount']['meminfo']['Slab'] / 2**20:+.1f} MiB, named caches "
                   f"{r['mem_resident_mount']['pinned_bytes'] / 2**20:+.1f} MiB")
        mm = r.get("mount_mark_only")
        if mm:
            out.append(f"  mount mark only (no stub marks): mount {mm['mount_stubs_cold']['secs']:.2f} s cold, "
                       f"{mm['marks_mounted']['inode_marks']} inode marks, Slab "
                       f"{mm['mem_mounted']['meminfo']['Slab'] / 2**20:+.1f} MiB, named caches "
                       f"{mm['mem_mounted']['pinned_bytes'] / 2**20:+.1f} MiB after drop_caches")
        out.append(f"  commit wait after the cold read: {r['commit_wait_secs']:.2f} s; verify: "
                   f"{r['verify']['mismatches']} mismatches, {r['verify']['zero_files']} all-zero files, "
                   f"{r['verify']['errors']} errors; wall {r['wall_secs']:.0f} s")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        return reader_main(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="stubs in the tree (default: %(default)s)")
    ap.add_argument("--fs", default="ext4", help="store filesystems, comma-separated: ext4,xfs,btrfs "
                    "(default: %(default)s)")
    ap.add_argument("--out", default="marks-results.json", help="JSON results file (default: %(default)s)")
    ap.add_argument("--mount-mark-only", action="store_true",
                    help="also serve a second copy of the tree with the view's mount mark only (no stub inode "
                    "marks; a benchmark-only shim) and compare mount time, memory and cold fills")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("marks.py needs root (loop mounts, fanotify, drop_caches)", file=sys.stderr)
        return 2
    fss = [x for x in args.fs.split(",") if x]
    for x in fss:
        if x not in MKFS:
            ap.error(f"unknown filesystem {x}")
    bench = Bench(args)
    t0 = time.perf_counter()
    try:
        log(f"working in {bench.base}")
        bench.make_source()
        for fs in fss:
            bench.results["runs"][fs] = bench.run_fs(fs)
    finally:
        bench.close()
    bench.results["wall_secs"] = round(time.perf_counter() - t0, 1)
    bench.results["command"] = " ".join(["python3", "contrib/bench/marks.py", *sys.argv[1:]])
    with open(args.out, "w") as f:
        json.dump(bench.results, f, indent=1)
    print(fmt_table(bench.results))
    log(f"results in {args.out}; wall {bench.results['wall_secs']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
