#!/usr/bin/env python3
"""hsmfs eviction benchmark: evictions/s and bytes freed/s, refill after eviction vs first fill, prefetch.

    python3 contrib/bench/evict.py [--tree DIR ...] [--out FILE] [--runs N] [--store-fs ext4|xfs|btrfs]

Run as root on Linux 6.14+. docs/benchmarks.md ("Eviction and refill") says why and shows results.
Same set-up, readers and hygiene as bench.py (whose Bench class this reuses):

1. Two sparse images under /var/tmp on direct-I/O loop devices: SOURCE (ext4) with the test tree
   (default: /usr/include, /usr/lib/python3.11, /usr/share/doc; 13,000+ files) copied by ``cp -a``,
   and STORE (--store-fs). One ``hsmfs mount`` of the source on the store.
2. First fill: cold full read through the view (reader subprocesses, caches dropped after they are
   ready), paired with a cold read of the source.
3. Once ``hsmfs status`` says nothing is pending and every file is resident: caches dropped, then
   ``hsmfs evict --json VIEW`` (the whole tree, through the filler's control socket) timed end to
   end: files evicted, bytes freed (the per-file JSON, the filler's counters, the store's df and du),
   the CLI's and the filler's CPU time.
4. Refill: cold full read through the view again, paired with a cold source read; refill / first
   fill. 3 and 4 are repeated --runs times.
5. Prefetch: evict everything, drop caches, ``hsmfs prefetch --jobs J VIEW`` timed end to end,
   paired with cold source reads with 1 and 4 readers; --runs times.
6. Last, every file of the view is compared byte for byte with the source.

Everything it makes (images, loop devices, mounts, views, fillers, their journals and logs) is
removed in ``finally``, also on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Optional

import _common
import bench
from _common import (
    HSMFS,
    LOG_DIR,
    MKFS,
    child_env,
    cpu_busy,
    drop_caches,
    du_bytes,
    fs_used,
    loadavg,
    log,
    proc_cpu,
    summary,
)


def task_cpu(pid: Optional[int]) -> float:
    """CPU-seconds (user + system, all threads) of one live process; 0 if it is gone."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


