"""Remote sources on a real network path: publish, mount over HTTP, faults, integrity, route loss.

The origin runs in its own network namespace behind a veth pair (contrib/bench/netlab.py, made with
pyroute2); hsmfs fetches from a second namespace (policy ``netns = PATH``), so nothing here uses
the host's network. Stores on ext4, xfs and btrfs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from conftest import LoopFS, View, ext4_only, hsmfs

from hsmfs import manifest as mf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "bench"))
import netlab  # noqa: E402

pytestmark = pytest.mark.root
PORT = 8080


def _need_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and veth pairs")
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        pytest.fail("pyroute2 is missing: pip install -e '.[test]'")


class Origin:
    """An HTTP origin in its own network namespace, serving root; faults set per URL path."""

    def __init__(self, prefix: str, *, rate: str | None = None) -> None:
        self.base = tempfile.mkdtemp(prefix="hsmfs-origin-", dir="/var/tmp")
        self.root = os.path.join(self.base, "www")
        os.mkdir(self.root)
        self.faults_path = os.path.join(self.base, "faults.json")
        self.set_faults({})
        self.lab = netlab.Lab(prefix, rate=rate)
        try:
            self.lab.start(self.lab.srv, [sys.executable, netlab.HERE, "origin", "--root", self.root, "--port",
                                          str(PORT), "--faults", self.faults_path,
                                          "--ready", os.path.join(self.base, "ready")],
                           ready=os.path.join(self.base, "ready"))
        except BaseException:
            self.close()
            raise

    def url(self, sub: str, port: int = PORT, scheme: str = "http") -> str:
        return f"{scheme}://{netlab.SRV_ADDR}:{port}/{sub}/manifest"

    def start(self, what: str, *args: str) -> None:
        ready = os.path.join(self.base, f"ready-{what}-{random.randrange(1 << 30)}")
        self.lab.start(self.lab.srv, [sys.executable, netlab.HERE, what, *args, "--ready", ready], ready=ready)

    def set_faults(self, faults: dict[str, Any]) -> None:
        with open(self.faults_path + ".tmp", "w") as f:
            json.dump(faults, f)
        os.replace(self.faults_path + ".tmp", self.faults_path)

    def counts(self) -> dict[str, int]:
        try:
            with open(self.faults_path + ".count") as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def publish(self, src: str, sub: str) -> str:
        hsmfs("publish", src, os.path.join(self.root, sub))
        return self.url(sub)

    def policy(self, dirpath: str, *, by_name: bool = False, **extra: object) -> str:
        """A policy file fetching through the client namespace (by its path, or its ip-netns name)."""
        path = os.path.join(dirpath, f"policy-{random.randrange(1 << 30)}.toml")
        keys: dict[str, object] = {"netns": self.lab.cli if by_name else self.lab.cli_path, **extra}
        with open(path, "w") as f:
            for k, v in keys.items():
                f.write(f"{k} = {json.dumps(v)}\n")
        return path

    def close(self) -> None:
        if hasattr(self, "lab"):
            self.lab.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    _need_netns()
    o = Origin(f"h2t{os.getpid()}")
    try:
        yield o
    finally:
        o.close()


def make_tree(root: str, *, seed: int = 7) -> str:
    rnd = random.Random(seed)
    src = tempfile.mkdtemp(prefix="src-", dir=root)
    os.makedirs(os.path.join(src, "d", "e"))
    sizes = {"empty": 0, "one": 1, "page": 4096, "mid.bin": 300_000, "d/e/deep.txt": 5000,
             "big.bin": 3 * (1 << 20) + 17}
    for name, size in sizes.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(rnd.randbytes(size))
    os.chmod(os.path.join(src, "mid.bin"), 0o640)
    os.chown(os.path.join(src, "page"), 1234, 5678)
    os.setxattr(os.path.join(src, "one"), "user.color", b"blue")
    os.link(os.path.join(src, "one"), os.path.join(src, "one-again"))
    os.symlink("e/deep.txt", os.path.join(src, "d", "link"))
    os.utime(os.path.join(src, "d", "e", "deep.txt"), ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    return src


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_publish_and_mount_over_http(origin: Origin, loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = make_tree(loopfs.mnt)
    url = origin.publish(src, f"t1-{loopfs.fstype}")
    # a parallel-part fetch for big.bin: parts of 1 MiB
    view = make_view(url, "--config", origin.policy(loopfs.base, fetch_part_size="1M", workers=4))
    names = sorted(os.listdir(view.target))
    assert names == sorted(os.listdir(src))
    for rel in ("empty", "one", "page", "mid.bin", "d/e/deep.txt", "big.bin", "one-again"):
        s, v = os.lstat(os.path.join(src, rel)), os.lstat(view.path(rel))
        assert (s.st_size, stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns) == \
               (v.st_size, stat.S_IMODE(v.st_mode), v.st_uid, v.st_gid, v.st_mtime_ns), rel
    assert os.stat(view.path("one")).st_ino == os.stat(view.path("one-again")).st_ino
    assert os.readlink(view.path("d/link")) == "e/deep.txt"
    assert os.getxattr(view.path("one"), "user.color") == b"blue"
    before = origin.counts()
    read = 0
    for rel in ("one", "page", "mid.bin", "d/e/deep.txt", "big.bin", "empty"):
        assert sha(view.path(rel)) == sha(os.path.join(src, rel)), rel
        read += os.path.getsize(view.path(rel))
    assert content(view.path("d/link")) == content(os.path.join(src, "d/e/deep.txt"))
    # the fill restored the published mtime
    assert os.stat(view.path("d/e/deep.txt")).st_mtime_ns == 1_500_000_000_123_456_789
    st = view.status()
    o = st["origin"]
    assert o["bytes_fetched"] == read  # every byte once, nothing ahead
    assert o["hash_failures"] == 0 and o["failures"] == 0
    assert o["origin_state"] == "ok" and o["netns"] == origin.lab.cli_path
    big = [p for p in origin.counts() if p.startswith(f"/t1-{loopfs.fstype}/")
           and p.endswith(sha(os.path.join(src, "big.bin")))]
    assert origin.counts()[big[0]] - before.get(big[0], 0) == 4  # four range GETs of at most 1 MiB
    assert st["filler"]["fill_ahead"]["enabled"] is False


@pytest.mark.slow
def test_fetch_failures(origin: Origin, loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """404, 403, a server that closes mid-body, a slow one, short and long bodies, a wrong hash: each a
    clear error within fill_timeout, a log line with URL, status and cause, and the stub stays a stub."""
    src = tempfile.mkdtemp(prefix="src-", dir=loopfs.mnt)
    rnd = random.Random(3)
    cases = ("gone", "forbidden", "closes", "slow", "short", "long", "corrupt", "flaky")
    for i, name in enumerate(cases):
        with open(os.path.join(src, name), "wb") as f:
            f.write(rnd.randbytes(200_000 + i))
    sub = f"t2-{loopfs.fstype}"
    url = origin.publish(src, sub)
    obj = {n: f"/{sub}/" + mf.object_key(sha(os.path.join(src, n))) for n in cases}
    os.unlink(os.path.join(origin.root, obj["gone"].lstrip("/")))
    origin.set_faults({obj["forbidden"]: {"status": 403}, obj["closes"]: {"close_after": 50_000},
                       obj["slow"]: {"delay": 3}, obj["short"]: {"short": 1000}, obj["long"]: {"long": 1000},
                       obj["corrupt"]: {"corrupt": True}, obj["flaky"]: {"status": 503, "fail_times": 2}})
    try:
        view = make_view(url, "--config", origin.policy(loopfs.base, fetch_timeout=1, fetch_retries=2,
                                                         fill_timeout=10))
        for name in cases:
            t0 = time.monotonic()
            if name == "flaky":  # two 503s, then the retry gets it
                with open(view.path(name), "rb") as f:
                    assert f.read() == content(os.path.join(src, name))
                continue
            with pytest.raises(OSError) as exc, open(view.path(name), "rb") as f:
                f.read()
            assert exc.value.errno == errno.EIO, name
            assert time.monotonic() - t0 < 10, name  # never a hang past fill_timeout
            st = os.stat(view.path(name))
            assert st.st_blocks == 0, f"{name}: a failed fill left bytes in the stub"
        log = view.log
        assert f"GET http://{netlab.SRV_ADDR}:{PORT}{obj['gone']}: HTTP 404" in log
        assert f"{obj['forbidden']}: HTTP 403" in log
        assert "timed out" in log  # the slow one
        assert "body of " in log and "expected 200" in log  # the long one
        assert "INTEGRITY" in log and "the manifest says" in log
        status = view.status()
        assert status["origin"]["hash_failures"] == 1 and status["filler"]["hash_failures"] == 1
        assert status["origin"]["retries"] >= 2
        out = hsmfs("status", view.name).stdout
        assert "HASH FAILURES 1" in out and "1 hash failures" in out
        states = json.loads(hsmfs("stat", "--json", *[view.path(n) for n in cases]).stdout)
        assert [s["state"] for s in states if s["path"].endswith(cases[:-1])] == ["stub"] * (len(cases) - 1)
        # the origin is fixed: the same stubs fill now
        origin.set_faults({})
        shutil.copy(os.path.join(src, "gone"), os.path.join(origin.root, obj["gone"].lstrip("/")))
        for name in cases:
            with open(view.path(name), "rb") as f:
                assert f.read() == content(os.path.join(src, name)), name
    finally:
        origin.set_faults({})


@ext4_only
@pytest.mark.parametrize("bad", ["dotdot", "absolute", "escaping symlink", "not json", "wrong format"])
def test_invalid_manifest_changes_nothing(origin: Origin, loopfs: LoopFS, bad: str) -> None:
    good = mf.Manifest([mf.Entry("", "dir", 0o755), mf.Entry("a", "file", size=1, sha256="0" * 64)])
    d = json.loads(good.dumps())
    d.pop("id")
    if bad == "dotdot":
        d["entries"][1]["path"] = "../a"
    elif bad == "absolute":
        d["entries"][1]["path"] = "/etc/a"
    elif bad == "escaping symlink":
        d["entries"][1] = {"path": "a", "type": "symlink", "target": "../../etc/shadow", "mode": 0o777,
                           "uid": 0, "gid": 0, "mtime_ns": 0}
    elif bad == "wrong format":
        d["format"] = "something-else"
    sub = f"bad-{bad.replace(' ', '-')}"
    os.makedirs(os.path.join(origin.root, sub), exist_ok=True)
    with open(os.path.join(origin.root, sub, "manifest"), "w") as f:
        f.write("{not json" if bad == "not json" else json.dumps(d))
    target = tempfile.mkdtemp(dir=loopfs.base)
    store = os.path.join(loopfs.mnt, f"store-bad-{random.randrange(1 << 30)}")
    try:
        r = hsmfs("mount", "--name", f"bad{os.getpid()}", "--store", store, "--config",
                  origin.policy(loopfs.base), origin.url(sub), target, check=False)
        assert r.returncode == 65, r.stderr
        assert "not a valid hsmfs manifest" in r.stderr
        assert not os.path.exists(store) and os.listdir(target) == []
    finally:
        os.rmdir(target)


@ext4_only
def test_unreachable_origin_at_mount(origin: Origin, loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    # a manifest whose first GET is cut short is fetched again, whole
    src = make_tree(loopfs.mnt, seed=2)
    url = origin.publish(src, "mclose")
    origin.set_faults({"/mclose/manifest": {"close_after": 100, "fail_times": 1}})
    try:
        view = make_view(url, "--config", origin.policy(loopfs.base))
        assert sorted(os.listdir(view.target)) == sorted(os.listdir(src))
    finally:
        origin.set_faults({})
    target = tempfile.mkdtemp(dir=loopfs.base)
    store = os.path.join(loopfs.mnt, "store-unreachable")
    try:
        r = hsmfs("mount", "--name", f"unr{os.getpid()}", "--store", store, "--config",
                  origin.policy(loopfs.base, fetch_timeout=1, fetch_retries=1),
                  f"http://{netlab.SRV_ADDR}:9/none/manifest", target, check=False)
        assert r.returncode == 69, r.stderr
        assert "Connection refused" in r.stderr
        r = hsmfs("mount", "--name", f"unr{os.getpid()}", "--store", store, "--config", origin.policy(loopfs.base),
                  origin.url("no-such-tree"), target, check=False)
        assert r.returncode == 66 and "HTTP 404" in r.stderr, r.stderr
        assert not os.path.exists(store)
    finally:
        os.rmdir(target)


def test_manifest_parse_rejects() -> None:
    ok = mf.Manifest([mf.Entry("", "dir", 0o755), mf.Entry("a", "dir", 0o755),
                      mf.Entry("a/b", "file", size=3, sha256="a" * 64),
                      mf.Entry("a/c", "hardlink", target="a/b"), mf.Entry("a/l", "symlink", target="b")])
    assert mf.parse(ok.dumps(), where="x").id == ok.id
    d = json.loads(ok.dumps())
    for mutate, why in [
        (lambda d: d["entries"].__setitem__(2, {**d["entries"][2], "path": "a/./b"}), "component"),
        (lambda d: d["entries"].__setitem__(2, {**d["entries"][2], "path": "a//b"}), "component"),
        (lambda d: d["entries"].__setitem__(2, {**d["entries"][2], "sha256": "xyz"}), "sha256"),
        (lambda d: d["entries"].__setitem__(2, {**d["entries"][2], "size": -1}), "size"),
        (lambda d: d["entries"].__setitem__(2, {**d["entries"][2], "mode": 0o17777}), "mode"),
        (lambda d: d["entries"].__setitem__(3, {**d["entries"][3], "target": "a"}), "hardlink"),
        (lambda d: d["entries"].__setitem__(4, {**d["entries"][4], "target": "/etc/passwd"}), "leaves the tree"),
        (lambda d: d["entries"].__setitem__(4, {**d["entries"][4], "target": "../../x"}), "leaves the tree"),
        (lambda d: d["entries"].__setitem__(2, {**d["entries"][2], "xattrs": {"trusted.hsmfs": ""}}), "xattr"),
        (lambda d: d["entries"].reverse(), "first entry"),
        (lambda d: d.__setitem__("id", "0" * 64), "hash of its entries"),
        (lambda d: d.__setitem__("version", 2), "version"),
    ]:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        with pytest.raises(mf.ManifestError, match=why):
            mf.parse(json.dumps(bad).encode(), where="x")


@pytest.mark.slow
def test_route_loss_fails_fast_and_recovers(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    """The link goes down mid-file: the reader gets EIO at once (not after fill_timeout), the next
    reads fail without trying, and fills resume when the route returns."""
    _need_netns()
    o = Origin(f"h2r{os.getpid()}", rate="4mbit")  # a 2 MiB file takes about 4 s
    try:
        src = tempfile.mkdtemp(prefix="src-", dir=loopfs.mnt)
        rnd = random.Random(5)
        for name in ("a", "b"):
            with open(os.path.join(src, name), "wb") as f:
                f.write(rnd.randbytes(2 << 20))
        url = o.publish(src, "r")
        view = make_view(url, "--config", o.policy(loopfs.base, fill_timeout=60, fetch_timeout=30))
        import threading

        result: dict[str, Any] = {}

        def read() -> None:
            t0 = time.monotonic()
            try:
                with open(view.path("a"), "rb") as f:
                    f.read()
                result["ok"] = True
            except OSError as e:
                result["errno"] = e.errno
            result["took"] = time.monotonic() - t0

        t = threading.Thread(target=read)
        t.start()
        time.sleep(1.0)
        o.lab.link(False)
        down_at = time.monotonic()
        t.join(30)
        assert result.get("errno") == errno.EIO, result
        assert time.monotonic() - down_at < 5  # not fill_timeout (60 s), not fetch_timeout (30 s)
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            open(view.path("b"), "rb").close()
        assert exc.value.errno == errno.EIO and time.monotonic() - t0 < 2
        assert os.stat(view.path("a")).st_blocks == 0
        st = view.status()["origin"]
        assert st["origin_state"].startswith("unreachable") and st["fast_fails"] >= 1
        assert "unreachable from network namespace" in view.log
        o.lab.link(True)
        deadline = time.monotonic() + 10
        while view.status()["origin"]["origin_state"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(view.path("b"), "rb") as f:
            assert f.read() == content(os.path.join(src, "b"))
        assert "reachable again" in view.log
    finally:
        o.close()


def test_netns_target_fetches_through_the_views_namespace(origin: Origin, loopfs: LoopFS,
                                                         make_view: Callable[..., View]) -> None:
    """netns = "target": a view mounted --namespace PID fetches through that process's network namespace
    (here the only one with a route to the origin), and the filler stays in its own."""
    import subprocess

    src = make_tree(loopfs.mnt, seed=9)
    url = origin.publish(src, f"t5-{loopfs.fstype}")
    # a "container": its own mount namespace, in the client network namespace
    proc = subprocess.Popen(["ip", "netns", "exec", origin.lab.cli, "unshare", "-m", "--propagation", "private",
                             "sleep", "300"])
    try:
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{proc.pid}/comm") as f:
                    if f.read().strip() == "sleep" and os.readlink(f"/proc/{proc.pid}/ns/mnt") != ours:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        cfg = os.path.join(loopfs.base, "netns-target.toml")
        with open(cfg, "w") as f:
            f.write('netns = "target"\n')
        view = make_view(url, "--namespace", str(proc.pid), "--config", cfg)
        out = subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "--", "sha256sum", view.path("big.bin")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == sha(os.path.join(src, "big.bin"))
        st = view.status()["origin"]
        assert st["netns"] == f"target (pid {proc.pid})" and st["bytes_fetched"] == os.path.getsize(
            os.path.join(src, "big.bin"))
        filler = view.status()["filler_pid"]
        assert os.readlink(f"/proc/{filler}/ns/net") == os.readlink("/proc/self/ns/net")  # it stayed where it is
        view.close()
    finally:
        proc.kill()
        proc.wait()


def test_round_trip_time_through_the_delay_line(origin: Origin, loopfs: LoopFS,
                                                 make_view: Callable[..., View]) -> None:
    """The userspace delay line (no netem here) adds 2 x 25 ms to every request: fills see it, and
    nothing else changes."""
    port = 8090 + ["ext4", "xfs", "btrfs"].index(loopfs.fstype)
    origin.start("delay", "--listen", f"{netlab.SRV_ADDR}:{port}", "--to", f"127.0.0.1:{PORT}", "--delay", "0.025")
    src = tempfile.mkdtemp(prefix="src-", dir=loopfs.mnt)
    for i in range(5):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(bytes([i]) * 1000)
    origin.publish(src, f"t6-{loopfs.fstype}")
    view = make_view(origin.url(f"t6-{loopfs.fstype}", port), "--config", origin.policy(loopfs.base, by_name=True))
    for i in range(5):
        assert content(view.path(f"f{i}")) == bytes([i]) * 1000
    st = view.status()
    lat = st["filler"]["fill_latency_ms"]
    assert 50 <= lat["p50"] < 2000, lat
    assert st["origin"]["netns"] == origin.lab.cli  # netns = NAME: /run/netns/NAME


@ext4_only
def test_tls_is_verified(origin: Origin, loopfs: LoopFS) -> None:
    """An HTTPS origin whose certificate no trusted authority signed is refused (exit 69), and the
    message says why."""
    import subprocess

    pem = os.path.join(origin.base, "self-signed.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", pem, "-out",
                    pem + ".crt", "-days", "1", "-subj", f"/CN={netlab.SRV_ADDR}",
                    "-addext", f"subjectAltName=IP:{netlab.SRV_ADDR}"], check=True, capture_output=True)
    with open(pem, "a") as f, open(pem + ".crt") as c:
        f.write(c.read())
    src = tempfile.mkdtemp(prefix="src-", dir=loopfs.mnt)
    with open(os.path.join(src, "a"), "w") as f:
        f.write("a\n")
    origin.publish(src, "tls")
    origin.start("origin", "--root", origin.root, "--port", "8443", "--cert", pem)
    target = tempfile.mkdtemp(dir=loopfs.base)
    store = os.path.join(loopfs.mnt, "store-tls")
    try:
        r = hsmfs("mount", "--name", f"tls{os.getpid()}", "--store", store, "--config",
                  origin.policy(loopfs.base, fetch_retries=0), origin.url("tls", 8443, "https"), target, check=False)
        assert r.returncode == 69, r.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in r.stderr or "certificate verify failed" in r.stderr
        assert not os.path.exists(store)
    finally:
        os.rmdir(target)


def test_publish_refuses_bad_input(tmp_path: Any) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a\n")
    r = hsmfs("publish", str(tmp_path / "missing"), str(tmp_path / "out"), check=False)
    assert r.returncode == 66 and not (tmp_path / "out").exists()
    r = hsmfs("publish", str(src), str(src / "pub"), check=False)
    assert r.returncode == 73 and "inside the tree" in r.stderr and sorted(os.listdir(src)) == ["a"]
    r = hsmfs("publish", str(src), "s3://", check=False)
    assert r.returncode == 64 and "s3://bucket/prefix" in r.stderr
    # a second publish of an unchanged tree writes no object and names the first as its parent
    first = hsmfs("publish", str(src), str(tmp_path / "out")).stdout.strip()
    again = hsmfs("publish", str(src), str(tmp_path / "out"))
    assert "0 written" in again.stderr and f"(parent {first[:12]})" in again.stderr
