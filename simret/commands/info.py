"""``simret info``: versions, devices and FAISS GPU support."""
from __future__ import annotations

from typing import Optional

import click

from simret.commands.options import command_device


@click.command(short_help="Versions, devices, FAISS GPU support, known official checkpoints; or an index's summary.")
@click.argument("index_dir", metavar="[DIR]", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoints", is_flag=True, help="Also list the official SimPool checkpoints (weights=simpool:NAME).")
@click.pass_context
def info(ctx: click.Context, index_dir: Optional[str], checkpoints: bool) -> None:
    """Print the versions of simret and its dependencies, the devices torch sees, the device models would
    run on (simret --device) and whether FAISS can use a GPU. Useful in bug reports.

    With DIR, print what that index directory holds instead: generation, images, encoder, index kind and
    parameters, why that kind (--max-memory) and its measured recall@10 against exact search.
    """
    if index_dir is not None:
        from simret.retrieval.indexdir import read_meta
        from simret.retrieval.indexdir.meta import summary_lines

        meta = read_meta(index_dir)
        if meta is None:
            raise FileNotFoundError(f"{index_dir} holds no simret index (build one with simret index)")
        click.echo("\n".join(summary_lines(meta)))
        return
    import platform

    from simret import __version__

    rows = [("simret", __version__), ("python", platform.python_version()), ("platform", platform.platform())]
    for name in ("torch", "torchvision", "timm", "numpy", "h5py", "sklearn", "PIL", "safetensors"):
        rows.append((name, _version(name)))
    import torch

    rows.append(("cuda", f"{torch.version.cuda} ({torch.cuda.device_count()} device(s) visible)"
                 if torch.cuda.is_available() else "not available"))
    for index in range(torch.cuda.device_count()):
        rows.append((f"  cuda:{index}", torch.cuda.get_device_name(index)))
    mps = getattr(torch.backends, "mps", None)
    rows.append(("mps", "available" if mps is not None and mps.is_available() else "not available"))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    from simret.utils.devices import resolve_device

    asked = command_device(ctx=ctx) or "auto"
    try:
        rows.append(("device", f"{asked} -> {resolve_device(asked)}"))
    except ValueError as err:
        rows.append(("device", f"{asked}: {err}"))
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        gpu_text = f"yes, {gpus} GPU(s)" if gpus else ("built with GPU support, no GPU visible"
                                                       if hasattr(faiss, "StandardGpuResources") else "no (faiss-cpu)")
        rows.append(("faiss", f"{faiss.__version__}; GPU: {gpu_text}"))
    except ImportError:
        rows.append(("faiss", "not installed"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    if checkpoints:
        from simret.models.checkpoints import list_official_checkpoints

        click.echo("")
        click.echo(_checkpoint_table(list_official_checkpoints()))


def _checkpoint_table(entries) -> str:
    """Official checkpoints grouped by training and architecture, each baseline above its SimPool models."""
    lines = ["official SimPool checkpoints and baselines (--weights simpool:NAME)",
             "ImageNet-1k top-1 % as the official READMEs state them, not measured here (k-NN and linear probe for "
             "self-supervised models, top-1 for supervised ones; -: not stated)"]
    header = ["name", "pool", "gamma", "epochs", "k-NN", "linear", "top-1"]
    rows, groups = [], []
    for entry in entries:
        group = f"{entry.training.split(',')[0]}, {entry.arch}"
        if not groups or groups[-1] != group:
            groups.append(group)
            rows.append(group)
        rows.append([entry.name, entry.pool, _cell(entry.gamma, "{}"), _cell(entry.epochs, "{}"),
                     _cell(entry.knn), _cell(entry.linear), _cell(entry.top1)])
    table = [row for row in rows if isinstance(row, list)] + [header]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip())
    for row in rows:
        if isinstance(row, str):
            lines.append(f"{row}:")
        else:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _cell(value, form: str = "{:.1f}") -> str:
    return "-" if value is None else form.format(value)


def _version(module: str) -> str:
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except ImportError:
        return "not installed"
