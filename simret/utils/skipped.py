"""The list of files a run could not use (``skipped.tsv``): one format for ``simret index`` and ``simret train``.

::

    id<TAB>reason
    broken.jpg<TAB>truncated or corrupt (image file is truncated)

Ids (paths relative to the indexed/training root) and reasons are escaped with ``simret.utils.text``, so a
file name holding a tab or a newline still takes exactly one row.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Tuple, Union

from simret.utils.atomic import write_text_atomic
from simret.utils.text import escape_field, unescape_field

PathLike = Union[str, os.PathLike]
HEADER = "id\treason"


def format_skipped(entries: Iterable[Tuple[str, str]]) -> str:
    """The file's text for ``(id, reason)`` pairs, in the order given."""
    return HEADER + "\n" + "".join(f"{escape_field(i)}\t{escape_field(r)}\n" for i, r in entries)


def parse_skipped(text: str) -> Dict[str, str]:
    """``{id: reason}`` from the file's text (a header of an older simret, ``path<TAB>reason``, is accepted)."""
    entries: Dict[str, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) >= 2:
            entries[unescape_field(fields[0])] = unescape_field("\t".join(fields[1:]))
    return entries


def read_skipped(path: PathLike) -> Dict[str, str]:
    """``{id: reason}`` from ``path`` (empty when there is no such file)."""
    path = Path(path)
    if not path.is_file():
        return {}
    return parse_skipped(path.read_text(encoding="utf-8"))


def write_skipped(path: PathLike, entries: Union[Mapping[str, str], Iterable[Tuple[str, str]]]) -> Path:
    """Write ``path`` atomically from ``{id: reason}`` or ``(id, reason)`` pairs."""
    pairs = entries.items() if isinstance(entries, Mapping) else entries
    return write_text_atomic(path, format_skipped(pairs))
