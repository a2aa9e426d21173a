"""``build_index``: images → the next generation of an index directory, in named stages.

    lock ▸ previous ▸ plan ▸ describe ▸ assemble store ▸ whitening + index ▸ commit

One writer at a time holds the directory's lock (``simret.utils.locking``); it reads the committed
generation (damage assessed), plans what to reuse and what to describe (``plan``), describes the missing
images into resume checkpoints (``describe``), writes the next store block by block (``assemble``),
builds whitening and index from it (``searchable``) and commits the generation with one atomic rename
(``layout``). Until that rename nothing a reader sees has changed; after it every file is the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.models.precision import recorded_precision
from simret.retrieval.indexdir.assemble import Assembled, assemble_store, resolve_sources
from simret.retrieval.indexdir.checkpoints import Checkpoints
from simret.retrieval.indexdir.describe import Described, describe_missing
from simret.retrieval.indexdir.layout import NewGeneration, new_generation_id, remove_stale
from simret.retrieval.indexdir.meta import (
    FORMAT,
    FORMAT_VERSION,
    IndexDamagedError,
    file_record,
    model_record,
)
from simret.retrieval.indexdir.names import INDEX_FILE, META, SKIPPED, STORE, WHITENING_FILE
from simret.retrieval.indexdir.plan import Entry, Plan, make_plan
from simret.retrieval.indexdir.previous import Previous, load_previous
from simret.retrieval.indexdir.searchable import INDEXED, Searchable, build_searchable, same_index_settings
from simret.retrieval.indexdir.settings import BuildSummary, IndexSettings
from simret.retrieval.indexdir.source import check_source, copy_source
from simret.retrieval.store import StoreError, StoreReader, store_attrs, store_dtype
from simret.utils import distributed
from simret.utils.atomic import write_failure
from simret.utils.filestate import FileStates, file_checksum
from simret.utils.locking import writer_lock
from simret.utils.logs import get_logger
from simret.utils.skipped import format_skipped
from simret.utils.text import count

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
Listing = Tuple[Path, List[str]]


@dataclass
class Identity:
    """What meta.json records of the encoder that computed the descriptors."""

    fingerprint: str
    provenance: Dict[str, Any]
    model: Dict[str, Any]  # model_record: how search rebuilds the encoder
    dim: int

    @classmethod
    def of_encoder(cls, encoder: Any, model_spec: Optional[Dict[str, Any]]) -> Identity:
        return cls(encoder.fingerprint, encoder.provenance(), model_record(model_spec, encoder), int(encoder.dim))

    @classmethod
    def of_store(cls, attrs: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> Identity:
        """From a store's attributes (and the index's meta.json when it is readable)."""
        keys = ("fingerprint", "arch", "pool", "gamma", "weights", "dim", "simret_version")
        provenance = (meta or {}).get("provenance") or {k: attrs[k] for k in keys if k in attrs}
        model = (meta or {}).get("model") or {
            "arch": attrs.get("arch"), "pool": attrs.get("pool"),
            "gamma": None if attrs.get("gamma") in (None, "none") else attrs.get("gamma"),
            "weights": _weights_option(str(attrs.get("weights", "random"))), "checkpoint_key": None}
        return cls(str(attrs["fingerprint"]), provenance, model, int(attrs.get("dim", 0)))


def _weights_option(recorded: str) -> str:
    """A store's ``weights`` attribute (``timm:resnet50``, ``simpool:NAME``, a path, ``random``) as --weights."""
    if recorded in ("random", "none"):
        return "none"
    return "timm" if recorded.startswith("timm:") else recorded


