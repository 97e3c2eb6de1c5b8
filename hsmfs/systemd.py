"""hsmfs under systemd: the hsmfs@.service main process, unit names, and ``hsmfs install-units``.

``hsmfs@INSTANCE.service`` (INSTANCE = ``systemd-escape --path MOUNTPOINT``) runs
``python -m hsmfs.filler --systemd MOUNTPOINT``: the filler itself is the unit's main process and
systemd is its supervisor (docs/systemd.md). On start it

1. takes the fanotify group back from the unit's fd store (``LISTEN_FDNAMES=group``) if a dead
   predecessor left it there, else creates it and stores it at once (``FDSTORE=1``), before any
   mark: from then on a crash keeps pending events blocked instead of letting readers through;
2. attaches the view (marks, detached clone, move_mount; hsmfs.session.attach_view) unless the
   group's view is still there;
3. answers what a dead predecessor left pending (Filler.take_over), then serves;
4. sends ``READY=1``, ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``, and on SIGTERM
   ``STOPPING=1``, unmounts the view and exits 0.

It exits 0 by itself when the view is unmounted behind its back (``umount``, ``hsmfs umount``)
and no other mount of the tree (a bind mount, a later namespace's copy, an overlay) is left: those
read stubs through marks that go with the group (hsmfs.session.OtherMountsWatch).
A handled failure never exits with the view mounted: the fd store is dropped when the unit stops,
and a view whose group is gone shows stubs' holes as data.

Which store (and policy) to serve comes from ``/run/hsmfs/units/INSTANCE.json``, written by
``mount.hsmfs`` before it starts the unit (:func:`write_params`); without it the store is
``/var/lib/hsmfs/INSTANCE`` and there is no policy file.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from typing import Callable, Optional

from hsmfs import sdnotify, tree
from hsmfs.errors import Busy, ConfigError, HsmfsError, SourceMissing, SystemCallFailed
from hsmfs.filler.takeover import new_session
from hsmfs.places import RUN_DIR, STORE_ROOT, UNIT_PARAMS_DIR
from hsmfs.policy import load_policy
from hsmfs.process import ignore_lease_breaks, setup_logging
from hsmfs.session import Session, attach_view, new_group, view_alive
from hsmfs.views import detach, is_mountpoint, marked_mount

log = logging.getLogger("hsmfs.systemd")

TEMPLATE = "hsmfs@.service"
DEFAULT_PYTHON = "/usr/bin/python3"  # what hsmfs/data/units/hsmfs@.service runs; install-units puts in sys.executable
START_EXTENSION_USEC = 10 * 60 * 1_000_000  # marking a large tree may outlast TimeoutStartSec=


# --- unit names ---------------------------------------------------------------------------------

_VALID = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def escape_path(path: str) -> str:
    """``systemd-escape --path PATH``: /srv/my-data -> srv-my\\x2ddata, / -> -."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r} is not a normalized path")
    if not parts:
        return "-"
    raw = "/".join(parts).encode("utf-8", "surrogateescape")
    out = []
    for i, b in enumerate(raw):
        if b == ord("/"):
            out.append("-")
        elif b in _VALID and not (i == 0 and b == ord(".")):  # no unit name starts with "."
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def unescape_path(instance: str) -> str:
    """``systemd-escape --unescape --path``: srv-my\\x2ddata -> /srv/my-data."""
    if instance == "-":
        return "/"
    out = bytearray()
    i = 0
    while i < len(instance):
        c = instance[i]
        if c == "-":
            out += b"/"
        elif c == "\\" and instance[i + 1:i + 2] == "x" and len(instance) >= i + 4:
            out.append(int(instance[i + 2:i + 4], 16))
            i += 3
        else:
            out += c.encode()
        i += 1
    return "/" + out.decode("utf-8", "surrogateescape")


def service_name(mountpoint: str) -> str:
    """The unit serving a mount point: /srv/data -> hsmfs@srv-data.service."""
    return f"hsmfs@{escape_path(mountpoint)}.service"


# --- what the service serves ----------------------------------------------------------------------


@dataclass
class Params:
    """/run/hsmfs/units/INSTANCE.json: the store and policy of the view at a mount point.

    Keys: ``store`` (absolute path of the store directory), ``config`` (policy TOML or null).
    """

    store: str
    config: Optional[str] = None


def params_path(mountpoint: str) -> str:
    return os.path.join(UNIT_PARAMS_DIR, escape_path(mountpoint) + ".json")


def write_params(mountpoint: str, params: Params) -> None:
    os.makedirs(UNIT_PARAMS_DIR, mode=0o700, exist_ok=True)
    tree.atomic_write(params_path(mountpoint), json.dumps({"store": params.store, "config": params.config}).encode())


