"""``simret index``: images → multi-scale descriptors (HDF5) → FAISS index, resumable and atomic."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from simret.commands.options import (
    BATCH_SIZE_AUTO,
    MAX_SIZE,
    WORKERS,
    command_device,
    compile_option,
    given_on_command_line,
    index_params_option,
    lock_timeout_option,
    memory_size,
    model_options,
)

INDEX_KINDS = ["auto", "flat", "ivfpq", "hnsw", "none"]


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
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the index may take (e.g. 4GB, 512MiB): flat while it fits, else ivfpq sized to fit "
                   "(hnsw only with --index hnsw); the choice and its reason go to meta.json and simret info DIR.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MS",
              help="Tune ivfpq nprobe / hnsw efSearch to the largest value whose median search time stays within MS.")
@click.option("--index-param", "index_params", multiple=True, metavar="NAME=VALUE",
              help="Override an index parameter (ivfpq: nlist, m, nbits, nprobe; hnsw: M, efConstruction, "
                   "efSearch). Repeatable.")
@click.option("--whiten", type=click.Choice(["none", "pca"]), default="none", show_default=True,
              help="PCA whitening, learned on the indexed images unless --whiten-on says otherwise.")
@click.option("--whiten-on", type=click.Path(exists=True), default=None, metavar="IMAGES|FILE.h5",
              help="Learn the whitening on other images (folder or list) or on a descriptors file.")
@click.option("--whiten-dim", type=int, default=None, help="Keep this many whitened dimensions (default: all).")
@click.option("-b", "--batch-size", type=BATCH_SIZE_AUTO, default="auto", show_default=True,
              help="Images of one size per forward pass (auto: by image size and device; 1 at 1024 px on a CPU).")
@compile_option
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
@click.option("--shard", default=None, metavar="I/N",
              help="Describe only shard I of N of the listing (by a hash of each id: stable as the collection "
                   "grows), e.g. one Slurm array task each; combine the shards with simret merge.")
@click.option("--train-from", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR0",
              help="Reuse DIR0's trained index (emptied) and its whitening instead of training one, so shards "
                   "built from the same DIR0 merge without retraining.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Save finished descriptors every N images, so an interrupted run resumes there.")
@click.pass_context
def index(ctx: click.Context, images: Optional[str], out: str, model_spec: Dict[str, Any], **options: Any) -> None:
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
      simret index photos/ --out idx/ --max-memory 4GB --max-latency-ms 5   # index sized to a budget
      simret index photos/ --out shard-3/ --shard 3/16 --train-from idx0/   # one of 16 jobs; then simret merge
      simret index --from-descriptors store.h5 --out idx/ --index ivfpq    # no images, no model
      torchrun --nproc_per_node=4 -m simret index photos/ --out idx/ --model resnet50 --weights timm

    Under torchrun every rank describes its share of the images (one GPU each, or CPU processes with
    gloo); rank 0 merges the shards into one store and builds the index.
    """
    from dataclasses import replace

    from simret.commands.options import build_inference_encoder
    from simret.retrieval.indexdir import build_index
    from simret.utils import progress
    from simret.utils.distributed import barrier, distributed_session, quiet_unless_main

    if options["append"] and options["overwrite"]:
        raise click.UsageError("--append and --overwrite exclude each other")
    if bool(images) == bool(options["from_store"]):
        raise click.UsageError("give IMAGES (a folder or a list file) or --from-descriptors STORE.h5 (one of the two)")
    if options["from_store"]:
        return _index_store(ctx, out, options)
    model_spec, settings = _settings(ctx, out, model_spec, options)
    listing = _listing(images, options["shard"])  # an empty or wrong folder fails before any model is built
    other_rank = quiet_unless_main()  # under torchrun only rank 0 prints
    with distributed_session(command_device(model_spec, ctx)) as session:
        if session.distributed:  # each rank on its own device (cuda:LOCAL_RANK, or the CPU)
            model_spec = {**model_spec, "device": str(session.device)}
        encoder, _ = build_inference_encoder(model_spec, ctx, compile=options["compile"])
        settings = replace(settings, precision=encoder.precision)  # what is recorded: the one that ran
        summary = build_index(listing, out, encoder, settings, model_spec=model_spec, append=options["append"],
                              overwrite=options["overwrite"], progress=progress.is_enabled() and not other_rank)
        barrier()  # the other ranks wait until rank 0 has written the index
    if not other_rank:
        click.echo(summary.line())


