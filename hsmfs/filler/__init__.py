"""The filler: the process that owns one mount's fanotify group, fills stubs, commits, evicts.

hsmfs.filler.core holds the filler itself and says what each of its threads does; the parts:
``marks`` (what each mark means), ``fill`` (one file), ``ahead`` (fill-ahead), ``evict``
(eviction), ``budget`` (space), ``takeover`` (after a filler crash), ``service`` (the process:
control socket and lifecycle).
"""

from hsmfs.filler.core import Filler

__all__ = ["Filler"]
