"""Weights for encoders: timm's hub, local ``.pth/.pt/.safetensors`` files, the official SimPool checkpoints.

Everything here fails fast and clearly offline: nothing is downloaded unless the host answers within a
couple of seconds, and every error says how to provide the file by hand. Checkpoints are read with
``torch.load(weights_only=True)`` (plus a short allow-list of harmless containers such as
``argparse.Namespace``, which DINO and timm store beside the weights) or with safetensors; arbitrary
pickles are refused.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import struct
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

from simret.utils.logs import get_logger
from simret.utils.paths import cache_dir  # its home; still importable from here

log = get_logger(__name__)

StateDict = Dict[str, "torch.Tensor"]  # noqa: F821

SIMRET_FORMAT_KEY = "simret_encoder"
CONTAINER_KEYS = ("teacher", "state_dict", "model", "model_ema", "state_dict_ema", "module", "student")
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "backbone.")
POOL_PREFIXES = ("simpool.", "head.global_pool.pool.", "global_pool.pool.", "gp.pool.")


class WeightsError(ValueError):
    """A weights file or name that cannot be used (corrupt, unsafe, mismatched keys, unknown name)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights file does not exist."""


class WeightsUnavailableError(WeightsError):
    """Weights would have to be downloaded, and the host cannot be reached from here."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of the checkpoints released with the SimPool paper (github.com/billpsomas/simpool): SimPool models
    and the official baselines trained by the same authors.

    ``pool`` is the pooling the checkpoint was trained with (``simpool``; baselines: ``cls`` for the ViT
    [CLS] token, ``avg`` for CNN global average pooling), used unless the caller asks for another.
    ``knn``/``linear`` (self-supervised: ImageNet k-NN and linear-probe top-1, %) and ``top1`` (supervised:
    ImageNet top-1, %) are the numbers the official READMEs state (None: not stated in the README version
    reachable when the entry was written; ``notes`` says where the entry comes from), not measured by simret.
    ``official_pos_embed``: the official self-supervised ViT code resamples its position embeddings at every
    forward (``simret.models.official_vit``); encoders built from this checkpoint do the same.
    """

    name: str
    arch: str
    gamma: Optional[float]
    use_beta: bool
    url: str
    training: str
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    notes: str = ""
    pool: str = "simpool"
    epochs: Optional[int] = None
    knn: Optional[float] = None
    linear: Optional[float] = None
    top1: Optional[float] = None
    official_pos_embed: bool = False

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name

    @property
    def is_baseline(self) -> bool:
        """True for the official baselines (no SimPool: [CLS] token or global average pooling)."""
        return self.pool != "simpool"


def _hf(repo: str, filename: str, revision: str = "main") -> str:
    return f"https://huggingface.co/billpsomas/{repo}/resolve/{revision}/{filename}"


SELF_SUPERVISED_README = "github.com/billpsomas/simpool self_supervised/README.md"
SUPERVISED_README = "github.com/billpsomas/simpool supervised/README.md"
NOT_IN_README = ("listed on huggingface.co/billpsomas (model card and files), not in the supervised README version "
                 "reachable here: no accuracy recorded")


def _dino(name: str, arch: str, gamma: Optional[float], repo: str, knn: float, linear: float, *, pool: str = "simpool",
          use_beta: bool = False, epochs: int = 100) -> OfficialCheckpoint:
    """A DINO (self-supervised) checkpoint of the self-supervised README's table."""
    kind = "SimPool" if pool == "simpool" else f"official baseline ({pool} pooling)"
    extra = ", no gamma" if pool == "simpool" and gamma is None else ""
    return OfficialCheckpoint(name, arch, gamma, use_beta, _hf(repo, f"{repo}.pth"),
                              f"DINO, ImageNet-1k, {epochs} ep, {kind}{extra}", notes=SELF_SUPERVISED_README,
                              pool=pool, epochs=epochs, knn=knn, linear=linear,
                              official_pos_embed=arch.startswith("vit_"))


