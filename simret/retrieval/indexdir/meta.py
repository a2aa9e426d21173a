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
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from simret.retrieval.index import DEFAULT_RERANK
from simret.retrieval.indexdir.names import CURRENT, GENERATIONS

PathLike = Union[str, os.PathLike]
FORMAT = "simret-index"
FORMAT_VERSION = 2
META_KEYS = ("generation", "root", "count", "fingerprint", "model", "dim", "scales", "max_size", "index", "whitening")


class IndexDamagedError(ValueError):
    """A file of an index directory that is missing, damaged or inconsistent; the message names the repair.

    ``problem`` is the message without the repair (what a writer logs before repairing it itself)."""

    def __init__(self, problem: str, out: PathLike, repair: Optional[str] = None) -> None:
        super().__init__(f"{problem}: {repair or repair_hint(out)}")
        self.problem = problem


def repair_hint(out: PathLike) -> str:
    """How to repair a directory whose derived files (index, whitening, meta) are damaged."""
    return (f"`simret check {out} --repair` rebuilds it from the stored descriptors (or run your simret index "
            f"command again)")


def store_repair_hint(out: PathLike) -> str:
    """How to repair a directory whose descriptor store is damaged (its rows must be described again)."""
    return (f"run your simret index command for {out} again: it describes the damaged entries again "
            f"(`simret check {out} --repair` would drop them instead)")


def parse_meta(text: str, shown: PathLike, out: PathLike, *, in_generation: bool = False) -> Dict[str, Any]:
    """Validate the text of a meta.json (``shown``: the path messages name; ``in_generation``: the file is
    in a generation folder simret wrote, so whatever it holds was a simret record: damaged, not foreign).

    Raises:
        IndexDamagedError: not JSON, or damaged (keys missing, or of the wrong type).
        ValueError: not a simret index description, or written by a newer simret.
    """
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise IndexDamagedError(f"{shown} is not readable JSON ({err})", out) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = f"format {meta.get('format')!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        if in_generation:
            raise IndexDamagedError(f"{shown} is damaged ({found} in a generation simret wrote)", out)
        raise ValueError(f"{shown} is not a simret index description ({found}, not written by simret index): "
                         f"choose another directory, or replace it with simret index --overwrite")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IndexDamagedError(f"{shown} is damaged (format_version {version!r})", out)
    if version > FORMAT_VERSION:
        raise ValueError(f"{out} was written by a newer simret (index format {version}; this simret reads formats "
                         f"up to {FORMAT_VERSION}): upgrade simret (pip install -U simret)")
    malformed = malformed_keys(meta, version)
    if malformed:
        raise IndexDamagedError(f"{shown} is damaged (missing or malformed: {', '.join(malformed)})", out)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _dict_of(fields: Dict[str, Callable[[Any], bool]], required: Tuple[str, ...]) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return isinstance(value, dict) and all(k in value for k in required) \
            and all(check_field(value[k]) for k, check_field in fields.items() if k in value)
    return check


_MODEL = _dict_of({k: _optional(lambda v: _is_text(v) or _is_number(v))
                   for k in ("arch", "pool", "gamma", "weights", "checkpoint_key")}, ())
_INDEX = _dict_of({"kind": _is_text, "dim": _is_int, "ntotal": _is_int, "params": lambda v: isinstance(v, dict),
                   "requested": _is_text, "requested_params": lambda v: isinstance(v, dict)}, ("kind", "dim"))
_WHITENING = _dict_of({"kind": lambda v: v in ("none", "pca"), "learned_on": _is_text,
                       "out_dim": _optional(_is_int), "in_dim": _is_int}, ())
_FILE = _dict_of({"name": _is_text, "bytes": _is_int, "checksum": _is_text, "integrity": _is_text}, ("name",))
# key → (check, first format version that requires it; None: optional)
SCHEMA: Dict[str, Tuple[Callable[[Any], bool], Optional[int]]] = {
    "generation": (_is_text, 1), "root": (_is_text, 1), "count": (_is_int, 1), "fingerprint": (_is_text, 1),
    "model": (_MODEL, 1), "dim": (_is_int, 1), "max_size": (_optional(_is_int), 1),
    "scales": (lambda v: isinstance(v, list) and bool(v) and all(_is_number(x) and x > 0 for x in v), 1),
    "index": (_INDEX, 1), "whitening": (_WHITENING, 1), "skipped": (_is_int, None),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(e, str) or _FILE(e) for e in v.values()), 2),
    "sequence": (_is_int, 2), "store_generation": (_is_text, None),
    "sources": (lambda v: isinstance(v, list) and all(_is_text(x) for x in v), None),
    "half": (lambda v: isinstance(v, bool), None), "store_dtype": (lambda v: v in ("float32", "float16"), None),
    "provenance": (lambda v: isinstance(v, dict), None),
}


def malformed_keys(meta: Dict[str, Any], version: int) -> List[str]:
    """The keys of ``meta`` that a ``version`` record must have and lacks, or that hold a value of the wrong type."""
    bad = []
    for key, (check, since) in SCHEMA.items():
        if key not in meta:
            if since is not None and version >= since:
                bad.append(key)
        elif not check(meta[key]):
            bad.append(key)
    return bad


def read_meta_file(path: Path, shown: PathLike, out: PathLike) -> Dict[str, Any]:
    """``parse_meta`` of the file ``path`` (an unreadable file is damaged)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise IndexDamagedError(f"{shown} is not readable JSON ({err})", out) from None
    folder = Path(path).parent
    return parse_meta(text, shown, out, in_generation=folder.parent.name == GENERATIONS or folder.name == CURRENT)


def disagreements(meta: Dict[str, Any], attrs: Dict[str, Any], count: int) -> List[str]:
    """What meta.json records differently from its generation's store (``attrs``, ``count`` rows): the
    generation, the row count, the encoder, the root, the scales or the size (any of them: not one run)."""
    def scales(values: Any) -> List[float]:
        return [float(v) for v in values]

    expected = meta.get("store_generation", meta.get("generation"))
    found = {"generation": attrs.get("generation"), "count": count, "fingerprint": attrs.get("fingerprint"),
             "root": attrs.get("root", meta["root"]), "scales": scales(attrs.get("scales", meta["scales"])),
             "max_size": attrs.get("max_size", meta["max_size"]) or None}
    recorded = {"generation": expected, "count": meta["count"], "fingerprint": meta["fingerprint"],
                "root": meta["root"], "scales": scales(meta["scales"]), "max_size": meta["max_size"] or None}
    return [key for key in recorded if found[key] != recorded[key]]


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
             f"{meta['model'].get('weights')}), scales {meta['scales']}, max size {meta['max_size'] or 'as stored'}",
             f"index       {index['kind']} {index.get('params', {})}, {index['dim']}-d, "
             f"{index.get('bytes_per_vector', 0):g} bytes/vector; whitening {whitening.get('kind', 'none')}"]
    if index.get("choice"):
        lines.append(f"choice      {index['choice']}")
    if "recall_at_10" in index:
        depth = index.get("rerank", DEFAULT_RERANK)
        rescored = f", {index['recall_at_10_rescored']:.3f} with exact re-scoring of {depth}·k candidates (what " \
            "searches use)" if "recall_at_10_rescored" in index else ""
        lines.append(f"recall@10   {index['recall_at_10']:.3f}{rescored} (against exact search, "
                     f"{index.get('recall_queries')} stored images as queries, at {index.get('recall_measured_at')} "
                     f"images)")
    if index.get("tuned"):
        lines.append(f"tuned       {index['tuned']}")
    return lines
