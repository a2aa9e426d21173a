"""SIGTERM handled like Ctrl-C: ``timeout``, Slurm and Kubernetes stop a run with SIGTERM, and simret must
then keep what it computed (resume checkpoints) and remove its temporaries, exactly as after Ctrl-C.

``terminate_like_interrupt()`` (called by the ``simret`` entry point) turns SIGTERM into ``Terminated``, a
``KeyboardInterrupt``, so every ``finally``/``except BaseException`` cleanup that handles Ctrl-C also runs
for it; the process then exits with status 143 (128 + SIGTERM), as an unhandled SIGTERM would.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def terminate_like_interrupt() -> None:
    """Route SIGTERM to ``Terminated`` in the main thread (a no-op elsewhere, or where SIGTERM is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_terminated)


def exit_status(err: KeyboardInterrupt) -> int:
    """The conventional exit status after ``err``: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
