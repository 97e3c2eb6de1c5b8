"""S3 sources: moto's server mode as the origin, in its own network namespace behind a veth pair;
publish to s3://, mount s3://bucket/prefix, refresh, and missing credentials."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Callable

import pytest
from conftest import LoopFS, View, ext4_only, hsmfs
from test_remote import _need_netns, content, make_tree, netlab, sha

pytestmark = pytest.mark.root
PORT = 9000
SECRET = "s3cr3t-never-logged"
MOTO = """
import os, signal, sys, threading
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address=sys.argv[1], port=int(sys.argv[2]), verbose=False)
s.start()
open(sys.argv[3], "w").close()
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
s.stop()
"""


class S3Origin:
    def __init__(self, prefix: str) -> None:
        self.base = tempfile.mkdtemp(prefix="hsmfs-s3-", dir="/var/tmp")
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET,
                        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{netlab.SRV_ADDR}:{PORT}",
                        AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
                        AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
        self.lab = netlab.Lab(prefix)
        try:
            ready = os.path.join(self.base, "ready")
            self.lab.start(self.lab.srv, [sys.executable, "-c", MOTO, netlab.SRV_ADDR, str(PORT), ready], ready=ready,
                           timeout=60)
            code = self.lab.run_in(self.lab.cli, [sys.executable, "-c", "import boto3; boto3.client('s3')"
                                                  ".create_bucket(Bucket='trees')"], env=self.env)
            assert code == 0
        except BaseException:
            self.close()
            raise

    def policy(self, dirpath: str) -> str:
        path = os.path.join(dirpath, "s3-policy.toml")
        with open(path, "w") as f:
            f.write(f"netns = {json.dumps(self.lab.cli_path)}\n")
        return path

    def publish(self, src: str, dest: str) -> None:
        # from the client's namespace: the origin is reachable only there
        assert self.lab.run_in(self.lab.cli, [sys.executable, "-m", "hsmfs", "publish", src, dest], env=self.env) == 0

    def close(self) -> None:
        self.lab.close()
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Origin]:
    _need_netns()
    o = S3Origin(f"h2s{os.getpid()}")
    try:
        yield o
    finally:
        o.close()


def test_publish_and_mount_s3(s3: S3Origin, loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    src = make_tree(loopfs.mnt, seed=11)
    dest = f"s3://trees/{loopfs.fstype}/v"
    s3.publish(src, dest)
    view = make_view(dest, "--config", s3.policy(loopfs.base), mount=False)
    view.env = s3.env
    view.mount()
    for rel in ("one", "page", "mid.bin", "big.bin", "d/e/deep.txt"):
        assert sha(view.path(rel)) == sha(os.path.join(src, rel)), rel
    st = view.status()
    assert st["source"] == dest and st["origin"]["hash_failures"] == 0
    assert st["origin"]["bytes_fetched"] == sum(os.path.getsize(os.path.join(src, r))
                                                for r in ("one", "page", "mid.bin", "big.bin", "d/e/deep.txt"))
    # a new version, followed by refresh
    with open(os.path.join(src, "added"), "wb") as f:
        f.write(b"from version 2\n")
    s3.publish(src, dest)
    r = hsmfs("refresh", view.target)
    assert "1 added" in r.stderr
    assert content(view.path("added")) == b"from version 2\n"
    assert SECRET not in view.log


@ext4_only
def test_missing_credentials(s3: S3Origin, loopfs: LoopFS) -> None:
    env = {k: v for k, v in s3.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    target = tempfile.mkdtemp(dir=loopfs.base)
    store = os.path.join(loopfs.mnt, "store-nocreds")
    try:
        r = hsmfs("mount", "--name", f"nocreds{os.getpid()}", "--store", store, "--config", s3.policy(loopfs.base),
                  "s3://trees/ext4/v", target, check=False, env=env)
        assert r.returncode == 77, r.stderr
        assert "no AWS credentials found" in r.stderr
        assert not os.path.exists(store) and os.listdir(target) == []
        r = hsmfs("publish", loopfs.mnt, "s3://trees/x", check=False, env=env)
        assert r.returncode == 77 and "no AWS credentials found" in r.stderr
    finally:
        os.rmdir(target)
