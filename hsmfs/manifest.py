"""The published tree's manifest: what ``hsmfs publish`` writes and remote mounts read.

The format is specified in docs/manifest.md; in short, one UTF-8 JSON object::

    {"format": "hsmfs-manifest", "version": 1, "id": "<sha256 hex>", "parent": "<id>" | null,
     "created": "2026-12-03T16:00:00Z", "objects": "objects/sha256/",
     "entries": [{"path": "", "type": "dir", "mode": 493, "uid": 0, "gid": 0, "mtime_ns": 0}, ...]}

Entries are sorted by path (bytes of the UTF-8 encoding, parents before their children); ``path``
is relative to the tree's root ("" is the root itself), components separated by "/". Types:
``dir``, ``file`` (with ``size`` and ``sha256``), ``symlink`` (with ``target``), ``hardlink``
(with ``target``: the path of a ``file`` entry earlier in the list; the two names share one
inode). Optional on every entry but hardlinks: ``xattrs`` (name -> base64 value; ``user.*``,
``system.posix_acl_access``, ``system.posix_acl_default``).

Content lives beside the manifest under ``objects/sha256/HH/HEX`` (HH: the first two hex digits),
so a file's bytes are named by their hash: versions share objects, and a second publish of a
changed tree uploads only the objects it lacks.

A manifest comes from the network: :func:`parse` trusts nothing in it. Any path that is empty in
a component, ``.``, ``..``, absolute, has a NUL or is not valid UTF-8, a parent that is not a
``dir`` entry, a duplicate, a symlink whose target is absolute or climbs above the root, a
hardlink to anything but an earlier file, a size, mode, owner or time out of range, or an xattr
name outside the three families above makes the whole manifest invalid (:class:`ManifestError`,
exit 65): nothing is populated from it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from hsmfs.errors import DataError

FORMAT = "hsmfs-manifest"
VERSION = 1
OBJECTS = "objects/sha256/"
TYPES = ("dir", "file", "symlink", "hardlink")
XATTR_PREFIXES = ("user.",)
XATTR_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
MAX_PATH = 4096
MAX_NAME = 255
MAX_ENTRIES = 10_000_000
_HEX = re.compile(r"[0-9a-f]{64}")
_U32 = (1 << 32) - 1
_I64 = (1 << 63) - 1


class ManifestError(DataError):
    """A manifest that is not valid: nothing is populated or refreshed from it (exit 65)."""


@dataclass(frozen=True)
class Entry:
    path: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""  # a symlink's target, or a hardlink's first name
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def parent(self) -> str:
        return self.path.rpartition("/")[0]

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.type}
        if self.type == "hardlink":
            d["target"] = self.target
            return d
        d.update(mode=self.mode, uid=self.uid, gid=self.gid, mtime_ns=self.mtime_ns)
        if self.type == "file":
            d.update(size=self.size, sha256=self.sha256)
        elif self.type == "symlink":
            d["target"] = self.target
        if self.xattrs:
            d["xattrs"] = {k: base64.b64encode(v).decode() for k, v in self.xattrs}
        return d


@dataclass
class Manifest:
    entries: list[Entry]
    parent: Optional[str] = None
    created: str = ""
    id: str = ""
    by_path: dict[str, Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.by_path:
            self.by_path = {e.path: e for e in self.entries}
        if not self.id:
            self.id = compute_id(self.entries, self.parent)

    def dumps(self) -> bytes:
        d = {"format": FORMAT, "version": VERSION, "id": self.id, "parent": self.parent,
             "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "objects": OBJECTS, "entries": [e.as_json() for e in self.entries]}
        return (json.dumps(d, separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.type == "file"]


def object_key(sha256: str) -> str:
    """Where a content object lives, relative to the manifest's directory (or S3 prefix)."""
    return f"{OBJECTS}{sha256[:2]}/{sha256}"


def compute_id(entries: list[Entry], parent: Optional[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"parent": parent, "entries": [e.as_json() for e in entries]}, sort_keys=True,
                        separators=(",", ":"), ensure_ascii=False).encode())
    return h.hexdigest()


def sort_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def check_path(path: str) -> Optional[str]:
    """Why path cannot name an entry of a tree, or None."""
    if path == "":
        return None
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        return "path too long"
    if "\0" in path:
        return "path holds a NUL byte"
    if path.startswith("/"):
        return "absolute path"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r} (empty, '.' or '..')"
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            return "name longer than 255 bytes"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8"
    return None


