"""Keep freed activations inside the process (glibc malloc settings), set before torch allocates anything.

With its default settings glibc serves every block above a sliding threshold (at most 32 MiB) with its own
``mmap`` and gives it back with ``munmap`` when freed, and trims the heap's free top back to the system
past 128 KiB. A forward pass at 1024 pixels allocates and frees activations of tens of MiB each, so every
image pays for fresh page mappings (about 300k page faults and half a second of system time per image for
ResNet-50 measured here) and the CPU spends a third of its time zeroing pages. ``keep_freed_memory``
stops that: no ``mmap`` for large blocks (``M_MMAP_MAX=0``) and a high trim threshold (``M_TRIM_THRESHOLD``),
so the memory freed after one image is reused by the next. Descriptors are identical; the process keeps
its peak memory until it exits (it is not handed back between images).

``release_freed_memory`` is the other direction, for a process that lives long (``simret serve``): it hands the
free pages of every malloc arena back to the system (``malloc_trim(0)``), called when the process is idle.

``simret``'s entry point calls ``keep_freed_memory`` before any command runs (torch is not imported then), except
for long-running commands. Switch it off with
``SIMRET_MALLOC=default``. Nothing is changed where another allocator is preloaded (jemalloc, tcmalloc,
mimalloc in ``LD_PRELOAD``: they keep memory on their own) or where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Optional

ENV = "SIMRET_MALLOC"
OFF_VALUES = ("0", "off", "default", "system", "no", "false")
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top (an int for mallopt)
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: Optional[str] = None


def allocator_state() -> str:
    """What ``keep_freed_memory`` did in this process: ``kept`` (glibc settings applied), ``off`` (switched
    off by ``SIMRET_MALLOC``), ``preloaded:<name>`` (another allocator is in use), ``unsupported`` (not glibc)
    or ``untouched`` (not called)."""
    return _state or "untouched"


def keep_freed_memory() -> str:
    """Apply the glibc settings once per process (see the module docstring); returns ``allocator_state()``."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get(ENV, "").strip().lower() in OFF_VALUES:
        _state = "off"
        return _state
    preload = os.environ.get("LD_PRELOAD", "")
    for name in OTHER_ALLOCATORS:
        if name in preload:
            _state = f"preloaded:{name}"
            return _state
    libc = _glibc()
    if libc is None:
        _state = "unsupported"
        return _state
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state = "kept" if ok else "unsupported"
    return _state


def release_freed_memory() -> bool:
    """Give the free memory of every glibc arena back to the system (``malloc_trim(0)``: the heap's free top
    and whole free pages inside it). True when glibc released something; False when nothing was released
    or the C library is not glibc. Costs a walk over the arenas (milliseconds): call it when idle."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library through ctypes when it is glibc (has ``mallopt``), else None."""
    try:
        if platform.system() != "Linux" or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):  # no such confstr name: not glibc
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover
        return None
    if not hasattr(libc, "mallopt"):  # pragma: no cover
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    return libc
