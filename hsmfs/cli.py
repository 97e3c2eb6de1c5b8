"""The hsmfs command line (typer): commands and printing. Exceptions become exit codes in
hsmfs.process.run_main, as in every hsmfs process."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Optional

import typer

from hsmfs import tree
from hsmfs.control import RuntimeRecord, request, runtime_records
from hsmfs.errors import (
    Busy,
    CannotCreate,
    FillerFailed,
    HsmfsError,
    Interrupted,
    NotMounted,
    NotPermitted,
    SourceMissing,
    Unavailable,
    UsageError,
    with_code,
)
from hsmfs.linux.fs import HSM_FILESYSTEMS, fs_type
from hsmfs.names import EscapingFormatter, escape
from hsmfs.places import LOG_DIR, STORE_ROOT, default_store, log_path
from hsmfs.policy import load_policy
from hsmfs.process import run_main, wait_ready
from hsmfs.session import new_group
from hsmfs.trust import UnsafeStore, check_store, open_source_root, weaknesses
from hsmfs.views import Namespace, is_mountpoint, open_namespace

READY_TIMEOUT = 120.0
PATHS_HELP = "Files or directories (recursively) in a view or a store."
EVICT_BATCH = 256  # handles per control request (its line is limited to 64 KiB)
NOT_DONE = "not done: its filler restarted; run hsmfs evict again"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Lazy views of a source tree: stubs filled on first access (fanotify pre-content).")
_debug = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    global _debug
    _debug = debug


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotPermitted(f"{what} needs root (CAP_SYS_ADMIN for mounts and fanotify)",
                           hint=f"run it as root: sudo hsmfs {what.split()[-1]} ...")


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


def _find(target_or_name: str) -> RuntimeRecord:
    recs = runtime_records()
    path = os.path.realpath(target_or_name) if os.path.isabs(target_or_name) or os.sep in target_or_name \
        or os.path.exists(target_or_name) else None
    for rt in recs:
        if rt.name == target_or_name or (path is not None and rt.target == path and rt.namespace is None):
            return rt
    # a view in another mount namespace, named by its path there, when that names only one
    there = [rt for rt in recs if rt.namespace is not None and os.path.isabs(target_or_name)
             and rt.target == os.path.normpath(target_or_name)]
    if len(there) == 1:
        return there[0]
    if there:
        raise UsageError(f"{target_or_name} names views in {len(there)} mount namespaces",
                         hint="give the mount name instead: " + ", ".join(rt.name for rt in there))
    raise NotMounted(f"no running hsmfs mount at or named {target_or_name}",
                     hint="'hsmfs status' lists running mounts")


@app.command()
def mount(
    source: str = typer.Argument(..., help="Directory whose files the view shows, or a published tree: "
                                 "https://host/path/manifest or s3://bucket/prefix (hsmfs publish)."),
    target: str = typer.Argument(..., help="Existing directory where the view appears."),
    name: Optional[str] = typer.Option(None, help="Mount name (default: from TARGET, /mnt/doc -> mnt-doc)."),
    store: Optional[str] = typer.Option(None, help=f"Store directory (default: {STORE_ROOT}/NAME)."),
    config: Optional[str] = typer.Option(None, help="Policy TOML file (docs/config.md)."),
    namespace: Optional[str] = typer.Option(None, help="Attach the view in this mount namespace: PID or "
                                            "namespace file (/proc/PID/ns/mnt)."),
) -> None:
    """Make TARGET a lazy view of SOURCE: stubs now, bytes on first access.

    Builds the stub tree in the store if it is not there yet (resuming an interrupted build),
    starts the filler in the background and returns once the view is live.
    """
    ns = open_namespace(namespace) if namespace is not None else None
    netns_fd: Optional[int] = None
    try:
        st, tgt = prepare_mount(source, target, name=name, store=store, config=config, namespace=ns)
        if tree.is_remote(st.source) and ns is not None and load_policy(config).netns == "target":
            netns_fd = fetch_netns(load_policy(config), ns)[0]
        _start_daemon(st, tgt, ns, config, netns_fd=netns_fd)
    finally:
        if ns is not None:
            os.close(ns.fd)
        if netns_fd is not None:
            os.close(netns_fd)


def prepare_mount(source: str, target: str, *, name: Optional[str] = None, store: Optional[str] = None,
                  config: Optional[str] = None, namespace: Optional[Namespace] = None) -> tuple[tree.Store, str]:
    """Everything ``hsmfs mount`` does before it starts the filler: checks, store, stub tree.

    Returns the store and the resolved target (with namespace, a path in that namespace).
    mount.hsmfs calls it too (hsmfs.mounthelper).
    """
    _need_root("hsmfs mount")
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
        _populate(src, st)
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
          f"{stats.symlinks} symlinks, {stats.hardlinks} hardlinks ({_size(stats.bytes)} at the origin)",
          file=sys.stderr)


def _populate(src: str, st: tree.Store) -> None:
    from hsmfs.populate import populate

    if not sys.stderr.isatty():
        stats = populate(src, st)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("stubs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task("populate", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            stats = populate(src, st, progress=progress)
    left = "".join(f"; {n} {what}" for n, what in (
        (stats.vanished, "names vanished or changed while populate read the source (left out, named above)"),
        (stats.submounts, "mount points left out (populate does not cross them)")) if n)
    print(f"stub tree of {escape(src)}: {stats.files} files, {stats.dirs} directories, {stats.symlinks} symlinks "
          f"({_size(stats.bytes)} in the source){left}", file=sys.stderr)


def _start_daemon(st: tree.Store, target: str, namespace: Optional[Namespace], config: Optional[str], *,
                  netns_fd: Optional[int] = None) -> None:
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
        print(f"hsmfs: {escape(st.source)} is live at {escape(where)} (filler pid {proc.pid}, log {log_file})",
              file=sys.stderr)
        return
    if word is None and proc.poll() is None:
        raise FillerFailed(f"the filler did not report ready within {READY_TIMEOUT:.0f} s; see {log_file}")
    proc.wait()
    if isinstance(word, HsmfsError):
        word.hint = word.hint or f"see {log_file}"
        raise word
    raise FillerFailed(f"the filler exited ({proc.returncode}) before the view was live", hint=f"see {log_file}")


@app.command()
def umount(
    target: str = typer.Argument(..., help="The view's directory, or the mount name."),
    lazy: bool = typer.Option(False, "--lazy", "-l", help="Detach now even if busy; the filler serves "
                              "the detached view until its last user is gone."),
) -> None:
    """Unmount a view and stop its filler."""
    _need_root("hsmfs umount")
    rt = _find(target)
    reply = request(rt.name, {"op": "umount", "lazy": lazy})
    others = ", ".join(escape(m) for m in reply.get("other_mounts") or [])
    if not reply.get("ok"):
        if others:
            raise Busy(f"the tree of {escape(rt.target)} is also mounted {others}: they would read unfilled files as "
                       "holes once its filler stops", hint="unmount those first, or use --lazy (the filler "
                       "then serves them until the last one is gone)")
        if reply.get("errno") == 16:
            holders = _holders(rt.target) if rt.namespace is None else []
            who = "; ".join(holders) if holders else "see fuser -vm " + rt.target
            raise Busy(f"{escape(rt.target)} is busy: {escape(who)}", hint="stop those processes, or use --lazy")
        raise HsmfsError(f"umount of {escape(rt.target)} failed: {reply.get('error')}")
    foreign = ", ".join(escape(m) for m in reply.get("foreign_mounts") or [])
    if lazy:
        also = f" and the other mounts of its tree ({', '.join(filter(None, (others, foreign)))})" \
            if others or foreign else ""
        print(f"hsmfs: detached {escape(rt.target)}; its filler serves the users it still has{also}, then exits",
              file=sys.stderr)
        return
    if foreign:  # any user can make such a copy and keep it: it does not block, it is served
        print(f"hsmfs: unmounted {escape(rt.target)}; copies of it in mount namespaces that another user "
              f"namespace owns remain ({foreign}): its filler (supervisor pid {rt.pid}) serves them until they "
              "are gone, then exits", file=sys.stderr)
        return
    deadline = time.monotonic() + 60
    while rt.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if rt.alive():
        print(f"hsmfs: unmounted {escape(rt.target)}; its supervisor (pid {rt.pid}) has not stopped yet, see {rt.log}",
              file=sys.stderr)
        return
    print(f"hsmfs: unmounted {escape(rt.target)}", file=sys.stderr)


def _holders(path: str) -> list[str]:
    """Processes with an fd, cwd, root or mapping under path (in this namespace)."""
    out = []
    prefix = path.rstrip("/") + "/"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        links = []
        try:
            links = [os.readlink(f"/proc/{pid}/{x}") for x in ("cwd", "root")]
            links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            with open(f"/proc/{pid}/maps") as f:
                links += [line.split(maxsplit=5)[-1].strip() for line in f if "/" in line]
        except OSError:
            pass
        if any(x == path or x.startswith(prefix) for x in links):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            out.append(f"{comm} (pid {pid})")
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def tree_summary(store: str) -> dict[str, dict[str, int]]:
    """Files and bytes by state, from the store tree (records, state log, allocated blocks).

    "pinned" counts pinned files whatever their state (they are in the other rows too).
    """
    from hsmfs.state import StateLog, tree_files

    files: Counter[str] = Counter()
    size: Counter[str] = Counter()
    resident: Counter[str] = Counter()
    log_ = StateLog(store)
    try:
        for f in tree_files(os.path.join(store, "tree"), log_):
            for row in (f.state.value, "pinned") if f.pinned else (f.state.value,):
                files[row] += 1
                size[row] += f.st.st_size
                resident[row] += tree.resident_bytes(f.st)
    finally:
        log_.close()
    return {st: {"files": files[st], "bytes": size[st], "resident_bytes": resident[st]}
            for st in ("stub", "resident", "unverified", "dirty", "local", "pinned")}


@app.command()
def status(
    name: Optional[str] = typer.Argument(None, help="Only this mount (name or target)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Running mounts: files and bytes by state, events served, fill latency."""
    _need_root("hsmfs status")
    recs = [_find(name)] if name else runtime_records()
    out: list[dict[str, Any]] = []
    for rt in recs:
        d: dict[str, Any] = {"name": rt.name, "source": rt.source, "target": rt.target,
                             "namespace": rt.namespace, "store": rt.store, "pid": rt.pid, "log": rt.log}
        try:
            reply = request(rt.name, {"op": "status"}, timeout=10)
            d["running"] = bool(reply.get("ok"))
            d["filler_pid"] = reply.get("filler_pid")
            d["restarts"] = reply.get("restarts")
            d["filler"] = reply.get("filler")
            d["view_mounted"] = reply.get("view_mounted")
            d["origin"] = reply.get("source")
            d["other_mounts"] = reply.get("other_mounts")
        except (OSError, Busy) as e:
            d["running"] = False
            d["error"] = str(e)
        d["states"] = tree_summary(rt.store)
        out.append(d)
    if as_json:
        print(json.dumps(out, indent=1))
        return
    if not out:
        print("no hsmfs mounts are running")
    for d in out:
        where = d["target"] + (f" (namespace {d['namespace']})" if d["namespace"] else "")
        if d.get("view_mounted") is False:
            others = ", ".join(escape(m) for m in d.get("other_mounts") or [])
            where += f" (unmounted; still serving its tree, also mounted {others})" if others else " (unmounted)"
        print(f"{d['name']}: {escape(d['source'])} -> {escape(where)}  supervisor pid {d['pid']}, filler pid "
              f"{d.get('filler_pid')} ({d.get('restarts')} restarts) {'running' if d['running'] else 'NOT RESPONDING'}")
        for state, v in d["states"].items():
            print(f"  {state:<10} {v['files']:>8} files  {_size(v['bytes']):>10}  "
                  f"({_size(v['resident_bytes'])} on disk)")
        o = d.get("origin")
        if o:
            print(f"  origin {o['origin']} via netns {o['netns']}: {o['origin_state']}; "
                  f"fetched {_size(o['bytes_fetched'])} "
                  f"in {o['requests']} requests over {o['connections']} connections, {o['retries']} retries, "
                  f"{o['failures']} failed, {o['hash_failures']} hash failures")
        f = d.get("filler")
        if f:
            lat = f["fill_latency_ms"]
            print(f"  events {f['events']}, fills {f['fills']} ({_size(f['fill_bytes'])}), errors {f['fill_errors']}, "
                  f"fill latency p50 {lat['p50']} ms p99 {lat['p99']} ms, queue overflows {f['overflows']}")
            print(f"  evictions {f['evictions']} ({_size(f['evicted_bytes'])} freed), store full {f['enospc']} times")
            if f.get("hash_failures"):
                print(f"  HASH FAILURES {f['hash_failures']} (fetched bytes that were not the published ones: see "
                      f"{d['log']})")
            b = f.get("budget")
            if b:
                print(f"  budget {_size(b['max_resident_bytes'])}: {_size(b['resident_bytes'])} resident, evicts past "
                      f"{_size(b['high'])} down to {_size(b['low'])}")


