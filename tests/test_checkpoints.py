"""Weights files: official SimPool layouts mapped onto simret's encoder, simret's own format, bad files."""
import argparse
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch

from simret.models import (
    SimPool,
    WeightsError,
    WeightsNotFoundError,
    create_encoder,
    load_encoder,
    save_encoder,
)
from simret.models.checkpoints import map_checkpoint, read_checkpoint
from simret.models.official_vit import official_pos_embed

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter and buffer random values, so a load that skips anything shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                values = torch.randn(tensor.shape, generator=generator) * 0.1
                if name.endswith(("running_var", "norm.weight", "bn1.weight", "bn2.weight", "bn3.weight")):
                    values = values.abs() + 0.5
                tensor.copy_(values)
    return module.eval()


def dino_checkpoint(trunk_state: dict, pool: SimPool) -> dict:
    """The layout DINO saves: teacher (backbone.*, head.*) and a DDP student, with an args Namespace."""
    teacher = {f"backbone.{k}": v for k, v in trunk_state.items()}
    teacher.update({f"backbone.simpool.{k}": v for k, v in pool.state_dict().items()})
    teacher["head.mlp.0.weight"] = torch.randn(32, 8)
    teacher["head.last_layer.weight_g"] = torch.randn(1, 4)
    student = {f"module.{k}": v + 1.0 for k, v in teacher.items()}
    return {"teacher": teacher, "student": student, "epoch": 100,
            "args": argparse.Namespace(arch="resnet50", mode="simpool", gamma=2.0, lr=0.3)}


def test_dino_resnet_checkpoint(tmp_path):
    trunk = randomised(timm.create_model("test_resnet", num_classes=0), 1)
    pool = randomised(SimPool(trunk.num_features, gamma=2.0), 2)
    path = tmp_path / "resnet_dino_simpool.pth"
    state = {k: v for k, v in trunk.state_dict().items()}
    state["fc.weight"] = torch.randn(10, trunk.num_features)  # DINO keeps a (replaced) fc in some exports
    torch.save(dino_checkpoint(state, pool), path)
    encoder = create_encoder("test_resnet", gamma=2.0, weights=path)
    with torch.no_grad():
        expected = pool(trunk.forward_features(IMAGES))
        torch.testing.assert_close(encoder(IMAGES), expected)
    student = create_encoder("test_resnet", gamma=2.0, weights=path, checkpoint_key="student")
    with torch.no_grad():
        assert not torch.allclose(student(IMAGES), expected)


def test_dino_vit_checkpoint_norm_follows_pooling(tmp_path):
    """Official DINO ViT: no [CLS] token; SimPool pools un-normalised tokens; the final norm comes after."""
    vit = randomised(timm.create_model("test_vit", num_classes=0, class_token=False, global_pool=""), 3)
    pool = randomised(SimPool(vit.num_features, gamma=1.25, use_beta=True), 4)
    state = vit.state_dict()
    assert "cls_token" not in state and "norm.weight" in state
    path = tmp_path / "vits_dino_simpool.pth"
    torch.save(dino_checkpoint(state, pool), path)
    encoder = create_encoder("test_vit", gamma=1.25, weights=path)
    with torch.no_grad():
        tokens = vit.patch_embed(IMAGES).flatten(1, 2)  # (B, 4·4, C)
        tokens = tokens + official_pos_embed(vit.pos_embed, (4, 4), class_token=False)  # as the official ViT
        tokens = vit.blocks(vit.norm_pre(tokens))
        expected = vit.norm(pool(tokens))  # pool first, norm after
        torch.testing.assert_close(encoder(IMAGES), expected, rtol=1e-4, atol=1e-5)
    assert encoder.pool.use_beta and encoder.pool.beta.item() == pool.beta.item()


