"""Encoders: any timm trunk followed by a global pooling (SimPool by default) → ``(B, D)`` descriptors.

``create_encoder("resnet50", pool="simpool", gamma=2.0, weights="timm")`` builds one;
``save_encoder``/``load_encoder`` round-trip a (fine-tuned) encoder through one file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from simret.models.checkpoints import (
    SIMRET_FORMAT_KEY,
    MappedWeights,
    WeightsError,
    WeightsSource,
    WeightsSpec,
    check_arch,
    describe_key_mismatch,
    read_weights,
    resolve_weights,
)
from simret.models.official_vit import OFFICIAL_POS_EMBED, use_official_pos_embed, wants_official_pos_embed
from simret.models.pooling import create_pool, pool_uses_prefix_tokens
from simret.utils.atomic import atomic_path
from simret.utils.logs import get_logger

log = get_logger(__name__)

Tensor = torch.Tensor


class RandomWeightsWarning(UserWarning):
    """Raised (as a warning) when an encoder, or its pooling layer, carries random weights."""


def weights_state(tensors: Sequence[torch.Tensor]) -> Tuple[int, ...]:
    """Each tensor's version, bumped by every in-place change. Kept with the tensor objects themselves (a
    replaced parameter is a new object). ``.data =`` swaps storage without either: that is how ``.to()`` and
    channels-last move weights without changing them, so it does not count as a change."""
    return tuple(t._version for t in tensors)


def same_weights(key: Any, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``key`` — ``(tensors, weights_state(tensors))`` kept from earlier — still describes ``tensors``
    (the same objects, unchanged)."""
    if not key:
        return False
    held, state = key
    return len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors)) and \
        weights_state(tensors) == state