@app.command()
def publish(
    src: str = typer.Argument(..., help="The local directory to publish."),
    dest: str = typer.Argument(..., help="A local directory (serve it over HTTP) or s3://bucket/prefix."),
    parent: Optional[str] = typer.Option(None, help="Id of the version this one follows (default: the one DEST's "
                                         "manifest names now)."),
    no_parent: bool = typer.Option(False, "--no-parent", help="Name no parent version."),
) -> None:
    """Publish SRC as a versioned manifest plus content objects named by their sha256 (docs/manifest.md).

    Objects already in DEST are not written again: a second publish of a changed tree uploads only
    what changed, and versions share objects. Mount the result with
    'hsmfs mount https://HOST/PATH/manifest TARGET' or 'hsmfs mount s3://bucket/prefix TARGET'.
    """
    from hsmfs.publish import publish as do_publish

    if not os.path.isdir(src):
        raise SourceMissing(f"{escape(src)} is not a directory", hint="give the directory to publish as SRC")
    if dest.startswith("s3://"):
        from hsmfs.sources.s3 import split_s3

        split_s3(dest)
    stats = do_publish(src, dest, parent=parent, no_parent=no_parent)
    print(f"hsmfs: published {escape(src)} to {escape(dest)}: version {stats.id}"
          + (f" (parent {stats.parent[:12]})" if stats.parent else "")
          + f"; {stats.files} files ({_size(stats.bytes)}), {stats.dirs} directories, {stats.symlinks} symlinks, "
          f"{stats.hardlinks} hardlinks; {stats.objects} objects, {stats.uploaded} written "
          f"({_size(stats.uploaded_bytes)})"
          + (f"; {stats.left_out} entries left out (named above)" if stats.left_out else ""), file=sys.stderr)
    print(stats.id)


