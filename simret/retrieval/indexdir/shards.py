"""Collections described on many machines: shards of a listing, merging their directories, searching several.

* ``select_shard(ids, i, n)``: the images of shard ``i`` of ``n`` — by a hash of each id, so an image stays in
  its shard when the collection grows (``simret index SRC --out DIR_i --shard i/n``, one job per shard).
* ``merge_index_dirs(sources, out)``: one index directory from several (same encoder and settings, ids
  unique), written as one new generation block by block. Shards built ``--train-from DIR0`` share DIR0's
  trained index, so their indexes are merged as they are (FAISS ``merge_from``), without retraining or
  re-adding a vector.
* ``IndexSet``: several index directories searched as one, with one merged ranking (an exact merge of
  each directory's top-k; needs comparable scores: same encoder and the same whitening, or none).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from simret.retrieval.indexdir.plan import path_key, relative_id
from simret.retrieval.indexdir.reader import IndexDir
from simret.retrieval.store import StoreReader
from simret.utils.filestate import FileStates

PathLike = Union[str, os.PathLike]


def parse_shard(text: str) -> Tuple[int, int]:
    """``"2/8"`` → ``(2, 8)`` (shards are numbered 0 … n-1)."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/8: the first of 8 shards), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: I must be in 0…N-1 and N at least 1")
    return index, count


