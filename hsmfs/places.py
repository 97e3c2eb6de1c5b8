"""Where hsmfs keeps things on the machine: stores, runtime files, logs. Defined here and nowhere else.

- ``/var/lib/hsmfs/NAME``: the default store of mount NAME (root's alone, mode 0700);
- ``/run/hsmfs/NAME.json``: the runtime record of a running mount (hsmfs.control.RuntimeRecord),
  ``NAME.sock`` its filler's control socket, ``NAME.journal`` its in-flight journal
  (hsmfs.filler.takeover); ``/run/hsmfs/units/INSTANCE.json``: what ``hsmfs@INSTANCE.service``
  serves (hsmfs.systemd.Params). A reboot empties /run, and with it everything that names a process;
- ``/var/log/hsmfs/NAME.log``: the log of a mount's supervisor and filler (under systemd: the journal).
"""

from __future__ import annotations

import os

STORE_ROOT = "/var/lib/hsmfs"
RUN_DIR = "/run/hsmfs"
UNIT_PARAMS_DIR = os.path.join(RUN_DIR, "units")
LOG_DIR = "/var/log/hsmfs"


def default_store(name: str) -> str:
    return os.path.join(STORE_ROOT, name)


def record_path(name: str) -> str:
    return os.path.join(RUN_DIR, name + ".json")


def socket_path(name: str) -> str:
    return os.path.join(RUN_DIR, name + ".sock")


def journal_path(name: str) -> str:
    return os.path.join(RUN_DIR, name + ".journal")


def log_path(name: str) -> str:
    return os.path.join(LOG_DIR, name + ".log")
