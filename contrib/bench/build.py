#!/usr/bin/env python3
"""hsmfs benchmark: a compile of a large C source tree through a view, against the same compile on a copy.

    python3 contrib/bench/build.py [--tarball /usr/src/linux-source-6.1.tar.xz] [--runs 3] [--out FILE]

Run as root on Linux 6.14+, alone on the machine. The tree is the Linux kernel source (Debian's
``linux-source-6.1`` package; it also needs gcc, make, flex, bison, bc, libelf-dev), about 78,000
files; the build is ``make tinyconfig && make -j$(nproc)``, which reads a few thousand of them.

1. Two sparse images on loop devices with direct I/O, as bench.py: SOURCE (ext4, the unpacked
   tree) and STORE (``--store-fs``).
2. Each run, in this order, with the caches dropped before each build:
   - **copy**: ``cp -a`` of the tree to the store filesystem (timed: what "a local copy" costs),
     then the build in the copy;
   - **view**: ``hsmfs mount`` of the tree on an empty store (timed: populate, filler, view), then
     the build in the view (its objects are files users made: they stay in the store).
3. Ratios: view build / copy build, and (mount + view build) / copy build; the filler's events,
   fills, fill-ahead fills and CPU per build.

Everything it makes is removed when it ends, fails or gets SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

import _common
from _common import HSMFS, LOG_DIR, MKFS, RUN_DIR, LoopFS, child_env, drop_caches, log, proc_cpu, run, summary

TARGETS = {"build_vs_copy": 1.05, "mount_and_build_vs_copy": 1.15}
IMAGE = 12 << 30


class Build:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = tempfile.mkdtemp(prefix="hsmfs-buildbench-", dir="/var/tmp")
        self.tag = f"build{os.getpid()}"
        self.fs: list[LoopFS] = []
        self.mounted: list[tuple[str, str]] = []  # (name, target)
        self.seq = 0

    def setup(self) -> None:
        self.src = LoopFS(self.base, "src", "ext4", IMAGE)
        self.fs.append(self.src)
        self.store = LoopFS(self.base, "store", self.args.store_fs, IMAGE)
        self.fs.append(self.store)
        log(f"unpacking {self.args.tarball}")
        run(["tar", "-xf", self.args.tarball, "-C", self.src.mnt])
        tops = [d for d in os.listdir(self.src.mnt) if d.startswith("linux")]
        if len(tops) != 1:
            raise RuntimeError(f"expected one linux-* directory in the tarball, found {tops}")
        self.tree = os.path.join(self.src.mnt, tops[0])
        os.sync()
        n = sum(len(files) for _d, _s, files in os.walk(self.tree))
        log(f"source tree: {n} files")
        self.files = n

    def build(self, where: str) -> float:
        drop_caches(2)
        t0 = time.monotonic()
        jobs = str(os.cpu_count() or 2)
        run(["make", "-s", "tinyconfig"], cwd=where, timeout=3600)
        run(["make", "-s", f"-j{jobs}"], cwd=where, timeout=3600)
        return time.monotonic() - t0

    def copy_run(self) -> dict[str, float]:
        dst = os.path.join(self.store.mnt, "copy")
        drop_caches(2)
        t0 = time.monotonic()
        run(["cp", "-a", self.tree, dst])
        run(["sync", "-f", dst])
        cp = time.monotonic() - t0
        secs = self.build(dst)
        shutil.rmtree(dst)
        self.store.trim()
        return {"cp_a_s": cp, "build_s": secs}

    def view_run(self) -> dict[str, Any]:
        self.seq += 1
        name = f"{self.tag}-{self.seq}"
        store = os.path.join(self.store.mnt, f"store-{self.seq}")
        target = os.path.join(self.base, f"view-{self.seq}")
        os.mkdir(target)
        cmd = [*HSMFS, "mount", "--name", name, "--store", store]
        if self.args.config:
            cmd += ["--config", self.args.config]
        drop_caches(2)
        t0 = time.monotonic()
        run([*cmd, self.tree, target], env=child_env())
        mount = time.monotonic() - t0
        self.mounted.append((name, target))
        with open(os.path.join(RUN_DIR, name + ".json")) as f:
            sup = json.load(f)["pid"]
        cpu0 = proc_cpu(sup)
        secs = self.build(target)
        cpu = proc_cpu(sup) - cpu0
        st = json.loads(run([*HSMFS, "status", "--json", name], env=child_env()).stdout)[0]
        self.umount(name, target)
        shutil.rmtree(store)
        self.store.trim()
        f = st.get("filler") or {}
        return {"mount_s": mount, "build_s": secs, "filler_cpu_s": cpu, "events": f.get("events"),
                "fills": f.get("fills"), "ahead_fills": f.get("ahead_fills"), "commits": f.get("commits"),
                "states": st.get("states")}

    def umount(self, name: str, target: str) -> None:
        run([*HSMFS, "umount", target], env=child_env(), check=False)
        if (name, target) in self.mounted:
            self.mounted.remove((name, target))
        try:
            os.rmdir(target)
        except OSError:
            pass

    def cleanup(self) -> None:
        for name, target in list(self.mounted):
            self.umount(name, target)
        for i in range(1, self.seq + 1):
            for p in (os.path.join(RUN_DIR, f"{self.tag}-{i}.journal"), os.path.join(LOG_DIR, f"{self.tag}-{i}.log")):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        for fs in reversed(self.fs):
            fs.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def main(self) -> dict[str, Any]:
        self.setup()
        copies, views = [], []
        for i in range(self.args.runs):
            log(f"run {i + 1}/{self.args.runs}: copy")
            copies.append(self.copy_run())
            log(f"  cp -a {copies[-1]['cp_a_s']:.1f} s, build {copies[-1]['build_s']:.1f} s; view")
            views.append(self.view_run())
            v = views[-1]
            log(f"  mount {v['mount_s']:.1f} s, build {v['build_s']:.1f} s, {v['events']} events, {v['fills']} fills "
                f"+ {v['ahead_fills']} ahead, filler {v['filler_cpu_s']:.1f} CPU-s")
        cb = statistics.median(c["build_s"] for c in copies)
        vb = statistics.median(v["build_s"] for v in views)
        vm = statistics.median(v["mount_s"] + v["build_s"] for v in views)
        out = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_at_start": os.getloadavg()},
               "store_fs": self.args.store_fs, "files": self.files, "runs": self.args.runs,
               "copy": {"cp_a": summary([c["cp_a_s"] for c in copies]),
                        "build": summary([c["build_s"] for c in copies])},
               "view": {"mount": summary([v["mount_s"] for v in views]),
                        "build": summary([v["build_s"] for v in views]), "per_run": views},
               "ratios": {"build_vs_copy": vb / cb, "mount_and_build_vs_copy": vm / cb,
                          "per_run_build": [v["build_s"] / c["build_s"] for c, v in zip(copies, views)]},
               "targets": TARGETS}
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tarball", default="/usr/src/linux-source-6.1.tar.xz")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store-fs", choices=sorted(MKFS), default="ext4")
    ap.add_argument("--config", help="policy TOML for the view's mount")
    ap.add_argument("--pythonpath", default=_common.REPO, help="import hsmfs from DIR/hsmfs")
    ap.add_argument("--out", default="build-results.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("build.py: run it as root", file=sys.stderr)
        return 77
    if not os.path.exists(args.tarball):
        print(f"build.py: {args.tarball} is missing: apt-get install linux-source-6.1 flex bison bc libelf-dev",
              file=sys.stderr)
        return 66
    _common.set_hsmfs_path(args.pythonpath)
    b = Build(args)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        out = b.main()
    finally:
        b.cleanup()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    r = out["ratios"]
    print(f"build through a view / on a copy: {r['build_vs_copy']:.3f} (target <= {TARGETS['build_vs_copy']}); "
          f"with hsmfs mount: {r['mount_and_build_vs_copy']:.3f} (target <= {TARGETS['mount_and_build_vs_copy']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
