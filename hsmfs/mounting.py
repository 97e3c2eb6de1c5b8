"""What ``hsmfs mount`` and ``mount.hsmfs`` do: every check, the store, the stub tree, then the
supervisor (``python -m hsmfs.daemon``), and the wait for its word that the view is live.

Never imports typer or rich: the CLI passes a progress bar in (:data:`ProgressBar`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Optional

from hsmfs import tree
from hsmfs.control import runtime_records
from hsmfs.errors import (
    Busy,
    CannotCreate,
    FillerFailed,
    HsmfsError,
    SourceMissing,
    Unavailable,
    UsageError,
    need_root,
)
from hsmfs.linux.fs import HSM_FILESYSTEMS, fs_type
from hsmfs.names import escape, human_size
from hsmfs.places import LOG_DIR, STORE_ROOT, default_store, log_path
from hsmfs.policy import load_policy
from hsmfs.process import wait_ready
from hsmfs.session import new_group
from hsmfs.trust import UnsafeStore, check_store, open_source_root, weaknesses
from hsmfs.views import Namespace, is_mountpoint, open_namespace

READY_TIMEOUT = 120.0

# a bar for the stub tree's build: entered around it, called with (entries done, entries in all)
ProgressBar = Callable[[], "AbstractContextManager[Optional[Callable[[int, int], None]]]"]


def mount(source: str, target: str, *, name: Optional[str] = None, store: Optional[str] = None,
          config: Optional[str] = None, namespace: Optional[str] = None,
          progress: Optional[ProgressBar] = None) -> None:
    """``hsmfs mount``: returns once the view is live (the supervisor runs on in its own session)."""
    ns = open_namespace(namespace) if namespace is not None else None
    netns_fd: Optional[int] = None
    try:
        st, tgt = prepare_mount(source, target, name=name, store=store, config=config, namespace=ns,
                                progress=progress)
        if tree.is_remote(st.source) and ns is not None and load_policy(config).netns == "target":
            netns_fd = fetch_netns(load_policy(config), ns)[0]
        start_supervisor(st, tgt, ns, config, netns_fd=netns_fd)
    finally:
        if ns is not None:
            os.close(ns.fd)
        if netns_fd is not None:
            os.close(netns_fd)


def default_name(target: str) -> str:
    """The mount name derived from the target path: /mnt/doc -> mnt-doc."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.abspath(target).strip("/").replace("/", "-"))
    return name.lstrip(".") or "root"


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_kernel() -> None:
    try:
        fd = new_group()  # the group a mount makes (hsmfs.session)
    except OSError as e:
        raise Unavailable(f"this kernel ({os.uname().release}) cannot create fanotify pre-content groups: "
                          f"{e.strerror}", hint="hsmfs needs Linux 6.14+ with "
                          "CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y; run 'hsmfs doctor'") from None
    os.close(fd)