def escapes(link_dir: str, target: str) -> bool:
    """Whether a symlink in directory link_dir with this target points outside the tree's root."""
    if target.startswith("/") or target == "":
        return True
    depth = len(link_dir.split("/")) if link_dir else 0
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _int(d: dict[str, Any], key: str, lo: int, hi: int, default: Optional[int] = None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{key}: expected an integer from {lo} to {hi}, got {v!r}")
    return v


def _entry(d: Any) -> Entry:
    if not isinstance(d, dict):
        raise ValueError("entry is not an object")
    path = d.get("path")
    if not isinstance(path, str):
        raise ValueError("path: expected a string")
    why = check_path(path)
    if why:
        raise ValueError(why)
    typ = d.get("type")
    if typ not in TYPES:
        raise ValueError(f"type: expected one of {', '.join(TYPES)}, got {typ!r}")
    if typ == "hardlink":
        target = d.get("target")
        if not isinstance(target, str) or check_path(target) or target == "":
            raise ValueError("target: a hardlink names the path of a file entry")
        return Entry(path, typ, target=target)
    xattrs: list[tuple[str, bytes]] = []
    raw = d.get("xattrs", {})
    if not isinstance(raw, dict):
        raise ValueError("xattrs: expected an object")
    for k, v in sorted(raw.items()):
        if not (k.startswith(XATTR_PREFIXES) or k in XATTR_NAMES) or len(k) > 255:
            raise ValueError(f"xattr {k!r}: only user.* and POSIX ACLs are allowed")
        if not isinstance(v, str):
            raise ValueError(f"xattr {k!r}: expected base64")
        try:
            xattrs.append((k, base64.b64decode(v, validate=True)))
        except ValueError:
            raise ValueError(f"xattr {k!r}: not valid base64") from None
    mode = _int(d, "mode", 0, 0o7777)
    uid, gid = _int(d, "uid", 0, _U32 - 1), _int(d, "gid", 0, _U32 - 1)
    mtime = _int(d, "mtime_ns", -_I64, _I64)
    size = 0
    sha = ""
    target = ""
    if typ == "file":
        size = _int(d, "size", 0, _I64)
        sha = d.get("sha256", "")
        if not isinstance(sha, str) or not _HEX.fullmatch(sha):
            raise ValueError("sha256: expected 64 lowercase hex digits")
    elif typ == "symlink":
        target = d.get("target", "")
        if not isinstance(target, str) or "\0" in target or len(target) > MAX_PATH:
            raise ValueError("target: expected a symlink target")
        link_dir = path.rpartition("/")[0]
        if escapes(link_dir, target):
            raise ValueError(f"symlink target {target!r} leaves the tree (absolute, empty or above its root)")
    elif typ == "dir" and d.get("size", 0) not in (0, None):
        raise ValueError("a dir has no size")
    return Entry(path, typ, mode, uid, gid, mtime, size, sha, target, tuple(xattrs))


def parse(data: bytes, *, where: str) -> Manifest:
    """The manifest in data (from where: a URL or path, for messages); ManifestError if it is not valid."""
    def bad(msg: str) -> ManifestError:
        return ManifestError(f"{where}: not a valid hsmfs manifest: {msg}",
                             hint="publish it again with 'hsmfs publish' (docs/manifest.md specifies the format)")

    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as why:
        raise bad(f"not UTF-8 JSON ({why})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise bad(f'"format" must be "{FORMAT}"')
    if d.get("version") != VERSION:
        raise bad(f"version {d.get('version')!r}; this hsmfs reads version {VERSION}")
    if d.get("objects", OBJECTS) != OBJECTS:
        raise bad(f'"objects" must be "{OBJECTS}"')
    parent = d.get("parent")
    if parent is not None and (not isinstance(parent, str) or not _HEX.fullmatch(parent)):
        raise bad('"parent" must be null or a manifest id')
    raw = d.get("entries")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_ENTRIES:
        raise bad('"entries" must be a non-empty list')
    entries: list[Entry] = []
    kinds: dict[str, str] = {}
    for i, item in enumerate(raw):
        try:
            e = _entry(item)
        except ValueError as why:
            name = item.get("path") if isinstance(item, dict) else None
            raise bad(f"entry {i} ({name!r}): {why}") from None
        if i == 0:
            if e.path != "" or e.type != "dir":
                raise bad("the first entry must be the root directory (path \"\")")
        else:
            if e.path == "":
                raise bad(f"entry {i}: a second root")
            if sort_key(e.path) <= sort_key(entries[-1].path):
                raise bad(f"entry {i} ({e.path!r}): entries must be sorted by path with no duplicates")
            if kinds.get(e.parent) != "dir":
                raise bad(f"entry {i} ({e.path!r}): its parent {e.parent!r} is not a directory of the manifest")
            if e.type == "hardlink" and kinds.get(e.target) != "file":
                raise bad(f"entry {i} ({e.path!r}): hardlink to {e.target!r}, which is not an earlier file")
        kinds[e.path] = e.type
        entries.append(e)
    m = Manifest(entries, parent=parent, created=str(d.get("created", "")))
    if d.get("id") not in (None, m.id):
        raise bad(f'"id" {d.get("id")!r} is not the hash of its entries ({m.id})')
    return m
