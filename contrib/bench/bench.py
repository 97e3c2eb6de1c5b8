#!/usr/bin/env python3
"""hsmfs benchmark: populate, cold reads and warm reads, each against a baseline of the same run.

    python3 contrib/bench/bench.py [--tree DIR ...] [--out FILE] [--runs N] [--store-fs ext4|xfs|btrfs]

Run as root on Linux 6.14+. What it does (docs/benchmarks.md says why and shows results):

1. Two sparse images under /var/tmp (loop devices, direct I/O so the host page cache is not a second
   cache): SOURCE (ext4) and STORE (--store-fs, ext4 by default). The test tree (default: /usr/include,
   /usr/lib/python3.11, /usr/share/doc: 13,000+ files) is copied onto SOURCE with ``cp -a``.
2. populate vs ``cp -a`` of the same tree to the store filesystem, caches dropped before each; also
   ``hsmfs mount`` end to end on an empty store, the daemon start on a populated one, and the disk use
   of the stub tree (du, df delta) against the source's.
3. cold full read through a fresh view vs cold read of the source, with 1 and with 4 reader processes.
4. warm read (everything resident and committed) through the view vs the source.

Every read is done by reader subprocesses (this file run with ``--reader``): they start, load their
file list, say "ready", and read only when told to, after the caches were dropped, so interpreter
start-up and the cold import of Python are not part of any timing.

Everything it makes (images, loop devices, mounts, views, fillers) is removed in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import _common
from _common import (
    DEFAULT_TREES,
    HSMFS,
    LOG_DIR,
    MKFS,
    REPO,
    RUN_DIR,
    LoopFS,
    child_env,
    cpu_busy,
    drop_caches,
    du_bytes,
    fs_used,
    is_mount_point,
    leftover_mounts,
    log,
    proc_cpu,
    run,
    summary,
)

MIN_FILES = 13000
TARGETS = {
    "populate_vs_cp": ("<=", 0.5),
    "stub_disk_use": ("<=", 0.05),
    "cold_read_1": ("<=", 1.3),
    "cold_read_4": ("<=", 1.3),
    "resident_cold_read": ("<=", 1.1),
    "warm_read_throughput": (">=", 0.98),
}


# ------------------------------------------------------------------------------------------------
# reader subprocess (kept free of imports beyond os/sys/json/time)
# ------------------------------------------------------------------------------------------------

def reader_main(listfile: str, root: str, loops: int, verify_root: Optional[str]) -> int:
    """Read every file of listfile (NUL-separated relative paths) under root, fully, loops times, when told.

    Protocol: print "ready", wait for one line on stdin, read, print one JSON line of results.
    With verify_root, compare each file's bytes with the same path under verify_root instead.
    """
    with open(listfile, "rb") as f:
        rels = [r for r in f.read().split(b"\0") if r]
    rootb = os.fsencode(root).rstrip(b"/") + b"/"
    paths = [rootb + r for r in rels]
    vpaths = [os.fsencode(verify_root).rstrip(b"/") + b"/" + r for r in rels] if verify_root else None
    buf = bytearray(1 << 20)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    t0 = time.perf_counter()
    total = files = 0
    errors: list[str] = []
    mismatches: list[str] = []
    for i, p in enumerate(paths * loops):
        try:
            if vpaths is None:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    while True:
                        n = os.readv(fd, [buf])
                        if not n:
                            break
                        total += n
                finally:
                    os.close(fd)
            else:
                with open(p, "rb") as a, open(vpaths[i % len(rels)], "rb") as b:
                    while True:
                        x, y = a.read(1 << 20), b.read(1 << 20)
                        if x != y:
                            mismatches.append(os.fsdecode(rels[i % len(rels)]))
                            break
                        total += len(x)
                        if not x:
                            break
            files += 1
        except OSError as e:
            errors.append(f"{os.fsdecode(p)}: {e.strerror}")
    secs = time.perf_counter() - t0
    sys.stdout.write(json.dumps({"secs": secs, "bytes": total, "files": files, "errors": errors[:20],
                                 "nerrors": len(errors), "mismatches": mismatches[:20],
                                 "nmismatches": len(mismatches)}) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------

class Bench:

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = tempfile.mkdtemp(prefix="hsmfs-benchrun-", dir="/var/tmp")
        self.tag = f"bench{os.getpid()}"
        self.fs: list[LoopFS] = []
        self.names: list[str] = []  # hsmfs mounts started by this run
        self.seq = 0
        self.results: dict[str, Any] = {}
        self.src: LoopFS
        self.store: LoopFS
        self.source = ""
        self.rels: list[bytes] = []
        self.bytes = 0

    # -- setup ---------------------------------------------------------------------------------
    def cleanup(self, ok: bool, *, logs: bool = False) -> None:
        """Remove every mount, filler, image and journal this run made; with logs, its fillers' logs
        too when it finished (a failed run keeps them to read)."""
        for name in list(self.names):
            try:
                self.umount(name)
            except Exception as e:  # keep cleaning up
                log(f"WARNING: cleanup of {name}: {e}")
        for i in range(1, self.seq + 1):  # journals (and logs) of this run's fillers, whose stores are gone
            paths = [os.path.join(RUN_DIR, f"{self.tag}-{i}.journal")]
            if logs and ok:
                paths.append(os.path.join(LOG_DIR, f"{self.tag}-{i}.log"))
            for p in paths:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        for fs in reversed(self.fs):
            try:
                fs.close()
            except Exception as e:
                log(f"WARNING: cleanup of {fs.mnt}: {e}")
        left = leftover_mounts(self.base)
        if left:
            log(f"WARNING: mounts left under {self.base}: {left}; not removing it")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        if not ok:
            log(f"benchmark did not finish; filler logs, if any: {LOG_DIR}/{self.tag}-*.log")

    def setup(self) -> None:
        log(f"working in {self.base}")
        self.src = LoopFS(self.base, "src", "ext4")
        self.fs.append(self.src)
        self.store = LoopFS(self.base, "store", self.args.store_fs)
        self.fs.append(self.store)
        self.source = os.path.join(self.src.mnt, "tree")
        os.mkdir(self.source)
        trees = self.args.tree or [d for d in DEFAULT_TREES if os.path.isdir(d)]
        used: set[str] = set()
        for d in trees:
            name = os.path.basename(os.path.normpath(d)) or "root"
            while name in used:
                name += "_"
            used.add(name)
            log(f"copying {d} -> source image")
            run(["cp", "-a", "--", d, os.path.join(self.source, name)])
        os.sync()
        self.scan()
        if len(self.rels) < MIN_FILES:
            msg = f"the test tree has {len(self.rels)} regular files, fewer than {MIN_FILES}"
            if not self.args.tree:
                raise RuntimeError(msg + "; give more with --tree DIR")
            log("WARNING: " + msg)
        self.listfiles = {}
        for n in (1, 4):
            for k in range(n):
                path = os.path.join(self.base, f"list-{n}-{k}")
                with open(path, "wb") as f:
                    f.write(b"\0".join(self.rels[k::n]))
                self.listfiles[(n, k)] = path

    def scan(self) -> None:
        rels: list[bytes] = []
        nbytes = dirs = symlinks = 0
        root = os.fsencode(self.source)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            dirs += len(dirnames)
            for n in sorted(filenames):
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    rels.append(os.path.relpath(p, root))
                    nbytes += st.st_size
                elif stat.S_ISLNK(st.st_mode):
                    symlinks += 1
        self.rels = rels
        self.bytes = nbytes
        self.results["tree"] = {"dirs_copied": self.args.tree or [d for d in DEFAULT_TREES if os.path.isdir(d)],
                                "files": len(rels), "bytes": nbytes, "dirs": dirs, "symlinks": symlinks,
                                "source_du_bytes": du_bytes(self.source)}
        log(f"test tree: {len(rels)} files, {nbytes / 2**20:.1f} MiB, {dirs} dirs, {symlinks} symlinks")

    # -- hsmfs operations ------------------------------------------------------------------------
    def new_name(self) -> str:
        self.seq += 1
        return f"{self.tag}-{self.seq}"

    def store_dir(self, name: str) -> str:
        return os.path.join(self.store.mnt, name)

    def populate(self, name: str) -> dict[str, Any]:
        """populate() alone, in a fresh interpreter; returns its own timing and the process wall time."""
        code = (
            "import json, os, sys, time\n"
            "from hsmfs import tree\n"
            "from hsmfs.populate import populate\n"
            "src, store, name = sys.argv[1:4]\n"
            "st = tree.Store(path=store, name=name, source=src)\n"
            "os.makedirs(store, mode=0o700, exist_ok=True)\n"
            "os.chmod(store, 0o700)\n"
            "st.save()\n"
            "t = time.perf_counter()\n"
            "s = populate(src, st)\n"
            "t = time.perf_counter() - t\n"
            "print(json.dumps({'secs': t, 'files': s.files, 'dirs': s.dirs, 'symlinks': s.symlinks,"
            " 'hardlinks': s.hardlinks, 'bytes': s.bytes}))\n"
        )
        t0 = time.perf_counter()
        r = run([sys.executable, "-c", code, self.source, self.store_dir(name), name], env=child_env())
        wall = time.perf_counter() - t0
        d: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        d["process_secs"] = wall
        return d

    def view_dir(self, name: str) -> str:
        v = os.path.join(self.base, "view-" + name)
        os.makedirs(v, exist_ok=True)
        return v

    def mount(self, name: str) -> float:
        view = self.view_dir(name)
        if name not in self.names:
            self.names.append(name)
        t0 = time.perf_counter()
        run([*HSMFS, "mount", self.source, view, "--name", name, "--store", self.store_dir(name)],
            env=child_env())
        return time.perf_counter() - t0

    def status(self, name: str) -> dict[str, Any]:
        r = run([*HSMFS, "status", name, "--json"], env=child_env())
        out: list[dict[str, Any]] = json.loads(r.stdout)
        return out[0]

    def wait_committed(self, name: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            d = self.status(name)
            f = d.get("filler") or {}
            if f.get("pending_commit") == 0 and f.get("inflight") == 0:
                return dict(d)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: fills not committed after {timeout} s: {f}")
            time.sleep(0.2)

    def umount(self, name: str) -> None:
        r = run([*HSMFS, "umount", name], env=child_env(), check=False)
        if r.returncode != 0:
            log(f"WARNING: hsmfs umount {name} failed: {r.stderr.strip()}; trying --lazy")
            run([*HSMFS, "umount", "--lazy", name], env=child_env(), check=False)
        self._reap(name)
        self._unmount_view(name)
        if name in self.names and not self._alive(name):
            self.names.remove(name)

    def _unmount_view(self, name: str) -> None:
        """A view left mounted without its filler (it crashed after attaching): unmount it directly."""
        view = os.path.join(self.base, "view-" + name)
        if not is_mount_point(view):
            return
        log(f"WARNING: {view} is still mounted after hsmfs umount; unmounting it directly")
        if run(["umount", view], check=False).returncode != 0:
            run(["umount", "-l", view], check=False)

    def _record(self, name: str) -> Optional[dict[str, Any]]:
        try:
            with open(os.path.join(RUN_DIR, name + ".json")) as f:
                rec: dict[str, Any] = json.load(f)
                return rec
        except (OSError, ValueError):
            return None

    def _alive(self, name: str) -> bool:
        rec = self._record(name)
        if rec is None:
            return False
        try:
            with open(f"/proc/{rec['pid']}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            return False
        return b"hsmfs.daemon" in cmd and self.store_dir(name).encode() in cmd

    def _reap(self, name: str) -> None:
        """Wait for this mount's filler to exit; SIGTERM it (by pid, ours only) if it lingers."""
        rec = self._record(name)
        if rec is None:
            return
        pid = rec["pid"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                return
            if b"hsmfs.daemon" not in cmd or self.store_dir(name).encode() not in cmd:
                return
            time.sleep(0.1)
        log(f"WARNING: filler {pid} of {name} still running; sending SIGTERM")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def remove_store(self, name: str) -> None:
        shutil.rmtree(self.store_dir(name), ignore_errors=True)
        v = os.path.join(self.base, "view-" + name)
        if os.path.isdir(v) and not is_mount_point(v):
            os.rmdir(v)
        self.store.trim()
        # the log, and the in-flight journal a filler may leave in /run/hsmfs, of a store that is gone
        for leftover in (os.path.join(LOG_DIR, name + ".log"), os.path.join(RUN_DIR, name + ".journal")):
            try:
                os.unlink(leftover)
            except OSError:
                pass

    # -- readers -----------------------------------------------------------------------------------
    def read_all(self, root: str, nreaders: int, *, cold: bool, verify_root: Optional[str] = None,
                 loops: int = 1, daemon: Optional[str] = None) -> dict[str, Any]:
        """Time nreaders reader processes reading the whole tree under root (cold: caches dropped first).

        Also accounts CPU: the readers' and the filler's (daemon: its mount name), and the whole
        machine's, so that other load on the machine during the timing is visible (other_cpu_s).
        """
        procs = []
        dpid = (self._record(daemon) or {}).get("pid") if daemon else None
        reader_cpu = 0.0
        try:
            for k in range(nreaders):
                cmd = [sys.executable, "-S", os.path.abspath(__file__), "--reader",
                       self.listfiles[(nreaders, k)], root, str(loops)]
                if verify_root:
                    cmd.append(verify_root)
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                              cwd="/"))
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError("a reader failed to start")
            if cold:
                drop_caches()
            busy0, d0 = cpu_busy(), proc_cpu(dpid)
            t0 = time.perf_counter()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = []
            for p in procs:
                assert p.stdout is not None
                outs.append(json.loads(p.stdout.readline()))
            wall = time.perf_counter() - t0
            busy1, d1 = cpu_busy(), proc_cpu(dpid)
            for p in procs:
                _, status, ru = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                reader_cpu += ru.ru_utime + ru.ru_stime
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        res = {"secs": wall, "bytes": sum(o["bytes"] for o in outs), "files": sum(o["files"] for o in outs),
               "nerrors": sum(o["nerrors"] for o in outs), "errors": [e for o in outs for e in o["errors"]][:10],
               "nmismatches": sum(o["nmismatches"] for o in outs),
               "mismatches": [e for o in outs for e in o["mismatches"]][:10],
               "reader_cpu_s": reader_cpu, "filler_cpu_s": d1 - d0, "busy_cpu_s": busy1 - busy0,
               "other_cpu_s": max(0.0, busy1 - busy0 - reader_cpu - (d1 - d0))}
        if res["nerrors"]:
            raise RuntimeError(f"{res['nerrors']} read errors under {root}: {res['errors']}")
        if res["nmismatches"]:
            raise RuntimeError(f"{res['nmismatches']} files differ between {root} and {verify_root}: "
                               f"{res['mismatches']}")
        if not verify_root and res["bytes"] != self.bytes * loops:
            raise RuntimeError(f"read {res['bytes']} bytes under {root}, expected {self.bytes * loops}")
        return res

    # -- 2. populate vs cp -a ------------------------------------------------------------------------
    def bench_populate(self) -> None:
        runs = self.args.runs
        cp, cp_sync, pop, pop_proc, mnt_e2e, remount = [], [], [], [], [], []
        for i in range(runs):
            # cp -a, then the sync that makes it durable (populate ends with a syncfs)
            dst = os.path.join(self.store.mnt, f"cp-{i}")
            drop_caches()
            t0 = time.perf_counter()
            run(["cp", "-a", "--", self.source, dst])
            t1 = time.perf_counter()
            run(["sync", "-f", dst])
            t2 = time.perf_counter()
            cp.append(t1 - t0)
            cp_sync.append(t2 - t0)
            shutil.rmtree(dst)
            self.store.trim()

            # populate() alone
            name = self.new_name()
            drop_caches()
            before = fs_used(self.store.mnt)
            d = self.populate(name)
            os.sync()
            pop.append(d["secs"])
            pop_proc.append(d["process_secs"])
            if i == 0:
                self.disk_use(name, before, d)
                # the daemon start on a populated store (a remount): cold caches, nothing to populate
                drop_caches()
                remount.append(self.mount(name))
                self.umount(name)
            self.remove_store(name)

            # hsmfs mount end to end on an empty store: populate + filler start + view
            name = self.new_name()
            drop_caches()
            mnt_e2e.append(self.mount(name))
            self.umount(name)
            self.remove_store(name)
            log(f"populate run {i + 1}/{runs}: cp -a {cp[-1]:.2f} s (+sync {cp_sync[-1]:.2f} s), "
                f"populate {pop[-1]:.2f} s, hsmfs mount {mnt_e2e[-1]:.2f} s")
        r = self.results
        r["cp_a_secs"] = summary(cp)
        r["populate_ratios"] = [p / c for p, c in zip(pop, cp)]
        r["cp_a_sync_secs"] = summary(cp_sync)
        r["populate_secs"] = summary(pop)
        r["populate_process_secs"] = summary(pop_proc)
        r["mount_e2e_secs"] = summary(mnt_e2e)
        r["remount_secs"] = summary(remount)

    def disk_use(self, name: str, before: int, d: dict[str, Any]) -> None:
        treedir = os.path.join(self.store_dir(name), "tree")
        stub_du = du_bytes(treedir)
        with_blocks = 0
        for dirpath, _dirs, files in os.walk(treedir):
            for n in files:
                st = os.lstat(os.path.join(dirpath, n))
                if stat.S_ISREG(st.st_mode) and st.st_blocks:
                    with_blocks += 1
        src_du = self.results["tree"]["source_du_bytes"]
        self.results["disk"] = {"stub_du_bytes": stub_du, "source_du_bytes": src_du,
                                "stub_df_delta_bytes": fs_used(self.store.mnt) - before,
                                "stub_files_with_blocks": with_blocks,
                                "populate_stats": {k: v for k, v in d.items() if k not in ("secs", "process_secs")}}
        log(f"stub tree: du {stub_du / 2**20:.1f} MiB vs source {src_du / 2**20:.1f} MiB; "
            f"{with_blocks} stub files have blocks allocated")

    # -- 3 and 4. cold and warm reads ------------------------------------------------------------------
    def bench_reads(self) -> None:
        runs = self.args.runs
        for n in (1, 4):
            if n == 4 and "cold4" in self.args.skip:
                continue
            src_runs, view_runs = [], []
            for i in range(runs):
                s = self.read_all(self.source, n, cold=True)
                name = self.new_name()
                self.populate(name)
                self.mount(name)
                v = self.read_all(self.view_dir(name), n, cold=True, daemon=name)
                v["filler"] = self.status(name).get("filler") or {}
                src_runs.append(s)
                view_runs.append(v)
                f = v["filler"]
                log(f"cold read, {n} reader(s), run {i + 1}/{runs}: source {s['secs']:.2f} s, "
                    f"view {v['secs']:.2f} s ({v['secs'] / s['secs']:.2f}x); filler {v['filler_cpu_s']:.2f} "
                    f"CPU-s, {f.get('events')} events, {f.get('fills')} fills, fill p50 "
                    f"{f.get('fill_latency_ms', {}).get('p50')} ms; other load {s['other_cpu_s']:.2f}/"
                    f"{v['other_cpu_s']:.2f} CPU-s")
                if n == 1 and i == runs - 1:
                    self.bench_warm(name)
                    if "resident" not in self.args.skip:
                        self.bench_resident_cold(name)
                self.umount(name)
                self.remove_store(name)
            src_t = [x["secs"] for x in src_runs]
            view_t = [x["secs"] for x in view_runs]
            nfiles = max(1, len(self.rels))
            events = [(x["filler"].get("events") or 0) / nfiles for x in view_runs]
            fills = [(x["filler"].get("fills") or 0) + (x["filler"].get("ahead_fills") or 0) for x in view_runs]
            cpu_us = [x["filler_cpu_s"] * 1e6 / max(1, n_) for x, n_ in zip(view_runs, fills)]  # demand and ahead
            self.results[f"cold_read_{n}"] = {
                "source_secs": summary(src_t), "view_secs": summary(view_t),
                "ratios": [v / s for v, s in zip(view_t, src_t)],
                "events_per_file": events, "filler_cpu_us_per_fill": cpu_us,
                "source_runs": src_runs, "view_runs": view_runs,
            }

    def bench_warm(self, name: str) -> None:
        view = self.view_dir(name)
        before = self.wait_committed(name)
        states = before.get("states", {})  # everything resident? (status counts states in the store)
        self.read_all(self.source, 1, cold=False)  # prime both caches
        self.read_all(view, 1, cold=False)
        ev0 = (self.status(name).get("filler") or {}).get("events", 0)
        # diagnostic: the same resident files read through the store's own mount, which carries no
        # fanotify mark: view vs store isolates the cost of the mark from that of the store's files
        store_tree = os.path.join(self.store_dir(name), "tree")
        self.read_all(store_tree, 1, cold=False)
        src_runs, view_runs, store_runs = [], [], []
        loops = self.args.warm_loops
        for _ in range(self.args.warm_runs):
            src_runs.append(self.read_all(self.source, 1, cold=False, loops=loops))
            view_runs.append(self.read_all(view, 1, cold=False, loops=loops, daemon=name))
            store_runs.append(self.read_all(store_tree, 1, cold=False, loops=loops))
        ev1 = (self.status(name).get("filler") or {}).get("events", 0)
        self.read_all(view, 1, cold=False, verify_root=self.source)  # every byte equals the source's
        src_t = [x["secs"] / loops for x in src_runs]
        view_t = [x["secs"] / loops for x in view_runs]
        store_t = [x["secs"] / loops for x in store_runs]
        self.results["warm_read"] = {
            "source_secs": summary(src_t), "view_secs": summary(view_t), "store_direct_secs": summary(store_t),
            "source_mib_s": self.bytes / statistics.median(src_t) / 2**20,
            "view_mib_s": self.bytes / statistics.median(view_t) / 2**20,
            "ratios": [s / v for v, s in zip(view_t, src_t)],
            "view_vs_store_direct_ratios": [s / v for v, s in zip(view_t, store_t)],
            "passes_per_timing": loops, "events_during_warm_reads": ev1 - ev0, "states": states,
            "verified_files": len(self.rels), "source_runs": src_runs, "view_runs": view_runs,
        }
        log(f"warm read: source {statistics.median(src_t):.3f} s, view {statistics.median(view_t):.3f} s, "
            f"store without view {statistics.median(store_t):.3f} s per pass, "
            f"{ev1 - ev0} fanotify events during {self.args.warm_runs * loops} warm passes; all bytes verified")

    def bench_resident_cold(self, name: str) -> None:
        """Informative: cold read of an all-resident tree after a remount (as after a reboot)."""
        src_t, view_t, fillers = [], [], []
        for _ in range(self.args.runs):
            self.umount(name)
            self.mount(name)
            s = self.read_all(self.source, 1, cold=True)
            v = self.read_all(self.view_dir(name), 1, cold=True, daemon=name)
            src_t.append(s["secs"])
            view_t.append(v["secs"])
            fillers.append({"filler_cpu_s": v["filler_cpu_s"], **(self.status(name).get("filler") or {})})
        self.results["cold_read_resident"] = {"source_secs": summary(src_t), "view_secs": summary(view_t),
                                              "ratios": [v / s for v, s in zip(view_t, src_t)], "filler": fillers}
        log(f"cold read of the resident tree after a remount: source {statistics.median(src_t):.2f} s, "
            f"view {statistics.median(view_t):.2f} s; {fillers[-1].get('events')} events")

    # -- report ------------------------------------------------------------------------------------------
    def report(self) -> None:
        r = self.results
        rows = []

        def add(key: str, what: str, base: float, mine: float, ratio: float, unit: str = "s",
                paired: Optional[list[float]] = None) -> None:
            op, target = TARGETS[key]
            met = ratio <= target if op == "<=" else ratio >= target
            rng = f"{min(paired):.2f}-{max(paired):.2f}" if paired else "-"
            rows.append((what, base, mine, unit, ratio, rng, f"{op} {target:g}", "yes" if met else "NO"))
            r.setdefault("ratios", {})[key] = {"ratio": ratio, "per_run": paired, "target": f"{op} {target:g}",
                                               "met": met}

        if "populate_secs" in r:
            add("populate_vs_cp", "populate / cp -a", r["cp_a_secs"]["median"], r["populate_secs"]["median"],
                r["populate_secs"]["median"] / r["cp_a_secs"]["median"], paired=r["populate_ratios"])
            d = r["disk"]
            add("stub_disk_use", "stub tree du / source du", d["source_du_bytes"] / 2**20,
                d["stub_du_bytes"] / 2**20, d["stub_du_bytes"] / d["source_du_bytes"], "MiB")
        for n in (1, 4):
            k = f"cold_read_{n}"
            if k in r:
                add(k, f"cold read, {n} reader{'s' if n > 1 else ''}", r[k]["source_secs"]["median"],
                    r[k]["view_secs"]["median"], r[k]["view_secs"]["median"] / r[k]["source_secs"]["median"],
                    paired=r[k]["ratios"])
        if "cold_read_resident" in r:
            c = r["cold_read_resident"]
            add("resident_cold_read", "cold read, resident tree", c["source_secs"]["median"], c["view_secs"]["median"],
                c["view_secs"]["median"] / c["source_secs"]["median"], paired=c["ratios"])
        if "warm_read" in r:
            w = r["warm_read"]
            add("warm_read_throughput", "warm read throughput", w["source_mib_s"], w["view_mib_s"],
                w["view_mib_s"] / w["source_mib_s"], "MiB/s", paired=w["ratios"])
        print()
        print("medians of the runs; 'runs' is the range of the ratio within single runs (paired)")
        print(f"{'measurement':<28} {'baseline':>10} {'hsmfs':>10} {'unit':<6} {'ratio':>7} {'runs':>10} "
              f"{'target':>8}  met")
        for what, base, mine, unit, ratio, rng, tgt, met in rows:
            print(f"{what:<28} {base:>10.3f} {mine:>10.3f} {unit:<6} {ratio:>7.3f} {rng:>10} {tgt:>8}  {met}")
        for n in (1, 4):
            k = f"cold_read_{n}"
            if k in r:
                print(f"cold read, {n}r: filler events per file read "
                      + " ".join(f"{x:.2f}" for x in r[k]["events_per_file"]) + "; filler CPU per fill (us) "
                      + " ".join(f"{x:.0f}" for x in r[k]["filler_cpu_us_per_fill"]) + " (targets <= 1.5, <= 60)")
        if "disk" in r:
            d = r["disk"]
            print(f"disk: stub tree du {d['stub_du_bytes'] / 2**20:.1f} MiB, store df delta "
                  f"{d['stub_df_delta_bytes'] / 2**20:.1f} MiB ({d['stub_df_delta_bytes'] / d['source_du_bytes']:.1%} "
                  f"of the source's du), {d['stub_files_with_blocks']} stubs with blocks")
        print()
        extra = []
        if "populate_secs" in r:
            extra.append(("cp -a + sync -f", r["cp_a_sync_secs"]))
            extra.append(("populate process (incl. start)", r["populate_process_secs"]))
            extra.append(("hsmfs mount, empty store", r["mount_e2e_secs"]))
            extra.append(("hsmfs mount, populated store", r["remount_secs"]))
        for n in (1, 4):
            k = f"cold_read_{n}"
            if k in r:
                extra.append((f"cold read source, {n}r", r[k]["source_secs"]))
                extra.append((f"cold read view, {n}r", r[k]["view_secs"]))
        if "warm_read" in r:
            extra.append(("warm read source (per pass)", r["warm_read"]["source_secs"]))
            extra.append(("warm read view (per pass)", r["warm_read"]["view_secs"]))
            extra.append(("warm read store, no view", r["warm_read"]["store_direct_secs"]))
        if "cold_read_resident" in r:
            extra.append(("cold read source, 1r (again)", r["cold_read_resident"]["source_secs"]))
            extra.append(("cold read resident view, 1r", r["cold_read_resident"]["view_secs"]))
        print(f"{'timing (s)':<32} {'median':>8} {'min':>8} {'max':>8} {'spread':>7}  runs")
        for what, s in extra:
            print(f"{what:<32} {s['median']:>8.3f} {s['min']:>8.3f} {s['max']:>8.3f} {s['spread_pct']:>6.1f}%  "
                  + " ".join(f"{x:.3f}" for x in s["runs"]))
        # timed reads during which other processes kept more than a third of a CPU busy
        noisy = []
        for key in ("cold_read_1", "cold_read_4", "warm_read"):
            for x in r.get(key, {}).get("source_runs", []) + r.get(key, {}).get("view_runs", []):
                if x["other_cpu_s"] > x["secs"] / 3:
                    noisy.append(x)
        r["noisy_timings"] = len(noisy)
        if noisy:
            print(f"\nnote: during {len(noisy)} timed reads, processes other than the readers and the filler "
                  f"(kernel threads included) kept more than 1/3 CPU busy; see other_cpu_s in the JSON")


