"""Logging to stderr with a verbosity set by ``-v``/``-q`` (results go to stdout, logs never do)."""
from __future__ import annotations

import logging
import sys

LOGGER_NAME = "simret"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (test runners and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the live sys.stderr wins
        pass


def setup_logging(verbosity: int = 0) -> logging.Logger:
    """Configure the ``simret`` logger: -1 quiet (warnings), 0 info, 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if getattr(h, "_simret", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler._simret = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(levelname)s %(name)s: %(message)s"))
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the ``simret`` logger, e.g. ``get_logger(__name__)``."""
    return logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")