def _supervised(name: str, arch: str, gamma: Optional[float], repo: str, filename: str, top1: Optional[float], *,
                pool: str = "simpool", use_beta: bool = False, epochs: int = 100, notes: str = SUPERVISED_README,
                revision: str = "main") -> OfficialCheckpoint:
    """A supervised checkpoint (timm training code; ``top1`` from the supervised README)."""
    kind = "SimPool" if pool == "simpool" else f"official baseline ({pool} pooling)"
    extra = ", no gamma" if pool == "simpool" and gamma is None else ""
    return OfficialCheckpoint(name, arch, gamma, use_beta, _hf(repo, filename, revision),
                              f"supervised, ImageNet-1k, {epochs} ep, {kind}{extra}", notes=notes, pool=pool,
                              epochs=epochs, top1=top1)


VITS, RESNET50, CONVNEXTS = "vit_small_patch16_224", "resnet50", "convnext_small"

# Each family lists its official baseline first, then the SimPool models (``simret info --checkpoints``).
OFFICIAL_CHECKPOINTS: Dict[str, OfficialCheckpoint] = {
    c.name: c
    for c in [
        # self-supervised (DINO); k-NN and linear-probe top-1 as the self-supervised README states them
        _dino("vits-dino-official-ep100", VITS, None, "vits_dino_official_ep100", 68.9, 71.5, pool="cls"),
        _dino("vits-dino-simpool-ep100", VITS, 1.25, "vits_dino_simpool_ep100", 69.7, 72.8, use_beta=True),
        _dino("vits-dino-simpool-ep300", VITS, 1.25, "vits_dino_simpool_ep300", 72.6, 75.0, use_beta=True,
              epochs=300),
        _dino("vits-dino-simpool-nogamma-ep100", VITS, None, "vits_dino_simpool_no_gamma_ep100", 69.8, 72.6),
        _dino("resnet50-dino-official-ep100", RESNET50, None, "resnet50_dino_official_ep100", 61.8, 63.8,
              pool="avg"),
        _dino("resnet50-dino-simpool-ep100", RESNET50, 2.0, "resnet50_dino_simpool_ep100", 63.8, 64.4),
        _dino("resnet50-dino-simpool-nogamma-ep100", RESNET50, None, "resnet50_dino_simpool_no_gamma_ep100",
              63.7, 64.2),
        _dino("convnexts-dino-official-ep100", CONVNEXTS, None, "convnext_small_dino_official_ep100", 59.3, 63.9,
              pool="avg"),
        _dino("convnexts-dino-simpool-ep100", CONVNEXTS, 2.0, "convnext_small_dino_simpool_ep100", 68.7, 72.2),
        _dino("convnexts-dino-simpool-nogamma-ep100", CONVNEXTS, None, "convnext_small_dino_simpool_no_gamma_ep100",
              68.8, 72.2),
        # supervised; top-1 as the supervised README states it
        _supervised("vits-supervised-official-ep100", VITS, None, "vits_supervised_official_ep100",
                    "vits_supervised_official_ep100.pth.tar", 72.7, pool="cls"),
        # the README links this file on the main branch, where the Hugging Face commit "rename model" (8a4598a)
        # deleted it: pinned to the revision that holds it (b261ca7)
        _supervised("vits-supervised-simpool-ep100", VITS, 1.25, "vits_supervised_simpool_ep100",
                    "vits_gem1.25_supervised_beta.pth.tar", 74.2, use_beta=True,
                    revision="b261ca794bf0fb17f7f95b038fe5e24a8aeea3e3",
                    notes=SUPERVISED_README + "; file pinned to Hugging Face revision b261ca7 (deleted on main)"),
        _supervised("vits-supervised-simpool-nogamma-ep100", VITS, None, "vits_supervised_simpool_no_gamma_ep100",
                    "vits_supervised_simpool_no_gamma_ep100.pth.tar", 74.3),
        _supervised("vits-supervised-simpool-ep300", VITS, 1.25, "vits_supervised_simpool_ep300",
                    "vits_supervised_simpool_ep300.pth.tar", None, epochs=300,
                    notes=NOT_IN_README + "; gamma 1.25 is the READMEs' default for transformers (the name has no "
                                          "'no_gamma'), not stated for this file"),
        _supervised("resnet50-supervised-official-ep100", RESNET50, None, "resnet50_supervised_official_ep100",
                    "resnet50_supervised_official_ep100.pth.tar", None, pool="avg", notes=NOT_IN_README),
        _supervised("resnet50-supervised-simpool-ep100", RESNET50, 2.0, "resnet50_supervised_simpool_ep100",
                    "resnet50_supervised_simpool_ep100.pth.tar", None,
                    notes=NOT_IN_README + "; gamma 2.0 from its model card"),
    ]
}


