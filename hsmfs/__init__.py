"""hsmfs: lazy views of a source tree, filled on first access by fanotify pre-content events."""

__version__ = "0.1.0"
