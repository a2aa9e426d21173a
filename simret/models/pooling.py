"""Global pooling family over a functional core: ``avg``, ``max``, ``gem``, ``cls`` and ``simpool``.

Every pooling module maps ``(B, C, H, W)`` feature maps or ``(B, N, C)`` tokens to ``(B, C)``.
``create_pool(name, dim, **kw)`` builds one by name, as timm's ``create_model`` does for models;
``register_pool`` adds a new one.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

from simret.models.simpool import SimPool, to_tokens

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------- functional core


def avg_pool(x: Tensor) -> Tensor:
    """Global average: ``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, C)``."""
    return to_tokens(x).mean(dim=1)


def max_pool(x: Tensor) -> Tensor:
    """Global max (MAC): ``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, C)``."""
    return to_tokens(x).amax(dim=1)


def gem_pool(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean (GeM, Radenović et al.): ``(mean x^p)^(1/p)`` over positions, inputs clamped at eps.

    ``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, C)``.
    """
    return to_tokens(x).clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def cls_pool(x: Tensor) -> Tensor:
    """The class token of a ViT: ``(B, 1 + N, C)`` tokens with prefix tokens kept → ``(B, C)``."""
    if x.ndim != 3:
        raise ValueError(f"'cls' pooling needs ViT tokens (B, N, C), got shape {tuple(x.shape)}")
    return x[:, 0]


# ------------------------------------------------------------------------------------------- modules


class AvgPool(nn.Module):
    """Global average pooling (GAP)."""

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool(x)


class MaxPool(nn.Module):
    """Global max pooling (MAC)."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool(x)


class GeMPool(nn.Module):
    """GeM pooling with a learnable exponent ``p`` (shape ``(1,)``), initialised at ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM p must be positive, got {p}")
        initial = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(initial)
        else:
            self.register_buffer("p", initial)
        self.eps = eps

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        return gem_pool(x, self.p, self.eps)


class ClsPool(nn.Module):
    """The [CLS] token of a ViT; needs the prefix tokens, so encoders hand it the whole token sequence."""

    uses_prefix_tokens = True

    def forward(self, x: Tensor) -> Tensor:
        return cls_pool(x)


# ------------------------------------------------------------------------------------------ registry

PoolFactory = Callable[..., nn.Module]
_POOLS: Dict[str, PoolFactory] = {}


def register_pool(name: str) -> Callable[[PoolFactory], PoolFactory]:
    """Decorator: ``@register_pool("mine") def make(dim, **kw) -> nn.Module``."""

    def wrap(factory: PoolFactory) -> PoolFactory:
        _POOLS[name] = factory
        return factory

    return wrap


@register_pool("avg")
def _make_avg(dim: int) -> nn.Module:
    return AvgPool()


@register_pool("max")
def _make_max(dim: int) -> nn.Module:
    return MaxPool()


@register_pool("gem")
def _make_gem(dim: int, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> nn.Module:
    return GeMPool(p=p, eps=eps, learnable=learnable)


@register_pool("cls")
def _make_cls(dim: int) -> nn.Module:
    return ClsPool()


@register_pool("simpool")
def _make_simpool(dim: int, **kwargs) -> nn.Module:
    return SimPool(dim, **kwargs)


def list_pools() -> List[str]:
    """Names accepted by ``create_pool``."""
    return sorted(_POOLS)


def create_pool(name: str, dim: int, **kwargs) -> nn.Module:
    """Build a pooling module by name: ``avg``, ``max``, ``gem`` (learnable p), ``cls`` or ``simpool``.

    Keyword arguments go to the module (``gamma``, ``num_heads``, ``use_beta`` for SimPool; ``p`` for
    GeM). Arguments a pooling does not take raise ``TypeError`` naming them.
    """
    if name not in _POOLS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(list_pools())}")
    try:
        return _POOLS[name](dim, **kwargs)
    except TypeError as err:
        raise TypeError(f"pooling {name!r} does not take {sorted(kwargs)}: {err}") from None


def pool_uses_prefix_tokens(pool: nn.Module) -> bool:
    """True for poolings that read the ViT prefix ([CLS]) tokens rather than the patch tokens."""
    return bool(getattr(pool, "uses_prefix_tokens", False))


__all__ = [
    "AvgPool", "MaxPool", "GeMPool", "ClsPool", "SimPool",
    "avg_pool", "max_pool", "gem_pool", "cls_pool",
    "create_pool", "register_pool", "list_pools", "pool_uses_prefix_tokens",
]
