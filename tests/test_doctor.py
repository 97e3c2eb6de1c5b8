"""hsmfs doctor: every check against the real kernel, real filesystems and a real unprivileged user."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
from conftest import LoopFS

from hsmfs import doctor
from hsmfs.doctor import Check, format_checks, run_checks
from hsmfs.linux import caps
from hsmfs.linux import fs as linux_fs

NAMES = ["kernel", "privileges", "fanotify", "store fs", "mount API", "store privacy", "store path", "fanotify limits",
         "python"]
NOBODY = 65534

root_only = pytest.mark.root  # fanotify groups, mounts, chown, setresuid (conftest skips it unless root)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def mountinfo() -> str:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def scratch() -> Iterator[str]:
    """A scratch directory on disk (/var/tmp, not a tmpfs /tmp), removed afterwards."""
    d = tempfile.mkdtemp(prefix="hsmfs-doctor-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmpfs_dir(scratch: str) -> Iterator[str]:
    """A real tmpfs mounted on a directory of its own, unmounted pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mount -t tmpfs")
    mnt = os.path.join(scratch, "tmpfs")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "hsmfs-doctor-test", mnt], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)


# -- the whole doctor on real filesystems --------------------------------------------------------


CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


def mounts() -> set[str]:
    """'ID MOUNTPOINT' of every mount of this mount namespace."""
    return {" ".join(line.split()[:5:4]) for line in mountinfo().splitlines()}