class Encoder(nn.Module):
    """A timm trunk and a global pooling: images ``(B, 3, H, W)`` → descriptors ``(B, D)`` (not normalised).

    Attributes:
        trunk: the timm model, classifier removed (``num_classes=0``).
        pool: the pooling module (``SimPool``, ``GeMPool`` …).
        dim: descriptor width ``D``.
        data_config: ``{"input_size", "mean", "std", "interpolation", "crop_pct", …}`` for preprocessing.
        config: everything ``create_encoder`` needs to rebuild this encoder (weights aside).
    """

    def __init__(self, trunk: nn.Module, pool: nn.Module, config: Dict[str, Any],
                 data_config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = pool
        self.config = dict(config)
        self.dim = int(trunk.num_features)
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0) or 0)
        self._keeps_prefix = pool_uses_prefix_tokens(pool)
        self._data_config = data_config
        self._fingerprint_cache: Tuple[Any, str] = ((), "")

    # ------------------------------------------------------------------------------------ properties

    @property
    def data_config(self) -> Dict[str, Any]:
        if self._data_config is None:
            from timm.data import resolve_data_config

            self._data_config = dict(resolve_data_config({}, model=self.trunk))
        return dict(self._data_config)

    @property
    def fingerprint(self) -> str:
        """A stable id of architecture + pooling + weights: ``<arch>-<pool>-<16 hex>``.

        The digest covers the configuration and every parameter and buffer, so two encoders share a
        fingerprint exactly when they compute the same descriptors; it is recomputed after the weights change
        in place (training steps, ``load_state_dict``) or a parameter or buffer is replaced (not after a change of
        layout or device, which keeps the values).
        """
        tensors = list(self.state_dict(keep_vars=True).items())
        values = [t for _, t in tensors]
        if not same_weights(self._fingerprint_cache[0], values):
            digest = hashlib.blake2b(digest_size=8)
            digest.update(json.dumps(self._identity(), sort_keys=True).encode())
            for name, tensor in tensors:
                digest.update(name.encode())
                data = tensor.detach().cpu().contiguous()
                if data.dtype == torch.bfloat16:
                    data = data.view(torch.int16)
                digest.update(data.numpy().tobytes() if data.numel() else b"")
            self._fingerprint_cache = ((values, weights_state(values)), digest.hexdigest())
        return f"{self.config['arch']}-{self.config['pool']}-{self._fingerprint_cache[1]}"

    def set_data_config(self, **overrides: Any) -> Dict[str, Any]:
        """Override preprocessing settings (e.g. ``input_size=(3, 84, 84)``); saved with the encoder."""
        config = self.data_config
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        self._data_config = config
        return dict(config)

    def provenance(self) -> Dict[str, Any]:
        """Attributes stored with everything computed by this encoder (HDF5 attrs, meta.json)."""
        from simret import __version__

        return {
            "fingerprint": self.fingerprint,
            "arch": self.config["arch"],
            "pool": self.config["pool"],
            "gamma": "none" if self.config.get("gamma") is None else float(self.config["gamma"]),
            "weights": str(self.config.get("weights") or "random"),
            "dim": self.dim,
            "simret_version": __version__,
        }

    def _identity(self) -> Dict[str, Any]:
        keys = ("arch", "pool", "gamma", "pool_kwargs", "trunk_kwargs")
        identity = {k: self.config.get(k) for k in keys}
        if self.config.get("pos_embed"):  # only when set, so every other encoder keeps its fingerprint
            identity["pos_embed"] = self.config["pos_embed"]
        return identity

    @property
    def is_transformer(self) -> bool:
        """True when the trunk produces a token sequence (ViT-like) rather than a feature map."""
        return hasattr(self.trunk, "patch_embed") and hasattr(self.trunk, "blocks")

    # --------------------------------------------------------------------------------------- compute

    def forward_features(self, images: Tensor) -> Tensor:
        """images ``(B, 3, H, W)`` → what the pooling sees: feature maps ``(B, C, h, w)`` for CNNs, patch
        tokens ``(B, N, C)`` for ViTs (all tokens, prefix first, for ``cls`` pooling)."""
        if images.ndim != 4:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        aligned = self._patch_aligned_size(*images.shape[-2:])
        if aligned != tuple(images.shape[-2:]):
            images = torch.nn.functional.interpolate(images, size=aligned, mode="bilinear", align_corners=False)
        features = self.trunk.forward_features(images)
        if features.ndim == 4:
            if getattr(self.trunk, "output_fmt", "NCHW") == "NHWC":
                features = features.permute(0, 3, 1, 2)
            return features
        if features.ndim == 3 and not self._keeps_prefix:
            return features[:, self.num_prefix_tokens:]
        return features

    def pool_features(self, features: Tensor) -> Tensor:
        """features from ``forward_features`` → pooled descriptors ``(B, D)`` (incl. the trunk's post-pool norm)."""
        return self._post_pool_norm(self.pool(features))

    def forward(self, images: Tensor) -> Tensor:
        """images ``(B, 3, H, W)`` → descriptors ``(B, D)``, not normalised."""
        return self.pool_features(self.forward_features(images))

    def feature_grid(self, images: Tensor) -> Tuple[int, int]:
        """``(h, w)`` of the feature grid the pooling attends over for images of this size."""
        height, width = self._patch_aligned_size(*images.shape[-2:])
        embed = getattr(self.trunk, "patch_embed", None)
        if embed is not None:
            if hasattr(embed, "dynamic_feat_size") and getattr(self.trunk, "dynamic_img_size", False):
                return tuple(embed.dynamic_feat_size((height, width)))
            return tuple(embed.grid_size)
        raise RuntimeError("feature_grid is only needed for token trunks")

    def _patch_aligned_size(self, height: int, width: int) -> Tuple[int, int]:
        """ViTs with dynamic input size need sides that are multiples of the patch size: the nearest ones."""
        embed = getattr(self.trunk, "patch_embed", None)
        if embed is None or not getattr(self.trunk, "dynamic_img_size", False):
            return int(height), int(width)
        if getattr(embed, "dynamic_img_pad", False):
            return int(height), int(width)
        patch_h, patch_w = embed.patch_size
        return (max(patch_h, int(round(height / patch_h)) * patch_h),
                max(patch_w, int(round(width / patch_w)) * patch_w))

    def attention(self, images: Tensor) -> Tensor:
        """SimPool attention maps: images ``(B, 3, H, W)`` → ``(B, h, w)`` (heads averaged; rows sum to 1)."""
        if not hasattr(self.pool, "attention"):
            raise ValueError(f"attention maps need pool='simpool', this encoder pools with {self.config['pool']!r}")
        features = self.forward_features(images)
        attn = self.pool.attention(features).mean(dim=1)  # (B, N)
        if features.ndim == 4:
            return attn.view(attn.shape[0], *features.shape[-2:])
        grid = self.feature_grid(images)
        if grid[0] * grid[1] != attn.shape[1]:
            raise RuntimeError(f"cannot lay {attn.shape[1]} tokens out on a {grid} grid")
        return attn.view(attn.shape[0], *grid)

    def _post_pool_norm(self, pooled: Tensor) -> Tensor:
        """The trunk's own norm between pooling and classifier (ViT ``fc_norm``, ConvNeXt ``head.norm``)."""
        fc_norm = getattr(self.trunk, "fc_norm", None)
        if isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity):
            return fc_norm(pooled)
        head_norm = getattr(getattr(self.trunk, "head", None), "norm", None)
        if isinstance(head_norm, nn.Module) and not isinstance(head_norm, nn.Identity):
            if type(head_norm).__name__.endswith("2d"):  # channels-first norm of a (B, C, 1, 1) map
                return head_norm(pooled[:, :, None, None]).flatten(1)
            return head_norm(pooled)
        return pooled