def prepare_mount(source: str, target: str, *, name: Optional[str] = None, store: Optional[str] = None,
                  config: Optional[str] = None, namespace: Optional[Namespace] = None,
                  progress: Optional[ProgressBar] = None) -> tuple[tree.Store, str]:
    """Everything ``hsmfs mount`` does before it starts the filler: checks, store, stub tree.

    Returns the store and the resolved target (with namespace, a path in that namespace).
    mount.hsmfs calls it too (hsmfs.mounthelper). progress: a bar while the stub tree is built.
    """
    need_root("hsmfs mount")
    policy = load_policy(config)  # a bad policy fails here, before anything changes
    remote = tree.is_remote(source)
    if remote:
        from hsmfs.remote import normalize

        src = normalize(source)
    else:
        src = os.path.abspath(source)
        if not os.path.isdir(src):
            raise SourceMissing(f"source {src} is not a directory" if os.path.exists(src)
                                else f"source {src} does not exist", hint="give an existing directory as SOURCE")
        if not os.access(src, os.R_OK | os.X_OK):
            raise SourceMissing(f"source {src} is not readable")
    name = name or default_name(target)
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise UsageError(f"mount name {name!r} may only hold letters, digits, '.', '_' and '-'")
    tgt = target
    if namespace is None:
        # a symlink on the way that a user owns could point anywhere (/etc/cron.d): not followed
        theirs = [w for w in weaknesses(target, itself=False)[1] if w.symlink]
        if theirs:
            raise CannotCreate(f"target {escape(target)} leads through a symlink that is not root's: "
                               + "; ".join(map(str, theirs)), hint="give the target's real path")
        tgt = os.path.realpath(target)
        if not os.path.exists(tgt):
            raise CannotCreate(f"target {tgt} does not exist", hint=f"create it first: mkdir -p {tgt}")
        if not os.path.isdir(tgt):
            raise CannotCreate(f"target {tgt} is not a directory")
        if is_mountpoint(tgt):
            raise Busy(f"target {tgt} is already a mount point", hint=f"unmount it first: hsmfs umount {tgt}")
    for rt in runtime_records():
        if rt.name == name and rt.alive():
            raise Busy(f"an hsmfs mount named {name} is already running (pid {rt.pid}, at {rt.target})",
                       hint="choose another --name or 'hsmfs umount' it first")
    store_dir = os.path.abspath(store or default_store(name))
    fstype = fs_type(_existing_ancestor(store_dir))
    if fstype not in HSM_FILESYSTEMS:
        raise Unavailable(f"store {store_dir} would be on {fstype}, which does not support fanotify "
                          "pre-content marks", hint="put the store on ext4, xfs or btrfs: --store DIR")
    if not remote and (src == store_dir or src.startswith(store_dir + os.sep) or store_dir.startswith(src + os.sep)):
        raise UsageError(f"the store {store_dir} and the source {src} must not contain each other")
    check_store(store_dir)  # root's alone, and so is every directory above it (issue 11, item 7)
    try:
        existing = tree.Store.load(store_dir) if os.path.isdir(store_dir) else None
    except OSError as e:  # a damaged one is a RecordError (65); one that is not root's, check_store refused
        raise UnsafeStore(f"store {store_dir}: cannot read its hsmfs.json: {e}",
                          hint="remove the store and mount again: it is built anew") from None
    if existing is not None and existing.source != src:
        raise UsageError(f"store {store_dir} holds a tree of {existing.source}, not {src}",
                         hint="use another --name or --store for a different source")
    if existing is None and os.path.isdir(store_dir) and os.listdir(store_dir):
        raise CannotCreate(f"store {store_dir} exists, is not empty and is not an hsmfs store",
                           hint="give an empty or new directory as --store")
    _check_kernel()
    fetched = None
    if remote and (existing is None or not existing.populated):
        fetched = _fetch_manifest(src, policy, namespace)  # a bad manifest or origin: nothing made yet

    st = existing or tree.Store(path=store_dir, name=name, source=src)
    recorded = st.source_id
    if not remote:
        os.close(open_source_root(st))  # the directory the store was built from, or now records
    if existing is None:
        if store is None and not os.path.isdir(STORE_ROOT):
            os.makedirs(STORE_ROOT, mode=0o700)  # the default store root is root's alone
        os.makedirs(store_dir, mode=0o700, exist_ok=True)
        os.chmod(store_dir, 0o700)
        check_store(store_dir)  # a directory above it made meanwhile by someone else: nothing to trust
        st.save()
    elif recorded is None and not remote:
        st.save()  # a store made before hsmfs recorded its source's identity
    if st.schema != tree.SCHEMA:
        from hsmfs.state import upgrade

        n = upgrade(st)
        print(f"hsmfs: upgraded the store {escape(st.path)} from hsmfs 0.1 ({n} stub records rewritten)",
              file=sys.stderr)
    if not st.populated and fetched is not None:
        _populate_manifest(fetched, st)
    elif not st.populated:
        _populate(src, st, progress)
    return st, tgt


def fetch_netns(policy: Any, namespace: Optional[Namespace]) -> tuple[Optional[int], str]:
    """(fd of the network namespace fetches go through, its label) for the policy's netns; UsageError
    if it names none. netns = "target" takes the network namespace of the --namespace process."""
    from hsmfs.netns import open_netns

    if policy.netns == "target":
        if namespace is None:
            return None, "host"  # the view is in our own namespaces
        from hsmfs.linux.ns import net_ns_of_pid

        m = re.fullmatch(r"pid (\d+)|/proc/(\d+)/ns/mnt", namespace.label)
        if m is None:
            raise UsageError(f'netns = "target" needs --namespace PID (or /proc/PID/ns/mnt), not {namespace.label}',
                             hint="or name the network namespace itself in the policy: netns = NAME or PATH")
        pid = int(m.group(1) or m.group(2))
        try:
            return net_ns_of_pid(pid), f"target (pid {pid})"
        except OSError as e:
            raise UsageError(f"--namespace {namespace.label}: cannot open its network namespace: {e.strerror}") \
                from None
    return open_netns(policy.netns), policy.netns


