"""Shared fixtures: real loop-mounted ext4, xfs and btrfs images, cleaned up pass or fail.

- Root: a test that uses a fixture of ROOT_FIXTURES, or is marked ``root``, is marked ``root`` at
  collection and skipped, saying why, when the tests do not run as root: ``-m "not root"`` is the
  unprivileged run, and nothing in it needs root.
- Logs: after a test, the log of every view it made (make_view, views) must hold no ALARM, no
  "bug while filling" and no traceback, unless the test expects it: ``@pytest.mark.log_allows(
  "regex", ...)`` lets lines matching one of the patterns through.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
from helpers import MKFS, LoopImage

from hsmfs.places import journal_path, log_path, record_path
from hsmfs.views import is_mountpoint

FILESYSTEMS = ("ext4", "xfs", "btrfs")
IMAGE_SIZE = 4 << 30  # sparse: what the whole session leaves behind on one filesystem (about 1 GiB on ext4 by now)


ROOT_FIXTURES = frozenset({"loopfs", "loopfs_all", "make_view", "views", "children"})
NEEDS_ROOT = "needs root (loop mounts, mounts, fanotify pre-content marks): run as root, or deselect with -m 'not root'"
BAD_LOG_LINE = re.compile(r"ALARM|bug while filling|Traceback")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "log_allows(*patterns): log lines of the test's views matching one of "
                            "these regexes do not fail it (ALARM, 'bug while filling', tracebacks)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.geteuid() == 0
    for item in items:
        if ROOT_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root)
        if not root and item.get_closest_marker("root") is not None:
            item.add_marker(pytest.mark.skip(reason=NEEDS_ROOT))


def _skip_unless_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)


def bad_log_lines(text: str, allowed: list[str]) -> list[str]:
    """Lines of a log that fail a test: an ALARM, a bug while filling, a traceback (unless allowed)."""
    return [line for line in text.splitlines()
            if BAD_LOG_LINE.search(line) and not any(re.search(a, line) for a in allowed)]


def check_logs(request: pytest.FixtureRequest, views: list[View]) -> None:
    allowed = [p for m in request.node.iter_markers("log_allows") for p in m.args]
    bad = {v.name: bad_log_lines(v.final_log, allowed) for v in views}
    bad = {name: lines for name, lines in bad.items() if lines}
    if bad:
        pytest.fail("the log of a view shows a failure (mark the test log_allows(...) if it is expected):\n"
                    + "\n".join(f"{name}: {line}" for name, lines in bad.items() for line in lines[:20]),
                    pytrace=False)


class LoopFS(LoopImage):
    """One loop-mounted filesystem image for the whole test session."""

    def __init__(self, fstype: str, base: str) -> None:
        self.base = base
        mkfs = MKFS[fstype]
        if shutil.which(mkfs[0]) is None:
            pytest.fail(f"{mkfs[0]} is missing: install {'xfsprogs' if fstype == 'xfs' else 'btrfs-progs'}")
        super().__init__(os.path.join(base, f"{fstype}.img"), os.path.join(base, fstype), fstype, IMAGE_SIZE)

    def fresh_dir(self, prefix: str = "t") -> str:
        return tempfile.mkdtemp(prefix=prefix + "-", dir=self.mnt)


@pytest.fixture(scope="session")
def loopfs_base() -> Iterator[str]:
    # not under /tmp: it may be tmpfs on other machines, and images there cost memory
    base = tempfile.mkdtemp(prefix="hsmfs-test-", dir="/var/tmp")
    yield base
    shutil.rmtree(base, ignore_errors=True)


_loopfs: dict[str, LoopFS] = {}


@pytest.fixture(scope="session")
def loopfs_all(loopfs_base: str) -> Iterator[dict[str, LoopFS]]:
    yield _loopfs
    for fs in list(_loopfs.values()):
        fs.close()
    _loopfs.clear()


@pytest.fixture(params=FILESYSTEMS)
def loopfs(request: pytest.FixtureRequest, loopfs_all: dict[str, LoopFS], loopfs_base: str) -> LoopFS:
    """A mounted ext4, xfs or btrfs image (the test runs once per filesystem)."""
    _skip_unless_root()
    fstype: str = request.param
    if fstype not in loopfs_all:
        loopfs_all[fstype] = LoopFS(fstype, loopfs_base)
    return loopfs_all[fstype]


# For a test whose subject no filesystem changes (a refusal before any store exists): it runs on
# ext4 only, instead of being skipped on the other two.
ext4_only = pytest.mark.parametrize("loopfs", ["ext4"], indirect=True)


def hsmfs(*args: str, check: bool = True, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the hsmfs CLI as users do, in a child process."""
    r = subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True, text=True,
                       timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"hsmfs {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r  # type: ignore[no-any-return]


