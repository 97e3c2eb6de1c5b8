"""The hsmfs command line (typer): commands and printing. Exceptions become exit codes in
hsmfs.process.run_main, as in every hsmfs process."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import typer

from hsmfs import tree
from hsmfs.control import RuntimeRecord, request, runtime_records
from hsmfs.errors import (
    Busy,
    HsmfsError,
    Interrupted,
    NotMounted,
    SourceMissing,
    Unavailable,
    UsageError,
    describe_oserror,
    need_root,
    with_code,
)
from hsmfs.names import EscapingFormatter, escape
from hsmfs.names import human_size as _size
from hsmfs.places import STORE_ROOT
from hsmfs.policy import load_policy
from hsmfs.process import run_main

READY_TIMEOUT = 120.0
PATHS_HELP = "Files or directories (recursively) in a view or a store."
EVICT_BATCH = 256  # handles per control request (its line is limited to 64 KiB)
STATUS_WAIT = 2.0  # seconds hsmfs status waits for a filler socket that is not there (restarting, or gone)
NOT_DONE = "not done: its filler restarted; run hsmfs evict again"
# how hsmfs stat names a state where its one word (--json's) says too little
STATE_WORDS = {"filled": "filled, commit pending"}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Lazy views of a source tree: stubs filled on first access (fanotify pre-content).")
_debug = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    global _debug
    _debug = debug


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
    from hsmfs import mounting  # here, not at the top: every other command starts without it (70 ms)

    mounting.mount(source, target, name=name, store=store, config=config, namespace=namespace,
                   progress=_populate_bar if sys.stderr.isatty() else None)


@contextmanager
def _populate_bar() -> Iterator[Callable[[int, int], None]]:
    """The bar hsmfs mount shows on a terminal while it builds the stub tree."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("stubs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("populate", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


@app.command()
def umount(
    target: str = typer.Argument(..., help="The view's directory, or the mount name."),
    lazy: bool = typer.Option(False, "--lazy", "-l", help="Detach now even if busy; the filler serves "
                              "the detached view until its last user is gone."),
) -> None:
    """Unmount a view and stop its filler."""
    need_root("hsmfs umount")
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
    if not rt.wait_exit(60):
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
    need_root("hsmfs status")
    recs = [_find(name)] if name else runtime_records()
    out: list[dict[str, Any]] = []
    for rt in recs:
        d: dict[str, Any] = {"name": rt.name, "source": rt.source, "target": rt.target,
                             "namespace": rt.namespace, "store": rt.store, "pid": rt.pid, "log": rt.log}
        try:
            # a short wait for a restarting filler's socket: one mount must not hold up the list
            reply = request(rt.name, {"op": "status"}, timeout=10, wait=STATUS_WAIT)
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
        try:
            d["states"] = tree_summary(rt.store)
        except OSError as e:
            if name is not None:
                raise
            if not rt.alive():
                continue  # it ended while we looked (its store may be gone with it)
            # its store is not visible here (a mount namespace of its own?): the others are still listed
            d["states"] = {}
            d["store_error"] = describe_oserror(e)
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
        if d.get("store_error"):
            print(f"  store: {escape(d['store_error'])}")
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
            latency = "no fills yet" if lat.get("p50") is None else \
                f"fill latency p50 {lat['p50']} ms p99 {lat['p99']} ms"
            print(f"  events {f['events']}, fills {f['fills']} ({_size(f['fill_bytes'])}), errors {f['fill_errors']}, "
                  f"{latency}, queue overflows {f['overflows']}")
            print(f"  evictions {f['evictions']} ({_size(f['evicted_bytes'])} freed), store full {f['enospc']} times")
            if f.get("hash_failures"):
                print(f"  HASH FAILURES {f['hash_failures']} (fetched bytes that were not the published ones: see "
                      f"{d['log']})")
            if f.get("user_waits"):
                print(f"  {f['user_waits']} fills waited for a worker because their user held fills_per_user of them")
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
    need_root("hsmfs refresh")
    if os.path.isfile(os.path.join(target, "hsmfs.json")):
        from hsmfs.mounting import fetch_netns
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
            shown = STATE_WORDS.get(str(r["state"]), str(r["state"]))
            print(f"{shown:<10} {'pinned' if r['pinned'] else '':<6} {r['size']:>12} {r['resident_bytes']:>12}  "
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

    need_root("hsmfs evict")
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
    from hsmfs.policy import Policy
    from hsmfs.sources.store import store_source
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

    need_root("hsmfs pin" if pinned else "hsmfs unpin")
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

    need_root("hsmfs prefetch")
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
        need_root("hsmfs install-units")
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
