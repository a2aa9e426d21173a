"""Tab-separated rows that no value can break: PostgreSQL's text-format escapes.

A value containing a backslash, tab, newline or carriage return is written with ``\\\\``, ``\\t``, ``\\n``
and ``\\r`` in their place, so every row stays one line of tab-separated fields whatever the file names
hold; ``unescape`` reverses it exactly. Used for ``skipped.tsv`` and every ``--format tsv``/table output
that prints ids.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape(value: str) -> str:
    """``value`` with backslash, tab, newline and carriage return written as two-character escapes."""
    if not any(c in value for c in _ESCAPES):
        return value
    return "".join(_ESCAPES.get(c, c) for c in value)


def unescape(value: str) -> str:
    """The inverse of ``escape`` (an unknown escape keeps its character, a trailing backslash stays)."""
    if "\\" not in value:
        return value
    out: List[str] = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            out.append("\\" if nxt is None else _UNESCAPES.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def format_row(fields: Iterable[object]) -> str:
    """One tab-separated line (no newline) of escaped fields."""
    return "\t".join(escape(str(f)) for f in fields)


def parse_row(line: str) -> Sequence[str]:
    """The unescaped fields of one line written by ``format_row``."""
    return [unescape(f) for f in line.split("\t")]
