"""``meta.json``: the commit record of an index generation (model, settings, counts, file checksums).

Format 2 (this simret) records, besides what format 1 did, the generation's sequence number, the roots
its images came from, and per file its size and checksum::

    "files": {"descriptors": {"name": "descriptors.h5", "bytes": N, "integrity": "hdf5-fletcher32"},
              "index": {"name": "index.faiss", "bytes": N, "checksum": "sha256:…"}, "whitening": …, "skipped": …}

Format 1 directories (written before generations existed) are read as they are and migrated by the next
write; a ``format_version`` above this simret's is refused with the reason.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

PathLike = Union[str, os.PathLike]
FORMAT = "simret-index"
FORMAT_VERSION = 2
META_KEYS = ("generation", "root", "count", "fingerprint", "model", "dim", "scales", "max_size", "index", "whitening")


class IndexDamagedError(ValueError):
    """A file of an index directory that is missing, damaged or inconsistent; the message names the repair.

    ``problem`` is the message without the repair (what a writer logs before repairing it itself)."""

    def __init__(self, problem: str, out: PathLike) -> None:
        super().__init__(f"{problem}: {repair_hint(out)}")
        self.problem = problem


def repair_hint(out: PathLike) -> str:
    """How to repair a directory whose derived files (index, whitening, meta) are damaged."""
    return (f"`simret check {out} --repair` rebuilds it from the stored descriptors (or run your simret index "
            f"command again)")


def parse_meta(text: str, shown: PathLike, out: PathLike) -> Dict[str, Any]:
    """Validate the text of a meta.json (``shown``: the path messages name).

    Raises:
        IndexDamagedError: not JSON, or damaged (keys missing or malformed).
        ValueError: not a simret index description, or written by a newer simret.
    """
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise IndexDamagedError(f"{shown} is not readable JSON ({err})", out) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = f"format {meta.get('format')!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{shown} is not a simret index description ({found}, not written by simret index): "
                         f"choose another directory, or replace it with simret index --overwrite")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise IndexDamagedError(f"{shown} is damaged (format_version {version!r})", out)
    if version > FORMAT_VERSION:
        raise ValueError(f"{out} was written by a newer simret (index format {version}; this simret reads formats "
                         f"up to {FORMAT_VERSION}): upgrade simret (pip install -U simret)")
    missing = [key for key in META_KEYS if key not in meta]
    if missing or not isinstance(meta["index"], dict) or not {"kind", "dim"} <= set(meta["index"]) \
            or not isinstance(meta["whitening"], dict):
        raise IndexDamagedError(f"{shown} is damaged (missing or malformed: "
                                f"{', '.join(missing) or 'index/whitening'})", out)
    return meta


def read_meta_file(path: Path, shown: PathLike, out: PathLike) -> Dict[str, Any]:
    """``parse_meta`` of the file ``path`` (an unreadable file is damaged)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise IndexDamagedError(f"{shown} is not readable JSON ({err})", out) from None
    return parse_meta(text, shown, out)


def file_record(meta: Dict[str, Any], key: str) -> Dict[str, Any]:
    """``{"name", "bytes", "checksum"}`` of one file of the generation (format 1: the name alone)."""
    entry = (meta.get("files") or {}).get(key)
    if isinstance(entry, dict):
        return entry
    return {"name": entry} if isinstance(entry, str) else {}


def model_record(model_spec: Optional[Dict[str, Any]], encoder: Any) -> Dict[str, Any]:
    """What ``simret search`` needs to rebuild the encoder: arch, pool, gamma, weights, checkpoint_key.

    Read back by ``simret.commands.index.spec_from_meta``."""
    spec = dict(model_spec or {})
    weights = spec.get("weights")
    if weights not in (None, "none", "random", "timm") and not str(weights).startswith("simpool:") \
            and Path(str(weights)).expanduser().exists():
        weights = str(Path(str(weights)).expanduser().resolve())
    config = getattr(encoder, "config", {}) or {}
    return {"arch": config.get("arch", spec.get("arch")), "pool": config.get("pool", spec.get("pool")),
            "gamma": config.get("gamma", spec.get("gamma")),
            "weights": "none" if weights in (None, "random") else weights,
            "checkpoint_key": spec.get("checkpoint_key")}


def spec_from_meta(model_spec: Dict[str, Any], meta: Dict[str, Any], chosen: Callable[[str], bool]) -> Dict[str, Any]:
    """Model options take the index's recorded values (``model_record``) unless ``chosen(key)`` says the user
    set them, so ``--append``, ``search`` and ``serve`` need no model flags."""
    spec = dict(model_spec)
    for key in ("arch", "pool", "gamma", "weights", "checkpoint_key"):
        if not chosen(key) and key in meta.get("model", {}):
            spec[key] = meta["model"][key]
    return spec


def summary_lines(meta: Dict[str, Any]) -> List[str]:
    """``simret info DIR``: what an index directory holds, one fact per line."""
    index, whitening = meta["index"], meta["whitening"]
    lines = [f"generation  {meta['generation']} (format {meta.get('format_version', 1)}), updated "
             f"{meta.get('updated', meta.get('created', '?'))}",
             f"images      {meta['count']} ({meta.get('skipped', 0)} skipped), root {meta['root']}"
             + (f"; sources {', '.join(meta['sources'])}" if len(meta.get("sources", [])) > 1 else ""),
             f"encoder     {meta['fingerprint']} (model {meta['model'].get('arch')}, weights "
             f"{meta['model'].get('weights')}), scales {meta['scales']}, max size {meta['max_size']}",
             f"index       {index['kind']} {index.get('params', {})}, {index['dim']}-d, "
             f"{index.get('bytes_per_vector', 0):g} bytes/vector; whitening {whitening.get('kind', 'none')}"]
    if index.get("choice"):
        lines.append(f"choice      {index['choice']}")
    if "recall_at_10" in index:
        rescored = f", {index['recall_at_10_rescored']:.3f} with exact re-scoring" \
            if "recall_at_10_rescored" in index else ""
        lines.append(f"recall@10   {index['recall_at_10']:.3f}{rescored} (against exact search, "
                     f"{index.get('recall_queries')} stored images as queries, at {index.get('recall_measured_at')} "
                     f"images)")
    if index.get("tuned"):
        lines.append(f"tuned       {index['tuned']}")
    return lines