# --------------------------------------------------------------------------------------- factory


def create_encoder(
    arch: Optional[str],
    pool: str = "simpool",
    gamma: Optional[float] = None,
    weights: WeightsSpec = None,
    *,
    pool_kwargs: Optional[Dict[str, Any]] = None,
    checkpoint_key: Optional[str] = None,
    seed: int = 0,
    **timm_kwargs: Any,
) -> Encoder:
    """Build an ``Encoder``: a timm trunk (``arch``) with ``pool`` as its global pooling.

    Args:
        arch: any timm model name (``resnet50``, ``convnext_small``, ``vit_small_patch16_224``…, a
            ``.tag`` suffix picks timm pretrained weights). May be None when ``weights`` names an official
            SimPool checkpoint or a file saved by simret, which carry their architecture.
        pool: ``simpool`` (default), ``avg``, ``max``, ``gem`` or ``cls`` (ViTs).
        gamma: SimPool's power-mean exponent (2.0 for CNNs, 1.25 for ViTs in the paper); None = plain mean.
        weights: ``None`` random init (deterministic from ``seed``, with a warning, no network);
            ``"timm"`` timm's pretrained trunk (fails fast and clearly when it cannot be fetched);
            ``"simpool:<name>"`` an official SimPool checkpoint (see ``list_official_checkpoints``);
            an ``http(s)://`` URL (downloaded once into the cache); a path to ``.pth/.pt/.tar/.safetensors`` —
            official SimPool DINO or supervised checkpoints, timm/torchvision trunk checkpoints, or files written
            by ``save_encoder``.
        pool_kwargs: extra pooling arguments (``num_heads``, ``use_beta`` for SimPool; ``p`` for GeM).
        checkpoint_key: which entry of a checkpoint dict holds the weights (default: ``teacher`` for DINO,
            then ``state_dict``, ``model`` …).
        seed: seed for every randomly initialised parameter.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate`` …).
    """
    source = resolve_weights(weights, arch, gamma)
    plan = _plan_encoder(source, pool, pool_kwargs, timm_kwargs, checkpoint_key)
    trunk, pooling = _build_modules(plan, source, seed)
    _load_weights(trunk, pooling, plan, source, seed)
    _match_official_model(trunk, plan, source)
    return _wrap(trunk, pooling, plan, source, seed)


@dataclass
class _EncoderPlan:
    """What ``create_encoder`` builds: the caller's arguments settled with what the weights imply."""

    arch: Optional[str]
    pool: str
    gamma: Optional[float]
    pool_kwargs: Dict[str, Any]
    timm_kwargs: Dict[str, Any]
    data_config: Dict[str, Any]  # preprocessing that overrides timm's defaults for the trunk
    mapped: Optional[MappedWeights] = None  # the checkpoint's weights, for sources read from a file
    file_meta: Dict[str, Any] = field(default_factory=dict)  # a save_encoder file's saved configuration
    pos_embed: Optional[str] = None  # OFFICIAL_POS_EMBED: the official DINO ViT's position-embedding step

    @property
    def pool_args(self) -> Dict[str, Any]:
        """The arguments of ``create_pool`` (``gamma`` included)."""
        return _pool_kwargs(self.pool, self.gamma, self.pool_kwargs)


