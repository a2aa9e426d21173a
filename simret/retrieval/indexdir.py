"""The index directory ``simret index`` writes and ``simret search`` reads.

::

    DIR/descriptors.h5   descriptors (N, D) + ids, as computed (L2-normalised, not whitened); see store.py
    DIR/index.faiss      FAISS index over the whitened descriptors, row i = ids[i]
    DIR/whitening.npz    PCA whitening (mean, projection), when --whiten pca
    DIR/skipped.tsv      id <TAB> reason, for every listed file that could not be used
    DIR/meta.json        written last: model, fingerprint, scales, max_size, index kind and parameters,
                         whitening, counts, and the generation id that ties the files together
    DIR/.partial/        while extraction runs: finished chunks of descriptors (removed on success), so an
                         interrupted run resumes where it stopped

Every file is written to a temporary name and renamed into place; ``meta.json`` comes last and names the
generation of ``descriptors.h5`` it belongs to, so a reader never mixes files of two runs unknowingly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.retrieval.index import DEFAULT_RERANK, Index, auto_kind
from simret.retrieval.store import (
    StoreError,
    check_fingerprint,
    read_attrs,
    read_store,
    store_attrs,
    write_store,
)
from simret.retrieval.whitening import PCAWhitening, l2_normalize
from simret.utils import distributed
from simret.utils.atomic import atomic_path, deferred_interrupts, write_text_atomic
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]

STORE_ONLY = "none"  # index kind of a directory that keeps the descriptor store alone (no FAISS index)
META, STORE, INDEX_FILE, WHITENING_FILE, SKIPPED, PARTIAL = (
    "meta.json", "descriptors.h5", "index.faiss", "whitening.npz", "skipped.tsv", ".partial")
FORMAT = "simret-index"
META_KEYS = ("generation", "root", "count", "fingerprint", "model", "dim", "scales", "max_size", "index", "whitening")
FORMAT_VERSION = 1
CHECKPOINT_SECONDS = 120.0


@dataclass
class IndexSettings:
    """How ``build_index`` computes and indexes descriptors (the ``simret index`` options)."""

    scales: Tuple[float, ...] = (1.0,)
    max_size: Optional[int] = 1024
    kind: str = "auto"
    index_params: Dict[str, Any] = field(default_factory=dict)
    whiten: str = "none"  # "pca" or "none"
    whiten_on: Optional[str] = None  # images (folder / list) or a descriptors .h5; None: the indexed set
    whiten_dim: Optional[int] = None
    half: bool = False  # mixed-precision extraction and float16 storage
    batch_size: int = 16
    workers: Optional[int] = None
    checkpoint_every: int = 2048  # descriptors per resume checkpoint (also every CHECKPOINT_SECONDS)

    def __post_init__(self) -> None:
        if self.whiten not in ("pca", "none"):
            raise ValueError(f"whitening must be 'pca' or 'none', not {self.whiten!r}")
        if self.kind == STORE_ONLY and (self.whiten != "none" or self.index_params):
            raise ValueError("--index none keeps the descriptors only: --whiten and --index-param do not apply")
        if self.whiten == "none" and (self.whiten_on or self.whiten_dim):
            raise ValueError("--whiten-on/--whiten-dim need --whiten pca")


@dataclass
class BuildSummary:
    """What ``build_index`` did."""

    out: Path
    count: int  # descriptors in the index now
    computed: int  # descriptors extracted by this run
    reused: int  # taken from the previous store or from an interrupted run's checkpoints
    skipped: int  # listed files that could not be used (skipped.tsv)
    kind: str
    dim: int
    up_to_date: bool = False
    failures: List[Tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        if self.up_to_date:
            return (f"{self.out}: up to date ({self.count} images, {self.kind} index, {self.dim}-d; "
                    f"{self.skipped} skipped)")
        skipped = f", {self.skipped} skipped (see {self.out / SKIPPED})" if self.skipped else ", 0 skipped"
        return (f"indexed {self.count} images into {self.out} ({self.computed} computed, {self.reused} reused"
                f"{skipped}); {self.kind} index, {self.dim}-d")


def path_key(root: PathLike, image_id: str) -> str:
    """The absolute, normalised path an id stands for (ids may be relative to root or absolute)."""
    return image_id if os.path.isabs(image_id) else os.path.normpath(os.path.join(str(root), image_id))


def relative_id(key: str, root: PathLike) -> str:
    """``key`` (absolute) as an id relative to ``root`` (POSIX), or kept absolute when outside it."""
    try:
        return Path(key).relative_to(Path(root)).as_posix()
    except ValueError:
        return Path(key).as_posix()


def model_record(model_spec: Optional[Dict[str, Any]], encoder: Any) -> Dict[str, Any]:
    """What ``simret search`` needs to rebuild the encoder: arch, pool, gamma, weights, checkpoint_key."""
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


# ------------------------------------------------------------------------------------- building


def read_meta(out: PathLike) -> Optional[Dict[str, Any]]:
    path = Path(out) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}): rebuild the index with simret index "
                         f"--overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = f"format {meta.get('format')!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{path} is not a simret index description ({found}, not written by simret index): "
                         f"choose another directory, or replace it with simret index --overwrite")
    missing = [key for key in META_KEYS if key not in meta]
    if missing or not isinstance(meta["index"], dict) or not {"kind", "dim"} <= set(meta["index"]) \
            or not isinstance(meta["whitening"], dict):
        raise ValueError(f"{path} is damaged (missing or malformed: {', '.join(missing) or 'index/whitening'}): "
                         f"rebuild the index with simret index --overwrite")
    return meta


def _check_compatible(meta: Dict[str, Any], fingerprint: str, settings: IndexSettings, out: Path) -> None:
    problems = []
    if meta.get("fingerprint") != fingerprint:
        problems.append(f"encoder {meta.get('fingerprint')} (this run: {fingerprint})")
    if [float(s) for s in meta.get("scales", [])] != [float(s) for s in settings.scales]:
        problems.append(f"scales {meta.get('scales')} (this run: {list(settings.scales)})")
    if meta.get("max_size") != settings.max_size:
        problems.append(f"max_size {meta.get('max_size')} (this run: {settings.max_size})")
    if problems:
        raise ValueError(f"{out} holds an index built with {'; '.join(problems)}: pass --overwrite to replace it, "
                         f"or choose another --out")


class _Checkpoints:
    """Finished chunks of an interrupted run in ``DIR/.partial`` (one small HDF5 store per chunk)."""

    def __init__(self, out: Path, attrs: Dict[str, Any]) -> None:
        self.folder = out / PARTIAL
        self.attrs = attrs
        self.pending_rows: List[np.ndarray] = []
        self.pending_keys: List[str] = []
        self.last_write = time.monotonic()

    def load(self) -> Dict[str, np.ndarray]:
        """``{path key: descriptor}`` from chunks computed with the same encoder and settings."""
        found: Dict[str, np.ndarray] = {}
        if not self.folder.is_dir():
            return found
        for part in sorted(self.folder.glob("part-*.h5")):
            try:
                chunk = read_store(part)
            except (StoreError, OSError) as err:
                log.warning("ignoring unreadable checkpoint %s (%s)", part, err)
                continue
            same = all(chunk.attrs.get(k) == self.attrs.get(k) for k in ("fingerprint", "scales", "max_size"))
            if not same:
                log.info("ignoring checkpoint %s from another encoder or settings", part.name)
                continue
            found.update(zip(chunk.ids, chunk.descriptors))
        return found

    def add(self, keys: Sequence[str], rows: np.ndarray, every: int) -> None:
        self.pending_keys.extend(keys)
        self.pending_rows.append(rows)
        if len(self.pending_keys) >= every or time.monotonic() - self.last_write > CHECKPOINT_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending_keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.h5"
        write_store(self.folder / name, np.concatenate(self.pending_rows), self.pending_keys,
                    {**self.attrs, "partial": 1})
        self.pending_keys, self.pending_rows = [], []
        self.last_write = time.monotonic()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_skipped(path: Path) -> Dict[str, str]:
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if "\t" in line:
            image_id, reason = line.split("\t", 1)
            entries[image_id] = reason
    return entries


def _skipped_text(failures: Sequence[Tuple[str, str]]) -> str:
    clean = [(i.replace("\t", " ").replace("\n", " "), r.replace("\t", " ").replace("\n", " ")) for i, r in failures]
    return "id\treason\n" + "".join(f"{i}\t{r}\n" for i, r in clean)


def learn_whitening(descriptors: np.ndarray, settings: IndexSettings, encoder: Any, fingerprint: str,
                    progress: bool = True) -> Tuple[PCAWhitening, str]:
    """PCA whitening on the indexed descriptors, or on ``settings.whiten_on`` (images or a .h5 store)."""
    if not settings.whiten_on:
        return PCAWhitening.learn(descriptors, settings.whiten_dim), "indexed images"
    source = Path(settings.whiten_on).expanduser()
    if source.suffix.lower() in (".h5", ".hdf5"):
        learned = read_store(source)
        check_fingerprint(learned.fingerprint, fingerprint, what=f"whitening descriptors in {source}", where="this index")
        if learned.descriptors.shape[1] != descriptors.shape[1]:
            raise ValueError(f"--whiten-on {source} holds {learned.descriptors.shape[1]}-d descriptors, this index "
                             f"{descriptors.shape[1]}-d ones")
        try:
            return PCAWhitening.learn(learned.descriptors, settings.whiten_dim), str(source)
        except ValueError as err:
            raise ValueError(f"--whiten-on {source}: {err}") from None
    from simret.data.images import list_images
    from simret.retrieval.extraction import extract

    root, ids = list_images(source)
    log.info("learning whitening on %d images from %s", len(ids), source)
    result = extract(encoder, root, ids, scales=settings.scales, max_size=settings.max_size,
                     batch_size=settings.batch_size, workers=settings.workers, half=settings.half, progress=progress)
    if result.failures:
        log.warning("whitening: %d of %d images under %s could not be used", len(result.failures), len(ids), source)
    if len(result.ids) < 2:
        raise ValueError(f"--whiten-on {source}: whitening needs at least two readable images, "
                         f"{len(result.ids)} of {len(ids)} could be used")
    return PCAWhitening.learn(result.descriptors, settings.whiten_dim), str(source)


def build_index(source: Union[PathLike, Tuple[Path, List[str]]], out: PathLike, encoder: Any, settings: Optional[IndexSettings] = None, *,
                model_spec: Optional[Dict[str, Any]] = None, append: bool = False, overwrite: bool = False,
                progress: bool = True) -> BuildSummary:
    """Index the images of ``source`` (folder or list file, or its ``list_images`` result ``(root, ids)``)
    into the directory ``out``.

    * ``out`` already holds an index of the same encoder and settings: descriptors of images it already
      has are reused (and so are the checkpoints of an interrupted run); the index is rebuilt over the
      images ``source`` lists now.
    * ``append=True``: the existing index keeps all its images; the new ones are added (same whitening,
      same FAISS index, no retraining).
    * ``overwrite=True``: start afresh (the previous files are replaced only once the new ones are ready).
    * under ``torchrun`` (process group initialised, e.g. by ``simret.utils.distributed.distributed_session``):
      every rank describes its contiguous share of the images into its own checkpoint chunks; rank 0 merges
      them and writes the directory, the other ranks return after their share (call ``barrier()`` after
      this function so they wait for rank 0).

    Raises:
        ValueError: ``out`` holds an index of another encoder or settings (without ``overwrite``), or no
            image could be used.
    """
    from simret.data.images import list_images
    from simret.retrieval.extraction import iter_extract

    settings = settings or IndexSettings()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    root, listed = source if isinstance(source, tuple) else list_images(source)
    fingerprint = encoder.fingerprint
    meta = None if overwrite else read_meta(out)
    if meta is not None:
        _check_compatible(meta, fingerprint, settings, out)
    if append and meta is None:
        log.info("%s holds no index yet: building a new one", out)
        append = False
    if append and (settings.whiten != meta.get("whitening", {}).get("kind", "none") or settings.kind != "auto"):
        log.info("--append keeps the existing %s index and its whitening (%s)", meta["index"]["kind"],
                 meta.get("whitening", {}).get("kind", "none"))

    attrs = store_attrs(encoder.provenance(), scales=settings.scales, max_size=settings.max_size)
    checkpoints = _Checkpoints(out, attrs)  # valid whatever --overwrite says: same encoder and settings

    # what is there already
    old_ids: List[str] = []
    old_rows = np.zeros((0, encoder.dim), np.float32)
    index_root = root
    if meta is not None and (out / STORE).is_file():
        try:
            old = read_store(out / STORE)
        except StoreError as err:
            raise StoreError(f"{err}: the index in {out} is damaged; pass --overwrite to rebuild it") from None
        check_fingerprint(old.fingerprint, fingerprint, what=f"descriptors in {out / STORE}", where="this run")
        old_ids, old_rows = old.ids, old.descriptors
        index_root = Path(meta.get("root", root)) if append else root
    old_root = Path(meta["root"]) if meta is not None and "root" in meta else root
    stored = {path_key(old_root, image_id): row for row, image_id in enumerate(old_ids)}
    partial = checkpoints.load()

    # what this run must produce: (path key, id relative to the index root)
    targets = [(path_key(root, i), relative_id(path_key(root, i), index_root)) for i in listed]
    if append:
        targets = [(key, image_id) for key, image_id in targets if key not in stored]
    have: Dict[str, np.ndarray] = {}
    todo: List[Tuple[str, str]] = []
    for key, image_id in targets:
        if not append and key in stored:
            have[key] = old_rows[stored[key]]
        elif key in partial:
            have[key] = partial[key]
        else:
            todo.append((key, image_id))
    reused = len(have)
    log.info("%d images listed under %s: %d to compute, %d already done%s", len(listed), root, len(todo), reused,
             f", {len(stored)} in the index" if append else "")

    # extraction, checkpointed; under torchrun each rank describes its contiguous share of `todo` into
    # its own checkpoint chunks (its shard), and rank 0 merges every shard below
    failures: Dict[str, str] = {}
    computed = 0
    sharded = distributed.is_distributed()
    if sharded:
        distributed.barrier()  # every rank has read the same state before any rank writes a chunk
    if todo or sharded:
        keys = [key for key, _ in todo]
        share = distributed.shard_indices(len(keys), distributed.rank(), distributed.world_size()) if sharded \
            else range(len(keys))
        keys = keys[share.start:share.stop]
        try:
            for batch in iter_extract(encoder, "/", keys, scales=settings.scales, max_size=settings.max_size,
                                      batch_size=settings.batch_size, workers=settings.workers, half=settings.half,
                                      progress=progress) if keys else ():
                for position, reason in batch.failures:
                    failures[keys[position]] = reason
                if len(batch.positions):
                    batch_keys = [keys[p] for p in batch.positions.tolist()]
                    have.update(zip(batch_keys, batch.descriptors))
                    computed += len(batch_keys)
                    checkpoints.add(batch_keys, batch.descriptors, settings.checkpoint_every)
        finally:
            try:
                checkpoints.flush()  # keep the work done so far, whatever stopped us
            except Exception as err:  # noqa: BLE001 - never hide the original error
                log.warning("could not save a checkpoint: %s", err)
    if sharded:
        gathered = distributed.all_gather_object((failures, computed))  # also waits for every shard's flush
        failures = {key: reason for part, _ in gathered for key, reason in part.items()}
        computed = sum(count for _, count in gathered)
        if not distributed.is_main_process():
            return BuildSummary(out, 0, computed, reused, len(failures), settings.kind, encoder.dim)
        have.update(checkpoints.load())

    new_pairs = [(key, image_id) for key, image_id in targets if key in have]
    failed = [(image_id, failures[key]) for key, image_id in targets if key in failures]
    if append:
        previous = _read_skipped(out / SKIPPED)
        now_known = {path_key(index_root, i) for i in old_ids} | {key for key, _ in new_pairs}
        carried = [(i, r) for i, r in previous.items() if path_key(index_root, i) not in now_known
                   and i not in dict(failed)]
        failed = carried + failed
        final_ids = old_ids + [image_id for _, image_id in new_pairs]
    else:
        final_ids = [image_id for _, image_id in new_pairs]
    if not final_ids:
        shown = "; ".join(f"{i}: {r}" for i, r in failed[:3])
        raise ValueError(f"none of the {len(listed)} images under {root} could be used ({shown}"
                         f"{' …' if len(failed) > 3 else ''})")

    kind_requested = settings.kind
    if (meta is not None and not append and not computed and final_ids == old_ids
            and (settings.kind == STORE_ONLY or (out / INDEX_FILE).is_file())
            and _same_index_settings(meta, settings, len(final_ids))):
        write_text_atomic(out / SKIPPED, _skipped_text(failed))
        checkpoints.remove()
        return BuildSummary(out, len(final_ids), 0, reused, len(failed), meta["index"]["kind"],
                            int(meta["index"]["dim"]), up_to_date=True, failures=failed)

    generation = uuid.uuid4().hex
    new_rows = np.stack([have[key] for key, _ in new_pairs]) if new_pairs else np.zeros((0, encoder.dim), np.float32)
    all_rows = np.concatenate([old_rows, new_rows]) if append else new_rows
    store_dtype = "float16" if settings.half else "float32"
    if append:
        store_dtype = meta.get("store_dtype", store_dtype)

    # whitening and the FAISS index
    whitening: Optional[PCAWhitening] = None
    whitening_meta: Dict[str, Any] = {"kind": "none"}
    index: Optional[Index] = None
    if (meta["index"]["kind"] if append else settings.kind) == STORE_ONLY:  # descriptors only
        index_meta = {"requested": STORE_ONLY, "requested_params": {}, "kind": STORE_ONLY, "params": {},
                      "dim": int(all_rows.shape[1]), "ntotal": len(final_ids), "bytes_per_vector": 0}
    elif append:
        whitening_meta = dict(meta.get("whitening") or {"kind": "none"})
        if whitening_meta.get("kind") == "pca":
            whitening = PCAWhitening.load(out / WHITENING_FILE)
        index = Index.load(out / INDEX_FILE)
        if index.ntotal != len(old_ids):
            raise ValueError(f"{out}: the FAISS index holds {index.ntotal} vectors, the store {len(old_ids)}; "
                             f"rebuild without --append")
        if len(new_rows):
            index.add(whitening.apply(new_rows) if whitening else l2_normalize(new_rows))
        index_meta = meta["index"]
    else:
        if settings.whiten == "pca":
            whitening, learned_on = learn_whitening(all_rows, settings, encoder, fingerprint, progress)
            whitening_meta = {**whitening.describe(), "learned_on": learned_on}
        vectors = whitening.apply(all_rows) if whitening else l2_normalize(all_rows)
        kind = auto_kind(len(vectors)) if kind_requested == "auto" else kind_requested
        log.info("building a %s index over %d %d-d descriptors", kind, len(vectors), vectors.shape[1])
        index = Index.build(vectors, kind, **settings.index_params)
        index_meta = {"requested": kind_requested, "requested_params": dict(settings.index_params)}
    if index is not None:
        index_meta = {**index_meta, "kind": index.kind, "params": index.params, "dim": index.dim,
                      "ntotal": index.ntotal, "bytes_per_vector": index.bytes_per_vector}

    # write every file to a temporary name first; rename them all only once all are complete, meta.json
    # (the commit record naming the store's generation) last. A failure before that changes nothing.
    out.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "generation": generation,
        "created": meta.get("created", now) if append and meta else now, "updated": now,
        "root": str(index_root), "count": len(final_ids), "skipped": len(failed),
        "fingerprint": fingerprint, "model": model_record(model_spec, encoder), "provenance": encoder.provenance(),
        "dim": int(all_rows.shape[1]), "scales": [float(s) for s in settings.scales], "max_size": settings.max_size,
        "half": bool(settings.half), "store_dtype": store_dtype,
        "index": index_meta, "whitening": whitening_meta,
        "files": {"descriptors": STORE, **({"index": INDEX_FILE} if index is not None else {}), "skipped": SKIPPED,
                  **({"whitening": WHITENING_FILE} if whitening is not None else {})},
    }
    with contextlib.ExitStack() as stack:  # exits in reverse: renames store … skipped, then meta.json
        meta_tmp = stack.enter_context(atomic_path(out / META, suffix=".json"))
        skipped_tmp = stack.enter_context(atomic_path(out / SKIPPED, suffix=".tsv"))
        index_tmp = stack.enter_context(atomic_path(out / INDEX_FILE, suffix=".faiss")) if index is not None else None
        whitening_tmp = (stack.enter_context(atomic_path(out / WHITENING_FILE, suffix=".npz"))
                         if whitening is not None and not append else None)
        store_tmp = stack.enter_context(atomic_path(out / STORE, suffix=".h5"))
        write_store(store_tmp, all_rows, final_ids, {**attrs, "root": str(index_root), "generation": generation},
                    dtype=store_dtype)
        if whitening_tmp is not None:
            whitening.save(whitening_tmp)
        if index is not None:
            index.save(index_tmp)
        skipped_tmp.write_text(_skipped_text(failed), encoding="utf-8")
        meta_tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        commit = stack.pop_all()  # every file complete: the renames below run together
    with deferred_interrupts():  # a Ctrl-C now arrives after the last rename, not between two
        commit.close()
    if whitening is None and (out / WHITENING_FILE).exists():
        (out / WHITENING_FILE).unlink()
    if index is None and (out / INDEX_FILE).exists():  # a store-only directory keeps no stale index
        (out / INDEX_FILE).unlink()
    checkpoints.remove()
    return BuildSummary(out, len(final_ids), computed, reused, len(failed), index_meta["kind"], int(index_meta["dim"]),
                        failures=failed)


def _same_index_settings(meta: Dict[str, Any], settings: IndexSettings, n: int) -> bool:
    index = meta.get("index", {})
    whitening = meta.get("whitening", {})
    same_index = (index.get("requested") == settings.kind
                  and index.get("requested_params", {}) == dict(settings.index_params))
    same_whitening = whitening.get("kind") == settings.whiten and (
        settings.whiten == "none" or (whitening.get("learned_on") == (str(Path(settings.whiten_on).expanduser())
                                                                       if settings.whiten_on else "indexed images")
                                      and (settings.whiten_dim is None
                                           or whitening.get("out_dim") == settings.whiten_dim)))
    return same_index and same_whitening and meta.get("half") == settings.half


# -------------------------------------------------------------------------------------- reading


class IndexDir:
    """A finished index directory: its meta, store ids, whitening and FAISS index (loaded lazily).

    >>> index_dir = IndexDir("idx/")
    >>> scores, rows = index_dir.search(raw_queries, k=10)     # raw: as extract() returns them
    >>> [index_dir.ids[r] for r in rows[0]]
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"no index directory {self.path}")
        meta = read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path} holds no simret index ({META} missing; build one with simret index)")
        self.meta = meta
        self.searchable = meta["index"].get("kind") != STORE_ONLY
        needed = (STORE,) + ((INDEX_FILE,) if self.searchable else ())
        for name in needed + ((WHITENING_FILE,) if meta["whitening"].get("kind") == "pca" else ()):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name} is missing: rebuild the index with simret index")
        generation = read_attrs(self.path / STORE).get("generation")
        if generation != meta.get("generation"):
            raise ValueError(f"{self.path}: {STORE} and {META} come from different runs (an interrupted write?); "
                             f"run simret index again to repair it")
        self._index: Optional[Index] = None
        self._ids: Optional[List[str]] = None
        self._whitening: Optional[PCAWhitening] = None
        self._memmap: Optional[np.ndarray] = None

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def root(self) -> Path:
        return Path(self.meta["root"])

    @property
    def index(self) -> Index:
        if self._index is None:
            if not self.searchable:
                raise ValueError(f"{self.path} keeps descriptors only (--index none, e.g. simret eval's cache): build a "
                                 f"searchable index with simret index --index flat|ivfpq|hnsw|auto")
            index = Index.load(self.path / INDEX_FILE)
            if index.ntotal != self.meta["count"]:
                raise ValueError(f"{self.path}: {INDEX_FILE} holds {index.ntotal} vectors but {META} says "
                                 f"{self.meta['count']} (an interrupted write?); run simret index again")
            self._index = index
        return self._index

    @property
    def ids(self) -> List[str]:
        if self._ids is None:
            import h5py

            with h5py.File(self.path / STORE, "r") as handle:
                self._ids = list(handle["ids"].asstr()[()])
        return self._ids

    @property
    def whitening(self) -> Optional[PCAWhitening]:
        if self._whitening is None and self.meta["whitening"].get("kind") == "pca":
            self._whitening = PCAWhitening.load(self.path / WHITENING_FILE)
        return self._whitening

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors ``(Q, D)`` (as extracted) → the index's space (whitened, L2-normalised)."""
        raw = np.atleast_2d(np.asarray(raw, dtype=np.float32))
        return self.whitening.apply(raw) if self.whitening is not None else l2_normalize(raw)

    def database_vectors(self, rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """Database descriptors in the index's space, exact (read from the store), all or ``rows``."""
        return self.prepare(read_store(self.path / STORE, rows=rows).descriptors)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the memory-mapped store in the index's space (what re-scores ivfpq candidates)."""
        if self._memmap is None:
            from simret.retrieval.store import open_descriptors

            self._memmap = open_descriptors(self.path / STORE)
        return self.prepare(np.asarray(self._memmap[np.asarray(rows, dtype=np.int64)]))

    def check_queries(self, fingerprint: Optional[str], what: str = "the queries") -> None:
        check_fingerprint(fingerprint, self.fingerprint, what=what, where=f"the index {self.path}")

    def search(self, raw_queries: Any, k: int = 10, *, qe: int = 0, alpha: float = 3.0,
               dba: int = 0, rerank: int = DEFAULT_RERANK) -> Tuple[np.ndarray, np.ndarray]:
        """Search raw query descriptors ``(Q, D)``; optional αQE (``qe`` neighbours) and αDBA (``dba``).

        An ivfpq index re-scores its top ``k·rerank`` candidates with the exact (memory-mapped) stored
        descriptors (``rerank=0``: compressed scores only).

        Returns ``(scores (Q, k'), rows (Q, k'))``; ``rows`` index ``self.ids``.
        """
        from simret.retrieval.rerank import alpha_qe
        from simret.retrieval.rerank import dba as augment

        queries = self.prepare(raw_queries)
        if dba:
            log.info("database-side augmentation over %d descriptors (n=%d, alpha=%g)", self.meta["count"], dba, alpha)
            database = augment(self.database_vectors(), dba, alpha)
            index = Index.build(database, "flat")

            def vectors(rows: np.ndarray) -> np.ndarray:
                return database[rows]
        else:
            index = self.index
            vectors = self.exact_vectors
        exact = self.exact_vectors if rerank and not dba else None
        scores, rows = index.search(queries, max(k, qe), exact=exact, rerank=rerank)
        if qe:
            top = rows[:, :qe]
            valid = top >= 0
            unique, inverse = np.unique(np.where(valid, top, 0), return_inverse=True)
            local = np.where(valid, inverse.reshape(top.shape), -1)
            queries = alpha_qe(queries, vectors(unique), local, min(qe, top.shape[1]), alpha, layout="I")
            scores, rows = index.search(queries, k, exact=exact, rerank=rerank)
        return scores[:, :k], rows[:, :k]
