"""Encoder throughput: SimPool-pooled encoders vs the plain timm model (its own pooling), CPU, images/s."""
from __future__ import annotations

import warnings

from simret.bench import Row, Section, interleaved_medians

TITLE = "Encoder throughput: SimPool vs the plain timm model"
TARGET = 0.98


def run(quick: bool = False) -> Section:
    import timm
    import torch

    from simret.models import create_encoder

    section = Section("encoder", TITLE, "python scripts/bench.py encoder")
    cases = [("resnet50", 2.0), ("vit_small_patch16_224", 1.25)] if not quick else [("resnet18", 2.0)]
    batch, size = (16, 224) if not quick else (4, 128)
    repeat = 9 if not quick else 3
    images = torch.randn(batch, 3, size, size)
    for arch, gamma in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = create_encoder(arch, pool="simpool", gamma=gamma).eval()
        plain = timm.create_model(arch, num_classes=0).eval()  # timm's own pooling (GAP / [CLS] + norm)

        def run_simpool():
            with torch.inference_mode():
                encoder(images)

        def run_plain():
            with torch.inference_mode():
                plain(images)

        medians = interleaved_medians({"simpool": run_simpool, "plain": run_plain}, repeat=repeat, warmup=2)
        rate, base_rate = batch / medians["simpool"], batch / medians["plain"]
        ratio = rate / base_rate
        section.rows.append(Row(f"{arch} + SimPool (γ={gamma}), batch {batch}, {size}²", rate, "img/s",
                                baseline=f"timm {arch} (own pooling)", baseline_value=base_rate, ratio=ratio,
                                target=f"≥ {TARGET} of timm", met=ratio >= TARGET))
    for shape in ([(16, 2048, 7, 7), (4, 2048, 32, 32)] if not quick else [(4, 512, 4, 4)]):
        features = torch.randn(*shape)
        pool = create_pool_for_bench(shape[1])

        def fast():
            with torch.inference_mode():
                pool(features)

        def naive():
            with torch.inference_mode():
                naive_simpool(pool, features)

        medians = interleaved_medians({"fast": fast, "naive": naive}, repeat=repeat * 2, warmup=2)
        section.rows.append(Row(f"SimPool layer alone (γ=2), features {'x'.join(map(str, shape))}",
                                medians["fast"] * 1e3, "ms", baseline="projecting every token through Wk",
                                baseline_value=medians["naive"] * 1e3, ratio=medians["naive"] / medians["fast"]))
    section.notes.append("SimPool scores tokens with Wkᵀ(Wq q) (the query brought to token space once), so its cost "
                         "is O(N·d) against the trunk's billions of operations.")
    section.notes.append(f"inference_mode, random weights (speed does not depend on them), {repeat} interleaved runs.")
    return section


def create_pool_for_bench(dim: int):
    from simret.models import SimPool

    return SimPool(dim, gamma=2.0).eval()


def naive_simpool(pool, features):
    """The textbook formulation: every token projected by Wk, then scored against Wq·GAP."""
    import torch

    tokens = features.flatten(2).transpose(1, 2)
    normed = pool.norm_patches(tokens)
    query = pool.wq(tokens.mean(1, keepdim=True))
    keys = pool.wk(normed)
    attn = (query @ keys.transpose(1, 2) * pool.scale).softmax(-1)
    shift = normed.amin(dim=(1, 2), keepdim=True)
    return torch.pow(attn @ (normed - shift + 1e-6).pow(pool.gamma), 1 / pool.gamma).flatten(1)