def build_index(source: Union[PathLike, Listing], out: PathLike, encoder: Any,
                settings: Optional[IndexSettings] = None, *, model_spec: Optional[Dict[str, Any]] = None,
                append: bool = False, overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """Index the images of ``source`` (folder or list file, or its ``list_images`` result ``(root, ids)``)
    into the directory ``out``, as its next generation.

    * ``out`` already holds an index of the same encoder, settings and root: descriptors of unchanged
      images are reused (and so are the checkpoints of an interrupted run); new and changed images are
      described; images no longer listed under the root leave it (``settings.keep_missing`` keeps them);
      the index is rebuilt over the result, or kept when nothing changed ("up to date").
    * ``append=True``: every indexed image stays; the listed ones are added (or described again if they
      changed), with the same whitening and FAISS index (no retraining).
    * ``overwrite=True``: start afresh (the previous generation stays current until the new one commits).
    * damaged files are repaired: a damaged index or whitening is rebuilt from the stored descriptors,
      damaged store rows are described again.
    * under ``torchrun`` every rank describes its share; rank 0 writes the generation (call ``barrier()``
      after this function so the other ranks wait for it).

    Raises:
        ValueError: ``out`` holds an index of another encoder, settings or root (without ``append`` /
            ``overwrite``), or no image could be used.
        LockTimeoutError: another writer kept ``out`` longer than ``settings.lock_timeout``.
        DiskWriteError: the new generation could not be written (disk full …); the previous one is intact.
    """
    from simret.data.images import list_images

    settings = settings or IndexSettings()
    out = output_dir(out)
    root, listed = source if isinstance(source, tuple) else list_images(source)
    with _exclusive(out, settings.lock_timeout):
        if distributed.is_main_process():
            remove_stale(out)  # what a killed writer left
        previous = Previous() if overwrite else load_previous(out)
        try:
            append = _check_previous(previous, encoder, settings, Path(root), append, out)
            return _build(out, Path(root), listed, previous, encoder, settings, model_spec, append, progress)
        finally:
            previous.close()


def _build(out: Path, root: Path, listed: Sequence[str], previous: Previous, encoder: Any, settings: IndexSettings,
           model_spec: Optional[Dict[str, Any]], append: bool, progress: bool) -> BuildSummary:
    attrs = store_attrs(encoder.provenance(), scales=settings.scales, max_size=settings.max_size,
                        extra={"precision": settings.precision})
    checkpoints = Checkpoints(out, attrs)  # valid whatever --overwrite says: same encoder and settings
    plan = make_plan(root, listed, previous, checkpoints.scan(), append=append, keep_missing=settings.keep_missing,
                     verify_content=settings.verify_content)
    _log_plan(plan, previous, append)
    distributed.barrier()  # every rank has read the same state before any rank writes a checkpoint
    described = describe_missing(plan, encoder, settings, checkpoints, progress=progress)
    if not distributed.is_main_process():
        return BuildSummary(out, 0, described.computed, 0, len(described.failures), settings.kind, encoder.dim)
    kept = resolve_sources(plan, checkpoints.scan())
    failed = _skipped(plan, described, previous, append)
    if not kept:
        shown = "; ".join(f"{i}: {r}" for i, r in failed[:3])
        raise ValueError(f"none of the {len(listed)} images under {root} could be used ({shown}"
                         f"{' …' if len(failed) > 3 else ''})")
    if _up_to_date(previous, plan, kept, failed, settings, append):
        checkpoints.remove()
        meta = previous.meta
        return BuildSummary(out, len(kept), 0, len(kept), len(failed), meta["index"]["kind"], int(meta["index"]["dim"]),
                            up_to_date=True, failures=failed, generation=str(meta["generation"]))
    summary = commit_generation(out, plan, kept, failed, described.computed, previous, checkpoints,
                                 {**attrs, "dim": encoder.dim}, Identity.of_encoder(encoder, model_spec), settings,
                                 append, encoder, progress)
    checkpoints.remove()
    return summary


def build_from_store(out: PathLike, settings: Optional[IndexSettings] = None, *, source: Optional[PathLike] = None,
                     overwrite: bool = False, progress: bool = True) -> BuildSummary:
    """A new generation of ``out`` from descriptors already computed: no image is read, no encoder built.

    * ``source=None`` (``simret check DIR --repair``): from the committed generation's own store, with the
      settings its meta.json records (the index, whitening and meta are rebuilt; rows whose checksums fail
      are dropped, and said so).
    * ``source=STORE.h5`` (``simret index --from-descriptors``): from a descriptor store written by shards,
      by ``simret eval``, or by another program in the documented format; ``settings`` say which index.

    Raises:
        IndexDamagedError: (repair) the store itself is unreadable: only ``simret index`` can describe the
            images again.
        ValueError: ``out`` holds an index of another encoder or root (without ``overwrite``).
    """
    settings = settings or IndexSettings()
    out = output_dir(out)
    with writer_lock(out, timeout=settings.lock_timeout):
        remove_stale(out)
        previous = Previous() if overwrite and source is not None else load_previous(out)
        try:
            if source is None:
                return _rebuild_from_own_store(out, previous, settings, progress)
            return _index_source(out, previous, Path(source).expanduser(), settings, progress)
        finally:
            previous.close()


def _rebuild_from_own_store(out: Path, previous: Previous, settings: IndexSettings, progress: bool) -> BuildSummary:
    """``simret check --repair``: the committed generation's intact rows, with the settings it was built with."""
    settings = _repair_settings(out, previous, settings)
    if not previous.usable.any():
        raise ValueError(f"{out / STORE} holds no usable descriptor ({len(previous.ids)} rows, all damaged or none): "
                         f"describe the images again with your simret index command")
    usable = np.flatnonzero(previous.usable)
    plan = Plan(previous.root or Path(), [], previous.states.take(usable), len(previous.ids),
                lost=int((~previous.usable).sum()))
    for row in usable.tolist():  # nothing is described: the key (a path, looked up only for images to
        plan.entries.append(Entry(previous.ids[row], previous.ids[row], row, None, False))  # describe) is the id
    attrs = {k: v for k, v in previous.attrs.items() if k not in ("generation", "root", "store_format")}
    return commit_generation(out, plan, range(len(plan.entries)), list(previous.skipped.items()), 0, previous, None,
                             attrs, Identity.of_store(previous.attrs, previous.meta), settings, False, None, progress)


def _index_source(out: Path, previous: Previous, path: Path, settings: IndexSettings, progress: bool) -> BuildSummary:
    """``simret index --from-descriptors``: a store written elsewhere, checked and copied block by block
    (``simret.retrieval.indexdir.source``: no Python object per row, whatever its size)."""
    rows = Previous(store=_open_source(path))
    try:
        _check_replacement(previous, rows, out)
        store = rows.store
        settings = replace(settings, scales=tuple(rows.attrs.get("scales", [1.0])),
                           max_size=rows.attrs.get("max_size") or None,
                           precision=rows.attrs.get("precision") or ("bf16" if store.dtype == np.float16 else "fp32"))
        if not store.count:
            raise ValueError(f"{path} holds no usable descriptor (0 rows, all damaged or none): describe the images "
                             f"again with your simret index command")
        plan = Plan(rows.root or Path(), [], FileStates.unknown(0), store.count)
        attrs = {k: v for k, v in rows.attrs.items() if k not in ("generation", "root", "store_format")}

        def assemble(target: Path, dtype: str, generation_id: str) -> Assembled:
            return copy_source(target, store, {**attrs, "root": str(plan.root)}, dtype, generation_id)

        return commit_generation(out, plan, range(store.count), [], 0, rows, None, attrs,
                                 Identity.of_store(rows.attrs, rows.meta), settings, False, None, progress,
                                 assemble=assemble)
    finally:
        rows.close()


def _open_source(path: Path) -> StoreReader:
    """A descriptor store to index as it is, checked (``check_source``); its root is its folder when it
    records none."""
    store = StoreReader(path)
    try:
        if not store.fingerprint:
            raise StoreError(f"{path} has no 'fingerprint' attribute: simret cannot tell which encoder computed "
                             f"these descriptors (write them with simret.retrieval.store.write_store)")
        check_source(path, store)
    except BaseException:
        store.close()
        raise
    if not store.attrs.get("root"):
        log.info("%s records no image root: ids are taken relative to its folder", path)
        store.attrs["root"] = str(path.parent.resolve())
    return store


def _repair_settings(out: Path, previous: Previous, given: IndexSettings) -> IndexSettings:
    """The settings the damaged generation was built with (its meta.json, else its store's attributes)."""
    if not previous.exists:
        raise FileNotFoundError(f"{out} holds no simret index to repair")
    if previous.store is None:
        raise ValueError(f"{out / STORE} is missing or unreadable: the descriptors themselves are lost; describe the "
                         f"images again with simret index IMAGES --out {out} (the same command that built it)")
    meta, attrs = previous.meta, previous.attrs
    if meta is None:
        log.warning("%s: meta.json is unusable; rebuilding with the store's settings and an automatic index "
                    "(no whitening)", out)
        return replace(given, scales=tuple(attrs.get("scales", [1.0])), max_size=attrs.get("max_size") or None,
                       kind="auto", index_params={}, whiten="none", whiten_on=None, whiten_dim=None)
    whitening = meta.get("whitening", {})
    learned_on = whitening.get("learned_on")
    if whitening.get("kind") == "pca" and not previous.whitening_ok and learned_on not in (None, INDEXED):
        raise IndexDamagedError(f"{out / WHITENING_FILE} was learned on {learned_on}, which needs the encoder: "
                                f"run your simret index command again (with --whiten-on {learned_on})", out)
    return replace(given, scales=tuple(meta["scales"]), max_size=meta.get("max_size"),
                   kind=meta["index"].get("requested", meta["index"]["kind"]),
                   index_params=dict(meta["index"].get("requested_params", {})),
                   whiten=whitening.get("kind", "none"),
                   whiten_on=learned_on if learned_on not in (None, INDEXED) else None,
                   whiten_dim=whitening.get("out_dim") if whitening.get("kind") == "pca" else None,
                   precision=recorded_precision(meta))


def _check_replacement(previous: Previous, rows: Previous, out: Path) -> None:
    recorded = previous.meta or previous.attrs
    if not recorded:
        return
    if recorded.get("fingerprint") != rows.attrs.get("fingerprint") or (previous.root and previous.root != rows.root):
        raise ValueError(f"{out} holds an index of {previous.root} by encoder {recorded.get('fingerprint')}; the "
                         f"store holds {rows.root} by {rows.attrs.get('fingerprint')}: choose another --out, or pass "
                         f"--overwrite to replace it (its {_held(previous)} leave it)")


# -------------------------------------------------------------------------------------------- stages


@contextlib.contextmanager
def _exclusive(out: Path, timeout: Optional[float]) -> Iterator[None]:
    """The writer lock of ``out`` (held by rank 0 under torchrun; the other ranks start once it holds it)."""
    if not distributed.is_distributed():
        with writer_lock(out, timeout=timeout):
            yield
    elif distributed.is_main_process():
        with writer_lock(out, timeout=timeout):
            distributed.barrier()
            yield
    else:
        distributed.barrier()
        yield


def output_dir(out: PathLike) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    return out


def _check_previous(previous: Previous, encoder: Any, settings: IndexSettings, root: Path, append: bool,
                    out: Path) -> bool:
    """Refuse what cannot be reused without --overwrite; returns whether this run appends."""
    recorded = previous.meta or previous.attrs
    if not recorded:
        if append:
            log.info("%s holds no index yet: building a new one", out)
        return False
    problems = []
    if recorded.get("fingerprint") != encoder.fingerprint:
        problems.append(f"encoder {recorded.get('fingerprint')} (this run: {encoder.fingerprint})")
    if [float(s) for s in recorded.get("scales", [])] != [float(s) for s in settings.scales]:
        problems.append(f"scales {recorded.get('scales')} (this run: {list(settings.scales)})")
    if (recorded.get("max_size") or None) != settings.max_size:
        problems.append(f"max_size {recorded.get('max_size')} (this run: {settings.max_size})")
    held = _held(previous)
    if problems and append:
        raise ValueError(f"{out} holds an index built with {'; '.join(problems)}: --append describes the new images "
                         f"as the index's were (leave out --model, --weights, --scales and --max-size: they follow "
                         f"the index), or choose another --out (--overwrite would replace the index and drop its "
                         f"{held})")
    if problems:
        raise ValueError(f"{out} holds an index built with {'; '.join(problems)}: choose another --out, or pass "
                         f"--overwrite to replace it (its {held} leave it)")
    if not append and previous.root is not None and previous.root != root:
        raise ValueError(f"{out} holds an index of {previous.root}, not of {root}: pass --append to add these images "
                         f"to it, choose another --out, or pass --overwrite to replace it (its {held} leave it)")
    if append and previous.meta and (settings.whiten != previous.meta["whitening"].get("kind", "none")
                                     or settings.kind != "auto"):
        log.info("--append keeps the existing %s index and its whitening (%s)", previous.meta["index"]["kind"],
                 previous.meta["whitening"].get("kind", "none"))
    return append


def _held(previous: Previous) -> str:
    """``"N images"`` an index holds, for messages about replacing it."""
    count = (previous.meta or {}).get("count", len(previous.ids))
    return f"{count} image{'s' if count != 1 else ''}"


def _log_plan(plan: Plan, previous: Previous, append: bool) -> None:
    todo = len(plan.todo)
    log.info("%s listed: %d to describe (%d changed since they were indexed), %d already done%s%s",
             count(plan.listed, "image"), todo, plan.redescribed, len(plan.entries) - todo,
             f", {len(previous.ids)} in the index" if append else "",
             f"; {count(len(plan.removed), 'image')} no longer listed or present leave the index" if plan.removed
             else "")
    if plan.lost:
        log.warning("%s not listed by this run cannot be described again: they leave the index",
                    count(plan.lost, "damaged entry", "damaged entries"))


def _skipped(plan: Plan, described: Described, previous: Previous, append: bool) -> List[Tuple[str, str]]:
    """``(id, reason)`` of every image that could not be used (an appending run keeps earlier ones)."""
    failed = [(e.image_id, described.failures.get(e.key, "no descriptor was computed")) for e in plan.entries
              if e.old_row < 0 and e.checkpoint is None]
    if not append:
        return failed
    known = {e.image_id for e in plan.entries} | {i for i, _ in failed}
    return [(i, r) for i, r in previous.skipped.items() if i not in known] + failed


def _up_to_date(previous: Previous, plan: Plan, kept: List[int], failed: List[Tuple[str, str]],
                settings: IndexSettings, append: bool) -> bool:
    """Nothing would change: same rows from an intact, current-format generation with the same settings."""
    if previous.meta is None or previous.problems or previous.format_version < FORMAT_VERSION:
        return False
    if not plan.reuses_all(previous, kept) or plan.digests_added:
        return False
    if previous.attrs.get("root") != str(plan.root):
        return False
    if not append and not same_index_settings(previous.meta, settings):
        return False
    return dict(failed) == previous.skipped


def commit_generation(out: Path, plan: Plan, kept: Sequence[int], failed: List[Tuple[str, str]], computed: int,
                      previous: Previous, checkpoints: Optional[Checkpoints], attrs: Dict[str, Any],
                      identity: Identity, settings: IndexSettings, append: bool, encoder: Any,
                      progress: bool, shards: Optional[List[Any]] = None,
                      assemble: Optional[Callable[[Path, str, str], Assembled]] = None) -> BuildSummary:
    """Stages 3-5: write the next generation and commit it; on any failure the previous one stays current.

    ``previous`` is where reused rows come from (the committed generation, or a store to index as it is);
    ``encoder`` is needed only to learn a whitening on other images; ``shards``: see ``build_searchable``;
    ``assemble``: ``(store path, dtype, generation id) → Assembled`` writes the store instead of
    ``assemble_store`` (a store indexed as it is)."""
    meta = previous.meta or {}
    sequence = int(meta.get("sequence", 0)) + 1
    generation_id = new_generation_id(sequence)
    dtype = meta.get("store_dtype", "float32") if append and meta else store_dtype(settings.precision)
    target = out
    try:
        with NewGeneration(out, generation_id) as generation:
            target = generation.path(STORE)
            assembled = assemble(target, dtype, generation_id) if assemble is not None else \
                assemble_store(target, plan, kept, previous, checkpoints, attrs, dtype, generation_id)
            target = generation.directory
            searchable = build_searchable(generation, assembled, previous, settings, append=append, encoder=encoder,
                                          progress=progress, shards=shards)
            target = generation.path(SKIPPED)
            target.write_text(format_skipped(failed), encoding="utf-8")
            record = _meta_record(generation, generation_id, sequence, plan, assembled, searchable, previous, identity,
                                  settings, failed, dtype)
            target = generation.path(META)
            target.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            target = out
            generation.commit()
    except (StoreError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as err:  # disk full, no permission, I/O error
        raise write_failure(Path(err.filename) if err.filename else target, err,
                            f"the previous index in {out} is intact; run the same command again once the problem "
                            f"is fixed (the descriptors computed are kept)") from None
    return BuildSummary(out, len(kept), computed, max(0, len(kept) - computed), len(failed),
                        searchable.index_meta["kind"], int(searchable.index_meta["dim"]), failures=failed,
                        redescribed=sum(plan.entries[i].redescribe for i in kept) if plan.entries else 0,
                        removed=len(plan.removed),
                        generation=generation_id)


def _meta_record(generation: NewGeneration, generation_id: str, sequence: int, plan: Plan, assembled: Assembled,
                 searchable: Searchable, previous: Previous, identity: Identity, settings: IndexSettings,
                 failed: List[Tuple[str, str]], dtype: str) -> Dict[str, Any]:
    meta = previous.meta or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sources = list(dict.fromkeys([*meta.get("sources", [meta["root"]] if meta.get("root") else []),
                                  str(plan.root), str(plan.listing_root or plan.root)]))
    files = {"descriptors": {"name": STORE, "bytes": generation.path(STORE).stat().st_size,
                             "integrity": "hdf5-fletcher32"}}
    for key, name, present, linked in (("index", INDEX_FILE, searchable.index is not None,
                                        searchable.linked.get("index")),
                                       ("whitening", WHITENING_FILE, searchable.whitening is not None,
                                        searchable.linked.get("whitening")),
                                       ("skipped", SKIPPED, True, False)):
        if present:
            old = file_record(meta, key) if linked else {}
            checksum = old.get("checksum") or file_checksum(generation.path(name))
            files[key] = {"name": name, "bytes": generation.path(name).stat().st_size, "checksum": checksum}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "generation": generation_id, "sequence": sequence,
        "store_generation": assembled.store_generation, "created": meta.get("created", now), "updated": now,
        "root": str(plan.root), "sources": sources, "count": assembled.count, "skipped": len(failed),
        "fingerprint": identity.fingerprint, "model": identity.model,
        "provenance": identity.provenance, "dim": assembled.dim, "scales": [float(s) for s in settings.scales],
        "max_size": settings.max_size, "precision": settings.precision, "store_dtype": dtype,
        "index": searchable.index_meta,
        "whitening": searchable.whitening_meta, "files": files,
    }


__all__ = ["build_index", "build_from_store", "IndexSettings", "BuildSummary", "META"]