def machine_facts(bench: Bench) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[:3]
    commit = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = bool(run(["git", "-C", REPO, "status", "--porcelain", "hsmfs"], check=False).stdout.strip())
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu, "mem_bytes": mem,
            "python": platform.python_version(), "hsmfs_path": _common.HSMFS_PATH,
            "hsmfs_commit": commit + ("+dirty" if dirty else ""), "loadavg_at_start": loadavg,
            "source_fs": "ext4", "store_fs": bench.args.store_fs,
            "loop_direct_io": all(fs.direct_io for fs in bench.fs),
            "host_fs_of_images": run(["findmnt", "-no", "FSTYPE", "-T", bench.base], check=False).stdout.strip(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        return reader_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", metavar="DIR",
                    help=f"directory to copy into the source (repeatable; default: {', '.join(DEFAULT_TREES)})")
    ap.add_argument("--out", default="bench-results.json", help="JSON results file (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each cold measurement (default: %(default)s)")
    ap.add_argument("--warm-runs", type=int, default=5, help="warm read passes of each side (default: %(default)s)")
    ap.add_argument("--warm-loops", type=int, default=5,
                    help="passes over the tree in one warm timing, to lift it above timer noise (default: %(default)s)")
    ap.add_argument("--store-fs", choices=sorted(MKFS), default="ext4", help="store filesystem (default: ext4)")
    ap.add_argument("--pythonpath", metavar="DIR", default=REPO,
                    help="import hsmfs from DIR/hsmfs (A/B a candidate change on a copy; default: this checkout)")
    ap.add_argument("--skip", action="append", default=[], choices=["populate", "reads", "cold4", "resident"],
                    help="skip a part (repeatable): populate (2), reads (3 and 4), cold4 (the 4-reader cold "
                         "reads), resident (the informative cold read of a resident tree)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench.py: run as root (loop mounts, drop_caches, fanotify)", file=sys.stderr)
        return 77
    if args.runs < 1 or args.warm_runs < 1 or args.warm_loops < 1:
        ap.error("--runs, --warm-runs and --warm-loops must be at least 1")
    HSMFS_PATH = _common.set_hsmfs_path(args.pythonpath)
    if not os.path.isfile(os.path.join(HSMFS_PATH, "hsmfs", "__init__.py")):
        ap.error(f"{HSMFS_PATH} holds no hsmfs package")

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    t_start = time.perf_counter()
    ok = False
    try:
        bench.setup()
        bench.results["machine"] = machine_facts(bench)
        if "populate" not in args.skip:
            bench.bench_populate()
        if "reads" not in args.skip:
            bench.bench_reads()
        bench.results["bench_wall_secs"] = time.perf_counter() - t_start
        bench.report()
        with open(args.out, "w") as f:
            json.dump(bench.results, f, indent=1)
        log(f"results written to {args.out} ({bench.results['bench_wall_secs']:.0f} s)")
        ok = True
    finally:
        bench.cleanup(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
