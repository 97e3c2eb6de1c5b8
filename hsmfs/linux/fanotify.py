"""fanotify(7) with pre-content events (Linux 6.14+): init, mark, read, respond."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple, Optional

from hsmfs.linux import check, libc

# include/uapi/linux/fanotify.h
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_PRE_CONTENT = 0x8
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20

FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_DONT_FOLLOW = 0x4
FAN_MARK_MOUNT = 0x10
FAN_MARK_IGNORED_SURV_MODIFY = 0x40
FAN_MARK_FLUSH = 0x80
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_EVICTABLE = 0x200
FAN_MARK_IGNORE = 0x400

FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_ACCESS_PERM = 0x20000
FAN_PRE_ACCESS = 0x100000
PERM_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_PRE_ACCESS

FAN_ALLOW = 0x1
FAN_DENY = 0x2
FAN_NOFD = -1
FAN_EVENT_METADATA_LEN = 24
FAN_EVENT_INFO_TYPE_RANGE = 6

# docs/kernel.md#k7: only these errnos are accepted by FAN_DENY_ERRNO on 6.18
DENY_ERRNOS = frozenset({1, 5, 11, 16, 26, 28, 122})  # EPERM EIO EAGAIN EBUSY ETXTBSY ENOSPC EDQUOT

_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_INFO_HDR = struct.Struct("=BBH")  # struct fanotify_event_info_header
_RANGE = struct.Struct("=IQQ")  # struct fanotify_event_info_range after the header: pad, offset, count
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response

AT_FDCWD = -100

libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def deny_errno(err: int) -> int:
    """FAN_DENY_ERRNO(err): deny the access and make the syscall fail with err."""
    if err not in DENY_ERRNOS:
        raise ValueError(f"the kernel does not accept errno {err} in a fanotify response")
    return FAN_DENY | ((err & 0xFF) << 24)


def init(flags: int, event_f_flags: int) -> int:
    return check(libc.fanotify_init(flags, event_f_flags), "fanotify_init")


def mark(group: int, flags: int, mask: int, dirfd: int = AT_FDCWD, path: Optional[str] = None) -> None:
    """fanotify_mark(2). path None marks dirfd itself (used with event fds and open_tree fds)."""
    p = None if path is None else os.fsencode(path)
    check(libc.fanotify_mark(group, flags, mask, dirfd, p), "fanotify_mark")


class Event(NamedTuple):
    """One event read from a group (a tuple: the reader decodes thousands a second)."""

    mask: int
    fd: int
    pid: int
    offset: int = 0
    length: int = 0  # the range's count: 0 means "to EOF" (or no range info)
    has_range: bool = False


def parse(buf: bytes | memoryview) -> Iterator[Event]:
    """Decode a buffer returned by read(2) on a group fd."""
    off, end = 0, len(buf)
    while off + FAN_EVENT_METADATA_LEN <= end:
        event_len, _vers, _res, meta_len, mask, fd, pid = _META.unpack_from(buf, off)
        if event_len < FAN_EVENT_METADATA_LEN or off + event_len > end:
            raise ValueError(f"malformed fanotify event at offset {off}: length {event_len}")
        offset = count = 0
        has_range = False
        ioff, iend = off + meta_len, off + event_len
        while ioff + _INFO_HDR.size <= iend:
            itype, _pad, ilen = _INFO_HDR.unpack_from(buf, ioff)
            if ilen < _INFO_HDR.size or ioff + ilen > iend:
                break
            if itype == FAN_EVENT_INFO_TYPE_RANGE and ilen >= _INFO_HDR.size + _RANGE.size:
                _p, offset, count = _RANGE.unpack_from(buf, ioff + _INFO_HDR.size)
                has_range = True
            ioff += ilen
        yield Event(mask, fd, pid, offset, count, has_range)
        off += event_len


def respond(group: int, fd: int, response: int) -> None:
    """Answer one permission event. Responses cannot be batched (docs/kernel.md#k7)."""
    os.write(group, _RESPONSE.pack(fd, response))
