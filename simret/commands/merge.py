"""``simret merge``: one index directory from several (shards described on many machines)."""
from __future__ import annotations

from typing import Optional, Tuple

import click

from simret.commands.options import lock_timeout_option


@click.command(short_help="Merge index directories (shards) into one: same encoder, no image read again.")
@click.argument("sources", metavar="DIR...", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="The merged index directory.")
@click.option("--index", "kind", type=click.Choice(["auto", "flat", "ivfpq", "hnsw", "none"]), default="auto",
              show_default=True, help="The merged index (auto: the shards' shared training if they were built "
                                      "--train-from one directory, else flat up to 200k images, ivfpq beyond).")
@click.option("--index-param", "index_params", multiple=True, metavar="NAME=VALUE", help="As for simret index.")
@click.option("--max-memory", default=None, metavar="SIZE", help="As for simret index: an index sized to fit.")
@click.option("--whiten", type=click.Choice(["none", "pca"]), default="none", show_default=True,
              help="PCA whitening learned on the merged descriptors (not with shared training).")
@click.option("--train-from", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR0",
              help="Add every shard's rows to DIR0's trained index (merged as they are when the shards were built "
                   "--train-from DIR0 too).")
@click.option("--overwrite", is_flag=True, help="Replace an index already in OUT.")
@lock_timeout_option
def merge(sources: Tuple[str, ...], out: str, kind: str, index_params: Tuple[str, ...], max_memory: Optional[str],
          whiten: str, train_from: Optional[str], overwrite: bool, lock_timeout: Optional[float]) -> None:
    """Merge the index directories DIR... into OUT: their descriptor stores are concatenated in the order
    given (same encoder, scales and size required; no image may be in two of them) and an index is built
    over the result. Nothing is described again and no model is loaded. The merge is one generation of
    OUT, committed at once: an interrupted merge leaves OUT as it was; run it again.

    \b
    Examples:
      simret index photos/ --out shard-0/ --shard 0/4 --model resnet50 --weights timm    # … one job per shard
      simret merge shard-0/ shard-1/ shard-2/ shard-3/ --out idx/ --max-memory 8GB
      simret index sample/ --out idx0/ --index ivfpq                                     # train once
      simret index photos/ --out shard-0/ --shard 0/4 --train-from idx0/                # … every shard
      simret merge shard-*/ --out idx/                   # the shards' IVF-PQ lists merged, nothing re-added
    """
    from simret.commands.options import index_params_option, memory_size
    from simret.retrieval.indexdir import IndexSettings
    from simret.retrieval.indexdir.shards import merge_index_dirs
    from simret.utils import progress

    settings = IndexSettings(kind=kind, index_params=index_params_option(index_params), whiten=whiten,
                             max_memory=memory_size(max_memory), train_from=train_from, lock_timeout=lock_timeout)
    summary = merge_index_dirs(sources, out, settings, overwrite=overwrite, progress=progress.is_enabled())
    click.echo(f"merged {len(sources)} directories: {summary.line()}")
