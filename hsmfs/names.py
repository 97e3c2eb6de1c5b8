"""How hsmfs shows a file name (or any text a user chose) in its output and logs: :func:`escape`.

File names come from users: whoever can write to the source, or to a view, picks them. A name may
hold a newline (a forged line in ``hsmfs evict``'s output or in the log), a carriage return or
terminal escape sequences (rewriting what an admin sees), bidirectional controls (a name that reads
differently from what it is), or bytes that are not UTF-8. Every line hsmfs prints or logs passes
what users chose through :func:`escape`: the CLI where it prints a path, and the log formatter of
every hsmfs process (:class:`EscapingFormatter`) on every message, whatever module
logged it.

The rules, close to ``ls -b`` and ``systemd-escape``:

- ``\\n``, ``\\r``, ``\\t`` for newline, carriage return and tab;
- ``\\xNN`` for every other C0 control, DEL and C1 control (``\\x1b`` for ESC), and for each byte
  of a name that is not UTF-8 (Python holds those as lone surrogates, ``os.fsdecode``);
- ``\\uNNNN`` for the line and paragraph separators and the bidirectional controls;
- everything else, a backslash included, as it is.

A backslash is kept so that escaping twice changes nothing (log lines of messages that already
hold escaped names stay readable); the price is that a name holding a real backslash followed by
``n`` looks like one holding a newline. ``--json`` output carries the exact names.
"""

from __future__ import annotations

import logging
import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0, DEL, C1; lone surrogates (undecodable bytes); U+2028/2029; bidi embeddings, overrides,
# isolates and marks (Unicode TR9); U+FEFF is left alone (harmless, and common at file starts)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def _one(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte 0x80-0xff that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape(text: str) -> str:
    """text with every character that could break a line or fool a terminal written as an escape.

    >>> escape("x\\nCRITICAL forged")
    'x\\\\nCRITICAL forged'
    >>> escape(escape("tab\\there")) == escape("tab\\there")
    True
    """
    return _UNSAFE.sub(_one, text)


class EscapingFormatter(logging.Formatter):
    """One log record, one line: the message (file names users chose among it) is escaped.

    A name holding a newline would otherwise add a line of its own choosing to the log, with
    the priority of the record it hides in (hsmfs.names). A traceback stays as it is: it is
    hsmfs's own text, and the exception's message in it is a repr.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        saved = record.message
        record.message = escape(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved


def human_size(n: float) -> str:
    """Bytes for people: 1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
