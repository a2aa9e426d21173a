"""Progress bars on stderr (tqdm), switched off by ``simret -q`` or ``SIMRET_PROGRESS=0``."""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional

_enabled = os.environ.get("SIMRET_PROGRESS", "1") not in ("0", "false", "no")


def set_enabled(enabled: bool) -> None:
    """Turn every later progress bar on or off."""
    global _enabled
    _enabled = bool(enabled) and os.environ.get("SIMRET_PROGRESS", "1") not in ("0", "false", "no")


def is_enabled() -> bool:
    return _enabled


def progress(iterable: Optional[Iterable] = None, *, desc: str = "", total: Optional[int] = None,
             unit: str = "it", **kwargs: Any):
    """A tqdm bar on stderr (or a silent one when progress is off).

    On a terminal the bar redraws every 0.5 s and is cleared when done; into a log file (stderr not a
    terminal) it writes a line at most every 5 s and keeps its final line (count, time, rate).
    """
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=not _enabled,
                dynamic_ncols=True, mininterval=0.5 if interactive else 5.0, leave=not interactive, **kwargs)