def test_supervised_timm_vit_checkpoint(tmp_path):
    """Official supervised ViT (timm): no [CLS] token, tokens normalised, SimPool at gp.pool.*."""
    vit = randomised(timm.create_model("test_vit", num_classes=5, class_token=False, global_pool=""), 5)
    pool = randomised(SimPool(vit.num_features), 6)
    state = {**vit.state_dict(), **{f"gp.pool.{k}": v for k, v in pool.state_dict().items()}}
    path = tmp_path / "vits_supervised.pth.tar"
    torch.save({"epoch": 99, "arch": "vit_small_patch16_224", "state_dict": state,
                "state_dict_ema": {k: v * 0 for k, v in state.items()},
                "args": argparse.Namespace(model="vit_small_patch16_224", gp="simpool")}, path)
    encoder = create_encoder("test_vit", weights=path, img_size=64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(IMAGES), pool(vit.forward_features(IMAGES)), rtol=1e-4, atol=1e-5)


def test_supervised_timm_resnet_checkpoint_with_classifier(tmp_path):
    trunk = randomised(timm.create_model("test_resnet", num_classes=7), 7)
    pool = randomised(SimPool(trunk.num_features, gamma=2.0), 8)
    state = {**trunk.state_dict(), **{f"global_pool.pool.{k}": v for k, v in pool.state_dict().items()}}
    path = tmp_path / "resnet_supervised.pth.tar"
    torch.save({"state_dict": state, "arch": "resnet50"}, path)
    encoder = create_encoder("test_resnet", gamma=2.0, weights=path)
    with torch.no_grad():
        torch.testing.assert_close(encoder(IMAGES), pool(trunk.forward_features(IMAGES)))


def fb_convnext_keys(state: dict) -> dict:
    """timm ConvNeXt names → the facebookresearch/ConvNeXt names the official DINO code uses."""
    import re

    out = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        out[key] = value
    return out


def test_dino_convnext_checkpoint_in_facebook_layout(tmp_path):
    trunk = randomised(timm.create_model("test_convnext", num_classes=0), 9)
    pool = randomised(SimPool(trunk.num_features, gamma=2.0), 10)
    state = fb_convnext_keys(trunk.state_dict())
    assert "norm.weight" in state and any(k.startswith("downsample_layers.") for k in state)
    path = tmp_path / "convnext_dino.pth"
    torch.save(dino_checkpoint(state, pool), path)
    encoder = create_encoder("test_convnext", gamma=2.0, weights=path)
    with torch.no_grad():
        pooled = pool(trunk.forward_features(IMAGES))
        expected = trunk.head.norm(pooled[:, :, None, None]).flatten(1)
        torch.testing.assert_close(encoder(IMAGES), expected, rtol=1e-4, atol=1e-5)