class EvictBench(bench.Bench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.tag = f"evict{os.getpid()}"
        self.loads: list[dict[str, Any]] = []

    def load(self, what: str) -> list[float]:
        la = loadavg()
        self.loads.append({"at": what, "t": time.strftime("%H:%M:%S"), "loadavg": la})
        return la

    def filler_stats(self, name: str) -> dict[str, Any]:
        d = self.status(name)
        f = dict(d.get("filler") or {})
        f["filler_pid"] = d.get("filler_pid")
        f["states"] = d.get("states", {})
        return f

    def store_usage(self, name: str) -> dict[str, int]:
        os.sync()
        return {"df_used": fs_used(self.store.mnt), "du_tree": du_bytes(os.path.join(self.store_dir(name), "tree"))}

    def timed_cli(self, cmd: list[str], name: str) -> dict[str, Any]:
        """Run an hsmfs command end to end: its wall and CPU time (wait4), the filler's and the machine's."""
        fpid = self.filler_stats(name)["filler_pid"]
        spid = (self._record(name) or {}).get("pid")
        busy0, f0, s0 = cpu_busy(), task_cpu(fpid), proc_cpu(spid)
        with open(os.path.join(self.base, "cli.out"), "w+") as outf, \
                open(os.path.join(self.base, "cli.err"), "w+") as errf:
            t0 = time.perf_counter()
            p = subprocess.Popen([*HSMFS, *cmd], stdout=outf, stderr=errf, env=child_env(), cwd="/")
            try:
                _, status, ru = os.wait4(p.pid, 0)
            except BaseException:
                p.kill()
                p.wait()
                raise
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            busy1, f1, s1 = cpu_busy(), task_cpu(fpid), proc_cpu(spid)
            outf.seek(0)
            errf.seek(0)
            out, err = outf.read(), errf.read()
        cli = ru.ru_utime + ru.ru_stime
        return {"secs": wall, "rc": p.returncode, "stdout": out, "stderr": err.strip()[-4000:],
                "cli_cpu_s": cli, "filler_cpu_s": f1 - f0, "mount_tree_cpu_s": s1 - s0,
                "busy_cpu_s": busy1 - busy0,
                "other_cpu_s": max(0.0, busy1 - busy0 - cli - max(f1 - f0, s1 - s0)), "filler_pid": fpid}

    def wait_resident(self, name: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.wait_committed(name)
        f = self.filler_stats(name)
        st = f["states"]
        if st.get("resident", {}).get("files") != self.results["tree"]["inodes"]:
            raise RuntimeError(f"{name}: not every file is resident after the commit: {st}")
        f["wait_secs"] = time.perf_counter() - t0
        return f

    # -- the parts ---------------------------------------------------------------------------------
    def evict_all(self, name: str, what: str) -> dict[str, Any]:
        before = self.filler_stats(name)
        use0 = self.store_usage(name)
        self.load(what)
        drop_caches()
        r = self.timed_cli(["evict", "--json", self.view_dir(name)], name)
        use1 = self.store_usage(name)
        after = self.filler_stats(name)
        rows = json.loads(r.pop("stdout") or "[]")
        n_ev = sum(1 for x in rows if x["evicted"])
        freed = sum(int(x["freed"]) for x in rows)
        skipped = Counter(x["reason"] for x in rows if not x["evicted"])
        res = {
            **r, "files_listed": len(rows), "evicted": n_ev, "freed_bytes": freed, "skipped": dict(skipped),
            "skipped_samples": [f"{x['path']}: {x['reason']}" for x in rows if not x["evicted"]][:10],
            "counter_evictions": after["evictions"] - before["evictions"],
            "counter_evicted_bytes": after["evicted_bytes"] - before["evicted_bytes"],
            "df_freed_bytes": use0["df_used"] - use1["df_used"], "du_freed_bytes": use0["du_tree"] - use1["du_tree"],
            "store_before": use0, "store_after": use1, "states_after": after["states"],
            "evictions_per_s": n_ev / r["secs"], "freed_mib_per_s": freed / r["secs"] / 2**20,
            "df_freed_mib_per_s": (use0["df_used"] - use1["df_used"]) / r["secs"] / 2**20,
            "loadavg_before": self.loads[-1]["loadavg"],
        }
        left = after["states"].get("resident", {}).get("files", 0)
        log(f"{what}: hsmfs evict {r['secs']:.2f} s (rc {r['rc']}): {n_ev} evicted "
            f"({res['evictions_per_s']:.0f}/s), {freed / 2**20:.1f} MiB freed ({res['freed_mib_per_s']:.0f} MiB/s), "
            f"df -{res['df_freed_bytes'] / 2**20:.1f} MiB, du -{res['du_freed_bytes'] / 2**20:.1f} MiB; "
            f"skipped {dict(skipped) or 0}; {left} left resident; CPU: cli {r['cli_cpu_s']:.2f} s, filler "
            f"{r['filler_cpu_s']:.2f} s, other {r['other_cpu_s']:.2f} s; load {self.loads[-1]['loadavg']}")
        if r["rc"] not in (0, 75):
            raise RuntimeError(f"hsmfs evict failed ({r['rc']}): {r['stderr']}")
        return res

    def cold_pair(self, name: str, what: str, nreaders: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
        la = self.load(what)
        s = self.read_all(self.source, nreaders, cold=True)
        v = self.read_all(self.view_dir(name), nreaders, cold=True, daemon=name)
        v["filler"] = self.filler_stats(name)
        s["loadavg_before"] = v["loadavg_before"] = la
        log(f"{what}: source {s['secs']:.2f} s, view {v['secs']:.2f} s ({v['secs'] / s['secs']:.2f}x); filler "
            f"{v['filler_cpu_s']:.2f} CPU-s; other load {s['other_cpu_s']:.2f}/{v['other_cpu_s']:.2f} CPU-s; "
            f"load {la}")
        return s, v

    def run_all(self) -> None:
        name = self.new_name()
        self.mount(name)
        self.results["store_stubs"] = self.store_usage(name)
        # 2. first fill
        s0, v0 = self.cold_pair(name, "first fill (cold read of a fresh view)")
        fills0 = v0["filler"]["fills"]
        self.results["first_fill"] = {"source": s0, "view": v0, "ratio": v0["secs"] / s0["secs"]}
        c = self.wait_resident(name)
        self.results["first_fill"]["commit_wait_secs"] = c["wait_secs"]
        self.results["store_resident"] = self.store_usage(name)
        # 3 + 4. evict, refill
        evicts, refills = [], []
        for i in range(self.args.runs):
            e = self.evict_all(name, f"evict {i + 1}/{self.args.runs}")
            evicts.append(e)
            fills_before = self.filler_stats(name)["fills"]
            s, v = self.cold_pair(name, f"refill {i + 1}/{self.args.runs}")
            v["fills"] = v["filler"]["fills"] - fills_before
            c = self.wait_resident(name)
            refills.append({"source": s, "view": v, "ratio_to_source": v["secs"] / s["secs"],
                            "ratio_to_first_fill": v["secs"] / v0["secs"], "commit_wait_secs": c["wait_secs"]})
        self.results["evict"] = evicts
        self.results["refill"] = refills
        # 5. prefetch
        prefetches = []
        for i in range(self.args.prefetch_runs):
            e = self.evict_all(name, f"evict before prefetch {i + 1}/{self.args.prefetch_runs}")
            la = self.load("prefetch")
            s1 = self.read_all(self.source, 1, cold=True)
            s4 = self.read_all(self.source, 4, cold=True)
            drop_caches()
            fills_before = self.filler_stats(name)["fills"]
            r = self.timed_cli(["prefetch", "--jobs", str(self.args.jobs), self.view_dir(name)], name)
            r.pop("stdout")
            after = self.filler_stats(name)
            r.update({"fills": after["fills"] - fills_before, "source_1r_secs": s1["secs"],
                      "source_4r_secs": s4["secs"], "ratio_to_source_1r": r["secs"] / s1["secs"],
                      "ratio_to_source_4r": r["secs"] / s4["secs"], "ratio_to_first_fill": r["secs"] / v0["secs"],
                      "mib_per_s": self.bytes / r["secs"] / 2**20, "loadavg_before": la, "evict": e})
            log(f"prefetch --jobs {self.args.jobs} {i + 1}/{self.args.prefetch_runs}: {r['secs']:.2f} s (rc "
                f"{r['rc']}), {r['fills']} fills, {r['mib_per_s']:.0f} MiB/s; source cold 1r {s1['secs']:.2f} s, "
                f"4r {s4['secs']:.2f} s; CPU cli {r['cli_cpu_s']:.2f} s, filler {r['filler_cpu_s']:.2f} s; "
                f"{r['stderr'].splitlines()[-1] if r['stderr'] else ''}")
            if r["rc"] != 0:
                raise RuntimeError(f"hsmfs prefetch failed ({r['rc']}): {r['stderr']}")
            self.wait_resident(name)
            prefetches.append(r)
        self.results["prefetch"] = prefetches
        # 6. nothing was lost
        self.read_all(self.view_dir(name), 1, cold=False, verify_root=self.source)
        self.results["verified_files"] = len(self.rels)
        log(f"all {len(self.rels)} files of the view equal the source's")
        self.results["filler_final"] = self.filler_stats(name)
        self.results["fills_first"] = fills0
        self.umount(name)
        self.results["filler_log_problems"] = self.log_problems(name)
        self.remove_store(name)

    def log_problems(self, name: str) -> list[str]:
        """The mount's log lines above INFO (the log goes with the store)."""
        try:
            with open(os.path.join(LOG_DIR, name + ".log"), errors="replace") as f:
                bad = [ln.rstrip()[:300] for ln in f if " INFO " not in ln and " DEBUG " not in ln]
        except OSError:
            return []
        if bad:
            log(f"WARNING: {len(bad)} log lines above INFO in {name}.log, e.g. {bad[0]}")
        return bad[:50]

    # -- report ----------------------------------------------------------------------------------
    def report(self) -> None:
        r = self.results
        t = r["tree"]
        ev, rf, pf = r.get("evict", []), r.get("refill", []), r.get("prefetch", [])
        evs = ev + [p["evict"] for p in pf]
        r["summary"] = sm = {
            "evict_secs": summary([e["secs"] for e in evs]),
            "evictions_per_s": summary([e["evictions_per_s"] for e in evs]),
            "freed_mib_per_s": summary([e["freed_mib_per_s"] for e in evs]),
            "df_freed_mib_per_s": summary([e["df_freed_mib_per_s"] for e in evs]),
            "evict_filler_cpu_s": summary([e["filler_cpu_s"] for e in evs]),
            "evict_cli_cpu_s": summary([e["cli_cpu_s"] for e in evs]),
            "first_fill_secs": r["first_fill"]["view"]["secs"],
            "first_fill_source_secs": r["first_fill"]["source"]["secs"],
            "refill_secs": summary([x["view"]["secs"] for x in rf]),
            "refill_source_secs": summary([x["source"]["secs"] for x in rf]),
            "refill_to_first_fill": summary([x["ratio_to_first_fill"] for x in rf]),
            "refill_to_source": summary([x["ratio_to_source"] for x in rf]),
            "refill_filler_cpu_s": summary([x["view"]["filler_cpu_s"] for x in rf]),
        }
        if pf:
            sm.update({"prefetch_secs": summary([p["secs"] for p in pf]),
                       "prefetch_to_source_1r": summary([p["ratio_to_source_1r"] for p in pf]),
                       "prefetch_to_source_4r": summary([p["ratio_to_source_4r"] for p in pf]),
                       "prefetch_to_first_fill": summary([p["ratio_to_first_fill"] for p in pf]),
                       "prefetch_filler_cpu_s": summary([p["filler_cpu_s"] for p in pf])})
        ff = r["first_fill"]
        print()
        print(f"tree: {t['files']} files ({t['inodes']} inodes), {t['bytes'] / 2**30:.3f} GiB; store "
              f"{self.args.store_fs}; medians over {len(evs)} evictions, {len(rf)} refills, {len(pf)} prefetches")
        print(f"evict whole tree: {sm['evict_secs']['median']:.2f} s ({sm['evict_secs']['min']:.2f}-"
              f"{sm['evict_secs']['max']:.2f}), {sm['evictions_per_s']['median']:.0f} evictions/s "
              f"({sm['evictions_per_s']['min']:.0f}-{sm['evictions_per_s']['max']:.0f}), "
              f"{sm['freed_mib_per_s']['median']:.0f} MiB freed/s (df: {sm['df_freed_mib_per_s']['median']:.0f}), "
              f"filler {sm['evict_filler_cpu_s']['median']:.2f} CPU-s, CLI {sm['evict_cli_cpu_s']['median']:.2f} "
              "CPU-s")
        print(f"first fill: view {ff['view']['secs']:.2f} s vs source {ff['source']['secs']:.2f} s "
              f"({ff['ratio']:.2f}x)")
        print(f"refill: view {sm['refill_secs']['median']:.2f} s ({sm['refill_secs']['min']:.2f}-"
              f"{sm['refill_secs']['max']:.2f}), / first fill {sm['refill_to_first_fill']['median']:.2f} "
              f"({sm['refill_to_first_fill']['min']:.2f}-{sm['refill_to_first_fill']['max']:.2f}), / source "
              f"{sm['refill_to_source']['median']:.2f} ({sm['refill_to_source']['min']:.2f}-"
              f"{sm['refill_to_source']['max']:.2f})")
        if pf:
            print(f"prefetch --jobs {self.args.jobs}: {sm['prefetch_secs']['median']:.2f} s, / cold source 1r "
                  f"{sm['prefetch_to_source_1r']['median']:.2f}, / 4r {sm['prefetch_to_source_4r']['median']:.2f}, "
                  f"/ first fill {sm['prefetch_to_first_fill']['median']:.2f}")
        print(f"filler log lines above INFO: {len(r.get('filler_log_problems', []))}")
        print(f"load averages seen: {[x['loadavg'][0] for x in self.loads]}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":  # evict.py reuses bench.py's reader
        return bench.reader_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", metavar="DIR",
                    help=f"directory to copy into the source (repeatable; default: {', '.join(_common.DEFAULT_TREES)})")
    ap.add_argument("--out", default="evict-results.json", help="JSON results file (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="evict + refill cycles (default: %(default)s)")
    ap.add_argument("--prefetch-runs", type=int, default=None, metavar="N",
                    help="evict + prefetch cycles (default: --runs; 0 skips prefetch)")
    ap.add_argument("--jobs", type=int, default=4, help="hsmfs prefetch --jobs (default: %(default)s)")
    ap.add_argument("--store-fs", choices=sorted(MKFS), default="ext4", help="store filesystem (default: ext4)")
    ap.add_argument("--pythonpath", metavar="DIR", default=_common.REPO,
                    help="import hsmfs from DIR/hsmfs (default: this checkout)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("evict.py: run as root (loop mounts, drop_caches, fanotify)", file=sys.stderr)
        return 77
    if args.runs < 1 or args.jobs < 1:
        ap.error("--runs and --jobs must be at least 1")
    if args.prefetch_runs is None:
        args.prefetch_runs = args.runs
    args.skip = []
    path = _common.set_hsmfs_path(args.pythonpath)
    if not os.path.isfile(os.path.join(path, "hsmfs", "__init__.py")):
        ap.error(f"{path} holds no hsmfs package")

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    b = EvictBench(args)
    t_start = time.perf_counter()
    ok = False
    try:
        b.load("start")
        b.setup()
        b.results["machine"] = bench.machine_facts(b)
        b.results["command"] = " ".join(["python3", "contrib/bench/evict.py", *sys.argv[1:]])
        inodes = {os.stat(os.path.join(os.fsencode(b.source), r)).st_ino for r in b.rels}
        b.results["tree"]["inodes"] = len(inodes)  # status counts inodes (hard links once)
        b.run_all()
        b.results["loadavg"] = b.loads
        b.results["bench_wall_secs"] = time.perf_counter() - t_start
        b.report()
        with open(args.out, "w") as f:
            json.dump(b.results, f, indent=1)
        log(f"results written to {args.out} ({b.results['bench_wall_secs']:.0f} s)")
        ok = True
    finally:
        b.cleanup(ok, logs=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