def _plan_encoder(source: WeightsSource, pool: str, pool_kwargs: Optional[Dict[str, Any]],
                  timm_kwargs: Dict[str, Any], checkpoint_key: Optional[str]) -> _EncoderPlan:
    """Settle the configuration: the caller's arguments, the source's implications, then (for checkpoint
    files) the file's own: a ``save_encoder`` file's saved configuration, the layout's trunk arguments."""
    official = source.official
    if official is not None and pool == "simpool" and official.pool != "simpool":
        pool = official.pool  # an official baseline: the pooling it was trained with ([CLS] token, GAP)
    plan = _EncoderPlan(source.arch, pool, source.gamma, {**source.pool_kwargs, **(pool_kwargs or {})},
                        dict(timm_kwargs), dict(source.data_config))
    if source.reads_file:
        plan.mapped, plan.file_meta = read_weights(source, checkpoint_key)
        if plan.file_meta:
            _merge_saved_config(plan, plan.file_meta, source.label)
        if plan.mapped.source != "simret" and plan.pool == "simpool" and "beta" in plan.mapped.pool:
            plan.pool_kwargs.setdefault("use_beta", True)
        for key, value in plan.mapped.trunk_kwargs.items():
            plan.timm_kwargs.setdefault(key, value)
    if plan.arch is None:
        raise ValueError("an architecture name is needed: this weights file does not name one "
                         "(pass arch=..., --model ARCH on the command line)")
    return plan


def _merge_saved_config(plan: _EncoderPlan, meta: Dict[str, Any], label: str) -> None:
    """The configuration of a file written by ``save_encoder`` wins where the caller left defaults."""
    saved_arch = meta.get("arch")
    if plan.arch is not None and saved_arch and plan.arch.split(".")[0] != saved_arch.split(".")[0]:
        raise WeightsError(f"{label} holds a {saved_arch} encoder, not {plan.arch}")
    saved_pool = meta.get("pool", plan.pool)
    if plan.pool not in ("simpool", saved_pool):
        raise WeightsError(f"{label} holds an encoder with {saved_pool!r} pooling, not {plan.pool!r}")
    if plan.gamma is None:
        plan.gamma = meta.get("gamma")
    elif meta.get("gamma") != plan.gamma:  # stacklevel: the caller of create_encoder
        warnings.warn(f"{label} was saved with gamma={meta.get('gamma')}; using gamma={plan.gamma}", stacklevel=4)
    plan.arch, plan.pool = saved_arch or plan.arch, saved_pool
    plan.pool_kwargs = {**dict(meta.get("pool_kwargs") or {}), **plan.pool_kwargs}
    plan.timm_kwargs = {**dict(meta.get("trunk_kwargs") or {}), **plan.timm_kwargs}
    plan.data_config = dict(meta.get("data_config") or {})


def _pool_kwargs(pool: str, gamma: Optional[float], pool_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    kwargs = dict(pool_kwargs or {})
    if gamma is not None:
        if pool == "simpool":
            kwargs["gamma"] = gamma
        elif pool == "gem":
            kwargs.setdefault("p", gamma)
        else:
            raise ValueError(f"gamma applies to pool='simpool' (and to 'gem' as its initial p), not {pool!r}")
    return kwargs


def _build_modules(plan: _EncoderPlan, source: WeightsSource, seed: int) -> Tuple[nn.Module, nn.Module]:
    """``(trunk, pooling)``: randomly initialised from ``seed``, or the trunk with timm's pretrained weights."""
    pool_args = plan.pool_args
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = _build_trunk(plan.arch, plan.timm_kwargs, source.timm_file, pretrained=source.kind == "timm")
        pooling = create_pool(plan.pool, int(trunk.num_features), **pool_args)
    return trunk, pooling


def _build_trunk(arch: str, timm_kwargs: Dict[str, Any], pretrained_file: Optional[str] = None,
                 pretrained: bool = False) -> nn.Module:
    import timm

    check_arch(arch)
    kwargs = {"num_classes": 0, **timm_kwargs}
    if pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained_file}
    dynamic = "dynamic_img_size" not in timm_kwargs
    try:
        return timm.create_model(arch, pretrained=pretrained, **({"dynamic_img_size": True} if dynamic else {}),
                                 **kwargs)
    except TypeError as err:
        if dynamic and "dynamic_img_size" in str(err):
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
        raise


