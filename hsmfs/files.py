"""Paths users give on the command line, and the hsmfs files they name.

``hsmfs evict``, ``pin``, ``unpin`` and ``prefetch`` take paths in a view (of a running mount in
this mount namespace) or in a store's tree, files or directories (taken recursively). Each is
resolved to the same file in ``STORE/tree``: that is the inode the commands work on, whatever
path reached it. Nothing here opens a file: ``lstat`` and directory listings raise no event.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from hsmfs import tree
from hsmfs.control import RuntimeRecord, runtime_records
from hsmfs.errors import SourceMissing
from hsmfs.names import escape


@dataclass(frozen=True)
class File:
    shown: str  # as the user would name it (under the path they gave)
    path: str  # the same file in STORE/tree
    store: str  # the store directory
    st: os.stat_result


@dataclass(frozen=True)
class Place:
    store: str
    tree_path: str  # the path given, in STORE/tree
    running: Optional[RuntimeRecord]  # the live mount serving that store, if any


def _real(path: str) -> str:
    """realpath of the directory, not of the last component (a symlink is itself)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(head)


def locate(path: str, records: Optional[list[RuntimeRecord]] = None) -> Place:
    """Which store (and running mount) path belongs to; SourceMissing (66) if none or missing."""
    if not os.path.lexists(path):
        raise SourceMissing(f"{escape(path)} does not exist")
    recs = [rt for rt in (runtime_records() if records is None else records) if rt.alive()]
    real = _real(path)
    for rt in recs:
        target = rt.target.rstrip("/") or "/"
        if rt.namespace is None and (real == target or real.startswith(target.rstrip("/") + "/")):
            rel = os.path.relpath(real, target)
            tree_path = os.path.normpath(os.path.join(rt.store, "tree", rel))
            return Place(rt.store, tree_path, rt)
    d = real
    while d != "/":
        parent = os.path.dirname(d)
        if os.path.basename(d) == "tree" and os.path.isfile(os.path.join(parent, "hsmfs.json")):
            running = next((rt for rt in recs if os.path.realpath(rt.store) == parent), None)
            return Place(parent, real, running)
        d = parent
    raise SourceMissing(f"{escape(path)} is not in an hsmfs view or store",
                        hint="give paths under a running view ('hsmfs status' lists them) or under STORE/tree")


def walk(shown: str, place: Place) -> Iterator[File]:
    """The regular files at or beneath place.tree_path (symlinks not followed), named as under shown."""
    st = os.lstat(place.tree_path)
    if stat.S_ISREG(st.st_mode):
        yield File(shown, place.tree_path, place.store, st)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    # directory fds: a tree deeper than PATH_MAX is listed whole (an operation on such a file then
    # says it cannot reach it, instead of the file being passed over in silence)
    for dirpath, dirs, names, dirfd in os.fwalk(place.tree_path, follow_symlinks=False):
        dirs.sort()
        for name in sorted(names):
            p = os.path.join(dirpath, name)
            try:
                s = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(s.st_mode) and not name.startswith(tree.TMP_PREFIX):
                yield File(os.path.join(shown, os.path.relpath(p, place.tree_path)), p, place.store, s)


def collect(paths: list[str]) -> list[tuple[Place, list[File]]]:
    """Every path located first (a bad one fails before anything is done), then their files."""
    records = runtime_records()
    places = [(p, locate(p, records)) for p in paths]
    for store in dict.fromkeys(place.store for _, place in places):
        tree.Store.load(store)  # a damaged hsmfs.json: a DataError (65) before anything is done
    return [(place, list(walk(p, place))) for p, place in places]
