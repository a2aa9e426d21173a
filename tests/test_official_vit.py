"""The official self-supervised SimPool ViT's position embeddings, against a transcription of the official code,
and the official registry (baselines, pooling, README numbers)."""
import argparse
import math
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from click.testing import CliRunner

from simret.models import SimPool, create_encoder, load_encoder, save_encoder
from simret.models.checkpoints import OFFICIAL_CHECKPOINTS, OfficialCheckpoint
from simret.models.official_vit import OFFICIAL_POS_EMBED, official_pos_embed

SIZES = [(160, 160), (224, 224), (320, 320), (224, 320), (320, 160)]


class OfficialTokens(nn.Module):
    """``VisionTransformer.interpolate_pos_encoding`` and ``prepare_tokens`` transcribed from
    github.com/billpsomas/simpool, self_supervised/vision_transformer.py (commit 9a7a720), around a given patch
    projection, position table and [CLS] token (``pos_drop`` is the identity in eval mode)."""

    def __init__(self, mode, proj, pos_embed, cls_token=None, patch_size=16):
        super().__init__()
        self.mode, self.proj, self.pos_embed, self.cls_token = mode, proj, pos_embed, cls_token
        self.patch_embed = SimpleNamespace(patch_size=patch_size)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        if self.mode == 'official':
            N = self.pos_embed.shape[1] - 1
        else:
            N = self.pos_embed.shape[1]
        if npatch == N and w == h:
            return self.pos_embed
        if self.mode == 'official':
            class_pos_embed = self.pos_embed[:, 0]
            patch_pos_embed = self.pos_embed[:, 1:]
        else:
            patch_pos_embed = self.pos_embed
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode='bicubic',
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        if self.mode == 'official':
            return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)
        else:
            return patch_pos_embed

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.proj(x).flatten(2).transpose(1, 2)
        if self.mode == 'official':
            cls_tokens = self.cls_token.expand(B, -1, -1)
            x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return x