def _load_weights(trunk: nn.Module, pooling: nn.Module, plan: _EncoderPlan, source: WeightsSource,
                  seed: int) -> None:
    """Load a checkpoint's weights, or say which parts stay random (timm's weights are already in the trunk)."""
    if plan.mapped is not None:
        _load_mapped(trunk, pooling, plan.mapped, plan.pool, source.label)
    elif source.kind == "none":
        warnings.warn(f"{plan.arch} with {plan.pool} pooling has RANDOM weights (weights=None, seed={seed}): "
                      f"descriptors carry no learnt meaning", RandomWeightsWarning, stacklevel=3)
    elif source.kind == "timm" and any(True for _ in pooling.parameters()):
        warnings.warn(f"timm's weights cover the {plan.arch} trunk only: the {plan.pool} pooling is randomly "
                      f"initialised (seed={seed}); fine-tune it (simret train --freeze-trunk) or use an official "
                      f"checkpoint", RandomWeightsWarning, stacklevel=3)


def _load_mapped(trunk: nn.Module, pool: nn.Module, mapped: MappedWeights, pool_name: str, label: str) -> None:
    """Load mapped weights; errors name every key that does not line up."""
    trunk_state = dict(mapped.trunk)
    module = __import__(type(trunk).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None and mapped.source != "simret":
        try:
            trunk_state = filter_fn(trunk_state, trunk)
        except Exception as err:  # noqa: BLE001 - timm filters assume their own layouts
            log.debug("timm checkpoint filter for %s skipped: %s", type(trunk).__name__, err)
    expected = trunk.state_dict()
    classifier = str(getattr(trunk, "pretrained_cfg", {}).get("classifier", "") or "")
    dropped = {"fc", "head", "head.fc", "classifier", classifier} - {""}
    unexpected = sorted(k for k in trunk_state if k not in expected
                        and not any(k.startswith(p + ".") or k == p for p in dropped))
    trunk_state = {k: v for k, v in trunk_state.items() if k in expected}
    missing = sorted(k for k in expected if k not in trunk_state)
    if missing or unexpected:
        raise WeightsError(f"{label}: " + describe_key_mismatch(missing, unexpected, f"{type(trunk).__name__} trunk"))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in trunk_state.items()
              if v.shape != expected[k].shape]
    if shapes:
        raise WeightsError(f"{label}: tensor shapes differ from the trunk's: {'; '.join(shapes[:8])}")
    trunk.load_state_dict(trunk_state, strict=True)

    pool_expected = pool.state_dict()
    if not mapped.pool:
        if pool_expected:  # stacklevel: the caller of create_encoder
            warnings.warn(f"{label} has no weights for the {pool_name!r} pooling: it stays randomly initialised",
                          RandomWeightsWarning, stacklevel=4)
        return
    if not pool_expected or pool_name != "simpool" and mapped.source != "simret":
        log.warning("%s holds pooling weights (%s) that pool=%r does not use; they are ignored",
                    label, ", ".join(sorted(mapped.pool)), pool_name)
        return
    missing = sorted(set(pool_expected) - set(mapped.pool))
    unexpected = sorted(set(mapped.pool) - set(pool_expected))
    if missing or unexpected:
        hint = ""
        if "beta" in unexpected:
            hint = (" (the checkpoint's SimPool has beta, which exists only with gamma: pass gamma, "
                    "e.g. 1.25 for ViTs, 2.0 for CNNs)")
        raise WeightsError(f"{label}: " + describe_key_mismatch(missing, unexpected, f"{pool_name} pooling") + hint)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(pool_expected[k].shape)}" for k, v in mapped.pool.items()
              if v.shape != pool_expected[k].shape]
    if shapes:
        raise WeightsError(f"{label}: pooling tensor shapes differ: {'; '.join(shapes)}")
    pool.load_state_dict(mapped.pool, strict=True)