def read_params(mountpoint: str) -> Params:
    try:
        with open(params_path(mountpoint)) as f:
            d = json.load(f)
        return Params(store=str(d["store"]), config=d.get("config"))
    except FileNotFoundError:
        return Params(store=os.path.join(STORE_ROOT, escape_path(mountpoint)))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{params_path(mountpoint)} is damaged ({e}); mount again to rewrite it") from None


# --- the service ----------------------------------------------------------------------------------


class _Store:
    """The fds this unit keeps in systemd's fd store: the group, and a memfd with a start count."""

    def __init__(self) -> None:
        passed = sdnotify.listen_fds()
        self.group: Optional[int] = None
        self.state: Optional[int] = None
        for name, fds in passed.items():
            for fd in fds:
                if name == "group" and self.group is None:
                    self.group = fd
                elif name == "state" and self.state is None:
                    self.state = fd
                else:
                    log.warning("closing an unexpected fd %d (%s) from the fd store", fd, name)
                    sdnotify.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
                    os.close(fd)

    def keep_group(self, group: int) -> None:
        self.group = group
        # FDPOLL=0: never drop it on EPOLLHUP/EPOLLERR (a fanotify fd signals neither, but be sure)
        if not sdnotify.notify("FDSTORE=1\nFDNAME=group\nFDPOLL=0", [group]):
            log.warning("no $NOTIFY_SOCKET: the group will not survive a crash of this process")

    def count_start(self) -> int:
        """How many times this unit's filler has started since the store was created (1 = first)."""
        if self.state is None:
            self.state = os.memfd_create("hsmfs-state", os.MFD_CLOEXEC)
            sdnotify.notify("FDSTORE=1\nFDNAME=state", [self.state])
        try:
            starts = int(json.loads(os.pread(self.state, 4096, 0) or b"{}").get("starts", 0)) + 1
        except (ValueError, AttributeError):
            starts = 1
        data = json.dumps({"starts": starts}).encode()
        os.ftruncate(self.state, 0)
        os.pwrite(self.state, data, 0)
        return starts


class Service:
    def __init__(self, target: str) -> None:
        self.target = target
        self.unit = service_name(target)
        self.fds = _Store()

    def run(self) -> int:
        from hsmfs.filler.service import Serving
        from hsmfs.filler.takeover import pin_fd_limit

        group = self.fds.group
        try:
            params = read_params(self.target)
            policy = load_policy(params.config)
            logging.getLogger().setLevel(policy.log_level.upper())
            pin_fd_limit()
            ignore_lease_breaks()
            store = tree.Store.load(params.store)
            if store is not None and store.schema != tree.SCHEMA:
                raise SourceMissing(f"the store {params.store} was made by hsmfs 0.1",
                                    hint=f"mount it with mount -t hsmfs SOURCE {self.target}: that upgrades it")
            if store is None or not store.populated:
                raise SourceMissing(f"no populated hsmfs store at {params.store}",
                                    hint=f"mount it with: mount -t hsmfs SOURCE {self.target} [-o store=DIR]")
            if group is not None and view_alive(group):
                log.info("took the group back from the fd store; the view at %s stayed live", self.target)
                mnt_id = marked_mount(group) or -1
            else:
                if is_mountpoint(self.target):
                    raise Busy(f"{self.target} is already a mount point, and not this unit's view")
                # as systemd does for Where=: a .mount unit that Wants= this one starts it before
                # its own mount job would create the mount point
                os.makedirs(self.target, mode=0o755, exist_ok=True)
                if group is None:
                    group = new_group()
                    new_session(store.name)
                    self.fds.keep_group(group)  # before any mark
                sdnotify.notify(f"EXTEND_TIMEOUT_USEC={START_EXTENSION_USEC}")
                mnt_id = attach_view(group, store, self.target, policy)
            os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)  # the in-flight journal lives there
            starts = self.fds.count_start()
            serving = Serving(group, store, self.target, policy, restarts=starts - 1)
        except (HsmfsError, OSError) as e:
            if group is not None and view_alive(group):
                # exiting with an error ends the unit (or restarts it): the fd store may go, so the
                # view must go first
                log.error("unmounting %s: its filler cannot serve it", self.target)
                try:
                    detach(self.target, lazy=True)
                except OSError as d:
                    log.error("cannot unmount %s: %s", self.target, d)
            if isinstance(e, OSError):  # run_main would say the same; the unit ends with 71
                raise SystemCallFailed.of(e) from None
            raise  # run_main logs it; its exit code tells systemd whether a restart can help
        session = Session(group, store, self.target)  # takes SIGTERM and SIGINT
        session.begin(mnt_id, f"journalctl -u {self.unit}")
        sdnotify.notify(f"READY=1\nSTATUS=serving {store.source} at {self.target}")
        self._serve(session, serving.filler.status)
        if session.terms:
            sdnotify.notify(f"STOPPING=1\nSTATUS=unmounting {self.target}")
            if view_alive(group):  # (systemctl stop of the mount unmounted it already)
                serving.filler.flush()  # fds held for the commit keep the view busy
                try:
                    detach(self.target, lazy=False)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        log.warning("%s is busy: detached lazily; serving its last users until they leave or the "
                                    "stop times out (then they may read holes of unfilled files)", self.target)
                        detach(self.target, lazy=True)
                    elif view_alive(group):
                        log.error("cannot unmount %s: %s", self.target, e)
            # returns at once unless a detached view is in use or another mount of the tree is left (then
            # until the stop times out, or another SIGTERM)
            self._serve(session, serving.filler.status)
        else:
            sdnotify.notify("STOPPING=1")
        serving.close()  # every fill is committed
        session.end(clean=True)
        log.info("stopped")
        return 0

    def _serve(self, session: Session, probe: Callable[[], object]) -> None:
        """Until a SIGTERM, or the view and every other mount of its tree are gone; pings the watchdog
        while the filler answers ``probe``. Sleeps on the session's poll() in between."""
        usec = sdnotify.watchdog_usec()
        every = usec / 2e6 if usec else None
        last = time.monotonic()
        terms = session.terms
        while session.terms == terms:
            if session.view_gone():
                return
            if every and time.monotonic() - last >= every:
                probe()  # takes the filler's lock: a wedged filler stops the pings, systemd restarts it
                sdnotify.notify("WATCHDOG=1")
                last = time.monotonic()
            session.wait(None if every is None else last + every - time.monotonic())


