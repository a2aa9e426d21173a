"""Position embeddings exactly as the official self-supervised SimPool ViT computes them.

The official ViT of the SimPool repository (github.com/billpsomas/simpool, ``self_supervised/
vision_transformer.py``, DINO's ViT with a ``mode`` switch) adds its position embeddings through
``interpolate_pos_encoding`` at every forward pass. That function counts the patch tokens as
``x.shape[1] − 1``, i.e. it assumes a [CLS] token. With SimPool (``mode="simpool"``) there is none, so the
count is one short and its shortcut ("same grid, square input: use the table as it is") never applies: even at
224 px the 14×14 table is resampled bicubically with ``scale_factor = (h/16 + 0.1)/14`` (and ``(w/16 + 0.1)/14``),
which is not the identity (about 2e-4 relative on the descriptors). For ``mode="official"`` (the DINO [CLS]
baseline, identical to DINO's own code) the shortcut applies at the training size, and other sizes are resampled
with that same scale factor, which differs from timm's resampling to an explicit size.

``official_pos_embed`` reproduces the function (same operations, same order), and ``use_official_pos_embed``
installs it as the ``_pos_embed`` step of a timm ``VisionTransformer``. ``create_encoder`` does this for the
official self-supervised ViT checkpoints only (registry entries with ``official_pos_embed``, official DINO
SimPool files given by path, and files saved from such encoders), never for timm or supervised weights.

Inputs are patch-aligned here (simret resizes ViT inputs to multiples of the patch size, where the official
patch embedding drops the remainder), so comparing the official code's pixel sizes ``w == h`` is comparing the
grid sides. Exact as long as the trunk keeps the checkpoint's table (the default; an ``img_size=`` passed to
``create_encoder`` makes timm resample the table when loading, which the official model never does).
"""
from __future__ import annotations

import math
import types
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

OFFICIAL_POS_EMBED = "official-dino"  # the value of ``Encoder.config["pos_embed"]`` when installed


def official_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], class_token: bool) -> torch.Tensor:
    """The official ``interpolate_pos_encoding`` for a ``grid = (rows, cols)`` of patches.

    Args:
        pos_embed: the learnt table ``(1, [1 +] N, C)`` (``N = n×n`` patch positions, after the class token's
            entry when ``class_token``).
        grid: patch rows and columns of the input (image height and width // patch size).
        class_token: True for ``mode="official"`` (a [CLS] token and its table entry), False for SimPool.

    Returns:
        ``(1, [1 +] rows·cols, C)``, the embeddings the official model adds to its tokens.
    """
    rows, cols = int(grid[0]), int(grid[1])
    tokens = rows * cols + (1 if class_token else 0)  # x.shape[1] in the official code
    npatch = tokens - 1  # the official count: one short when there is no [CLS] token
    n_positions = pos_embed.shape[1] - (1 if class_token else 0)
    if npatch == n_positions and rows == cols:
        return pos_embed
    class_pos_embed = pos_embed[:, 0] if class_token else None
    patch_pos_embed = pos_embed[:, 1:] if class_token else pos_embed
    dim = pos_embed.shape[-1]
    side = math.sqrt(n_positions)
    h0, w0 = rows + 0.1, cols + 0.1  # "a small number to avoid floating point error in the interpolation"
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
        scale_factor=(h0 / side, w0 / side),
        mode="bicubic",
    )
    if (int(h0), int(w0)) != tuple(patch_pos_embed.shape[-2:]):
        raise RuntimeError(f"position-embedding resampling gave a {tuple(patch_pos_embed.shape[-2:])} grid for "
                           f"{rows}×{cols} patches")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    if class_token:
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)
    return patch_pos_embed


def _official_pos_embed_step(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Replaces ``VisionTransformer._pos_embed``: patch embeddings ``(B, H, W, C)`` (dynamic size) or
    ``(B, N, C)`` → tokens ``(B, [1 +] N, C)`` with the [CLS] token (if any) and the official embeddings."""
    if x.ndim == 4:
        batch, rows, cols, dim = x.shape
        x = x.reshape(batch, rows * cols, dim)
    else:
        rows, cols = self.patch_embed.grid_size
    class_token = self.cls_token is not None
    if class_token:
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + official_pos_embed(self.pos_embed, (rows, cols), class_token)
    return self.pos_drop(x)


def use_official_pos_embed(trunk: nn.Module) -> nn.Module:
    """Make a timm ``VisionTransformer`` add its position embeddings as the official SimPool/DINO ViT does.

    Raises:
        ValueError: ``trunk`` is not a ViT of that layout (absolute position table, at most a [CLS] token).
    """
    if not (hasattr(trunk, "_pos_embed") and getattr(trunk, "pos_embed", None) is not None
            and hasattr(trunk, "patch_embed")):
        raise ValueError(f"the official position embeddings need a timm VisionTransformer, not {type(trunk).__name__}")
    if getattr(trunk, "reg_token", None) is not None or getattr(trunk, "no_embed_class", False):
        raise ValueError("the official position embeddings apply to ViTs without register tokens whose table "
                         "includes the class token's entry (DINO / SimPool layout)")
    trunk._pos_embed = types.MethodType(_official_pos_embed_step, trunk)
    return trunk


def wants_official_pos_embed(trunk: nn.Module, official: Any = None, source: Optional[str] = None,
                             saved_config: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether an encoder's ViT trunk must use the official embeddings: its weights are an official
    self-supervised ViT checkpoint (``official`` registry entry flagged ``official_pos_embed``; or a file in the
    official DINO SimPool layout, ``source == "dino"``), or a simret file saved from such an encoder."""
    is_vit = hasattr(trunk, "pos_embed") and hasattr(trunk, "blocks")
    if not is_vit:
        return False
    if official is not None:
        return bool(getattr(official, "official_pos_embed", False))
    if saved_config:
        return saved_config.get("pos_embed") == OFFICIAL_POS_EMBED
    return source == "dino"
