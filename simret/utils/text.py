r"""One field of a row-wise text output (tsv, tables, ``skipped.tsv``) that never splits its row.

File names may hold any character but ``/`` and NUL, tab and newline included. Printed as they are, such an
id would add a column or a row. ``escape_field`` writes them as PostgreSQL's text format (``COPY … TO``)
does: a backslash becomes ``\\``, a tab ``\t``, a newline ``\n``, a carriage return ``\r``; any other
control character (U+0000–U+001F, U+007F, U+0080–U+009F, and the line/paragraph separators U+2028/U+2029
that some readers take as line breaks) becomes ``\xHH`` or ``\uHHHH``, as do the lone surrogates by which
Python spells file-name bytes that are not UTF-8 (they could not be printed otherwise). Everything else,
non-ASCII letters included, is printed as it is. ``unescape_field`` reverses it exactly; ``jsonl`` output
needs neither (JSON escapes strings itself).
"""
from __future__ import annotations

import re

_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_SPECIAL = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.DOTALL)
_UNNAMED = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group(0)
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_field(text: str) -> str:
    """``text`` with backslash, tab, newline and other control characters escaped (see the module doc):
    a name holding a tab, ``a<TAB>b``, is printed ``a\\tb`` (four characters)."""
    return _SPECIAL.sub(_escape_one, str(text))


def _unescape_one(match: re.Match[str]) -> str:
    body = match.group(1)
    if len(body) > 1:  # xHH or uHHHH
        return chr(int(body[1:], 16))
    return _UNNAMED.get(body, body)  # an unknown escape stands for the character itself, as in PostgreSQL


def unescape_field(text: str) -> str:
    """The original of an ``escape_field`` output: ``unescape_field(escape_field(s)) == s`` for every str."""
    return _ESCAPE.sub(_unescape_one, text)


def count(n: int, noun: str, plural: str = "") -> str:
    """``"1 image"``, ``"3 images"``: a number with its noun in the right form (``plural`` if not noun + s)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