def main(argv: list[str]) -> int:
    """``python -m hsmfs.filler --systemd MOUNTPOINT``: hsmfs@.service's main process."""
    ap = argparse.ArgumentParser(prog="python -m hsmfs.filler --systemd",
                                 description="The filler of one hsmfs mount, run by hsmfs@.service.")
    ap.add_argument("mountpoint", help="The view's mount point (the unit's %%f).")
    args = ap.parse_args(argv)
    setup_logging("info")  # the policy's level applies once it is read
    return Service(os.path.normpath(args.mountpoint)).run()


# --- install-units ----------------------------------------------------------------------------------


def unit_files() -> dict[str, str]:
    """The unit files shipped as package data (hsmfs/data/units/), by name."""
    base = files("hsmfs") / "data" / "units"
    return {p.name: p.read_text() for p in base.iterdir() if p.name.endswith((".service", ".mount"))}


def _quote(arg: str) -> str:
    """One ExecStart= word (systemd.service(5) "Command lines")."""
    if arg and all(c.isalnum() or c in "/._-+:@" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hsmfs_script() -> str:
    """The installed ``hsmfs`` console script: beside the interpreter (venv, pyenv), else on PATH.

    Not a pyenv shim: mount helpers run with an almost empty environment.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "hsmfs")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("hsmfs")
    if found is None:
        raise FileNotFoundError("cannot find the hsmfs script (pip install hsmfs puts it beside python)")
    return os.path.abspath(found)


def install_units(root: str = "/", *, python: Optional[str] = None, script: Optional[str] = None,
                  reload: bool = True) -> list[str]:
    """Copy the units to ROOT/etc/systemd/system and link ROOT/sbin/mount.hsmfs; returns what was done."""
    python = python or sys.executable
    script = script or hsmfs_script()
    done = []
    unit_dir = os.path.join(root, "etc/systemd/system")
    os.makedirs(unit_dir, mode=0o755, exist_ok=True)
    for name, text in sorted(unit_files().items()):
        text = text.replace(f"ExecStart={DEFAULT_PYTHON} ", f"ExecStart={_quote(python)} ")
        path = os.path.join(unit_dir, name)
        tree.atomic_write(path, text.encode(), mode=0o644)
        done.append(f"installed {path}")
    sbin = os.path.join(root, "sbin")
    os.makedirs(sbin, mode=0o755, exist_ok=True)
    link = os.path.join(sbin, "mount.hsmfs")
    tmp = link + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(script, tmp)
    os.rename(tmp, link)
    done.append(f"linked {link} -> {script}")
    if reload and os.path.realpath(root) == "/" and sdnotify.booted():
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        done.append("systemctl daemon-reload")
    return done