def shard_of(image_id: str, count: int) -> int:
    """The shard (of ``count``) an image id belongs to: stable across runs, machines and collection growth."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def select_shard(ids: Sequence[str], index: int, count: int) -> List[str]:
    """The ids of shard ``index`` of ``count``, in their order."""
    return [image_id for image_id in ids if shard_of(image_id, count) == index]


class StoreUnion:
    """Several open stores read as one: rows numbered in order, store after store (what a merge writes).

    Offers what a build reads from a store: ``ids``, ``count``, ``dim``, ``dtype``, ``attrs``, ``rows``,
    ``blocks``, ``file_states``, ``has_file_states``, ``row_access``, ``close``.
    """

    def __init__(self, stores: Sequence[StoreReader], ids: List[str]) -> None:
        self.stores = list(stores)
        self.ids = ids
        self.starts = np.cumsum([0] + [s.count for s in self.stores])
        self.path = self.stores[0].path
        self.attrs = dict(self.stores[0].attrs)

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        return self.stores[0].dim

    @property
    def dtype(self) -> np.dtype:
        return self.stores[0].dtype

    @property
    def fingerprint(self) -> Optional[str]:
        return self.attrs.get("fingerprint")

    @property
    def has_file_states(self) -> bool:
        return all(s.has_file_states for s in self.stores)

    def file_states(self) -> FileStates:
        return FileStates.concat(s.file_states() for s in self.stores)

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        order = np.asarray(indices, dtype=np.int64)
        out = np.empty((order.size, self.dim), np.float32)
        owner = np.searchsorted(self.starts, order, side="right") - 1
        for number, store in enumerate(self.stores):
            mine = np.flatnonzero(owner == number)
            if mine.size:
                out[mine] = store.rows(order[mine] - self.starts[number])
        return out

    def blocks(self, rows_per_block: Optional[int] = None, start: int = 0):
        for number, store in enumerate(self.stores):
            offset = int(self.starts[number])
            for first, block in store.blocks(rows_per_block, start=max(0, start - offset)):
                yield offset + first, block

    def close(self) -> None:
        for store in self.stores:
            store.close()


def open_sources(sources: Sequence[PathLike]) -> List[IndexDir]:
    """The source directories, opened (and pinned), checked to hold the same encoder and settings."""
    opened = [IndexDir(path) for path in sources]
    first = opened[0].meta
    for other in opened[1:]:
        for key in ("fingerprint", "scales", "max_size"):
            if other.meta[key] != first[key]:
                for source in opened:
                    source.close()
                raise ValueError(f"{other.path} was built with {key} {other.meta[key]}, {opened[0].path} with "
                                 f"{first[key]}: only directories of the same encoder and settings can be merged")
    return opened


def union_ids(opened: Sequence[IndexDir]) -> Tuple[Path, List[str], List[str]]:
    """``(common root, ids relative to it, path keys)`` over every source, in order.

    Raises:
        ValueError: an image is in two sources (named).
    """
    root = opened[0].root
    keys: List[str] = []
    seen: Dict[str, PathLike] = {}
    for source in opened:
        for image_id in source.ids:
            key = path_key(source.root, image_id)
            if key in seen:
                raise ValueError(f"{key} is in both {seen[key]} and {source.path}: shards must not overlap (build "
                                 f"them with --shard I/N over one listing)")
            seen[key] = source.path
            keys.append(key)
    return root, [relative_id(key, root) for key in keys], keys


class IndexSet:
    """Index directories searched as one: ``search`` returns one ranking over all of them.

    >>> shards = IndexSet(["idx-0/", "idx-1/"])
    >>> scores, hits = shards.search(raw_queries, k=10)     # hits[q][r] = (directory number, row)
    >>> [shards.id_of(hit) for hit in hits[0]]
    """

    def __init__(self, paths: Sequence[PathLike], **options: Any) -> None:
        self.dirs = [IndexDir(path, **options) for path in paths]
        first = self.dirs[0]
        for other in self.dirs[1:]:
            if other.fingerprint != first.fingerprint:
                raise ValueError(f"{other.path} holds descriptors of encoder {other.fingerprint}, {first.path} of "
                                 f"{first.fingerprint}: their scores cannot be compared")
            if _whitening_id(other) != _whitening_id(first):
                raise ValueError(f"{other.path} and {first.path} use different whitenings: their scores cannot be "
                                 f"compared (build the shards --train-from one directory, or without --whiten)")
        self.meta = first.meta
        self.path = first.path

    @property
    def fingerprint(self) -> str:
        return self.dirs[0].fingerprint

    @property
    def count(self) -> int:
        return sum(d.meta["count"] for d in self.dirs)

    def id_of(self, hit: Tuple[int, int]) -> str:
        """The id of a hit, as the directory records it (absolute when it has another root than the first)."""
        number, row = hit
        source = self.dirs[number]
        image_id = source.ids[row]
        return image_id if number == 0 or source.root == self.dirs[0].root else path_key(source.root, image_id)

    def check_queries(self, fingerprint: Optional[str], what: str = "the queries") -> None:
        self.dirs[0].check_queries(fingerprint, what)

    def search(self, raw_queries: Any, k: int = 10, *, qe: int = 0, alpha: float = 3.0,
               rerank: Optional[int] = None) -> Tuple[np.ndarray, List[List[Tuple[int, int]]]]:
        """``(scores (Q, k'), hits)``: the best ``k`` over every directory (αQE over the merged ranking)."""
        from simret.retrieval.rerank import alpha_qe

        queries = self.dirs[0].prepare(raw_queries)
        scores, hits = self._merged(queries, max(k, qe), rerank)
        if qe:
            vectors = np.stack([[self.dirs[d].exact_vectors(np.array([r]))[0] for d, r in row[:qe]] for row in hits])
            local = np.arange(vectors.shape[0] * vectors.shape[1]).reshape(vectors.shape[:2])
            queries = alpha_qe(queries, vectors.reshape(-1, vectors.shape[-1]), local, vectors.shape[1], alpha,
                               layout="I")
            scores, hits = self._merged(queries, k, rerank)
        return scores[:, :k], [row[:k] for row in hits]

    def _merged(self, queries: np.ndarray, k: int,
                rerank: Optional[int]) -> Tuple[np.ndarray, List[List[Tuple[int, int]]]]:
        parts = [d._nearest(rerank)(queries, k) for d in self.dirs]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        owners = np.concatenate([np.full(p[1].shape, i) for i, p in enumerate(parts)], axis=1)
        rows = np.concatenate([p[1] for p in parts], axis=1)
        scores = np.where(rows >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(scores, order, axis=1)
        hits = [[(int(owners[q, j]), int(rows[q, j])) for j in order[q] if rows[q, j] >= 0]
                for q in range(queries.shape[0])]
        return best, hits

    def close(self) -> None:
        for directory in self.dirs:
            directory.close()


def _whitening_id(directory: IndexDir) -> Optional[str]:
    from simret.retrieval.indexdir.meta import file_record

    if directory.meta["whitening"].get("kind") != "pca":
        return None
    return file_record(directory.meta, "whitening").get("checksum") or str(directory.path)


def merge_index_dirs(sources: Sequence[PathLike], out: PathLike, settings: Any = None, *, overwrite: bool = False,
                     progress: bool = True) -> Any:
    """One index directory ``out`` from ``sources`` (see the module docstring): their stores concatenated in
    order into a new generation (atomic: nothing is visible before the commit; an interrupted merge is simply
    run again, nothing is ever described again), and an index built over it — or, for shards trained from
    ``settings.train_from``, their indexes merged as they are.

    Raises:
        ValueError: sources of different encoders or settings, overlapping sources, or ``out`` holding another
            index (without ``overwrite``).
    """
    from simret.retrieval.indexdir.build import Identity, commit_generation, output_dir
    from simret.retrieval.indexdir.layout import remove_stale
    from simret.retrieval.indexdir.plan import Entry, Plan
    from simret.retrieval.indexdir.previous import Previous, load_previous
    from simret.retrieval.indexdir.settings import IndexSettings
    from simret.utils.locking import writer_lock

    settings = settings or IndexSettings()
    out = output_dir(out)
    if any(Path(s).expanduser().resolve() == out.resolve() for s in sources):
        raise ValueError(f"--out {out} is one of the sources: merge into a new directory")
    opened = open_sources(sources)
    union = StoreUnion([s.store for s in opened], [])
    try:
        root, ids, keys = union_ids(opened)
        union.ids = ids
        first = opened[0].meta
        settings = _merge_settings(settings, first, opened)
        with writer_lock(out, timeout=settings.lock_timeout):
            remove_stale(out)
            existing = Previous() if overwrite else load_previous(out, quiet=True)
            try:
                recorded = existing.meta or existing.attrs
                if recorded and not overwrite:
                    held = len(existing.ids)
                    raise ValueError(f"{out} already holds an index of {held} images: merge into a new directory, or "
                                     f"pass --overwrite to replace it with the merge (its {held} images would leave "
                                     f"it unless a source holds them)")
            finally:
                existing.close()
            rows = Previous(store=union, ids=ids, states=union.file_states(), usable=np.ones(len(ids), bool))
            rows.store.attrs["root"] = str(root)
            plan = Plan(root, [Entry(i, k, row, None, False) for row, (i, k) in enumerate(zip(ids, keys))],
                        rows.states, len(ids))
            failed = [item for source in opened for item in _skipped_of(source, root)]
            attrs = {k: v for k, v in union.attrs.items() if k not in ("generation", "root", "store_format")}
            return commit_generation(out, plan, list(range(len(ids))), failed, 0, rows, None, attrs,
                                     Identity.of_store(union.attrs, first), settings, False, None, progress,
                                     shards=opened)
    finally:
        for source in opened:
            source.close()


def _merge_settings(settings: Any, first: Dict[str, Any], opened: Sequence[IndexDir]) -> Any:
    """The sources' scales and size; their shared training when every shard was built --train-from it."""
    from dataclasses import replace

    from simret.models.precision import recorded_precision

    settings = replace(settings, scales=tuple(first["scales"]), max_size=first["max_size"],
                       precision=recorded_precision(first))
    origins = {str((s.meta["index"].get("trained_from") or {}).get("checksum")) for s in opened}
    trained = (first["index"].get("trained_from") or {}).get("path")
    if settings.train_from is None and len(origins) == 1 and trained and settings.kind == "auto":
        settings = replace(settings, train_from=trained)  # the shards' own training: merged, not rebuilt
    return settings


def _skipped_of(source: IndexDir, root: Path) -> List[Tuple[str, str]]:
    from simret.retrieval.indexdir.names import SKIPPED
    from simret.utils.skipped import read_skipped

    skipped = read_skipped(source.generation_dir.file(SKIPPED))
    return [(relative_id(path_key(source.root, image_id), root), reason) for image_id, reason in skipped.items()]
