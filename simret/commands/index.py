"""``simret index``: images → multi-scale descriptors (HDF5) → FAISS index, resumable and atomic."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import click

from simret.commands.options import (
    BATCH_SIZE,
    MAX_SIZE,
    WORKERS,
    command_device,
    lock_timeout_option,
    model_options,
)

INDEX_KINDS = ["auto", "flat", "ivfpq", "hnsw", "none"]


def _index_params(pairs: Tuple[str, ...]) -> Dict[str, int]:
    params: Dict[str, int] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not value:
            raise click.BadParameter(f"expected NAME=VALUE (e.g. nprobe=32), got {pair!r}", param_hint="--index-param")
        try:
            params[name.strip()] = int(value)
        except ValueError:
            raise click.BadParameter(f"{name} takes an integer, got {value!r}", param_hint="--index-param") from None
    return params


@click.command(short_help="Index an image folder: descriptors (HDF5) + FAISS index.")
@click.argument("images", type=click.Path(exists=True), required=False)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@model_options
@click.option("--scales", default="1", show_default=True, metavar="S1,S2,…",
              help="Multi-scale extraction, e.g. 1,0.707,0.5 (each applied to the max-size image; descriptors "
                   "are averaged, then L2-normalised).")
@click.option("--max-size", type=MAX_SIZE, default=1024, show_default=True,
              help="Long side of each image before scaling (smaller images are not enlarged); 0 keeps the size.")
@click.option("--index", "kind", type=click.Choice(INDEX_KINDS), default="auto", show_default=True,
              help="FAISS index: exact flat, compressed ivfpq, graph hnsw, or auto (flat up to 200k images, "
                   "ivfpq beyond); parameters follow the collection size. none: keep the descriptor store only "
                   "(no index.faiss; what simret eval caches).")
@click.option("--index-param", "index_params", multiple=True, metavar="NAME=VALUE",
              help="Override an index parameter (ivfpq: nlist, m, nbits, nprobe; hnsw: M, efConstruction, "
                   "efSearch). Repeatable.")
@click.option("--whiten", type=click.Choice(["none", "pca"]), default="none", show_default=True,
              help="PCA whitening, learned on the indexed images unless --whiten-on says otherwise.")
@click.option("--whiten-on", type=click.Path(exists=True), default=None, metavar="IMAGES|FILE.h5",
              help="Learn the whitening on other images (folder or list) or on a descriptors file.")
@click.option("--whiten-dim", type=int, default=None, help="Keep this many whitened dimensions (default: all).")
@click.option("--half", is_flag=True, help="Mixed-precision extraction and float16 descriptors on disk.")
@click.option("-b", "--batch-size", type=BATCH_SIZE, default=16, show_default=True,
              help="Images per forward pass.")
@click.option("-j", "--workers", type=WORKERS, default=None,
              help="Image-loading worker processes (default: up to 8 beside a GPU; on a CPU, none on ≤ 2 cores).")
@click.option("--append", is_flag=True,
              help="Add the images to the existing index (same whitening, no retraining); images of it that "
                   "changed are described again, none is removed.")
@click.option("--overwrite", is_flag=True,
              help="Replace the index in OUT (another model, settings or source) with one of IMAGES only.")
@click.option("--keep-missing", is_flag=True,
              help="Keep indexed images that are no longer listed under the root (they leave the index otherwise).")
@click.option("--verify-content", is_flag=True,
              help="Also compare file contents (SHA-256), not only sizes and modification times, to find images "
                   "replaced in place; the digests are stored.")
@lock_timeout_option
@click.option("--from-descriptors", "from_store", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="STORE.h5",
              help="Build OUT from a descriptor store instead of images (shards, simret eval's cache, another "
                   "program writing the documented format): no image is read, no model built.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Save finished descriptors every N images, so an interrupted run resumes there.")
@click.pass_context
def index(ctx: click.Context, images: str, out: str, model_spec: Dict[str, Any], scales: str, max_size: int,
          kind: str, index_params: Tuple[str, ...], whiten: str, whiten_on: Optional[str], whiten_dim: Optional[int],
          half: bool, batch_size: int, workers: Optional[int], append: bool, overwrite: bool, keep_missing: bool,
          verify_content: bool, lock_timeout: Optional[float], from_store: Optional[str],
          checkpoint_every: int) -> None:
    """Index IMAGES (a folder, searched recursively, or a text file with one path per line) into OUT.

    \b
    OUT gets descriptors.h5 (descriptors + ids + file sizes and times), index.faiss, meta.json,
    skipped.tsv (files that could not be read, and why) and, with --whiten pca, whitening.npz: one
    generation, committed at once (readers see the previous one until then). Run the same command
    again and it brings the index up to date: new and changed images are described, unchanged ones
    reused, images no longer under the root removed (--keep-missing keeps them); an interrupted run
    (Ctrl-C, SIGTERM, a crash) resumes where it stopped. One writer at a time: a second one waits.

    \b
    Examples:
      simret index photos/ --out idx/ --model resnet50 --weights timm
      simret index photos/ --out idx/ --model vit_small_patch16_224 --weights simpool:vits-dino-simpool-ep300 \\
          --scales 1,0.707,0.5 --whiten pca
      simret index new_photos/ --out idx/ --append      # add images, same model as the index
      simret index photos/ --out idx/ --model test_resnet --weights none --max-size 256   # offline smoke test
      torchrun --nproc_per_node=4 -m simret index photos/ --out idx/ --model resnet50 --weights timm

    Under torchrun every rank describes its share of the images (one GPU each, or CPU processes with
    gloo); rank 0 merges the shards into one store and builds the index.
    """
    from simret.commands.options import build_encoder
    from simret.data.images import list_images
    from simret.retrieval.extraction import parse_scales
    from simret.retrieval.indexdir import IndexSettings, build_index
    from simret.utils import progress

    if append and overwrite:
        raise click.UsageError("--append and --overwrite exclude each other")
    if bool(images) == bool(from_store):
        raise click.UsageError("give IMAGES (a folder or a list file) or --from-descriptors STORE.h5 (one of the two)")
    if from_store:
        return _index_store(ctx, from_store, out, kind, index_params, whiten, whiten_on, whiten_dim, append, overwrite,
                            lock_timeout)
    if append:
        meta = _readable_meta(out)
        if meta is not None:  # options left at their defaults follow the index
            model_spec = _spec_from_meta(ctx, model_spec, meta)
            if _is_default(ctx, "scales"):
                scales = ",".join(str(s) for s in meta["scales"])
            if _is_default(ctx, "max_size"):
                max_size = meta["max_size"] or 0
            if _is_default(ctx, "half"):
                half = bool(meta.get("half"))
    settings = IndexSettings(scales=parse_scales(scales), max_size=max_size or None, kind=kind,
                             index_params=_index_params(index_params), whiten=whiten, whiten_on=whiten_on,
                             whiten_dim=whiten_dim, half=half, batch_size=batch_size, workers=workers,
                             checkpoint_every=checkpoint_every, keep_missing=keep_missing,
                             verify_content=verify_content, lock_timeout=lock_timeout)
    from simret.utils.distributed import barrier, distributed_session, quiet_unless_main

    listing = list_images(images)  # an empty or wrong folder fails before any model is built

    other_rank = quiet_unless_main()  # under torchrun only rank 0 prints
    device = command_device(model_spec, ctx)
    with distributed_session(device) as session:
        if session.distributed:  # each rank on its own device (cuda:LOCAL_RANK, or the CPU)
            model_spec = {**model_spec, "device": str(session.device)}
        encoder, _ = build_encoder(model_spec, ctx)
        summary = build_index(listing, out, encoder, settings, model_spec=model_spec, append=append,
                              overwrite=overwrite, progress=progress.is_enabled() and not other_rank)
        barrier()  # the other ranks wait until rank 0 has written the index
    if not other_rank:
        click.echo(summary.line())


def _index_store(ctx: click.Context, store: str, out: str, kind: str, index_params: Tuple[str, ...], whiten: str,
                 whiten_on: Optional[str], whiten_dim: Optional[int], append: bool, overwrite: bool,
                 lock_timeout: Optional[float]) -> None:
    """``--from-descriptors``: a new generation of OUT from a store, without images or a model."""
    from simret.retrieval.indexdir import IndexSettings
    from simret.retrieval.indexdir.build import build_from_store
    from simret.utils import progress

    ignored = [name for name in ("append", "whiten_on", "scales", "max_size", "half", "keep_missing",
                                 "verify_content", *MODEL_KEYS) if not _is_default(ctx, name)]
    if ignored:
        shown = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise click.UsageError(f"--from-descriptors indexes the store as it is (its model, scales and size): {shown} "
                               f"do not apply")
    settings = IndexSettings(kind=kind, index_params=_index_params(index_params), whiten=whiten,
                             whiten_dim=whiten_dim, lock_timeout=lock_timeout)
    summary = build_from_store(out, settings, source=store, overwrite=overwrite, progress=progress.is_enabled())
    click.echo(summary.line())


MODEL_KEYS = ("arch", "pool", "gamma", "weights", "checkpoint_key")


def _is_default(ctx: click.Context, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _spec_from_meta(ctx: click.Context, model_spec: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, Any]:
    """Model options left at their defaults take the index's values (so --append needs no model flags)."""
    from simret.retrieval.indexdir import spec_from_meta

    return spec_from_meta(model_spec, meta, lambda key: not _is_default(ctx, key))


def _readable_meta(out: str) -> Optional[Dict[str, Any]]:
    """The index's meta.json (None when there is no index); when it is damaged (the build repairs it), what
    its descriptor store records: the model and settings --append must describe the new images with."""
    from simret.retrieval.indexdir import IndexDamagedError, read_meta

    try:
        return read_meta(out)
    except IndexDamagedError:
        return _recorded_by_store(out)


def _recorded_by_store(out: str) -> Optional[Dict[str, Any]]:
    """Model, scales, max_size and precision as the committed generation's store records them (None: unreadable)."""
    import numpy as np

    from simret.retrieval.indexdir import STORE, current
    from simret.retrieval.indexdir.build import Identity
    from simret.retrieval.store import StoreError, StoreReader

    generation = current(out)
    try:
        with StoreReader(generation.file(STORE)) as store:
            attrs, half = dict(store.attrs), store.dtype == np.float16
        return {"model": Identity.of_store(attrs).model, "scales": list(attrs["scales"]),
                "max_size": attrs.get("max_size") or None, "half": bool(half)}
    except (StoreError, OSError, KeyError, TypeError, AttributeError):
        return None