def _run_checks_alone(store: str) -> tuple[list[Check], dict[str, list[str]]]:
    """run_checks in a forked child in a mount namespace of its own (private propagation).

    Nothing the machine mounts or unmounts meanwhile shows there, so the mounts that came or went
    while the checks ran are the doctor's. Returns the checks and what changed in the child:
    file descriptors opened, mounts made, mounts gone.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            out: dict[str, Any] = {}
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"unshare(CLONE_NEWNS) and mount --make-rprivate /: {os.strerror(e)}")
                fds, before = open_fds(), mounts()
                checks = run_checks(store)
                after = mounts()
                out = {"checks": [asdict(c) for c in checks], "changed": {
                    "fds opened": sorted(open_fds() - fds), "mounts made": sorted(after - before),
                    "mounts gone": sorted(before - after)}}
            except BaseException:
                out = {"error": traceback.format_exc()}
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, wstatus = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wstatus) == 0
    got = json.loads(data)
    assert "error" not in got, got.get("error")
    return [Check(**c) for c in got["checks"]], got["changed"]


@pytest.mark.root
def test_all_ok_on_supported_fs_and_nothing_left_behind(loopfs: LoopFS) -> None:
    store = loopfs.fresh_dir("store")  # mkdtemp: mode 0700, owner root
    checks, changed = _run_checks_alone(store)
    assert changed["fds opened"] == [], "a check leaked a file descriptor (fanotify group or open_tree fd)"
    assert changed["mounts made"] == [], "a check left a mount behind"
    assert changed["mounts gone"] == [], "a check unmounted something"
    assert [c.name for c in checks] == NAMES
    assert all(c.ok for c in checks), format_checks(checks)
    assert all(c.fix == "" for c in checks)
    fs_check = by_name(checks)["store fs"]
    assert f"{store} is on {loopfs.fstype}" in fs_check.detail
    assert "FAN_PRE_ACCESS mark on it works" in fs_check.detail
    assert store in by_name(checks)["store privacy"].detail


@pytest.mark.root
def test_store_not_made_yet_is_judged_by_nearest_existing_ancestor(loopfs: LoopFS) -> None:
    parent = loopfs.fresh_dir("store")
    store = os.path.join(parent, "not", "yet")
    checks = by_name(run_checks(store))
    assert all(c.ok for c in checks.values()), format_checks(list(checks.values()))
    assert f"{parent} (where {store} will be made) is on {loopfs.fstype}" in checks["store fs"].detail
    assert parent in checks["mount API"].detail
    assert "does not exist yet" in checks["store privacy"].detail
    assert not os.path.exists(os.path.join(parent, "not")), "the doctor must not create the store"


@pytest.mark.root
@pytest.mark.parametrize("sub", ["", "store", "not/made/yet"])
def test_store_on_tmpfs_fails_with_a_fix(tmpfs_dir: str, sub: str) -> None:
    store = os.path.join(tmpfs_dir, sub) if sub else tmpfs_dir
    if sub == "store":
        os.mkdir(store, 0o700)
    checks = by_name(run_checks(store))
    fs_check = checks["store fs"]
    assert not fs_check.ok
    assert "is on tmpfs, which does not support fanotify pre-content marks" in fs_check.detail
    assert "EOPNOTSUPP" in fs_check.detail, "the mark must really have been tried"
    assert "ext4, xfs or btrfs" in fs_check.fix
    # the suggested store really is on a supported filesystem
    suggested = fs_check.fix.split("--store ", 1)[1].split()[0]
    assert linux_fs.fs_type(doctor._nearest_existing(suggested)) in linux_fs.HSM_FILESYSTEMS
    # the kernel itself is fine: only the filesystem is wrong
    assert checks["fanotify"].ok and checks["kernel"].ok
    text = format_checks(list(checks.values()))
    assert "FAIL  store fs" in text and "fix: put the store on ext4, xfs or btrfs" in text


# -- store privacy -------------------------------------------------------------------------------


def _searchable_by_others(path: str) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in _ancestors(path))


def _ancestors(path: str) -> list[str]:
    out = []
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


@root_only
@pytest.mark.root
def test_store_privacy_fails_for_an_open_chain_and_passes_after_chmod_700(scratch: str) -> None:
    os.chmod(scratch, 0o755)
    store = os.path.join(scratch, "store")
    os.mkdir(store)
    os.chmod(store, 0o755)
    assert _searchable_by_others(store), "test premise: / .. store are all o+x"
    check = by_name(run_checks(store))["store privacy"]
    assert not check.ok
    assert "reachable by non-root users" in check.detail and "0755" in check.detail
    assert check.fix == f"chmod 700 {store}"
    os.chmod(store, 0o700)
    check = by_name(run_checks(store))["store privacy"]
    assert check.ok and check.fix == ""
    assert "closed to non-root users" in check.detail


@root_only
@pytest.mark.root
def test_store_privacy_a_closed_ancestor_is_enough(scratch: str) -> None:
    os.chmod(scratch, 0o700)
    store = os.path.join(scratch, "a", "store")
    os.makedirs(store)
    os.chmod(store, 0o755)
    check = doctor.check_store_privacy(store)
    assert check.ok, check
    assert scratch in check.detail


@root_only
@pytest.mark.root
def test_store_privacy_owner_and_group_count(scratch: str) -> None:
    os.chmod(scratch, 0o755)
    store = os.path.join(scratch, "store")
    os.mkdir(store, 0o700)
    # a non-root owner can get in: chmod alone does not help
    os.chown(store, NOBODY, NOBODY)
    check = doctor.check_store_privacy(store)
    assert not check.ok and check.fix == f"chown root:root {store} && chmod 700 {store}"
    # group x: fine for root's group, not for another
    os.chown(store, 0, 0)
    os.chmod(store, 0o710)
    assert doctor.check_store_privacy(store).ok
    os.chown(store, 0, NOBODY)
    check = doctor.check_store_privacy(store)
    assert not check.ok and check.fix == f"chmod 700 {store}"


# -- as an unprivileged user ---------------------------------------------------------------------


def _run_checks_as_nobody(store: str) -> dict[str, Check]:
    """run_checks in a forked child that dropped to uid/gid 65534 and no groups (capabilities go too)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            status = {"euid": os.geteuid(), "capeff": caps.effective()}
            out = {"status": status, "checks": [asdict(c) for c in run_checks(store)]}
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, wstatus = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wstatus) == 0
    out = json.loads(data)
    assert out["status"] == {"euid": NOBODY, "capeff": 0}
    return {c["name"]: Check(**c) for c in out["checks"]}


@root_only
@pytest.mark.root
def test_unprivileged_user_is_told_to_run_as_root(scratch: str) -> None:
    store = os.path.join(scratch, "store")
    checks = _run_checks_as_nobody(store)
    priv = checks["privileges"]
    assert not priv.ok
    assert "uid 65534" in priv.detail and "needs root" in priv.detail
    assert priv.fix == "run as root: sudo hsmfs doctor"
    fan = checks["fanotify"]
    assert not fan.ok and "EPERM" in fan.detail and "sudo" in fan.fix
    mnt = checks["mount API"]
    assert not mnt.ok and "EPERM" in mnt.detail and "sudo" in mnt.fix
    assert checks["kernel"].ok


