"""Run the ``simret`` command line and report this process's own peak resident memory (``VmHWM``).

``python -m simret.bench.peak FILE ARGS…`` runs ``simret ARGS…`` and, at exit, writes the process's
``VmHWM`` in bytes to ``FILE``. Why not ``ru_maxrss`` from ``wait4``: Linux carries the parent's resident
memory at the fork into the child's ``ru_maxrss`` (the address space it replaced at ``exec`` counts), so a
benchmark process holding 2 GB would report every child as 2 GB or more. ``VmHWM`` belongs to the address
space the command itself ran in.
"""
from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import List, Optional, Union


def process_status_bytes(field: str, pid: Union[int, str] = "self") -> int:
    """A memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM`` …) in bytes (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status (Linux only)")


def peak_resident_bytes() -> int:
    """This process's peak resident memory since its ``exec`` (``VmHWM``), bytes."""
    return process_status_bytes("VmHWM")


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m simret.bench.peak FILE [simret arguments…]")
    report = Path(args.pop(0))
    atexit.register(lambda: report.write_text(str(peak_resident_bytes())))
    from simret.cli import main as simret_main

    simret_main(args)


if __name__ == "__main__":
    main()
