"""``hsmfs publish SRC DEST``: a local tree -> a manifest and content objects named by their sha256.

DEST is a local directory (serve it with any static web server and mount
``https://host/path/manifest``) or ``s3://bucket/prefix`` (mount that URL). Layout under DEST
(docs/manifest.md)::

    manifest                      the latest version (what mounts and refreshes read)
    manifests/ID.json             every version, by id; "parent" names the one before
    objects/sha256/HH/HEX         content, one object per distinct file content

Objects are written first, each atomically (a temporary name, then rename; S3 puts are atomic),
then ``manifests/ID.json``, and ``manifest`` last: a reader never finds a manifest whose objects
are not all there. An object already present is not written again, so a second publish of a
changed tree uploads only what changed, and versions share objects. The new manifest's parent is
the version ``manifest`` named before (``--parent`` overrides it, ``--no-parent`` drops it).

Published: directories, regular files (hardlinks as such), symlinks that stay inside the tree,
with mode, owner (numeric), mtime, ``user.*`` xattrs and POSIX ACLs. Left out, with a warning:
symlinks that leave the tree (absolute, or above its root), fifos, sockets and device nodes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from hsmfs import manifest as mf
from hsmfs.errors import CannotCreate, HsmfsError
from hsmfs.names import escape
from hsmfs.scan import scan
from hsmfs.tree import atomic_write

log = logging.getLogger("hsmfs.publish")
CHUNK = 1 << 20


@dataclass
class PublishStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    objects: int = 0  # distinct contents
    uploaded: int = 0  # objects written by this run
    uploaded_bytes: int = 0
    left_out: int = 0
    id: str = ""
    parent: Optional[str] = None


def _hash_file(dfd_path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    fd = os.open(dfd_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            h.update(data)
            n += len(data)
    finally:
        os.close(fd)
    return h.hexdigest(), n


def build(src: str, stats: PublishStats) -> tuple[list[mf.Entry], dict[str, str]]:
    """The manifest entries of the tree at src, and {sha256: path of one file with that content}."""
    found = scan(src)
    entries: list[mf.Entry] = []
    content: dict[str, str] = {}
    kept: set[str] = set()
    for f in found:
        mode = f.st.st_mode
        if f.path and f.path.rpartition("/")[0] not in kept:
            continue  # its directory was left out
        why = mf.check_path(f.path)
        if why:
            log.warning("left out %s: %s", escape(f.path), why)
            stats.left_out += 1
            continue
        common: dict[str, Any] = dict(mode=stat.S_IMODE(mode), uid=f.st.st_uid, gid=f.st.st_gid,
                                      mtime_ns=f.st.st_mtime_ns, xattrs=f.xattrs)
        if stat.S_ISDIR(mode):
            entries.append(mf.Entry(f.path, "dir", **common))
            kept.add(f.path)
            stats.dirs += f.path != ""
        elif stat.S_ISREG(mode) and f.first:
            if f.first in kept:
                entries.append(mf.Entry(f.path, "hardlink", target=f.first))
                stats.hardlinks += 1
        elif stat.S_ISREG(mode):
            full = os.path.join(src, f.path)
            try:
                sha, n = _hash_file(full)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ELOOP):
                    stats.left_out += 1
                    continue
                raise HsmfsError(f"cannot read {escape(full)}: {e.strerror}") from None
            if n != f.st.st_size:
                raise HsmfsError(f"{escape(full)} changed while it was published ({n} bytes read, "
                                 f"{f.st.st_size} expected)", hint="publish again once the tree is quiet")
            entries.append(mf.Entry(f.path, "file", size=n, sha256=sha, **common))
            content.setdefault(sha, full)
            kept.add(f.path)
            stats.files += 1
            stats.bytes += n
        elif stat.S_ISLNK(mode):
            if mf.escapes(f.path.rpartition("/")[0], f.target):
                log.warning("left out the symlink %s -> %s: it leaves the tree", escape(f.path), escape(f.target))
                stats.left_out += 1
                continue
            entries.append(mf.Entry(f.path, "symlink", target=f.target, **{**common, "xattrs": ()}))
            stats.symlinks += 1
        else:
            log.warning("left out %s: fifos, sockets and device nodes are not published", escape(f.path))
            stats.left_out += 1
    stats.objects = len(content)
    return entries, content


class _Dest:
    def read(self, key: str) -> Optional[bytes]:
        raise NotImplementedError

    def existing(self) -> set[str]:
        raise NotImplementedError

    def put_file(self, key: str, path: str) -> None:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError


class _LocalDest(_Dest):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise CannotCreate(f"cannot create {escape(self.root)}: {e.strerror}") from None

    def read(self, key: str) -> Optional[bytes]:
        try:
            with open(os.path.join(self.root, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def existing(self) -> set[str]:
        out: set[str] = set()
        base = os.path.join(self.root, mf.OBJECTS)
        for _d, _dirs, names in os.walk(base):
            out.update(n for n in names if len(n) == 64)
        return out

    def _write(self, key: str, data: Union[bytes, Callable[[int], None]]) -> None:
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        atomic_write(path, data, mode=0o644)

    def put_file(self, key: str, path: str) -> None:
        def write(fd: int) -> None:
            with open(path, "rb") as src, open(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, CHUNK)

        self._write(key, write)

    def put(self, key: str, data: bytes) -> None:
        self._write(key, data)


class _S3Dest(_Dest):
    def __init__(self, url: str) -> None:
        from hsmfs.sources.s3 import s3_client, split_s3

        self.bucket, self.prefix = split_s3(url)
        self.client = s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str) -> Optional[bytes]:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            return body
        except self.client.exceptions.NoSuchKey:
            return None

    def existing(self) -> set[str]:
        out: set[str] = set()
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=self._key(mf.OBJECTS))
        for page in pages:
            for o in page.get("Contents", []):
                name = o["Key"].rsplit("/", 1)[-1]
                if len(name) == 64:
                    out.add(name)
        return out

    def put_file(self, key: str, path: str) -> None:
        with open(path, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=f)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)


def publish(src: str, dest: str, *, parent: Optional[str] = None, no_parent: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> PublishStats:
    """Publish the tree at src to dest (a directory or s3://bucket/prefix); see the module docstring."""
    stats = PublishStats()
    src = os.path.abspath(src)
    if not dest.startswith("s3://"):  # checked before anything is made
        real_src, real_dest = os.path.realpath(src), os.path.realpath(dest)
        if real_dest == real_src or real_dest.startswith(real_src + os.sep):
            raise CannotCreate(f"the destination {escape(dest)} is inside the tree {escape(src)}")
    d: _Dest = _S3Dest(dest) if dest.startswith("s3://") else _LocalDest(dest)
    entries, content = build(src, stats)
    if parent is None and not no_parent:
        old = d.read("manifest")
        if old is not None:
            try:
                parent = mf.parse(old, where=f"{dest}/manifest").id
            except mf.ManifestError:
                log.warning("the manifest at %s is not valid: the new version names no parent", escape(dest))
    have = d.existing()
    todo = [(sha, path) for sha, path in content.items() if sha not in have]
    for i, (sha, path) in enumerate(todo):
        d.put_file(mf.object_key(sha), path)
        stats.uploaded += 1
        stats.uploaded_bytes += os.path.getsize(path)
        if progress is not None:
            progress(i + 1, len(todo))
    m = mf.Manifest(entries, parent=None if no_parent else parent)
    data = m.dumps()
    mf.parse(data, where="the new manifest")  # what we write is what mounts accept
    d.put(f"manifests/{m.id}.json", data)
    d.put("manifest", data)
    stats.id, stats.parent = m.id, m.parent
    return stats


def object_keys(entries: Iterable[mf.Entry]) -> set[str]:
    return {mf.object_key(e.sha256) for e in entries if e.type == "file"}
