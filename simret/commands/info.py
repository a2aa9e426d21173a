"""``simret info``: versions, devices and FAISS GPU support."""
from __future__ import annotations

import click

from simret.commands.options import command_device


@click.command(short_help="Versions, devices, FAISS GPU support, known official checkpoints.")
@click.option("--checkpoints", is_flag=True, help="Also list the official SimPool checkpoints (weights=simpool:NAME).")
@click.pass_context
def info(ctx: click.Context, checkpoints: bool) -> None:
    """Print the versions of simret and its dependencies, the devices torch sees, the device models would
    run on (simret --device) and whether FAISS can use a GPU. Useful in bug reports."""
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

        click.echo("\nofficial SimPool checkpoints (--weights simpool:NAME):")
        for entry in list_official_checkpoints():
            gamma = "-" if entry.gamma is None else entry.gamma
            click.echo(f"  {entry.name:<40} {entry.arch:<24} gamma={gamma:<5} {entry.training}")


def _version(module: str) -> str:
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except ImportError:
        return "not installed"
