"""Index choice under a memory budget (``simret index --max-memory 4GB``), as autofaiss does it.

The memory an index needs for ``n`` vectors of width ``d``:

* ``flat``: ``4·n·d`` bytes (the vectors themselves);
* ``ivfpq``: per vector ``⌈m·nbits/8⌉`` code bytes + 8 id bytes, plus ``4·nlist·d`` for the coarse centroids
  and ``4·2^nbits·d`` for the product-quantizer tables;
* ``hnsw``: per vector ``4·d`` + about ``2·M`` links of 4 bytes (×1.05 for the upper levels).

``choose_index`` keeps ``flat`` while it fits (exact search), else sizes an ``ivfpq`` to the budget (the most
bytes per code that fit, so the best recall that fits), and takes ``hnsw`` only when asked for; it says
what it picked and why.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from simret.retrieval.index import auto_params

UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024 ** 2, "g": 1e9,
         "gb": 1e9, "gib": 1024 ** 3, "t": 1e12, "tb": 1e12, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5g"``, ``"2000000"`` → bytes.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"expected a size like 4GB, 512MiB or 2000000 (bytes), got {text!r}")
    value = float(match.group(1)) * UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"a memory budget must be at least 1 byte, got {text!r}")
    return int(value)


def format_size(n_bytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{int(n_bytes)} B"


def index_bytes(kind: str, n: int, dim: int, params: Dict[str, Any]) -> float:
    """Memory (bytes) an index of ``kind`` with ``params`` needs for ``n`` ``dim``-wide vectors."""
    if kind == "flat":
        return 4.0 * n * dim
    if kind == "ivfpq":
        code = math.ceil(params["m"] * params["nbits"] / 8)
        return n * (code + 8.0) + 4.0 * params["nlist"] * dim + 4.0 * (2 ** params["nbits"]) * dim
    if kind == "hnsw":
        return n * (4.0 * dim + 4 * 2 * params["M"] * 1.05)
    raise ValueError(f"unknown index kind {kind!r}")


@dataclass
class IndexChoice:
    """What ``choose_index`` picked: the kind, its parameters, the memory it needs and why."""

    kind: str
    params: Dict[str, Any] = field(default_factory=dict)
    bytes: float = 0.0
    reason: str = ""


def choose_index(n: int, dim: int, budget: int, kind: str = "auto",
                 params: Optional[Dict[str, Any]] = None) -> IndexChoice:
    """The index for ``n`` ``dim``-wide vectors in ``budget`` bytes (see the module docstring).

    ``kind``: ``auto`` (flat if it fits, else ivfpq), or ``flat``/``ivfpq``/``hnsw`` to check and size that kind;
    ``params``: parameters the user fixed (``--index-param``).

    Raises:
        ValueError: nothing of that kind fits in the budget (the message says how much is needed).
    """
    params = dict(params or {})
    if kind in ("auto", "flat"):
        needed = index_bytes("flat", n, dim, {})
        if needed <= budget:
            return IndexChoice("flat", {}, needed, f"exact flat index: {n:,} × {dim} float32 = {format_size(needed)} "
                                                   f"fits in {format_size(budget)}")
        if kind == "flat":
            raise ValueError(f"a flat index of {n:,} {dim}-d vectors needs {format_size(needed)}, more than "
                             f"--max-memory {format_size(budget)}: use --index ivfpq or auto, or a larger budget")
    if kind == "hnsw":
        chosen = {**auto_params("hnsw", n, dim), **params}
        needed = index_bytes("hnsw", n, dim, chosen)
        if needed > budget:
            raise ValueError(f"an hnsw index of {n:,} {dim}-d vectors (M={chosen['M']}) needs {format_size(needed)}, "
                             f"more than --max-memory {format_size(budget)}: use --index ivfpq or auto")
        return IndexChoice("hnsw", chosen, needed,
                           f"hnsw as asked: {format_size(needed)} fits in {format_size(budget)}")
    return _sized_ivfpq(n, dim, budget, params, flat_bytes=index_bytes("flat", n, dim, {}))


def _sized_ivfpq(n: int, dim: int, budget: int, params: Dict[str, Any], flat_bytes: float) -> IndexChoice:
    """The ivfpq with the largest codes (best recall) that fits: ``m`` from the automatic choice downwards."""
    base = {**auto_params("ivfpq", n, dim), **params}
    fixed_m = "m" in params
    candidates = [base["m"]] if fixed_m else [m for m in range(base["m"], 0, -1) if dim % m == 0]
    for m in candidates:
        chosen = {**base, "m": m}
        needed = index_bytes("ivfpq", n, dim, chosen)
        if needed <= budget:
            code = math.ceil(m * chosen["nbits"] / 8)
            return IndexChoice("ivfpq", chosen, needed,
                               f"a flat index would need {format_size(flat_bytes)}, more than {format_size(budget)}: "
                               f"ivfpq with {code}-byte codes (m={m}, nbits={chosen['nbits']}, "
                               f"nlist={chosen['nlist']}) needs {format_size(needed)}")
    smallest = index_bytes("ivfpq", n, dim, {**base, "m": candidates[-1] if candidates else 1})
    raise ValueError(f"no index of {n:,} {dim}-d vectors fits in --max-memory {format_size(budget)}: the smallest "
                     f"ivfpq needs {format_size(smallest)} (a flat one {format_size(flat_bytes)})")