def test_plain_trunk_checkpoint_leaves_pool_random_with_warning(tmp_path):
    from simret.models import RandomWeightsWarning

    trunk = randomised(timm.create_model("test_resnet", num_classes=0), 11)
    path = tmp_path / "plain.pth"
    torch.save(trunk.state_dict(), path)
    with pytest.warns(RandomWeightsWarning, match="no weights for the 'simpool' pooling"):
        encoder = create_encoder("test_resnet", weights=path)
    torch.testing.assert_close(encoder.trunk.conv1[0].weight, trunk.conv1[0].weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_simret_format_round_trip(tmp_path, suffix):
    encoder = create_encoder("test_vit", pool="simpool", gamma=1.25, pool_kwargs={"num_heads": 2, "use_beta": True})
    with torch.no_grad():
        encoder.pool.beta.fill_(0.25)
    path = save_encoder(encoder, tmp_path / f"enc{suffix}")
    loaded = load_encoder(path)
    assert loaded.config["arch"] == "test_vit" and loaded.pool.num_heads == 2 and loaded.pool.gamma == 1.25
    assert loaded.fingerprint == encoder.fingerprint
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES), encoder(IMAGES))
    same = create_encoder("test_vit", weights=path)
    assert same.fingerprint == encoder.fingerprint
    with pytest.raises(WeightsError, match="holds a test_vit encoder, not test_resnet"):
        create_encoder("test_resnet", weights=path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_encoder("test_resnet", weights=tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        create_encoder("test_resnet", weights=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    import random

    generator = random.Random(0)
    path = tmp_path / f"corrupt{suffix}"
    for _ in range(100):  # random bytes fail in many different ways inside the unpickler
        path.write_bytes(generator.randbytes(2048))
        with pytest.raises(WeightsError, match="not a readable"):
            read_checkpoint(path)
    with pytest.raises(WeightsError, match="not a readable"):
        create_encoder("test_resnet", weights=path)


def test_truncated_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        create_encoder("test_resnet", weights=truncated)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(WeightsError, match="weights_only=True.*posix.system"):
        create_encoder("test_resnet", weights=path)
    with open(tmp_path / "plain.pkl", "wb") as handle:
        pickle.dump({"a": Exploit()}, handle)
    with pytest.raises(WeightsError):
        read_checkpoint(tmp_path / "plain.pkl")


def test_wrong_architecture_names_the_keys(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        create_encoder("test_resnet", weights=path)
    message = str(info.value)
    assert "missing from the checkpoint" in message and "conv1" in message
    assert "not used by the model" in message and "blocks.0" in message


def test_shape_mismatch_is_reported(tmp_path):
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="conv1.0.weight"):
        create_encoder("test_resnet", weights=path)


def test_beta_without_gamma_gets_a_hint(tmp_path):
    trunk = timm.create_model("test_resnet", num_classes=0)
    pool = SimPool(trunk.num_features, gamma=2.0, use_beta=True)
    path = tmp_path / "beta.pth"
    torch.save(dino_checkpoint(trunk.state_dict(), pool), path)
    with pytest.raises(WeightsError, match="pass gamma"):
        create_encoder("test_resnet", weights=path)


def test_unknown_weights_name_and_official_name_offline():
    with pytest.raises(WeightsError, match="neither 'timm'"):
        create_encoder("test_resnet", weights="imagenet")
    with pytest.raises(WeightsError, match="unknown official SimPool checkpoint"):
        create_encoder("test_resnet", weights="simpool:nope")
    from simret.models import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="vits_dino_simpool_ep300.pth"):
        create_encoder(None, weights="simpool:vits-dino-simpool-ep300")


def test_official_name_loads_from_cache(tmp_path, monkeypatch):
    """A file put by hand where the message says is picked up, with the registry's arch, gamma and beta."""
    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path))
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, class_token=False, global_pool="")
    pool = SimPool(vit.num_features, gamma=1.25, use_beta=True)
    target = tmp_path / "downloads" / "vits_dino_simpool_ep100.pth"
    target.parent.mkdir(parents=True)
    torch.save(dino_checkpoint(vit.state_dict(), pool), target)
    encoder = create_encoder(None, weights="simpool:vits-dino-simpool-ep100")
    assert encoder.config["arch"] == "vit_small_patch16_224" and encoder.pool.gamma == 1.25
    assert encoder.data_config["mean"] == (0.485, 0.456, 0.406)
    assert encoder.config["weights"] == "simpool:vits-dino-simpool-ep100"


def test_mapping_reports_layouts():
    assert map_checkpoint({"simpool.wq.weight": torch.zeros(1), "conv1.weight": torch.zeros(1)}).source == "dino"
    assert map_checkpoint({"global_pool.pool.wq.weight": torch.zeros(1)}).source == "timm"
    assert map_checkpoint({"conv1.weight": torch.zeros(1)}).source == "plain"
    assert map_checkpoint({"trunk.a": torch.zeros(1), "pool.b": torch.zeros(1)}).source == "simret"


