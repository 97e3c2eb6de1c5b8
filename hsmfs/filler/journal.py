"""The in-flight journal: which permission events a filler has read and not answered yet.

A filler that dies leaves the events it read pending in the kernel, matched by fd number only
(kernel-facts §6), and their event fds, the files' identities, die with it. Before a worker
starts on an event the filler appends ``R <fd> <handle type> <handle hex>`` to
``/run/hsmfs/NAME.journal``; after answering it appends ``A <fd>``. Its successor reads the
journal before it reads any new event, opens each unanswered file by handle, fills it, answers its
fd number, and only then starts afresh. Events answered by the reader thread at once (files
already filled) are not journaled: a crash in that window leaves them to the sweep, which
answers EAGAIN.
"""

from __future__ import annotations

import os
import threading

COMPACT_AT = 1 << 20  # bytes: truncate when nothing is outstanding and the file is this big


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()
        self._outstanding = 0
        self._size = os.fstat(self.fd).st_size

    def pending(self) -> dict[int, tuple[int, bytes]]:
        """Events a predecessor read and did not answer: fd number -> (handle type, handle)."""
        data = os.pread(self.fd, self._size, 0)
        out: dict[int, tuple[int, bytes]] = {}
        for line in data.split(b"\n")[:-1]:  # a torn last line has no newline: ignore it
            parts = line.split()
            try:
                if parts[0] == b"R" and len(parts) == 4:
                    out[int(parts[1])] = (int(parts[2]), bytes.fromhex(parts[3].decode()))
                elif parts[0] == b"A" and len(parts) == 2:
                    out.pop(int(parts[1]), None)
            except (ValueError, IndexError):
                continue
        return out

    def reset(self) -> None:
        with self._lock:
            os.ftruncate(self.fd, 0)
            self._size = 0
            self._outstanding = 0

    def read(self, fd: int, handle_type: int, handle: bytes) -> None:
        self._append(f"R {fd} {handle_type} {handle.hex()}\n".encode(), 1)

    def answered(self, fd: int) -> None:
        self._append(f"A {fd}\n".encode(), -1)

    def _append(self, line: bytes, delta: int) -> None:
        with self._lock:
            os.write(self.fd, line)
            self._size += len(line)
            self._outstanding += delta
            if self._outstanding <= 0 and self._size >= COMPACT_AT:
                os.ftruncate(self.fd, 0)
                self._size = 0
                self._outstanding = 0

    def close(self) -> None:
        os.close(self.fd)