def random_table(n_side, dim, class_token, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_side * n_side + int(class_token), dim, generator=generator) * 0.02


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("n_side, dim", [(14, 384), (10, 8)])  # ViT-S/16 at 224 px; test_vit at 160 px
def test_position_table_equals_the_official_function(class_token, n_side, dim):
    pos_embed = random_table(n_side, dim, class_token)
    official = OfficialTokens("official" if class_token else "simpool", None, pos_embed)
    for height, width in SIZES + [(n_side * 16, n_side * 16)]:
        tokens = torch.zeros(1, (height // 16) * (width // 16) + int(class_token), dim)
        expected = official.interpolate_pos_encoding(tokens, height, width)
        got = official_pos_embed(pos_embed, (height // 16, width // 16), class_token)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_simpool_mode_resamples_even_at_the_training_size():
    """The official quirk itself: without a [CLS] token the table is resampled at 224 px (scale 14.1/14)."""
    pos_embed = random_table(14, 384, class_token=False)
    resampled = official_pos_embed(pos_embed, (14, 14), class_token=False)
    assert resampled.shape == pos_embed.shape
    relative = ((resampled - pos_embed).norm() / pos_embed.norm()).item()
    assert 1e-4 < relative < 0.5
    with_cls = random_table(14, 384, class_token=True)
    assert official_pos_embed(with_cls, (14, 14), class_token=True) is with_cls  # the DINO [CLS] model: as is


# ------------------------------------------------------------------------------- encoders, end to end


def dino_file(path, trunk, pool=None):
    """An official self-supervised checkpoint: DINO's teacher/student dicts, ``backbone.`` prefixes, args."""
    teacher = {f"backbone.{k}": v for k, v in trunk.state_dict().items()}
    if pool is not None:
        teacher.update({f"backbone.simpool.{k}": v for k, v in pool.state_dict().items()})
    teacher["head.mlp.0.weight"] = torch.randn(4, trunk.num_features)
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()},
                "args": argparse.Namespace(arch="vit_small", mode="simpool" if pool is not None else "official")},
               path)
    return path


def randomised(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                values = torch.randn(tensor.shape, generator=generator) * 0.05
                is_norm_scale = "norm" in name and name.endswith("weight")
                tensor.copy_(values.abs() + 0.5 if is_norm_scale else values)
    return module.eval()


@pytest.fixture(scope="module")
def simpool_vit(tmp_path_factory):
    """A test_vit with SimPool in the official DINO layout (no [CLS] token), random weights, and its file."""
    trunk = randomised(timm.create_model("test_vit", num_classes=0, class_token=False, global_pool=""), 1)
    pool = randomised(SimPool(trunk.num_features, gamma=1.25, use_beta=True), 2)
    path = dino_file(tmp_path_factory.mktemp("official") / "vit_dino_simpool.pth", trunk, pool)
    return trunk, pool, path


def official_simpool_forward(trunk, pool, images):
    """The official ViT in mode 'simpool': prepare_tokens (transcribed), blocks, SimPool, then the final norm."""
    tokens = OfficialTokens("simpool", trunk.patch_embed.proj, trunk.pos_embed).prepare_tokens(images)
    for block in trunk.blocks:
        tokens = block(tokens)
    return trunk.norm(pool(tokens))


def images_of(height, width, seed=0):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_official_simpool_file_reproduces_the_official_model(simpool_vit):
    trunk, pool, path = simpool_vit
    encoder = create_encoder("test_vit", gamma=1.25, weights=path)  # a file in the official DINO SimPool layout
    assert encoder.config["pos_embed"] == OFFICIAL_POS_EMBED
    with torch.no_grad():
        for height, width in SIZES:
            images = images_of(height, width)
            expected = official_simpool_forward(trunk, pool, images)
            torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)
        # timm's own resampling (the step this replaces) does not reproduce it, even at the training size
        images = images_of(160, 160)
        plain = create_encoder("test_vit", gamma=1.25, weights=path)
        del plain.trunk._pos_embed  # back to timm's VisionTransformer._pos_embed
        difference = (plain(images) - official_simpool_forward(trunk, pool, images)).abs().max().item()
        assert difference > 1e-4


def test_registry_name_applies_it_and_saved_files_keep_it(simpool_vit, tmp_path, monkeypatch):
    trunk, pool, path = simpool_vit
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path))
    entry = OfficialCheckpoint("test-vit-dino-simpool", "test_vit", 1.25, True,
                               "https://huggingface.co/billpsomas/x/resolve/main/vit_dino_simpool.pth", "DINO",
                               official_pos_embed=True)
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, entry.name, entry)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "vit_dino_simpool.pth").write_bytes(path.read_bytes())
    encoder = create_encoder(None, weights=f"simpool:{entry.name}")
    images = images_of(224, 320)
    with torch.no_grad():
        expected = official_simpool_forward(trunk, pool, images)
        torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)
        saved = load_encoder(save_encoder(encoder, tmp_path / "saved.safetensors"))
        assert saved.config["pos_embed"] == OFFICIAL_POS_EMBED and saved.fingerprint == encoder.fingerprint
        torch.testing.assert_close(saved(images), expected, rtol=1e-5, atol=1e-5)
    fingerprint = encoder.fingerprint
    encoder.config.pop("pos_embed")
    encoder._fingerprint_cache = ((), "")  # (the cache follows the weights, not the config)
    assert encoder.fingerprint != fingerprint  # the embedding step is part of the encoder's identity


def test_dino_cls_baseline_by_name_uses_the_class_token_and_official_embeddings(tmp_path, monkeypatch):
    """An official baseline entry builds [CLS] pooling; DINO's resampling at other sizes, as the official code."""
    trunk = randomised(timm.create_model("test_vit", num_classes=0), 3)
    dino_file(tmp_path / "vit_dino_official.pth", trunk)
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / "vit_dino_official.pth").write_bytes((tmp_path / "vit_dino_official.pth")
                                                                             .read_bytes())
    entry = OfficialCheckpoint("test-vit-dino-official", "test_vit", None, False,
                               "https://huggingface.co/billpsomas/x/resolve/main/vit_dino_official.pth", "DINO",
                               pool="cls", official_pos_embed=True)
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, entry.name, entry)
    encoder = create_encoder(None, weights=f"simpool:{entry.name}")
    assert encoder.config["pool"] == "cls" and encoder.config["pos_embed"] == OFFICIAL_POS_EMBED
    with torch.no_grad():
        for height, width in SIZES:
            images = images_of(height, width, seed=1)
            tokens = OfficialTokens("official", trunk.patch_embed.proj, trunk.pos_embed, trunk.cls_token) \
                .prepare_tokens(images)
            for block in trunk.blocks:
                tokens = block(tokens)
            expected = trunk.norm(tokens)[:, 0]  # the official forward in mode 'official'
            torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)


def test_not_for_timm_supervised_or_random_weights(tmp_path):
    trunk = timm.create_model("test_vit", num_classes=0, class_token=False, global_pool="")
    pool = SimPool(trunk.num_features, gamma=1.25, use_beta=True)
    supervised = {**trunk.state_dict(), **{f"global_pool.pool.{k}": v for k, v in pool.state_dict().items()}}
    torch.save({"state_dict": supervised}, tmp_path / "supervised.pth.tar")
    for encoder in (create_encoder("test_vit", gamma=1.25, weights=tmp_path / "supervised.pth.tar"),
                    create_encoder("test_vit", weights=None)):
        assert "pos_embed" not in encoder.config and "_pos_embed" not in vars(encoder.trunk)


