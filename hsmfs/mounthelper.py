"""``mount.hsmfs``: the mount(8) helper behind ``mount -t hsmfs``, fstab lines and ``Type=hsmfs`` units.

Calling convention (mount(8), EXTERNAL HELPERS)::

    /sbin/mount.hsmfs SOURCE TARGET [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t hsmfs[.SUBTYPE]]

SOURCE is the directory whose files the view shows, TARGET the mount point. Options:

* kept: ``config=FILE`` (policy TOML), ``store=DIR`` (default /var/lib/hsmfs/NAME), ``name=NAME``;
* ignored, because they are for mount(8), fstab or systemd and not the filesystem: ``_netdev``,
  ``nofail``, ``rw``, ``defaults``, ``auto``, ``noauto``, ``user``, ``users``, ``nouser``,
  ``owner``, ``group``, ``comment=…``, ``x-…`` (mount(8) keeps most of these for itself; systemd
  passes ``_netdev`` and ``nofail`` through);
* refused: ``ro`` (views are read-write) and anything else, unless ``-s`` (sloppy) is given, which
  turns unknown options into a warning.

What it does: the same checks and stub-tree build as ``hsmfs mount``; then, when systemd is the init
system, it starts ``hsmfs@INSTANCE.service`` (the service attaches the view; see hsmfs.systemd),
else it starts the ``hsmfs mount`` supervisor. It exits 0 only once TARGET is a mount point.
Exit codes are mount(8)'s: 1 bad invocation or not root, 2 system error, 4 internal error,
32 mount failure. systemd runs it with an almost empty environment: everything comes from argv.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from hsmfs import sdnotify
from hsmfs.errors import ConfigError, HsmfsError, NotPermitted, UsageError
from hsmfs.mounting import mount, prepare_mount
from hsmfs.names import EscapingFormatter
from hsmfs.process import JournalFormatter, journal_stderr
from hsmfs.systemd import Params, service_name, write_params
from hsmfs.views import wait_mounted

log = logging.getLogger("mount.hsmfs")

EX_USAGE, EX_SYSERR, EX_SOFTWARE, EX_FAIL = 1, 2, 4, 32  # mount(8) EXIT STATUS
KEPT = ("config", "store", "name")
IGNORED = frozenset({"_netdev", "nofail", "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner",
                     "group"})
IGNORED_PREFIXES = ("x-", "comment=")
MOUNT_WAIT = 30.0  # seconds for the view to appear after the service reported ready


class HelperError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Invocation:
    """What mount(8) asked for."""

    source: str
    target: str
    config: Optional[str] = None
    store: Optional[str] = None
    name: Optional[str] = None
    namespace: Optional[str] = None
    sloppy: bool = False
    fake: bool = False
    verbose: bool = False
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Invocation:
    """Parse the helper's argv (without argv[0]); raises HelperError(code 1) on a bad invocation."""
    positional: list[str] = []
    opts: list[str] = []
    flags = {"s": False, "f": False, "n": False, "v": False}
    namespace = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-o", "-t", "-N"):
            if i + 1 >= len(argv):
                raise HelperError(f"option {a} needs a value", EX_USAGE)
            value = argv[i + 1]
            if a == "-o":
                opts += [o for o in value.split(",") if o]
            elif a == "-t":
                if value.split(".", 1)[0] != "hsmfs":
                    raise HelperError(f"-t {value}: this helper mounts type hsmfs only", EX_USAGE)
            else:
                namespace = value
            i += 2
            continue
        if a.startswith("-") and len(a) > 1 and a != "--":
            for ch in a[1:]:
                if ch not in flags:
                    raise HelperError(f"unknown flag -{ch}", EX_USAGE)
                flags[ch] = True
        elif a != "--":
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise HelperError("usage: mount.hsmfs SOURCE TARGET [-sfnv] [-N NAMESPACE] [-o OPTIONS]", EX_USAGE)
    inv = Invocation(source=positional[0], target=positional[1], namespace=namespace, sloppy=flags["s"],
                     fake=flags["f"], verbose=flags["v"])
    for o in opts:
        key, eq, value = o.partition("=")
        if key in KEPT:
            if not eq or not value:
                raise HelperError(f"option {key} needs a value: {key}=...", EX_USAGE)
            setattr(inv, key, value)
        elif o in IGNORED or o.startswith(IGNORED_PREFIXES):
            inv.ignored.append(o)
        elif o == "ro":
            raise HelperError("option ro: hsmfs views are read-write", EX_USAGE)
        else:
            inv.unknown.append(o)
    if inv.unknown and not inv.sloppy:
        raise HelperError(f"unknown option{'s' if len(inv.unknown) > 1 else ''} {','.join(inv.unknown)} "
                          f"(hsmfs knows {', '.join(k + '=' for k in KEPT)}; -s ignores unknown options)", EX_USAGE)
    return inv


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("%(name)s: %(message)s") if journal_stderr()
                         else EscapingFormatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _systemctl() -> str:
    found = shutil.which("systemctl", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))
    if found is None:
        raise HelperError("systemd is running but systemctl is missing", EX_SYSERR)
    return found