@app.command()
def refresh(
    target: str = typer.Argument(..., help="The view's directory or the mount name (running), or a store directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
    config: Optional[str] = typer.Option(None, help="Policy TOML file for a store no mount serves (its netns and "
                                         "fetch settings); a running mount uses its own."),
) -> None:
    """Follow the source: a new manifest version, or a rescan of a local source directory.

    New entries appear as stubs, deleted ones go, changed stubs get their new record, changed
    clean resident files become stubs again (through eviction: never one in use), mode, owner and
    xattr changes are applied; dirty files (changed by a user) are kept and reported, never
    overwritten. Exit 0; 75 if some files were in use (a later refresh does them); 74 if some
    entries could not be made or removed (each is named).
    """
    _need_root("hsmfs refresh")
    if os.path.isfile(os.path.join(target, "hsmfs.json")):
        from hsmfs.refresh import refresh_offline

        policy = load_policy(config)
        st = _offline_store(os.path.abspath(target))
        fd, label = fetch_netns(policy, None) if tree.is_remote(st.source) else (None, "host")
        try:
            report = refresh_offline(st, policy, netns_fd=fd, netns_label=label).as_dict()
        finally:
            if fd is not None:
                os.close(fd)
    else:
        rt = _find(target)
        reply = request(rt.name, {"op": "refresh"}, timeout=3600)
        if not reply.get("ok"):
            raise HsmfsError(f"refresh of {escape(rt.target)} failed: {reply.get('error')}",
                             hint=f"see {rt.log}")
        report = reply["report"]
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        for path in report["dirty_kept"]:
            print(f"kept     {escape(path)}: dirty (changed by a user); the source's new version is not applied")
        for path in report["busy"]:
            print(f"later    {escape(path)}: in use; the next refresh replaces it")
        for path in report["kept"]:
            print(f"kept     {escape(path)}: a user's file or directory holds the name; left as it is")
        for line in report["errors"]:
            print(f"error    {escape(line)}", file=sys.stderr)
    print(f"hsmfs: refreshed to {report['version']}: {report['added']} added, {report['removed']} removed, "
          f"{report['replaced']} stubs replaced, {report['restubbed']} resident files made stubs again, "
          f"{report['metadata']} metadata changes; {len(report['dirty_kept'])} dirty kept, "
          f"{len(report['busy'])} in use",
          file=sys.stderr)
    if report["error_code"]:
        err = with_code(int(report["error_code"]),
                        f"refresh failed: {report['errors'][0] if report['errors'] else ''}")
        raise err
    if report["errors"]:
        raise typer.Exit(os.EX_IOERR)  # some entries could not be made or removed (each is named)
    if report["busy"]:
        raise typer.Exit(Busy.exit_code)


@app.command("stat")
def stat_cmd(
    files: list[str] = typer.Argument(..., help="Files in a view or a store."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """State of each file: stub, filled (its commit pending), resident, unverified, dirty or local, whether
    it is pinned, its size and the bytes it holds on disk."""
    from hsmfs.files import locate
    from hsmfs.state import FileState, StateLog, key_at

    rows = []
    failed = 0  # the exit code
    stores: dict[str, tuple[StateLog, tree.PathTable]] = {}
    records = runtime_records()
    try:
        for p in files:
            try:
                s = os.lstat(p)
                place = locate(p, records)
                if place.store not in stores:
                    tree.Store.load(place.store)  # a damaged hsmfs.json: a DataError (65)
                    stores[place.store] = (StateLog(place.store), tree.PathTable(place.store))
                log_, table = stores[place.store]
                rec = tree.read_record(p) if stat.S_ISREG(s.st_mode) else None
                key = key_at(p) if rec is not None else None
                state = log_.state(rec, s, key)
                if state is FileState.STUB and key is not None and place.running is not None:
                    state = _filled(place.running, key) or state
                rows.append({"path": p, "state": state.value, "size": s.st_size,
                             "resident_bytes": tree.resident_bytes(s),
                             "pinned": key is not None and log_.pinned(key),
                             "source": table.get(rec.path_id) if rec is not None else None})
            except (OSError, HsmfsError) as e:
                # the first failure's code: 65 for a damaged record, else 66 (the file cannot be read)
                failed = failed or (e.exit_code if isinstance(e, HsmfsError) else SourceMissing.exit_code)
                print(f"hsmfs: {escape(p)}: {escape(str(getattr(e, 'strerror', None) or e))}", file=sys.stderr)
    finally:
        for log_, table in stores.values():
            log_.close()
            table.close()
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['state']:<10} {'pinned' if r['pinned'] else '':<6} {r['size']:>12} {r['resident_bytes']:>12}  "
                  f"{escape(str(r['path']))}")
    if failed:
        raise typer.Exit(failed)


def _filled(rt: RuntimeRecord, key: bytes) -> Any:
    """FileState.FILLED if the running filler rt filled the file and its commit is pending."""
    from hsmfs.state import FileState, split_key

    htype, handle = split_key(key)
    try:
        reply = request(rt.name, {"op": "states", "handles": [[htype, handle.hex()]]}, timeout=10, wait=2)
    except (OSError, Busy):
        return None
    got = (reply.get("states") or [None])[0] if reply.get("ok") else None
    return FileState(got) if got else None


def _progress(total: int, label: str) -> Any:
    """A rich progress bar over bytes on a terminal, or None."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                   TimeRemainingColumn(), transient=True)
    bar.start()
    bar.add_task(label, total=total)
    return bar


def _files(paths: list[str]) -> list[tuple[Any, list[Any]]]:
    from hsmfs.files import collect

    return collect(paths)


@app.command()
def evict(
    paths: list[str] = typer.Argument(..., help=PATHS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: one object per file."),
) -> None:
    """Turn resident files back into stubs and free their blocks.

    Never evicts a file a user changed (dirty), a pinned file, or one that anyone has open or
    mapped (checked with a write lease). Works through the filler of a running mount, and
    directly on a store that no mount serves. Prints what it did with each file and why it
    skipped one, then bytes freed. Exit 0, or 75 if some files were in use (try again later).
    """
    from hsmfs.filler.evict import FILLING, IN_USE, Outcome
    from hsmfs.process import ignore_lease_breaks

    _need_root("hsmfs evict")
    work = _files(paths)
    stores = {place.store: _offline_store(place.store) for place, _ in work if place.running is None}
    if stores:
        ignore_lease_breaks()
    total = sum(f.st.st_size for _, files in work for f in files)
    rows: list[tuple[Any, Outcome]] = []
    bar = _progress(total, "evict")
    try:
        for place, files in work:
            done = _evict_through(place.running, files) if place.running is not None \
                else _evict_here(stores[place.store], files)
            for f, outcome in done:
                rows.append((f, outcome))
                if bar is not None:
                    bar.advance(0, f.st.st_size)
    finally:
        if bar is not None:
            bar.stop()
    freed = sum(o.freed for _, o in rows)
    evicted = sum(o.evicted for _, o in rows)
    skipped = Counter(o.reason for _, o in rows if not o.evicted)
    if as_json:
        print(json.dumps([{"path": f.shown, **o.as_dict()} for f, o in rows], indent=1))
    else:
        for f, o in rows:
            print(f"evicted  {_size(o.freed):>10}  {escape(f.shown)}" if o.evicted
                  else f"skipped  {escape(f.shown)}: {escape(o.reason)}")
    why = "; ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    print(f"hsmfs: evicted {evicted} files, freed {_size(freed)}" + (f"; skipped {sum(skipped.values())}: {why}"
          if skipped else ""), file=sys.stderr)
    if skipped[IN_USE] or skipped[FILLING] or skipped[NOT_DONE]:
        raise typer.Exit(Busy.exit_code)


def _evict_through(rt: RuntimeRecord, files: list[Any]) -> Iterator[tuple[Any, Any]]:
    """Evict files through the filler of the running mount rt, by file handle, in batches.

    If the filler restarts mid-way, the files of the batch it was working on and the rest are
    reported as not done (the control socket says so): nothing is lost, a second run does them."""
    from hsmfs.filler.evict import Outcome
    from hsmfs.state import key_at, split_key

    for i in range(0, len(files), EVICT_BATCH):
        batch = files[i:i + EVICT_BATCH]
        handles = []
        for f in batch:
            htype, h = split_key(key_at(f.path))  # no open: no event
            handles.append([htype, h.hex()])
        try:
            reply = request(rt.name, {"op": "evict", "handles": handles}, timeout=300)
        except Busy as e:
            print(f"hsmfs: {e.message}", file=sys.stderr)
            for f in files[i:]:
                yield f, Outcome(False, NOT_DONE)
            return
        if not reply.get("ok"):
            raise with_code(int(reply.get("exit_code", HsmfsError.exit_code)),
                            f"the filler of {escape(rt.target)} refused to evict: {reply.get('error')}")
        for f, r in zip(batch, reply["results"]):
            yield f, Outcome(bool(r["evicted"]), str(r["reason"]), int(r["freed"]))


def _evict_here(st: tree.Store, files: list[Any]) -> Iterator[tuple[Any, Any]]:
    """Evict files of a store that no running mount serves (no group, so no marks to change)."""
    from hsmfs.filler.evict import BATCH, IN_USE, Evictor, Outcome
    from hsmfs.filler.service import store_source
    from hsmfs.policy import Policy
    from hsmfs.state import StateLog

    # a remote store's objects are fetched (host network) only to compare an unverified file
    source, table = store_source(st, Policy(), watch_routes=False), tree.PathTable(st.path)
    log_ = StateLog(st.path, writable=True)
    # after an unclean end a resident file may hide a user's fdatasync'd write: compare each first
    evictor = Evictor(source, table, log_, distrust=st.mounted)
    try:
        for i in range(0, len(files), BATCH):
            batch = files[i:i + BATCH]
            opened: list[tuple[Any, int]] = []
            for f in batch:
                try:
                    opened.append((f, os.open(f.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)))
                except OSError as e:
                    yield f, Outcome(False, IN_USE if e.errno == errno.ETXTBSY else f"cannot open: {e.strerror}")
            try:
                outcomes = evictor.evict([fd for _f, fd in opened])
            finally:
                for _f, fd in opened:
                    os.close(fd)
            yield from zip([f for f, _fd in opened], outcomes)
    finally:
        source.close()
        table.close()
        log_.close()


def _offline_store(path: str) -> tree.Store:
    """A store that no running mount serves, checked before anything is evicted from it."""
    from hsmfs.views import other_mounts

    st = tree.Store.load(path)
    if st is None:
        raise SourceMissing(f"{path} is not an hsmfs store")
    if st.schema != tree.SCHEMA:
        raise Busy(f"{path} was made by hsmfs 0.1 and is not upgraded yet",
                   hint="mount it once with 'hsmfs mount' (that upgrades it), then evict")
    mounted = other_mounts(st.tree, st.tree)
    if mounted:  # a view whose filler is gone: its marks are not ours to change
        raise Busy(f"the tree of {st.path} is mounted {', '.join(map(str, mounted))}, but no running hsmfs mount "
                   "serves it", hint="unmount it, or evict through its running mount ('hsmfs status' lists them)")
    return st


def _pin(paths: list[str], pinned: bool) -> None:
    from hsmfs.state import OP_PIN, OP_UNPIN, StateLog, key_at

    _need_root("hsmfs pin" if pinned else "hsmfs unpin")
    changed = same = 0
    for place, files in _files(paths):
        log_ = StateLog(place.store, writable=True)
        try:
            todo = []
            for f in files:
                if tree.read_record(f.path) is None:
                    print(f"skipped  {escape(f.shown)}: not from the source (made by a user)")
                    continue
                key = key_at(f.path)
                if log_.pinned(key) == pinned:
                    same += 1
                    continue
                todo.append((key, OP_PIN if pinned else OP_UNPIN, 0))
                print(f"{'pinned' if pinned else 'unpinned':<8} {escape(f.shown)}")
            log_.record(todo, durable=True)  # the filler reads it before every eviction
            changed += len(todo)
        finally:
            log_.close()
    word = "pinned" if pinned else "unpinned"
    print(f"hsmfs: {word} {changed} files" + (f" ({same} were {word} already)" if same else ""), file=sys.stderr)


@app.command()
def pin(paths: list[str] = typer.Argument(..., help=PATHS_HELP)) -> None:
    """Never evict these files, by hand or for the space budget; kept across restarts.

    Pinning does not fetch a stub: 'hsmfs prefetch' does.
    """
    _pin(paths, True)


@app.command()
def unpin(paths: list[str] = typer.Argument(..., help=PATHS_HELP)) -> None:
    """Let these files be evicted again."""
    _pin(paths, False)


@app.command()
def prefetch(
    paths: list[str] = typer.Argument(..., help=PATHS_HELP),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=256, help="Files filled at once."),
) -> None:
    """Fill stubs now, in parallel, before anyone reads them (progress bar on a terminal).

    Needs the mount to be running. Exit 0, or 74 if some files could not be filled (the log of
    the mount says why).
    """
    from concurrent.futures import ThreadPoolExecutor

    from hsmfs.state import FileState, StateLog, key_at

    _need_root("hsmfs prefetch")
    todo = []
    resident = 0
    for place, files in _files(paths):
        if place.running is None:
            raise NotMounted(f"no running hsmfs mount serves {place.store}",
                             hint="mount it first: hsmfs mount SOURCE TARGET")
        log_ = StateLog(place.store)
        try:
            for f in files:
                rec = tree.read_record(f.path)
                if rec is not None and log_.state(rec, f.st, key_at(f.path)) is FileState.STUB:
                    todo.append(f)
                else:
                    resident += 1
        finally:
            log_.close()
    total = sum(f.st.st_size for f in todo)
    failed: list[str] = []
    bar = _progress(total, "prefetch")
    t0 = time.monotonic()

    def fill(f: Any) -> None:
        # the open is the fill: the stub's inode mark raises FAN_OPEN_PERM, the filler fills
        # the whole file before it answers
        try:
            os.close(os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
        except OSError as e:
            failed.append(f"{escape(f.shown)}: {e.strerror}")
        if bar is not None:
            bar.advance(0, f.st.st_size)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(fill, todo))
    finally:
        if bar is not None:
            bar.stop()
    took = time.monotonic() - t0
    for line in failed:
        print(f"failed   {line}", file=sys.stderr)
    rate = f" in {took:.1f} s ({_size(total / took)}/s)" if todo and took > 0 else ""
    print(f"hsmfs: prefetched {len(todo) - len(failed)} files ({_size(total)}){rate}; {resident} were resident "
          "already" + (f"; {len(failed)} failed" if failed else ""), file=sys.stderr)
    if failed:
        raise typer.Exit(os.EX_IOERR)


@app.command()
def doctor(store: str = typer.Option(STORE_ROOT, help="Store directory to check."),
           source: Optional[list[str]] = typer.Option(None, "--source", help="A source to check the path of "
                                                      "(repeatable; the running mounts' sources are checked too).")
           ) -> None:
    """Check kernel, store filesystem and privileges; say what is missing and how to fix it.

    Warns (without failing) when someone other than root can replace a source root.
    """
    from hsmfs.doctor import format_checks, run_checks

    sources = list(dict.fromkeys([*(source or []), *(rt.source for rt in runtime_records()
                                                     if not tree.is_remote(rt.source))]))
    checks = run_checks(store, sources)
    print(format_checks(checks))
    if not all(c.ok for c in checks):
        raise typer.Exit(Unavailable.exit_code)


@app.command("install-units")
def install_units(
    root: str = typer.Option("/", "--root", help="Install under this directory instead of /."),
) -> None:
    """Install hsmfs@.service in ROOT/etc/systemd/system and link ROOT/sbin/mount.hsmfs to hsmfs.

    Then mount -t hsmfs, fstab lines and .mount units with Type=hsmfs work (docs/systemd.md).
    Runs systemctl daemon-reload when ROOT is / and systemd is running.
    """
    from hsmfs.systemd import install_units as install

    if os.path.realpath(root) == "/":
        _need_root("hsmfs install-units")
    for line in install(root):
        print(f"hsmfs: {line}", file=sys.stderr)


def _setup_logging() -> None:
    """Warnings of the work done in this process (populate: vanished entries, submounts) on stderr, escaped."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("hsmfs: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _report(e: HsmfsError) -> None:
    if isinstance(e, Interrupted):
        print("hsmfs: interrupted", file=sys.stderr)
        return
    # a message may have several lines of its own (a policy file's mistakes); each is escaped,
    # and every name a user chose was escaped where the message was made
    print("hsmfs: error: " + "\n".join(escape(line) for line in str(e).split("\n")), file=sys.stderr)


def main() -> None:
    if os.path.basename(sys.argv[0]) == "mount.hsmfs" or os.path.basename(sys.argv[0]).startswith("mount.hsmfs."):
        from hsmfs.mounthelper import main as mount_helper  # /sbin/mount.hsmfs -> hsmfs

        run_main(lambda: mount_helper(sys.argv[1:]))
    _setup_logging()
    run_main(app, report=_report, debug=lambda: _debug)