def _fetch_manifest(src: str, policy: Any, namespace: Optional[Namespace]) -> Any:
    from hsmfs.netns import NetNamespace
    from hsmfs.remote import fetch_manifest

    fd, label = fetch_netns(policy, namespace)
    ns = NetNamespace(fd, label)
    try:
        return fetch_manifest(src, policy, ns)[0]
    finally:
        ns.close()
        if fd is not None:
            os.close(fd)


def _populate_manifest(m: Any, st: tree.Store) -> None:
    from hsmfs.stubs import populate_manifest

    stats = populate_manifest(m, st)
    print(f"stub tree of {escape(st.source)} (version {m.id[:12]}): {stats.files} files, {stats.dirs} directories, "
          f"{stats.symlinks} symlinks, {stats.hardlinks} hardlinks ({human_size(stats.bytes)} at the origin)",
          file=sys.stderr)


def _populate(src: str, st: tree.Store, progress: Optional[ProgressBar]) -> None:
    from hsmfs.populate import populate

    with progress() if progress is not None else nullcontext(None) as step:
        stats = populate(src, st, progress=step)
    left = "".join(f"; {n} {what}" for n, what in (
        (stats.vanished, "names vanished or changed while populate read the source (left out, named above)"),
        (stats.submounts, "mount points left out (populate does not cross them)")) if n)
    print(f"stub tree of {escape(src)}: {stats.files} files, {stats.dirs} directories, {stats.symlinks} symlinks "
          f"({human_size(stats.bytes)} in the source){left}", file=sys.stderr)


def start_supervisor(st: tree.Store, target: str, namespace: Optional[Namespace], config: Optional[str], *,
                  netns_fd: Optional[int] = None) -> None:
    """Start ``python -m hsmfs.daemon`` in its own session, logging to /var/log/hsmfs/NAME.log, and
    wait for its word on the ready pipe: "ready", or the error that stopped it, raised here as is."""
    os.makedirs(LOG_DIR, mode=0o700, exist_ok=True)
    log_file = log_path(st.name)
    r, w = os.pipe2(os.O_CLOEXEC)
    cmd = [sys.executable, "-m", "hsmfs.daemon", "--store", st.path, "--target", target,
           "--ready-fd", str(w), "--log", log_file]
    fds: tuple[int, ...] = (w,)
    if namespace is not None:
        cmd += ["--ns-fd", str(namespace.fd), "--namespace", namespace.label]
        fds += (namespace.fd,)
    if config:
        cmd += ["--config", os.path.abspath(config)]
    if netns_fd is not None:
        cmd += ["--netns-fd", str(netns_fd)]
        fds += (netns_fd,)
    with open(log_file, "ab") as logf:
        os.chmod(log_file, 0o600)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=fds,
                                start_new_session=True, cwd="/")
    os.close(w)
    pidfd = os.pidfd_open(proc.pid)
    try:
        word = wait_ready(r, pidfd, READY_TIMEOUT)
    finally:
        os.close(pidfd)
        os.close(r)
    if word is True:
        where = f"{target} (mount namespace of {namespace.label})" if namespace else target
        print(f"hsmfs: {escape(st.source)} is live at {escape(where)} (supervisor pid {proc.pid}, log {log_file})",
              file=sys.stderr)
        return
    if word is None and proc.poll() is None:
        raise FillerFailed(f"the filler did not report ready within {READY_TIMEOUT:.0f} s; see {log_file}")
    proc.wait()
    if isinstance(word, HsmfsError):
        word.hint = word.hint or f"see {log_file}"
        raise word
    raise FillerFailed(f"the filler exited ({proc.returncode}) before the view was live", hint=f"see {log_file}")
