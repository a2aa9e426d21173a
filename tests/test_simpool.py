"""SimPool against a straightforward per-token reference, and the properties the official module lacks."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simret.models import SimPool
from simret.models.simpool import to_tokens


@torch.no_grad()
def reference_simpool(pool: SimPool, tokens: torch.Tensor):
    """One image, loops over tokens: tokens (N, C) → (pooled (C,), attention (h, N)). Float64 throughout."""
    tokens = tokens.double()
    num_tokens, width = tokens.shape
    heads, head_dim = pool.num_heads, width // pool.num_heads
    ln_w, ln_b = pool.norm_patches.weight.double(), pool.norm_patches.bias.double()
    wq, wk = pool.wq.weight.double(), pool.wk.weight.double()
    bq = pool.wq.bias.double() if pool.wq.bias is not None else torch.zeros(width, dtype=torch.float64)
    bk = pool.wk.bias.double() if pool.wk.bias is not None else torch.zeros(width, dtype=torch.float64)
    query = sum(tokens[n] for n in range(num_tokens)) / num_tokens
    normed = []
    for n in range(num_tokens):
        mean = tokens[n].mean()
        var = ((tokens[n] - mean) ** 2).mean()
        normed.append((tokens[n] - mean) / math.sqrt(var + 1e-6) * ln_w + ln_b)
    q = wq @ query + bq
    keys = [wk @ v + bk for v in normed]
    shift = min(float(v.min()) for v in normed)
    pooled = torch.zeros(width, dtype=torch.float64)
    attention = torch.zeros(heads, num_tokens, dtype=torch.float64)
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = [float(q[part] @ keys[n][part]) * pool.scale for n in range(num_tokens)]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        weights = [e / sum(exps) for e in exps]
        attention[h] = torch.tensor(weights, dtype=torch.float64)
        if pool.gamma is None:
            pooled[part] = sum(weights[n] * normed[n][part] for n in range(num_tokens))
        else:
            acc = sum(weights[n] * (normed[n][part] - shift + 1e-6) ** pool.gamma for n in range(num_tokens))
            pooled[part] = acc ** (1.0 / pool.gamma)
            if pool.use_beta:
                pooled[part] += float(pool.beta)
    return pooled, attention


def make_pool(dim=16, **kwargs):
    torch.manual_seed(0)
    pool = SimPool(dim, **kwargs)
    with torch.no_grad():  # non-trivial norm and bias so that every term is exercised
        pool.norm_patches.weight.uniform_(0.5, 1.5)
        pool.norm_patches.bias.uniform_(-0.2, 0.2)
        for layer in (pool.wq, pool.wk):
            if layer.bias is not None:
                layer.bias.uniform_(-0.5, 0.5)
        if hasattr(pool, "beta"):
            pool.beta.fill_(0.3)
    return pool


CASES = [
    dict(),
    dict(num_heads=4),
    dict(qkv_bias=True),
    dict(gamma=2.0),
    dict(gamma=1.25, use_beta=True),
    dict(gamma=2.0, num_heads=2, qkv_bias=True),
    dict(qk_scale=0.05, gamma=3.0),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("layout", ["cnn", "vit"])
def test_matches_per_token_reference(kwargs, layout):
    pool = make_pool(16, **kwargs)
    torch.manual_seed(1)
    if layout == "cnn":
        x = torch.randn(3, 16, 3, 4)
        tokens = x.flatten(2).transpose(1, 2)
    else:
        x = torch.randn(3, 12, 16)
        tokens = x
    pooled, attn = pool(x, return_attention=True)
    assert pooled.shape == (3, 16)
    assert attn.shape == (3, pool.num_heads, 12)
    for i in range(3):
        expected, expected_attn = reference_simpool(pool, tokens[i])
        torch.testing.assert_close(pooled[i].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn[i].double(), expected_attn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("layout", ["cnn", "vit"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_path_equals_autograd_path_and_leaves_input_alone(kwargs, layout, mode):
    pool = make_pool(16, **kwargs)
    torch.manual_seed(2)
    x = torch.randn(3, 16, 3, 4) if layout == "cnn" else torch.randn(3, 12, 16)
    before = x.clone()
    with_grad, attn_grad = pool(x, return_attention=True)  # out-of-place power
    with getattr(torch, mode)():
        fast, attn_fast = pool(x, return_attention=True)  # shift and power in place
    torch.testing.assert_close(fast, with_grad.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attn_fast, attn_grad.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(x, before)


def test_float64_matches_reference_tightly():
    pool = make_pool(8, gamma=2.0, use_beta=True, qkv_bias=True).double()
    x = torch.randn(2, 8, 2, 3, dtype=torch.float64)
    out = pool(x)
    assert out.dtype == torch.float64
    for i in range(2):
        expected, _ = reference_simpool(pool, x[i].flatten(1).T)
        torch.testing.assert_close(out[i], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [None, 2.0])
def test_each_image_is_independent_of_its_batch(gamma):
    pool = make_pool(16, gamma=gamma, num_heads=2)
    torch.manual_seed(2)
    image = torch.randn(1, 16, 4, 4)
    neighbour = torch.randn(1, 16, 4, 4) * 50 - 100  # a wildly different neighbour (much lower minimum)
    alone = pool(image)
    together = pool(torch.cat([image, neighbour, image * 0.1]))
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-6)


def test_batch_of_one_keeps_batch_dimension():
    pool = make_pool(16, gamma=2.0)
    assert pool(torch.randn(1, 16, 2, 2)).shape == (1, 16)
    assert pool(torch.randn(1, 5, 16)).shape == (1, 16)
    assert pool(torch.randn(1, 16, 1, 1)).shape == (1, 16)


def test_multi_head_gamma_returns_flat_descriptor():
    pool = make_pool(32, num_heads=4, gamma=2.0, use_beta=True)
    pooled, attn = pool(torch.randn(5, 32, 3, 3), return_attention=True)
    assert pooled.shape == (5, 32)
    assert attn.shape == (5, 4, 9)


@pytest.mark.parametrize("kwargs", CASES[:5])
def test_attention_rows_sum_to_one(kwargs):
    pool = make_pool(16, **kwargs)
    attn = pool.attention(torch.randn(4, 16, 5, 3))
    assert attn.shape == (4, pool.num_heads, 15)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, pool.num_heads))
    assert (attn >= 0).all()


def test_parameter_names_match_official_module():
    assert set(SimPool(8).state_dict()) == {"norm_patches.weight", "norm_patches.bias", "wq.weight", "wk.weight"}
    assert set(SimPool(8, qkv_bias=True, gamma=2.0).state_dict()) == {
        "norm_patches.weight", "norm_patches.bias", "wq.weight", "wq.bias", "wk.weight", "wk.bias"}
    beta_pool = SimPool(8, gamma=1.25, use_beta=True)
    assert "beta" in beta_pool.state_dict() and beta_pool.beta.shape == (1,)
    assert "beta" not in SimPool(8, use_beta=True).state_dict()  # as the official module: beta needs gamma


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    pool = make_pool(16, gamma=2.0)
    x = torch.randn(2, 16, 3, 3)
    out = pool(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), pool(x.to(dtype).float()), rtol=1e-2, atol=1e-2)


def test_half_precision_module():
    pool = make_pool(16, gamma=2.0).to(torch.bfloat16)
    x = torch.randn(2, 16, 3, 3, dtype=torch.bfloat16)
    out = pool(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradients_reach_every_parameter():
    pool = make_pool(16, gamma=2.0, use_beta=True, qkv_bias=True)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    pool(x).square().sum().backward()
    for name, param in pool.named_parameters():
        if name == "wk.bias":  # the key bias adds the same score to every token: no effect on softmax
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="divisible"):
        SimPool(10, num_heads=3)
    with pytest.raises(ValueError, match="gamma"):
        SimPool(8, gamma=0.0)
    pool = SimPool(8)
    with pytest.raises(ValueError, match="width 6"):
        pool(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pool(torch.randn(2, 8))


class OfficialSimPool(torch.nn.Module):
    """The official module (github.com/billpsomas/simpool, README version), transcribed line by line;
    the only change is that its tensors follow the input's device instead of being created on 'cuda'."""

    def __init__(self, dim, num_heads=1, qkv_bias=False, qk_scale=None, gamma=None, use_beta=False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.norm_patches = torch.nn.LayerNorm(dim, eps=1e-6)
        self.wq = torch.nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = torch.nn.Linear(dim, dim, bias=qkv_bias)
        if gamma is not None:
            if use_beta:
                self.beta = torch.nn.Parameter(torch.tensor([0.0]))
        self.gamma = gamma
        self.use_beta = use_beta

    def prepare_input(self, x):
        if len(x.shape) == 3:  # Transformer
            gap_cls = x.mean(-2).unsqueeze(1)  # GAP of the raw tokens
            return gap_cls, x
        B, d, H, W = x.shape  # CNN
        gap_cls = x.mean([-2, -1])
        x = x.reshape(B, d, H * W).permute(0, 2, 1)
        return gap_cls.unsqueeze(1), x

    def forward(self, x):
        gap_cls, x = self.prepare_input(x)
        x = self.norm_patches(x)
        q, k, v = gap_cls, x, x
        B, N, C = k.shape
        q = self.wq(q).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.wk(k).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = v.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if self.gamma is not None:
            gamma = torch.tensor([self.gamma], device=x.device)
            eps = torch.tensor([1e-6], device=x.device)
            x = torch.pow(attn @ torch.pow((v - v.min() + eps), gamma), 1 / gamma)
            if self.use_beta:
                x = x + self.beta
        else:
            x = attn @ v
        return x.squeeze()


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("layout", ["cnn", "vit"])
def test_equals_official_module_for_one_image(kwargs, layout):
    """Official checkpoints load unchanged into our module and give the same descriptor for one image."""
    pool = make_pool(24, **kwargs)
    official = OfficialSimPool(24, **kwargs)
    official.load_state_dict(pool.state_dict(), strict=True)
    torch.manual_seed(3)
    x = torch.randn(1, 24, 3, 5) if layout == "cnn" else torch.randn(1, 15, 24)
    with torch.no_grad():
        expected = official(x).reshape(-1)  # the official module squeezes the batch (and head) dimensions
        ours = pool(x)
    assert ours.shape == (1, 24)
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-6)