def mount_with_systemd(inv: Invocation) -> None:
    """Build the tree if needed, then start hsmfs@INSTANCE.service and wait for the view."""
    if inv.namespace is not None:
        raise HelperError("-N: under systemd hsmfs mounts in systemd's mount namespace only", EX_USAGE)
    st, target = prepare_mount(inv.source, inv.target, name=inv.name, store=inv.store, config=inv.config)
    unit = service_name(target)
    write_params(target, Params(store=st.path, config=os.path.abspath(inv.config) if inv.config else None))
    log.debug("starting %s", unit)
    r = subprocess.run([_systemctl(), "start", "--no-ask-password", unit], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise HelperError(f"{unit} did not start ({r.stdout.strip() or f'systemctl exit {r.returncode}'}); "
                          f"see journalctl -u {unit}", EX_FAIL)
    if not wait_mounted(target, MOUNT_WAIT):
        raise HelperError(f"{unit} is running but {target} is not mounted; see journalctl -u {unit}", EX_FAIL)
    log.info("%s is live at %s (%s)", st.source, target, unit)


def mount_without_systemd(inv: Invocation) -> None:
    """What ``hsmfs mount`` does: build the tree if needed, start the supervisor, wait for the view."""
    mount(inv.source, inv.target, name=inv.name, store=inv.store, config=inv.config, namespace=inv.namespace)


def main(argv: list[str]) -> int:
    """Entry point for argv[0] == mount.hsmfs (hsmfs.cli.main dispatches here)."""
    _setup_logging()
    try:
        inv = parse_args(argv)
        if inv.verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        for o in inv.unknown:
            log.warning("ignoring unknown option %s (-s)", o)
        if inv.ignored:
            log.debug("ignoring options for mount(8)/systemd: %s", ",".join(inv.ignored))
        if os.geteuid() != 0:
            raise HelperError("must be root (CAP_SYS_ADMIN for mounts and fanotify)", EX_USAGE)
        if inv.fake:
            return 0
        if sdnotify.booted():
            mount_with_systemd(inv)
        else:
            mount_without_systemd(inv)
        return 0
    except HelperError as e:
        log.error("%s", e)
        return e.code
    except Exception as e:
        return _exit_code(e)


def _exit_code(e: Exception) -> int:
    if isinstance(e, (UsageError, NotPermitted, ConfigError)):
        log.error("%s", e)
        return EX_USAGE
    if isinstance(e, HsmfsError):
        log.error("%s", e)
        return EX_FAIL
    if isinstance(e, OSError):
        log.error("%s", e)
        return EX_SYSERR
    log.exception("internal error")
    return EX_SOFTWARE