def _match_official_model(trunk: nn.Module, plan: _EncoderPlan, source: WeightsSource) -> None:
    """The official self-supervised ViT's position embeddings, for its checkpoints only (see
    ``simret.models.official_vit``)."""
    if plan.mapped is not None and wants_official_pos_embed(trunk, source.official, plan.mapped.source, plan.file_meta):
        use_official_pos_embed(trunk)
        plan.pos_embed = OFFICIAL_POS_EMBED


def _wrap(trunk: nn.Module, pooling: nn.Module, plan: _EncoderPlan, source: WeightsSource, seed: int) -> Encoder:
    """The ``Encoder`` in eval mode, with the configuration that rebuilds it and the source's preprocessing."""
    data_config = None
    if plan.data_config:
        from timm.data import resolve_data_config

        data_config = dict(resolve_data_config({}, model=trunk))
        data_config.update({k: tuple(v) if isinstance(v, list) else v for k, v in plan.data_config.items()})
    config = {
        "arch": plan.arch,
        "pool": plan.pool,
        "gamma": plan.gamma,
        "pool_kwargs": {k: v for k, v in plan.pool_args.items() if k != "gamma"},
        "trunk_kwargs": {k: v for k, v in plan.timm_kwargs.items() if _jsonable(v)},
        "weights": source.weights_id,
        "seed": seed,
        **({"pos_embed": plan.pos_embed} if plan.pos_embed else {}),
    }
    encoder = Encoder(trunk, pooling, config, data_config)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("encoder %s (%s), dim %d", encoder.fingerprint, source.label, encoder.dim)
    return encoder.eval()


def create_encoder_from_spec(spec: Dict[str, Any]) -> Encoder:
    """An encoder from command options or an index's model record (``meta.json`` ``model``): ``arch``,
    ``pool``, ``gamma``, ``weights`` (``none``/``random``, ``timm``, ``simpool:NAME``, a path) and
    ``checkpoint_key``; the architecture defaults as ``arch_or_default`` says."""
    from simret.models.defaults import arch_or_default

    weights = spec.get("weights")
    weights = None if weights in (None, "none", "random") else weights
    return create_encoder(arch_or_default(spec.get("arch"), weights), pool=spec.get("pool") or "simpool",
                          gamma=spec.get("gamma"), weights=weights, checkpoint_key=spec.get("checkpoint_key"))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def save_encoder(encoder: Encoder, path: Union[str, Path], extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``encoder`` (configuration + weights) to ``path`` atomically; ``.safetensors`` or torch format.

    The file loads back with ``create_encoder(None, weights=path)`` or ``load_encoder(path)``.
    """
    path = Path(path)
    meta = {**encoder_metadata(encoder), **(extra or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(temporary), metadata={SIMRET_FORMAT_KEY: json.dumps(meta)})
        else:
            torch.save({SIMRET_FORMAT_KEY: meta, "state_dict": state}, str(temporary))
    return path


def encoder_metadata(encoder: Encoder) -> Dict[str, Any]:
    """The ``simret_encoder`` entry of saved files: configuration (weights source aside), data_config and
    fingerprint, as plain JSON values. ``create_encoder(None, weights=FILE)`` rebuilds the encoder from it."""
    meta = {k: v for k, v in encoder.config.items() if k != "weights"}
    meta["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in encoder.data_config.items()
                           if _jsonable(v)}
    meta["fingerprint"] = encoder.fingerprint
    return json.loads(json.dumps(meta))


def load_encoder(path: Union[str, Path], **overrides: Any) -> Encoder:
    """Load an encoder written by ``save_encoder`` (architecture and pooling come from the file)."""
    return create_encoder(overrides.pop("arch", None), weights=Path(path), **overrides)