def test_reachability_probe_never_waits_on_a_hung_resolver(monkeypatch):
    """A connection attempt that never returns (DNS hanging) reads as unreachable; the caller moves on."""
    import threading

    from simret.models import checkpoints

    monkeypatch.delenv("SIMRET_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    release, finished = threading.Event(), threading.Event()

    def hung_connection(address, timeout=None):
        release.wait(30)
        finished.set()
        raise OSError("resolver gave up")

    monkeypatch.setattr(checkpoints.socket, "create_connection", hung_connection)
    try:
        assert checkpoints.host_reachable("huggingface.co", timeout=0.05) is False
        assert not finished.is_set()  # it answered while the attempt was still hanging
    finally:
        release.set()


def test_reachability_goes_through_the_https_proxy(monkeypatch):
    from simret.models import checkpoints

    monkeypatch.delenv("SIMRET_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("no_proxy", "NO_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    dialled = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_connection(address, timeout=None):
        dialled.append(address)
        return Connection()

    monkeypatch.setattr(checkpoints.socket, "create_connection", fake_connection)
    assert checkpoints.host_reachable("huggingface.co") is True
    assert dialled == [("proxy.internal", 3128)]
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert checkpoints.host_reachable("huggingface.co") is True
    assert dialled[-1] == ("huggingface.co", 443)


def test_supervised_timm_convnext_checkpoint(tmp_path):
    """Official supervised ConvNeXt (timm): SimPool at head.global_pool.pool.*, head.norm after it."""
    trunk = randomised(timm.create_model("test_convnext", num_classes=6), 12)
    pool = randomised(SimPool(trunk.num_features, gamma=2.0), 13)
    state = {**trunk.state_dict(), **{f"head.global_pool.pool.{k}": v for k, v in pool.state_dict().items()}}
    path = tmp_path / "convnext_supervised.pt"
    torch.save({"state_dict": state}, path)
    encoder = create_encoder("test_convnext", gamma=2.0, weights=path)
    with torch.no_grad():
        pooled = pool(trunk.forward_features(IMAGES))
        expected = trunk.head.norm(pooled[:, :, None, None]).flatten(1)
        torch.testing.assert_close(encoder(IMAGES), expected, rtol=1e-4, atol=1e-5)


def test_resolve_weights_says_where_weights_come_from(tmp_path):
    """resolve_weights decides the source (and what it implies) before anything is read or built."""
    from simret.models import resolve_weights

    random = resolve_weights(None, "test_resnet", 2.0)
    assert (random.kind, random.label, random.weights_id, random.arch, random.gamma) == (
        "none", "random init", None, "test_resnet", 2.0)
    assert not random.reads_file
    official = resolve_weights("simpool:resnet50-dino-simpool-ep100")  # nothing downloaded: offline is fine
    assert (official.kind, official.arch, official.gamma, official.weights_id) == (
        "official", "resnet50", 2.0, "simpool:resnet50-dino-simpool-ep100")
    assert official.url.endswith("resnet50_dino_simpool_ep100.pth") and official.reads_file
    assert official.data_config["mean"] == (0.485, 0.456, 0.406)
    vits = resolve_weights("simpool:vits-dino-simpool-ep300")
    assert vits.pool_kwargs == {"use_beta": True} and vits.gamma == 1.25
    with pytest.warns(UserWarning, match="trained with gamma=1.25; using gamma=3.0"):
        assert resolve_weights("simpool:vits-dino-simpool-ep300", gamma=3.0).gamma == 3.0
    with pytest.raises(WeightsError, match="is a resnet50, not test_vit"):
        resolve_weights("simpool:resnet50-dino-simpool-ep100", "test_vit")
    url = resolve_weights("https://example.org/models/w.pth")
    assert (url.kind, url.label, url.weights_id) == ("url", "weights w.pth", "https://example.org/models/w.pth")
    local = resolve_weights(tmp_path / "w.pth", "test_resnet")
    assert (local.kind, local.path, local.weights_id) == ("file", tmp_path / "w.pth", str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="needs an architecture name"):
        resolve_weights("timm")
    with pytest.raises(ValueError, match="unknown timm architecture"):
        resolve_weights("timm", "resnet_nope")
    with pytest.raises(TypeError, match="weights must be None"):
        resolve_weights(3)


def test_read_weights_maps_a_file_and_names_it(tmp_path):
    from simret.models import read_weights, resolve_weights

    trunk = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "trunk.pth"
    torch.save({"state_dict": trunk.state_dict()}, path)
    mapped, meta = read_weights(resolve_weights(path, "test_resnet"))
    assert mapped.source == "plain" and set(mapped.trunk) == set(trunk.state_dict()) and meta == {}
    torch.save({"epoch": 1}, path)
    with pytest.raises(WeightsError, match=r"weights .*trunk\.pth: checkpoint holds no tensors"):
        read_weights(resolve_weights(path))
    with pytest.raises(ValueError, match="random init is not read from a checkpoint file"):
        read_weights(resolve_weights(None, "test_resnet"))


def test_cache_dir_lives_in_utils(tmp_path, monkeypatch):
    from simret.models import checkpoints
    from simret.utils.paths import cache_dir

    monkeypatch.setenv("SIMRET_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and checkpoints.cache_dir is cache_dir
    monkeypatch.delenv("SIMRET_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "simret"
