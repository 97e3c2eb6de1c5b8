"""Where content comes from. One module per kind of source behind the small protocol below."""

from __future__ import annotations

from typing import Protocol

from hsmfs.tree import Record


class SourceError(Exception):
    """The source cannot give this object's bytes; readers get the policy's errno and the stub stays a stub.

    ``errno`` is the cause when there is one (ENOSPC and EDQUOT of the store are told apart by
    callers), the message says which object and why, for the log.
    """

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class IntegrityError(SourceError):
    """A fetched file's bytes do not hash to its manifest's sha256: readers get EIO, the stub stays a stub."""


class SourceFile(Protocol):
    """One source object, checked to be the one a stub record describes."""

    def data_regions(self) -> list[tuple[int, int]]:
        """[(start, end)] of the object that hold data; the rest reads as zeros (holes of a sparse file)."""
        ...

    def copy_to(self, dst_fd: int, start: int, end: int) -> None:
        """Write the object's bytes [start, end) into dst_fd at the same offsets."""
        ...

    def same(self, dst_fd: int, start: int, end: int) -> bool:
        """Whether dst_fd's bytes [start, end) are the object's."""
        ...

    def verify(self, dst_fd: int) -> None:
        """Check dst_fd's whole content before it may be called resident (a remote object's hash);
        SourceError (EIO) if it is not the object's. Local objects: nothing to check."""
        ...

    def close(self) -> None: ...


class Source(Protocol):
    """What the filler needs from a source.

    A source class may set ``quick = True`` when a fill costs about a local disk read: the filler
    then fills small files in its event reader, saving a thread hand-off per file. Slow sources
    (a network) leave it unset, so that one slow fetch never holds up other readers' events.
    """

    def describe(self) -> str:
        """A human-readable name for logs ("/srv/data", "s3://bucket/prefix")."""
        ...

    def open(self, rel: str, rec: Record) -> SourceFile:
        """The object rel, checked against rec; SourceError if it is gone, unreadable, or not the
        object the stub was made from (so never served under the stub's old metadata)."""
        ...

    def close(self) -> None: ...
