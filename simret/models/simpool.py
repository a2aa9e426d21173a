"""SimPool: attention-based global pooling (Psomas et al., "Keep It SimPool", ICCV 2023).

Given features ``X`` of ``N`` tokens of width ``d`` (CNN locations or ViT patch tokens):

* the query is the global average of the RAW, un-normalised tokens, ``q = Wq · mean_n(x_n)``: the
  official code takes this GAP before its ``norm_patches`` LayerNorm, so the LayerNorm never touches the
  query. We keep exactly that (not ``mean_n LN(x_n)``), so official checkpoints give official descriptors;
* keys and values are the LayerNorm-ed tokens ``k_n = v_n = LN(x_n)``; keys are projected by ``Wk``;
* attention ``a = softmax(scale · <q, Wk k_n>)`` over the ``N`` tokens, per head;
* the pooled vector is the attention-weighted mean of the values, or with ``gamma`` the generalised
  (power) mean ``(sum_n a_n (v_n - min v + eps)^gamma)^(1/gamma)`` (``min v``: the smallest value of
  this image's LayerNorm-ed tokens) plus an optional learnt ``beta``.

Under autocast (``--precision bf16|fp16``) everything here runs in float32 — the LayerNorm, the softmax, the
power mean — and the pooled vector is returned in float32, so reduced precision stops at the trunk.

Parameter names (``norm_patches``, ``wq``, ``wk``, ``beta``) and shapes are those of the official module so
its checkpoints load unchanged. Unlike the official module this one runs on any device and dtype, keeps
the batch dimension for B=1, returns ``(B, d)`` for every head count, takes the γ shift per image (an
image's descriptor never depends on its batch neighbours) and never projects the tokens through ``Wk``:
``<Wq q + bq, Wk k + bk> = <Wkᵀ(Wq q + bq), k> + const``, and the constant (same for every token) cancels
in the softmax, so scoring costs ``O(N·d)`` instead of ``O(N·d²)``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def to_tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` feature maps or ``(B, N, C)`` tokens → ``(B, N, C)`` tokens (N = H·W, row-major)."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim == 3:
        return x
    raise ValueError(f"expected (B, C, H, W) feature maps or (B, N, C) tokens, got shape {tuple(x.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision inputs are pooled in float32 (the power mean overflows in fp16); others as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class SimPool(nn.Module):
    """SimPool global pooling; state-dict compatible with the official ``SimPool`` module.

    As in the official code, the query is the GAP of the incoming (un-normalised) tokens; only keys and
    values pass through ``norm_patches``.

    Args:
        dim: channel width ``d`` of the incoming features.
        num_heads: attention heads; ``dim`` must be divisible by it.
        qkv_bias: biases in ``wq``/``wk``.
        qk_scale: attention temperature; default ``(dim / num_heads) ** -0.5``.
        gamma: exponent of the generalised mean (the paper uses 2.0 for CNNs, 1.25 for ViTs); ``None``
            pools with the plain attention-weighted mean.
        use_beta: add a learnt scalar ``beta`` (shape ``(1,)``) after the power mean. As in the official
            module it exists only when ``gamma`` is set.

    Shapes:
        ``forward(x)``: x ``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, C)``;
        ``forward(x, return_attention=True)`` → ``((B, C), (B, num_heads, N))``, rows summing to 1.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        gamma: Optional[float] = None,
        use_beta: bool = False,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"SimPool needs dim divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        if gamma is not None and not 0 < gamma < float("inf"):
            raise ValueError(f"SimPool gamma must be a positive finite number (or None), got {gamma}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.gamma = None if gamma is None else float(gamma)
        self.use_beta = bool(use_beta)
        self.eps = 1e-6
        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        if self.gamma is not None and self.use_beta:
            self.beta = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, gamma={self.gamma}, use_beta={self.use_beta}"

    def attention(self, x: Tensor) -> Tensor:
        """Attention over the tokens: x ``(B, C, H, W)`` or ``(B, N, C)`` → ``(B, num_heads, N)``."""
        return self.forward(x, return_attention=True)[1]

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        tokens = to_tokens(x)
        batch, num_tokens, width = tokens.shape
        if width != self.dim:
            raise ValueError(f"SimPool(dim={self.dim}) got features of width {width} (shape {tuple(x.shape)})")
        if num_tokens == 0:
            raise ValueError("SimPool got zero tokens to pool")
        dtype = _compute_dtype(tokens.dtype)
        out_dtype = _output_dtype(x)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            tokens = tokens.to(dtype)
            norm = self.norm_patches
            normed = F.layer_norm(tokens, (width,), _cast(norm.weight, dtype), _cast(norm.bias, dtype), norm.eps)
            query = tokens.mean(dim=1)  # (B, C): GAP of the incoming features
            attn = self._attention(query, normed)  # (B, h, N)
            if self.gamma is None:
                pooled = self._weighted_sum(attn, normed)
            else:
                # the shift is the minimum over this image's values only (all heads, tokens, channels)
                shift = (normed.amin(dim=(1, 2)) - self.eps).view(batch, 1, 1)  # v - min v + eps = v - (min v - eps)
                if torch.is_grad_enabled():
                    powered = (normed - shift).pow(self.gamma)
                else:  # inference: shift and raise to the power in place (the keys are no longer needed)
                    powered = normed.sub_(shift)
                    powered = powered.square_() if self.gamma == 2.0 else powered.pow_(self.gamma)
                pooled = self._weighted_sum(attn, powered).pow(1.0 / self.gamma)
                if self.use_beta:
                    pooled = pooled + _cast(self.beta, dtype)
            pooled = pooled.reshape(batch, width).to(out_dtype)
        if return_attention:
            return pooled, attn.to(out_dtype)
        return pooled

    def _attention(self, query: Tensor, keys: Tensor) -> Tensor:
        """query ``(B, C)``, LayerNorm-ed keys ``(B, N, C)`` → softmax attention ``(B, h, N)``."""
        dtype = keys.dtype
        batch = query.shape[0]
        projected = F.linear(query, _cast(self.wq.weight, dtype), _cast(self.wq.bias, dtype))  # (B, C)
        wk = _cast(self.wk.weight, dtype)  # (C, C): rows are the heads' output channels, (h·c, C)
        # Wk_hᵀ q_h for every head: the query is brought to the token space once, not every token to it
        if self.num_heads == 1:
            query_in_token_space = torch.mm(projected, wk).unsqueeze(1)  # (B, 1, C)
        else:  # (h, B, c) @ (h, c, C) → (h, B, C): a batched product over heads, no copy of Wk
            heads = projected.view(batch, self.num_heads, self.head_dim).transpose(0, 1)
            query_in_token_space = torch.bmm(heads, wk.view(self.num_heads, self.head_dim, self.dim)).transpose(0, 1)
        query_in_token_space = query_in_token_space * self.scale  # (B, h, C)
        scores = torch.bmm(query_in_token_space, keys.transpose(1, 2))  # (B, h, N); wk.bias cancels
        return scores.softmax(dim=-1)

    def _weighted_sum(self, attn: Tensor, values: Tensor) -> Tensor:
        """attention ``(B, h, N)``, values ``(B, N, C)`` → per-head weighted sums ``(B, h, c)`` (c = C / h)."""
        if self.num_heads == 1:
            return torch.bmm(attn, values)  # (B, 1, C)
        batch, num_tokens, _ = values.shape
        return torch.einsum("bhn,bnhc->bhc", attn, values.view(batch, num_tokens, self.num_heads, self.head_dim))


def _output_dtype(x: Tensor) -> torch.dtype:
    """The dtype SimPool returns: its input's, except under autocast, where the float32 result is kept (the
    pooled vector is the descriptor: rounding it to bf16 would cost accuracy for nothing)."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype


def _cast(tensor: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if tensor is None else tensor.to(dtype)
