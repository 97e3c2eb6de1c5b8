"""Where content comes from. One module per kind of source behind the small protocol below."""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """What the filler needs from a source: the bytes of one object, written into an fd."""

    def describe(self) -> str:
        """A human-readable name for logs ("/srv/data", "s3://bucket/prefix")."""
        ...

    def open(self, rel: str) -> int:
        """A readable fd of the object rel (used to compare partially filled files)."""
        ...

    def fill(self, rel: str, dst_fd: int, size: int) -> None:
        """Write the object's bytes [0, size) into dst_fd at the same offsets.

        Raises OSError (with the file named in the message) if the object is gone, unreadable
        or no longer size bytes long. Writes nothing but the source's bytes.
        """
        ...

    def close(self) -> None: ...