def test_cnn_baseline_by_name_pools_with_gap(tmp_path, monkeypatch):
    trunk = timm.create_model("test_resnet", num_classes=0).eval()
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    dino_file(tmp_path / "downloads" / "resnet_dino_official.pth", trunk)
    entry = OfficialCheckpoint("test-resnet-dino-official", "test_resnet", None, False,
                               "https://huggingface.co/billpsomas/x/resolve/main/resnet_dino_official.pth", "DINO",
                               pool="avg")
    monkeypatch.setitem(OFFICIAL_CHECKPOINTS, entry.name, entry)
    encoder = create_encoder(None, weights=f"simpool:{entry.name}")
    assert encoder.config["pool"] == "avg" and "pos_embed" not in encoder.config
    images = images_of(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), trunk.forward_features(images).mean((2, 3)))
    explicit = create_encoder(None, pool="gem", weights=f"simpool:{entry.name}")  # the caller's choice wins
    assert explicit.config["pool"] == "gem"


# -------------------------------------------------------------------------------------------- registry


def test_registry_holds_every_readme_checkpoint_with_its_numbers():
    entries = OFFICIAL_CHECKPOINTS
    readme = {  # self_supervised/README.md: k-NN, linear probe; supervised/README.md: top-1
        "vits-dino-official-ep100": (68.9, 71.5), "vits-dino-simpool-ep100": (69.7, 72.8),
        "vits-dino-simpool-ep300": (72.6, 75.0), "vits-dino-simpool-nogamma-ep100": (69.8, 72.6),
        "resnet50-dino-official-ep100": (61.8, 63.8), "resnet50-dino-simpool-ep100": (63.8, 64.4),
        "resnet50-dino-simpool-nogamma-ep100": (63.7, 64.2), "convnexts-dino-official-ep100": (59.3, 63.9),
        "convnexts-dino-simpool-ep100": (68.7, 72.2), "convnexts-dino-simpool-nogamma-ep100": (68.8, 72.2),
    }
    for name, (knn, linear) in readme.items():
        assert (entries[name].knn, entries[name].linear, entries[name].top1) == (knn, linear, None)
    for name, top1 in {"vits-supervised-official-ep100": 72.7, "vits-supervised-simpool-ep100": 74.2,
                       "vits-supervised-simpool-nogamma-ep100": 74.3}.items():
        assert entries[name].top1 == top1
    for name in ("vits-supervised-simpool-ep300", "resnet50-supervised-simpool-ep100",
                 "resnet50-supervised-official-ep100"):
        assert name in entries and entries[name].top1 is None  # listed on Hugging Face, no README number here
    pools = {name: entry.pool for name, entry in entries.items() if entry.is_baseline}
    assert pools == {"vits-dino-official-ep100": "cls", "resnet50-dino-official-ep100": "avg",
                     "convnexts-dino-official-ep100": "avg", "vits-supervised-official-ep100": "cls",
                     "resnet50-supervised-official-ep100": "avg"}
    for entry in entries.values():
        assert entry.url.startswith("https://huggingface.co/billpsomas/") and entry.filename.endswith((".pth", ".tar"))
        assert entry.official_pos_embed == (entry.arch.startswith("vit_") and entry.training.startswith("DINO"))
        assert entry.gamma is None or not entry.is_baseline
        # every SimPool model has its baseline: same architecture, same kind of training
        kind = entry.training.split(",")[0]
        assert any(other.is_baseline and other.arch == entry.arch and other.training.startswith(kind)
                   for other in entries.values())
    assert len({entry.filename for entry in entries.values()}) == len(entries)  # one cache file each


def test_info_lists_baselines_beside_simpool():
    from simret.cli import cli

    result = CliRunner().invoke(cli, ["info", "--checkpoints"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line.startswith("  ") and "-ep" in line}
    assert set(row) == set(OFFICIAL_CHECKPOINTS)
    assert row["vits-dino-official-ep100"][1:] == ["cls", "-", "100", "68.9", "71.5", "-"]
    assert row["resnet50-dino-simpool-ep100"][1:] == ["simpool", "2.0", "100", "63.8", "64.4", "-"]
    assert row["vits-supervised-simpool-nogamma-ep100"][1:] == ["simpool", "-", "100", "-", "-", "74.3"]
    order = [line.split()[0] for line in lines if line.startswith("  ") and "-ep" in line]
    assert order.index("resnet50-dino-official-ep100") + 1 == order.index("resnet50-dino-simpool-ep100")
