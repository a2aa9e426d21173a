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
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from simret.retrieval.indexdir.assemble import Assembled, assemble_store, resolve_sources
from simret.retrieval.indexdir.checkpoints import Checkpoints
from simret.retrieval.indexdir.describe import Described, describe_missing
from simret.retrieval.indexdir.layout import NewGeneration, new_generation_id, remove_stale
from simret.retrieval.indexdir.meta import FORMAT, FORMAT_VERSION, file_record, model_record
from simret.retrieval.indexdir.names import INDEX_FILE, META, SKIPPED, STORE, WHITENING_FILE
from simret.retrieval.indexdir.plan import Plan, make_plan
from simret.retrieval.indexdir.previous import Previous, load_previous
from simret.retrieval.indexdir.searchable import Searchable, build_searchable, same_index_settings
from simret.retrieval.indexdir.settings import BuildSummary, IndexSettings
from simret.retrieval.store import StoreError, store_attrs
from simret.utils import distributed
from simret.utils.atomic import write_failure
from simret.utils.filestate import file_checksum
from simret.utils.locking import writer_lock
from simret.utils.logs import get_logger
from simret.utils.skipped import format_skipped

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]
Listing = Tuple[Path, List[str]]


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
    out = _output_dir(out)
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
    summary = _commit_generation(out, plan, kept, failed, described, previous, checkpoints, attrs, encoder,
                                 settings, model_spec, append, progress)
    checkpoints.remove()
    return summary


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


def _output_dir(out: PathLike) -> Path:
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
    if problems:
        raise ValueError(f"{out} holds an index built with {'; '.join(problems)}: pass --overwrite to replace it, "
                         f"or choose another --out")
    if not append and previous.root is not None and previous.root != root:
        raise ValueError(f"{out} holds an index of {previous.root}, not of {root}: pass --append to add these images "
                         f"to it, --overwrite to replace it, or choose another --out")
    if append and previous.meta and (settings.whiten != previous.meta["whitening"].get("kind", "none")
                                     or settings.kind != "auto"):
        log.info("--append keeps the existing %s index and its whitening (%s)", previous.meta["index"]["kind"],
                 previous.meta["whitening"].get("kind", "none"))
    return append


def _log_plan(plan: Plan, previous: Previous, append: bool) -> None:
    todo = len(plan.todo)
    log.info("%d images listed: %d to describe (%d changed since they were indexed), %d already done%s%s", plan.listed,
             todo, plan.redescribed, len(plan.entries) - todo,
             f", {len(previous.ids)} in the index" if append else "",
             f"; {len(plan.removed)} no longer listed leave the index" if plan.removed else "")
    if plan.lost:
        log.warning("%d damaged entries are not listed by this run and cannot be described again: they leave the "
                    "index", plan.lost)


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


def _commit_generation(out: Path, plan: Plan, kept: List[int], failed: List[Tuple[str, str]], described: Described,
                       previous: Previous, checkpoints: Checkpoints, attrs: Dict[str, Any], encoder: Any,
                       settings: IndexSettings, model_spec: Optional[Dict[str, Any]], append: bool,
                       progress: bool) -> BuildSummary:
    """Stages 3-5: write the next generation and commit it; on any failure the previous one stays current."""
    meta = previous.meta or {}
    sequence = int(meta.get("sequence", 0)) + 1
    generation_id = new_generation_id(sequence)
    dtype = meta.get("store_dtype", "float32") if append and meta else ("float16" if settings.precision != "fp32" else "float32")
    target = out
    try:
        with NewGeneration(out, generation_id) as generation:
            target = generation.path(STORE)
            assembled = assemble_store(target, plan, kept, previous, checkpoints, {**attrs, "dim": encoder.dim},
                                       dtype, generation_id)
            target = generation.directory
            searchable = build_searchable(generation, assembled, previous, settings, append=append, encoder=encoder,
                                          progress=progress)
            target = generation.path(SKIPPED)
            target.write_text(format_skipped(failed), encoding="utf-8")
            record = _meta_record(generation, generation_id, sequence, plan, assembled, searchable, previous, encoder,
                                  settings, model_spec, failed, dtype)
            target = generation.path(META)
            target.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            target = out
            generation.commit()
    except (StoreError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as err:  # disk full, no permission, I/O error
        raise write_failure(target, err, f"the previous index in {out} is intact; run the same command again once "
                                         f"the problem is fixed (the descriptors computed are kept)") from None
    reused = len(kept) - described.computed
    return BuildSummary(out, len(kept), described.computed, max(0, reused), len(failed),
                        searchable.index_meta["kind"], int(searchable.index_meta["dim"]), failures=failed,
                        redescribed=sum(plan.entries[i].redescribe for i in kept), removed=len(plan.removed),
                        generation=generation_id)


def _meta_record(generation: NewGeneration, generation_id: str, sequence: int, plan: Plan, assembled: Assembled,
                 searchable: Searchable, previous: Previous, encoder: Any, settings: IndexSettings,
                 model_spec: Optional[Dict[str, Any]], failed: List[Tuple[str, str]], dtype: str) -> Dict[str, Any]:
    meta = previous.meta or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sources = list(dict.fromkeys([*meta.get("sources", [meta["root"]] if meta.get("root") else []),
                                  str(plan.root)]))
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
        "root": str(plan.root), "sources": sources, "count": len(assembled.ids), "skipped": len(failed),
        "fingerprint": encoder.fingerprint, "model": model_record(model_spec, encoder),
        "provenance": encoder.provenance(), "dim": assembled.dim, "scales": [float(s) for s in settings.scales],
        "max_size": settings.max_size, "precision": settings.precision, "store_dtype": dtype, "index": searchable.index_meta,
        "whitening": searchable.whitening_meta, "files": files,
    }


__all__ = ["build_index", "IndexSettings", "BuildSummary", "META"]
