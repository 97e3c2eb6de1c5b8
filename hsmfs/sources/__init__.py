"""Where content comes from. One module per kind of source behind the small protocol below."""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """What the filler needs from a source: a readable fd per object."""

    def describe(self) -> str:
        """A human-readable name for logs ("/srv/data", "s3://bucket/prefix")."""
        ...

    def open(self, rel: str) -> int:
        """A readable fd of the object rel; OSError (ENOENT, ELOOP, ...) when it cannot be had.

        The filler checks its size and mtime against the stub's record, then copies from it.
        """
        ...

    def close(self) -> None: ...
