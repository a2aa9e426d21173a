"""``simret search``: query images (or stored query descriptors) against an index directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from simret.commands.options import (
    ALPHA,
    BATCH_SIZE_AUTO,
    NEIGHBOURS,
    WORKERS,
    command_device,
    compile_option,
    model_options,
)

FORMATS = ["table", "jsonl", "tsv"]


def _parse_bbox(text: Optional[str]) -> Optional[Tuple[float, float, float, float]]:
    if text is None:
        return None
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected x1,y1,x2,y2 in pixels, got {text!r}", param_hint="--bbox") from None
    if not all(abs(v) < float("inf") for v in (x1, y1, x2, y2)):  # also refuses NaN
        raise click.BadParameter(f"expected finite numbers of pixels, got {text!r}", param_hint="--bbox")
    if x2 <= x1 or y2 <= y1:
        raise click.BadParameter(f"x2 > x1 and y2 > y1 needed, got {text!r}", param_hint="--bbox")
    return (x1, y1, x2, y2)


@click.command(short_help="Search an index with query images; ranked ids and scores on stdout.")
@click.argument("index_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", metavar="[DIR]... [QUERY]...", nargs=-1, type=click.Path(exists=True))
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Results per query.")
@click.option("--bbox", default=None, metavar="x1,y1,x2,y2",
              help="Crop every query image to this box (pixels, as PIL.Image.crop: a part past the border is black) "
                   "before describing it (Revisited queries).")
@click.option("--descriptors", "descriptor_file", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="FILE.h5", help="Query with stored descriptors (a simret descriptors.h5 with a fingerprint) "
                                      "instead of images.")
@click.option("--qe", type=NEIGHBOURS, default=0, show_default=True, metavar="N",
              help="α-query expansion over the top N results (0: off).")
@click.option("--alpha", type=ALPHA, default=3.0, show_default=True,
              help="Similarity exponent of --qe and --dba.")
@click.option("--dba", type=NEIGHBOURS, default=0, show_default=True, metavar="N",
              help="Database-side augmentation with N neighbours (computed over the whole index at search time).")
@click.option("--rerank", type=click.IntRange(min=0), default=None, metavar="R",
              help="ivfpq indexes: re-score the top k·R candidates with the exact stored descriptors (0: off; "
                   "default: the depth the build measured to reach recall@10 >= 0.95, shown by simret info; 16 "
                   "for indexes built before).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table for people; jsonl: {\"query\", \"ids\", \"scores\"} per line; tsv: query, rank, id, score.")
@click.option("--mmap/--no-mmap", default=None,
              help="Map the FAISS index from its file instead of reading it (default: when it is larger than half "
                   "the memory available); a mapped index opens at once.")
@model_options
@click.option("-b", "--batch-size", type=BATCH_SIZE_AUTO, default="auto", show_default=True,
              help="Query images of one size per forward pass (auto: by image size and device).")
@compile_option
@click.option("-j", "--workers", type=WORKERS, default=0, show_default=True,
              help="Image-loading worker processes.")
@click.pass_context
def search(ctx: click.Context, index_dir: str, queries: Tuple[str, ...], k: int, bbox: Optional[str],
           descriptor_file: Optional[str], qe: int, alpha: float, dba: int, rerank: Optional[int], fmt: str,
           mmap: Optional[bool], model_spec: Dict[str, Any], batch_size: Any, compile: str, workers: int) -> None:
    """Rank the images of the index DIR for each QUERY image (files, or folders of images). Several index
    directories (shards: the leading arguments that are index directories) are searched as one, with one
    merged ranking.

    \b
    By default the queries are described with the model the index was built with (meta.json); model
    options override it, and a model whose fingerprint differs from the index's is refused. Results
    go to stdout, logs to stderr. Ranks start at 1; scores are cosine similarities (higher is better).

    \b
    Examples:
      simret search idx/ query.jpg -k 5
      simret search idx/ q1.jpg q2.jpg --format jsonl > results.jsonl
      simret search idx/ oxford_001.jpg --bbox 136,34,648,955 --qe 2 --alpha 3
      simret search idx/ --descriptors queries.h5 --format tsv
      simret search shard-0/ shard-1/ shard-2/ query.jpg       # three shards, one ranking
    """
    from simret.utils.logs import get_logger

    log = get_logger("simret.commands.search")
    index, queries = _open_indexes(index_dir, queries, mmap)
    if bool(queries) == bool(descriptor_file):
        raise click.UsageError("give query images or --descriptors FILE.h5 (one of the two)")
    box = _parse_bbox(bbox)
    count = index.count
    if qe > count:
        raise click.BadParameter(f"{qe} is more than the {count} images of {index_dir}: use at most {count}",
                                 param_hint="--qe")
    if dba and dba >= count:
        raise click.BadParameter(f"{dba} neighbours need more than the {count} images of {index_dir}: use at most "
                                 f"{count - 1}", param_hint="--dba")
    if descriptor_file:
        if box is not None:
            raise click.UsageError("--bbox applies to query images, not to --descriptors")
        names, raw = _stored_queries(index, descriptor_file)
    else:
        names, raw = _image_queries(ctx, index, queries, box, model_spec, batch_size, workers, log, compile)
    _write(_rank(ctx, index, names, raw, k, qe, alpha, dba, rerank, model_spec, log), fmt)


def _open_indexes(index_dir: str, arguments: Tuple[str, ...], mmap: Optional[bool]):
    """``(IndexDir, or IndexSet over DIR and the leading arguments that are index directories; the rest)``."""
    from simret.retrieval.indexdir import IndexDir, current
    from simret.retrieval.indexdir.shards import IndexSet

    shards = [index_dir]
    rest = list(arguments)
    while rest and Path(rest[0]).is_dir() and current(rest[0]) is not None:
        shards.append(rest.pop(0))
    index = IndexDir(index_dir, mmap=mmap) if len(shards) == 1 else IndexSet(shards, mmap=mmap)
    return index, tuple(rest)


def _rank(ctx: click.Context, index, names: List[str], raw, k: int, qe: int, alpha: float, dba: int,
          rerank: Optional[int], model_spec: Dict[str, Any], log) -> List[Tuple[str, List[str], List[float]]]:
    """``(query, ids, scores)`` per query, best first."""
    from simret.retrieval.indexdir.shards import IndexSet

    if isinstance(index, IndexSet):
        if dba:
            raise click.UsageError("--dba augments one index directory: it does not apply across shards")
        scores, hits = index.search(raw, k, qe=qe, alpha=alpha, rerank=rerank)
        return [(name, [index.id_of(hit) for hit in row], [float(s) for s in score[:len(row)]])
                for name, score, row in zip(names, scores, hits)]
    _faiss_on_gpu(ctx, index, model_spec, log)
    scores, rows = index.search(raw, k, qe=qe, alpha=alpha, dba=dba, rerank=rerank)
    ids = index.ids
    return [(name, [ids[r] for r in row if r >= 0], [float(s) for s, r in zip(score, row) if r >= 0])
            for name, score, row in zip(names, scores, rows)]


def _faiss_on_gpu(ctx: click.Context, index, model_spec: Dict[str, Any], log) -> None:
    """With a CUDA device and a FAISS built with GPU support, search on the GPU (flat and ivfpq)."""
    from simret.utils.devices import resolve_device

    device = resolve_device(command_device(model_spec, ctx) or "auto")
    if device.type != "cuda" or not index.searchable or index.meta["index"]["kind"] == "hnsw":
        return
    try:
        index.index.to_gpu(device.index or 0)
        log.info("FAISS search on %s", device)
    except RuntimeError as err:
        log.info("FAISS search stays on the CPU: %s", err)


def _stored_queries(index, path: str):
    import numpy as np

    from simret.retrieval.store import read_store

    stored = read_store(path)
    index.check_queries(stored.fingerprint, what=f"the query descriptors in {path}")
    shape = stored.descriptors.shape
    if not len(stored.ids):
        raise ValueError(f"{path} holds no descriptors: nothing to search for")
    if shape[1] != index.meta["dim"]:
        raise ValueError(f"{path} holds {shape[1]}-d descriptors, the index {index.path} holds "
                         f"{index.meta['dim']}-d ones")
    if not np.isfinite(stored.descriptors).all():
        raise ValueError(f"{path} holds NaN or infinite descriptors: recompute them")
    return stored.ids, stored.descriptors


def _image_queries(ctx: click.Context, index, queries: Sequence[str], box, model_spec: Dict[str, Any],
                   batch_size: Any, workers: int, log, compile: str = "auto"):
    from pathlib import Path

    from simret.commands.index import _spec_from_meta
    from simret.commands.options import build_inference_encoder
    from simret.data.images import list_images
    from simret.retrieval.queries import describe_queries
    from simret.utils import progress

    paths: List[str] = []
    for query in queries:
        if Path(query).is_dir():
            root, found = list_images(query)
            paths += [str(root / f) for f in found]
        else:
            paths.append(query)
    spec = _spec_from_meta(ctx, model_spec, index.meta)
    encoder, device = build_inference_encoder(spec, ctx, compile=compile)  # any precision: same fingerprint
    index.check_queries(encoder.fingerprint, what=f"query descriptors of this model ({spec.get('arch')})")
    described = describe_queries(encoder, index.meta, paths, boxes=[box] * len(paths) if box else None,
                                 batch_size=batch_size, workers=workers, device=device,
                                 progress=progress.is_enabled() and len(paths) > 1)
    for name, reason in described.failures:
        log.warning("query %s skipped: %s", name, reason)
    if not described.names:
        raise ValueError("no query image could be used")
    return described.names, described.descriptors


def _write(results: List[Tuple[str, List[str], List[float]]], fmt: str) -> None:
    """Print the results; in ``tsv`` and ``table`` every query name and id is escaped with
    ``simret.utils.text.escape_field`` (tab, newline, backslash … as ``\\t``, ``\\n``, ``\\\\``), so a file
    name holding them never splits a row; ``jsonl`` holds them as they are (JSON escapes them)."""
    from simret.utils.text import escape_field

    if fmt == "jsonl":
        for name, ids, scores in results:
            click.echo(json.dumps({"query": name, "ids": ids, "scores": [round(s, 6) for s in scores]}))
    elif fmt == "tsv":
        click.echo("query\trank\tid\tscore")
        for name, ids, scores in results:
            query = escape_field(name)
            for rank, (image_id, score) in enumerate(zip(ids, scores), 1):
                click.echo(f"{query}\t{rank}\t{escape_field(image_id)}\t{score:.6f}")
    else:
        for number, (name, ids, scores) in enumerate(results):
            if number:
                click.echo("")
            click.echo(f"query: {escape_field(name)}")
            width = max([len(str(len(ids)))] + [4])
            click.echo(f"  {'rank':>{width}}  {'score':>7}  id")
            for rank, (image_id, score) in enumerate(zip(ids, scores), 1):
                click.echo(f"  {rank:>{width}}  {score:7.4f}  {escape_field(image_id)}")