def test_official_module_mixes_the_batch_and_ours_does_not():
    """The official γ shift is the minimum over the whole batch; ours is per image."""
    pool = make_pool(16, gamma=2.0)
    official = OfficialSimPool(16, gamma=2.0)
    official.load_state_dict(pool.state_dict())
    torch.manual_seed(4)
    image = torch.randn(1, 16, 3, 3)
    neighbour = torch.randn(1, 16, 3, 3) * 0.01
    channel = int(pool.norm_patches.weight.argmax())  # one channel far below the rest: after the
    neighbour[:, channel] = -100.0                     # LayerNorm about -sqrt(15) * weight, below the image's
    with torch.no_grad():
        normed = pool.norm_patches  # the premise: the neighbour's LayerNorm-ed minimum is the lower one
        assert normed(to_tokens(neighbour)).min() < normed(to_tokens(image)).min() - 1.0
        official_alone = official(image)
        official_batched = official(torch.cat([image, neighbour]))[0]
        ours_batched = pool(torch.cat([image, neighbour]))[0]
    assert not torch.allclose(official_batched, official_alone, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours_batched, official_alone, rtol=1e-5, atol=1e-6)


def test_scoring_never_projects_the_tokens_through_wk():
    """Wk is applied to the query once: far fewer FLOPs than the N·d² of projecting every token."""
    from torch.utils.flop_counter import FlopCounterMode

    dim, tokens = 256, 196
    pool = SimPool(dim, gamma=2.0, qkv_bias=True)
    x = torch.randn(2, tokens, dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pool(x)
    per_token_projection = 2 * 2 * tokens * dim * dim  # what wk(tokens) alone would cost for the batch
    assert 0 < counter.get_total_flops() < per_token_projection / 10


@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 9),
    heads=st.sampled_from([1, 2, 4]),
    gamma=st.sampled_from([None, 1.25, 2.0, 3.0]),
    use_beta=st.booleans(),
    qkv_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30, deadline=None)
def test_properties_hold_for_any_shape(batch, tokens, heads, gamma, use_beta, qkv_bias, seed):
    """(B, C) out, rows of attention summing to 1, and every row equal to that image pooled alone."""
    pool = make_pool(8, num_heads=heads, gamma=gamma, use_beta=use_beta, qkv_bias=qkv_bias)
    x = torch.randn(batch, tokens, 8, generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        pooled, attn = pool(x, return_attention=True)
        alone = torch.cat([pool(x[i:i + 1]) for i in range(batch)])
    assert pooled.shape == (batch, 8) and attn.shape == (batch, heads, tokens)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(batch, heads))
    torch.testing.assert_close(pooled, alone, rtol=1e-5, atol=1e-6)