# -- single checks with given inputs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "ok"),
    [("6.18.44-fc-v669", True), ("6.14.0-rc1", True), ("7.0.0", True), ("6.13.12-arch1", False),
     ("5.15.0-generic", False), ("banana", False)],
)
def test_kernel_version(release: str, ok: bool) -> None:
    check = doctor.check_kernel(release)
    assert check.ok is ok
    assert release in check.detail and "6.14+" in check.detail
    if ok:
        assert check.fix == ""
    else:
        assert "Linux 6.14 or later" in check.fix and "CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y" in check.fix


def test_kernel_check_reads_this_kernel() -> None:
    assert os.uname().release in doctor.check_kernel().detail


def _status_file(directory: str, capeff: int) -> str:
    path = os.path.join(directory, "status")
    with open(path, "w") as f:
        f.write(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{capeff:016x}\nCapBnd:\t000001ffffffffff\n")
    return path


def test_capeff_parsing(tmp_path: os.PathLike[str]) -> None:
    d = os.fspath(tmp_path)
    assert caps.effective(_status_file(d, 0x1FFFEFFFFFF)) == 0x1FFFEFFFFFF
    assert caps.has_effective(caps.CAP_SYS_ADMIN, _status_file(d, 1 << 21))
    assert not caps.has_effective(caps.CAP_SYS_ADMIN, _status_file(d, ~(1 << 21) & 0x1FFFFFFFFFF))
    with open(os.path.join(d, "status"), "w") as f:
        f.write("Name:\tx\n")
    with pytest.raises(OSError):
        caps.effective(os.path.join(d, "status"))


@root_only
def test_root_without_cap_sys_admin(tmp_path: os.PathLike[str]) -> None:
    status = _status_file(os.fspath(tmp_path), 0x1FFFFFFFFFF & ~(1 << caps.CAP_SYS_ADMIN))
    check = doctor.check_privileges(status)
    assert not check.ok and "CAP_SYS_ADMIN" in check.detail and "SYS_ADMIN" in check.fix


@root_only
def test_privileges_ok_as_root() -> None:
    assert doctor.check_privileges() == Check("privileges", True, "uid 0 with CAP_SYS_ADMIN")


def test_fanotify_limits(tmp_path: os.PathLike[str]) -> None:
    real = doctor.check_fanotify_limits()
    with open("/proc/sys/fs/fanotify/max_user_groups") as f:
        assert f"max_user_groups {int(f.read())}" in real.detail
    d = os.fspath(tmp_path)
    for name, value in (("max_user_groups", 1), ("max_user_marks", 8192)):
        with open(os.path.join(d, name), "w") as f:
            f.write(f"{value}\n")
    low = doctor.check_fanotify_limits(d)
    assert not low.ok and "max_user_groups 1" in low.detail and "max_user_marks 8192" in low.detail
    assert "sysctl -w fs.fanotify.max_user_groups=" in low.fix
    missing = doctor.check_fanotify_limits(os.path.join(d, "nope"))
    assert not missing.ok and "CONFIG_FANOTIFY=y" in missing.fix


def test_python_check() -> None:
    assert doctor.check_python().ok
    old = doctor.check_python((3, 8, 18))
    assert not old.ok and "3.8.18" in old.detail and "3.9 or later" in old.fix
    no_toml = doctor.check_python((3, 10, 0), toml_modules=("hsmfs_no_such_module",))
    assert not no_toml.ok and "pip install tomli" in no_toml.fix


# -- output ----------------------------------------------------------------------------------------


def test_format_checks_aligns_and_adds_fix_lines() -> None:
    fix = "put the store on ext4, xfs or btrfs: hsmfs mount --store /srv/hsmfs-store ..."
    checks = [
        Check("kernel", True, "Linux 6.18.44 (pre-content events need 6.14+)"),
        Check("store fs", False, "/var/lib/hsmfs is on tmpfs, which does not support pre-content marks", fix),
        Check("store privacy", True, "fine"),
    ]
    assert format_checks(checks).splitlines() == [
        "ok    kernel         Linux 6.18.44 (pre-content events need 6.14+)",
        "FAIL  store fs       /var/lib/hsmfs is on tmpfs, which does not support pre-content marks",
        "                     fix: " + fix,
        "ok    store privacy  fine",
    ]
    assert format_checks([]) == ""


def test_check_is_frozen() -> None:
    c = Check("kernel", True, "x")
    with pytest.raises(AttributeError):
        c.ok = False  # type: ignore[misc]
    assert c.fix == ""


def test_fs_fix_without_any_supported_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_suggest_store_root", lambda: None)
    fix = doctor._fs_fix()
    assert "mkfs.ext4 DEVICE" in fix and "hsmfs mount --store /srv/hsmfs/NAME" in fix