class View:
    """A live hsmfs mount of a source on a loop filesystem (source and store on the same fs)."""

    def __init__(self, fs: LoopFS, source: str, name: str, *extra: str) -> None:
        self.fs = fs
        self.source = source
        self.name = name
        self.store = os.path.join(fs.mnt, "store-" + name)
        self.target = tempfile.mkdtemp(prefix="view-", dir=fs.base)
        self.extra = extra
        self.env: Optional[dict[str, str]] = None  # for hsmfs mount (and so the supervisor and filler)
        self.mounted = False
        self.final_log = ""  # the log as close() found it, after the umount

    def mount(self) -> subprocess.CompletedProcess[str]:
        r = hsmfs("mount", "--name", self.name, "--store", self.store, *self.extra, self.source, self.target,
                  **({"env": self.env} if self.env is not None else {}))
        self.mounted = True
        return r

    def path(self, rel: str) -> str:
        return os.path.join(self.target, rel)

    def status(self) -> dict[str, Any]:
        out: list[dict[str, Any]] = json.loads(hsmfs("status", "--json", self.name).stdout)
        return out[0]

    @property
    def log(self) -> str:
        with open(log_path(self.name)) as f:
            return f.read()

    def close(self) -> None:
        if self.mounted:
            r = hsmfs("umount", self.target, check=False)
            if r.returncode != 0:  # leave nothing behind even when a test broke the mount
                rt = record_path(self.name)
                if os.path.exists(rt):
                    with open(rt) as f:
                        pid = json.load(f)["pid"]
                    subprocess.run(["umount", "-l", self.target], check=False)
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    _wait_gone(pid)
                elif is_mountpoint(self.target):
                    subprocess.run(["umount", "-l", self.target], check=False)
            self.mounted = False
        if os.path.isdir(self.target) and not is_mountpoint(self.target):
            os.rmdir(self.target)
        try:
            with open(log_path(self.name), errors="replace") as f:
                self.final_log = f.read()
        except FileNotFoundError:
            pass  # closed before (a second close), or never mounted
        for leftover in (log_path(self.name), journal_path(self.name)):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


_counter = [0]


@pytest.fixture
def make_view(request: pytest.FixtureRequest, loopfs: LoopFS) -> Iterator[Callable[..., View]]:
    """make_view(source_dir, *extra_mount_args) -> a mounted View; all unmounted at teardown, and
    then their logs checked (check_logs)."""
    views: list[View] = []

    def make(source: str, *extra: str, mount: bool = True) -> View:
        _counter[0] += 1
        v = View(loopfs, source, f"t{os.getpid()}-{_counter[0]}", *extra)
        views.append(v)
        if mount:
            v.mount()
        return v

    yield make
    for v in views:
        v.close()
    check_logs(request, views)


@pytest.fixture
def views(loopfs: LoopFS, make_view: Callable[..., View]) -> Iterator[Callable[..., View]]:
    """make_view, with the loop filesystems' base directory traversable by nobody meanwhile.

    Views and sources live below it (mkdtemp, 0700). At teardown the views are closed and the
    in-flight journals the fillers leave in /run/hsmfs removed.
    """
    made: list[View] = []
    mode = stat.S_IMODE(os.stat(loopfs.base).st_mode)
    os.chmod(loopfs.base, 0o711)

    def make(source: str, *extra: str, mount: bool = True) -> View:
        v = make_view(source, *extra, mount=mount)
        made.append(v)
        return v

    try:
        yield make
    finally:
        os.chmod(loopfs.base, mode)
        for v in made:
            v.close()  # make_view closes them again, harmlessly
            try:
                os.unlink(journal_path(v.name))
            except FileNotFoundError:
                pass


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def _child(work: Callable[[], None]) -> int:
    """A forked child that runs work() as uid 65534 until killed; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _drop_to_nobody()
            work()
        finally:
            os._exit(0)
    return pid


@pytest.fixture
def children() -> Iterator[Callable[[Callable[[], None]], int]]:
    """start(work) -> pid of a child running work() as nobody; all killed and reaped at teardown."""
    pids: list[int] = []

    def start(work: Callable[[], None]) -> int:
        pid = _child(work)
        pids.append(pid)
        return pid

    yield start
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