def list_official_checkpoints() -> List[OfficialCheckpoint]:
    """The official SimPool checkpoints simret knows by name (``weights="simpool:<name>"``)."""
    return list(OFFICIAL_CHECKPOINTS.values())


def official_checkpoint(spec: str) -> Optional[OfficialCheckpoint]:
    """``"simpool:<name>"`` or a bare registry name → its entry; anything else → None."""
    name = spec.split(":", 1)[1] if spec.startswith("simpool:") else spec
    entry = OFFICIAL_CHECKPOINTS.get(name)
    if entry is None and spec.startswith("simpool:"):
        known = ", ".join(sorted(OFFICIAL_CHECKPOINTS))
        raise WeightsError(f"unknown official SimPool checkpoint {name!r}; known: {known}")
    return entry


# ------------------------------------------------------------------------------------------ network


def _first_hop(host: str, port: int) -> Tuple[str, int]:
    """Where a connection to ``host`` really goes: the HTTPS proxy from the environment, unless bypassed."""
    import urllib.request

    proxy = urllib.request.getproxies().get("https")
    if not proxy or urllib.request.proxy_bypass(host):
        return host, port
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if not parsed.hostname:
        return host, port
    return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)


def host_reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """True when a TCP connection to ``host:port`` (or to the HTTPS proxy in the environment) opens within
    about ``timeout`` seconds. Name resolution counts towards the limit: a resolver that never answers
    makes this return False, it does not hang. ``SIMRET_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: always False."""
    if os.environ.get("SIMRET_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    address = _first_hop(host, port)
    answer: List[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    # getaddrinfo ignores socket timeouts, so the whole attempt runs in a thread we stop waiting for
    worker = threading.Thread(target=probe, name=f"simret-probe-{host}", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(answer and answer[0])


def fetch_url(url: str, *, what: str) -> Path:
    """The local copy of ``url`` in the cache, downloading it (with a progress bar) if it is not there.

    Raises:
        WeightsUnavailableError: not cached and the host does not answer; the message says where to put
            the file by hand.
    """
    target = cache_dir() / "downloads" / Path(urlparse(url).path).name
    if target.is_file():
        return target
    host = urlparse(url).hostname or ""
    if not host_reachable(host):
        raise WeightsUnavailableError(
            f"{what} is not in the cache and {host} cannot be reached from here.\n"
            f"  Download {url}\n  on a machine with internet access and either put it at {target}\n"
            f"  or pass the file's path as the weights (--weights /path/to/{target.name})."
        )
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    log.info("downloading %s to %s", url, target)
    torch.hub.download_url_to_file(url, str(partial), progress=True)
    partial.replace(target)
    return target


def timm_pretrained_file(arch: str) -> Optional[str]:
    """A locally cached file with timm's pretrained weights for ``arch``, or None when timm must download.

    Raises:
        WeightsUnavailableError: nothing cached and neither huggingface.co nor the weights URL answers.
        WeightsError: timm has no pretrained weights for ``arch``.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {arch!r}; see timm.list_pretrained()")
    if cfg.file and Path(cfg.file).is_file():
        return str(cfg.file)
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import hf_hub_download

            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for name in names:
                try:
                    return hf_hub_download(cfg.hf_hub_id, name, local_files_only=True)
                except Exception:  # noqa: BLE001 - not cached under this name
                    continue
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            pass
    if cfg.url:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return str(cached)
    hosts = (["huggingface.co"] if cfg.hf_hub_id else []) + ([urlparse(cfg.url).hostname] if cfg.url else [])
    if any(host_reachable(h) for h in hosts if h):
        return None
    where = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    raise WeightsUnavailableError(
        f"timm's pretrained weights for {arch!r} are not cached here and {', '.join(h for h in hosts if h)} "
        f"cannot be reached.\n  Fetch them on a machine with internet access "
        f"(python -c \"import timm; timm.create_model('{arch}', pretrained=True)\") and copy the Hugging Face "
        f"cache (~/.cache/huggingface/hub), or download the weights from {where} and pass the file's path "
        f"as the weights (--weights /path/to/model.safetensors)."
    )


# ---------------------------------------------------------------------------------------- reading


def _safe_globals() -> list:
    """Harmless classes found in real checkpoints next to the weights (DINO/timm ``args``, numpy scalars)."""
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np

        allowed += [np.dtype, np.ndarray]
        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, core.multiarray._reconstruct]
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except Exception:  # noqa: BLE001 - numpy layout differs between versions
        pass
    return allowed


def read_checkpoint(path: str | os.PathLike) -> Tuple[Mapping[str, Any], Dict[str, Any]]:
    """Read a checkpoint safely: ``(the loaded object, simret metadata or {})``.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.

    Raises:
        WeightsNotFoundError: the file does not exist.
        WeightsError: corrupt, truncated, not a checkpoint, or holding Python objects outside the allow-list.
    """
    import torch

    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"weights must be a file, {path} is a directory")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path} is not a readable safetensors file ({err})") from None
        meta = json.loads(metadata[SIMRET_FORMAT_KEY]) if SIMRET_FORMAT_KEY in metadata else {}
        return state, meta
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # garbage reads as odd protocols
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line]
        if not refused:
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?)") from None
        raise WeightsError(
            f"{path} holds Python objects that simret will not unpickle (it loads checkpoints with "
            f"weights_only=True for safety): {refused[0]}\n  Re-save only the tensors, e.g. "
            f"torch.save(model.state_dict(), 'clean.pth'), or convert the file to .safetensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, struct.error, UnicodeDecodeError, MemoryError) as err:
        # garbage bytes read as a legacy pickle stream fail in many ways inside the unpickler
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                           f"{type(err).__name__}: {err}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    meta = dict(obj.get(SIMRET_FORMAT_KEY) or {}) if SIMRET_FORMAT_KEY in obj else {}
    return obj, meta


def unwrap_state_dict(obj: Mapping[str, Any], checkpoint_key: Optional[str] = None) -> StateDict:
    """Find the weights inside a checkpoint dict (DINO ``teacher``, timm ``state_dict``, ``model`` …).

    ``checkpoint_key`` picks one explicitly (e.g. ``student`` or ``state_dict_ema``).
    """
    import torch

    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            raise WeightsError(f"checkpoint has no {checkpoint_key!r} entry; it has: {_name_keys(map(str, obj))}")
        obj = obj[checkpoint_key]
    else:
        for key in CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"checkpoint holds no tensors (entries: {', '.join(list(map(str, obj))[:10])})")
    return state


# ---------------------------------------------------------------------------------------- mapping


@dataclass
class MappedWeights:
    """A checkpoint split onto simret's encoder: trunk and pooling state dicts, and trunk constructor hints.

    ``source`` names the layout found: ``simret``, ``dino`` (official SimPool DINO: ``simpool.*``, the
    trunk's final norm applied after pooling), ``timm`` (official supervised SimPool, timm naming) or
    ``plain`` (a trunk checkpoint with no pooling weights).
    """

    trunk: StateDict
    pool: StateDict
    trunk_kwargs: Dict[str, Any] = field(default_factory=dict)
    source: str = "plain"


def _strip_prefixes(state: StateDict) -> StateDict:
    has_backbone = any(k.replace("module.", "", 1).startswith("backbone.") for k in state)
    out: StateDict = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if has_backbone:
            if not key.startswith("backbone."):
                continue  # DINO projection head and other non-backbone parts
            key = key[len("backbone."):]
        out[key] = value
    return out


def map_checkpoint(state: StateDict) -> MappedWeights:
    """Split a state dict (any supported layout) into trunk and pooling weights for ``Encoder``."""
    if any(k.startswith("trunk.") for k in state):
        trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
        pool = {k[len("pool."):]: v for k, v in state.items() if k.startswith("pool.")}
        others = sorted(k for k in state if not k.startswith(("trunk.", "pool.")))
        if others:
            raise WeightsError(f"unexpected keys in a simret checkpoint: {_name_keys(others)}")
        return MappedWeights(trunk, pool, source="simret")
    state = _strip_prefixes(state)
    trunk: StateDict = {}
    pool: StateDict = {}
    pool_prefix = None
    for key, value in state.items():
        for prefix in POOL_PREFIXES:
            if key.startswith(prefix):
                pool[key[len(prefix):]] = value
                pool_prefix = pool_prefix or prefix
                break
        else:
            trunk[key] = value
    kwargs: Dict[str, Any] = {}
    source = "plain" if not pool else ("dino" if pool_prefix == "simpool." else "timm")
    is_vit = "pos_embed" in trunk and any(k.startswith("blocks.") for k in trunk)
    if is_vit and "cls_token" not in trunk:
        kwargs.update(class_token=False, global_pool="")
    if is_vit and source == "dino" and "norm.weight" in trunk and "fc_norm.weight" not in trunk:
        # official DINO ViT: SimPool pools the un-normalised tokens and the final norm follows the pooling,
        # which is timm's fc_norm arrangement
        kwargs["fc_norm"] = True
        trunk = {("fc_" + k if k.startswith("norm.") else k): v for k, v in trunk.items()}
    return MappedWeights(trunk, pool, kwargs, source)


def _name_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


def describe_key_mismatch(missing: List[str], unexpected: List[str], where: str) -> str:
    """A readable sentence naming the keys that did not line up."""
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint ({len(missing)}): {_name_keys(missing)}")
    if unexpected:
        parts.append(f"not used by the model ({len(unexpected)}): {_name_keys(unexpected)}")
    return f"weights do not fit the {where}: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------- sources

WeightsSpec = Union[None, str, Path]


@dataclass(frozen=True)
class WeightsSource:
    """Where an encoder's weights come from, and what that source implies (``resolve_weights``).

    Attributes:
        kind: ``none`` (random init), ``timm`` (timm's pretrained trunk), ``official`` (an official SimPool
            checkpoint), ``url`` (a file to download) or ``file`` (a local file).
        label: how messages name the weights (``random init``, ``timm pretrained resnet50``,
            ``official SimPool checkpoint <name>``, ``weights <file>``).
        weights_id: what the encoder records as its weights: None (random init), ``timm:<arch>``,
            ``simpool:<name>``, the URL or the path.
        arch: the architecture asked for or named by the source (official checkpoints); None when only the
            weights file can tell (files written by ``save_encoder``).
        gamma: SimPool's gamma asked for, else the official checkpoint's.
        pool_kwargs: pooling arguments the source implies (``use_beta`` of official checkpoints); the
            caller's own take precedence.
        data_config: preprocessing the source implies (an official checkpoint's ``mean`` and ``std``).
        official: the registry entry of an ``official`` source.
        url: what ``read_weights`` downloads (into the cache) for ``official`` and ``url`` sources.
        path: the local file of a ``file`` source.
        timm_file: ``timm`` sources: a cached copy of timm's weights, or None when timm downloads them.
    """

    kind: str
    label: str
    weights_id: Optional[str] = None
    arch: Optional[str] = None
    gamma: Optional[float] = None
    pool_kwargs: Dict[str, Any] = field(default_factory=dict)
    data_config: Dict[str, Any] = field(default_factory=dict)
    official: Optional[OfficialCheckpoint] = None
    url: Optional[str] = None
    path: Optional[Path] = None
    timm_file: Optional[str] = None

    @property
    def reads_file(self) -> bool:
        """True when the weights come from a checkpoint file (``read_weights`` reads it)."""
        return self.kind in ("official", "url", "file")


def _is_path_like(weights: WeightsSpec) -> bool:
    if isinstance(weights, Path):
        return True
    text = str(weights)
    return text.endswith((".pth", ".pt", ".tar", ".bin", ".safetensors", ".ckpt")) or "/" in text or "\\" in text


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming similar architectures when timm does not know ``arch``."""
    import timm

    if not timm.is_model(arch.split(".")[0]):
        close = timm.list_models(f"*{arch.split('.')[0].split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm architecture {arch!r}{hint}")


def resolve_weights(weights: WeightsSpec, arch: Optional[str] = None,
                    gamma: Optional[float] = None) -> WeightsSource:
    """Where ``weights`` come from, decided before anything is read or built; ``read_weights`` reads them.

    Args:
        weights: None (random init), ``"timm"`` (timm's pretrained trunk), ``"simpool:<name>"`` (an official
            SimPool checkpoint), an ``http(s)://`` URL, or the path of a local file.
        arch: the architecture asked for (None: the one the weights name).
        gamma: SimPool's gamma asked for (None: the official checkpoint's, if any).

    Nothing is downloaded here; timm weights are looked up in the local caches (and the hosts probed) so
    that an offline machine fails now, clearly.

    Raises:
        TypeError: ``weights`` of another type.
        ValueError: ``"timm"`` without an architecture, or an architecture timm does not know.
        WeightsError: an unknown name, or an official checkpoint of another architecture.
        WeightsUnavailableError: timm's weights are neither cached nor reachable.
    """
    if weights is not None and not isinstance(weights, (str, Path)):
        raise TypeError(f"weights must be None, 'timm', 'simpool:<name>' or a path, got {type(weights).__name__}")
    if weights is None:
        return WeightsSource("none", "random init", arch=arch, gamma=gamma)
    spec = str(weights)
    if spec == "timm":
        if arch is None:
            raise ValueError("weights='timm' needs an architecture name")
        check_arch(arch)  # an unknown name is a typo, not a weights problem
        return WeightsSource("timm", f"timm pretrained {arch}", f"timm:{arch}", arch, gamma,
                             timm_file=timm_pretrained_file(arch))
    official = None if _is_path_like(weights) else official_checkpoint(spec)
    if official is not None:
        return _official_source(official, arch, gamma)
    if spec.startswith(("http://", "https://")):
        return WeightsSource("url", f"weights {Path(urlparse(spec).path).name}", spec, arch, gamma, url=spec)
    if not _is_path_like(weights) and ":" not in spec and not Path(spec).exists():
        raise WeightsError(f"weights {spec!r} is neither 'timm', an official SimPool checkpoint name "
                           f"(simpool:<name>) nor an existing file")
    path = Path(spec).expanduser()
    return WeightsSource("file", f"weights {path}", str(path), arch, gamma, path=path)


def _official_source(official: OfficialCheckpoint, arch: Optional[str], gamma: Optional[float]) -> WeightsSource:
    """An official checkpoint names its architecture, gamma, beta and normalisation."""
    if arch is not None and arch.split(".")[0] != official.arch:
        raise WeightsError(f"official checkpoint {official.name!r} is a {official.arch}, not {arch}")
    if gamma is None:
        gamma = official.gamma
    elif gamma != official.gamma:  # stacklevel: the caller of create_encoder
        warnings.warn(f"{official.name} was trained with gamma={official.gamma}; using gamma={gamma}", stacklevel=4)
    return WeightsSource(
        "official", f"official SimPool checkpoint {official.name}", f"simpool:{official.name}", official.arch, gamma,
        pool_kwargs={"use_beta": True} if official.use_beta and gamma is not None else {},
        data_config={"mean": official.mean, "std": official.std}, official=official, url=official.url)


def read_weights(source: WeightsSource, checkpoint_key: Optional[str] = None) -> Tuple[MappedWeights, Dict[str, Any]]:
    """Read the checkpoint of a file, URL or official source (downloading it into the cache if need be):
    ``(its weights split onto trunk and pooling, the simret metadata of a save_encoder file or {})``.

    ``checkpoint_key`` picks the entry holding the weights (files written by ``save_encoder`` know theirs).

    Raises:
        ValueError: ``source`` is not read from a file (random init, timm).
        WeightsUnavailableError: the file has to be downloaded and its host cannot be reached.
        WeightsError, WeightsNotFoundError: as ``read_checkpoint``; errors name the source.
    """
    if not source.reads_file:
        raise ValueError(f"{source.label} is not read from a checkpoint file")
    path = source.path
    if source.url is not None:
        what = (f"official SimPool checkpoint {source.official.name!r}" if source.official is not None
                else f"weights {source.url}")
        path = fetch_url(source.url, what=what)
    obj, meta = read_checkpoint(path)
    try:
        state = unwrap_state_dict(obj, checkpoint_key if not meta else "state_dict" if "state_dict" in obj else None)
    except WeightsError as err:  # name the file: "checkpoint holds no tensors" alone leaves one guessing
        raise WeightsError(f"{source.label}: {err}") from None
    return map_checkpoint(state), meta