SETTING_OPTIONS = ("kind", "whiten", "whiten_on", "whiten_dim", "batch_size", "workers", "checkpoint_every",
                   "keep_missing", "verify_content", "lock_timeout", "max_latency_ms", "train_from")


def _settings(ctx: click.Context, out: str, model_spec: Dict[str, Any], options: Dict[str, Any]):
    """``(model_spec, IndexSettings)`` from the options; with --append, options left at their defaults follow
    the index (model, scales, size, precision)."""
    from simret.models.precision import recorded_precision
    from simret.retrieval.extraction import parse_scales
    from simret.retrieval.indexdir import IndexSettings

    scales, max_size = options["scales"], options["max_size"]
    meta = _readable_meta(out) if options["append"] else None
    if meta is not None:
        model_spec = _spec_from_meta(ctx, model_spec, meta)
        scales = ",".join(str(s) for s in meta["scales"]) if _is_default(ctx, "scales") else scales
        max_size = (meta["max_size"] or 0) if _is_default(ctx, "max_size") else max_size
        if not given_on_command_line(ctx, "precision") and _is_default(ctx, "half"):
            model_spec = {**model_spec, "precision": recorded_precision(meta)}
    if options["train_from"] and [n for n in ("kind", "index_params", "whiten", "max_memory")
                                  if not _is_default(ctx, n)]:
        raise click.UsageError("--train-from takes the index and whitening of DIR0: --index, --index-param, --whiten "
                               "and --max-memory do not apply")
    chosen = {name: options[name] for name in SETTING_OPTIONS}
    return model_spec, IndexSettings(**chosen, scales=parse_scales(scales), max_size=max_size or None,
                                     index_params=index_params_option(options["index_params"]),
                                     max_memory=memory_size(options["max_memory"]))


def _listing(images: str, shard: Optional[str]):
    from simret.data.images import list_images
    from simret.retrieval.indexdir.shards import parse_shard, select_shard

    root, ids = list_images(images)
    if shard is None:
        return root, ids
    number, count = parse_shard(shard)
    picked = select_shard(ids, number, count)
    if not picked:
        raise ValueError(f"shard {number}/{count} of the {len(ids)} images under {root} is empty: use fewer shards")
    return root, picked


def _index_store(ctx: click.Context, out: str, options: Dict[str, Any]) -> None:
    """``--from-descriptors``: a new generation of OUT from a store, without images or a model."""
    from simret.retrieval.indexdir import IndexSettings
    from simret.retrieval.indexdir.build import build_from_store
    from simret.utils import progress

    ignored = [name for name in ("append", "whiten_on", "scales", "max_size", "half", "precision", "keep_missing",
                                 "verify_content", "shard", "train_from", *MODEL_KEYS)
               if given_on_command_line(ctx, name)]
    if ignored:
        shown = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise click.UsageError(f"--from-descriptors indexes the store as it is (its model, scales and size): {shown} "
                               f"do not apply")
    settings = IndexSettings(kind=options["kind"], index_params=index_params_option(options["index_params"]),
                             whiten=options["whiten"], whiten_dim=options["whiten_dim"],
                             lock_timeout=options["lock_timeout"], max_memory=memory_size(options["max_memory"]),
                             max_latency_ms=options["max_latency_ms"])
    summary = build_from_store(out, settings, source=options["from_store"], overwrite=options["overwrite"],
                               progress=progress.is_enabled())
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
