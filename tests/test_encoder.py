"""Encoders over tiny timm models: shapes, attention maps, data config, fingerprints, pooling choices."""
import warnings

import pytest
import torch

from simret.models import Encoder, RandomWeightsWarning, WeightsUnavailableError, create_encoder

ARCHS = ["test_resnet", "test_convnext", "test_vit"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_descriptor_and_attention_shapes(arch, size):
    encoder = create_encoder(arch, gamma=2.0)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        descriptors = encoder(images)
        maps = encoder.attention(images)
    assert isinstance(encoder, Encoder)
    assert descriptors.shape == (2, encoder.dim)
    assert encoder.dim == encoder.trunk.num_features
    assert maps.ndim == 3 and maps.shape[0] == 2
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(2))
    if arch == "test_vit":  # one token per 16x16 patch
        assert maps.shape[1:] == (size[0] // 16, size[1] // 16)
    else:  # one weight per location of the trunk's feature map
        with torch.no_grad():
            assert maps.shape[1:] == encoder.trunk.forward_features(images).shape[-2:]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_one_equals_batch_row(arch):
    encoder = create_encoder(arch, gamma=2.0)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = encoder(images)
        alone = encoder(images[1:2])
    assert alone.shape == (1, encoder.dim)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_vit_simpool_ignores_class_token_and_cls_pool_uses_it():
    simpool = create_encoder("test_vit")
    features = simpool.forward_features(torch.randn(1, 3, 64, 64))
    assert features.shape[1] == 16  # 4x4 patches, the [CLS] token dropped
    cls = create_encoder("test_vit", pool="cls")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = cls.trunk.forward_features(images)
        torch.testing.assert_close(cls(images), cls.trunk.fc_norm(tokens[:, 0]))
    with pytest.raises(ValueError, match="simpool"):
        cls.attention(images)


def test_cls_pool_on_cnn_fails_clearly():
    encoder = create_encoder("test_resnet", pool="cls")
    with pytest.raises(ValueError, match="ViT tokens"):
        encoder(torch.randn(1, 3, 64, 64))


def test_convnext_post_pool_norm_is_applied():
    encoder = create_encoder("test_convnext", pool="avg")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = encoder.trunk.forward_features(images)
        expected = encoder.trunk.head.norm(feature_map.mean((2, 3), keepdim=True)).flatten(1)
        torch.testing.assert_close(encoder(images), expected)


def test_random_weights_warn_and_are_deterministic():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = create_encoder("test_resnet", gamma=2.0)
    assert any(issubclass(w.category, RandomWeightsWarning) and "RANDOM" in str(w.message) for w in caught)
    second = create_encoder("test_resnet", gamma=2.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(first(images), second(images))
    assert first.fingerprint == second.fingerprint
    assert create_encoder("test_resnet", gamma=2.0, seed=1).fingerprint != first.fingerprint


def test_fingerprint_tracks_configuration_and_weights():
    base = create_encoder("test_resnet", gamma=2.0)
    assert base.fingerprint.startswith("test_resnet-simpool-")
    assert create_encoder("test_resnet", gamma=1.5).fingerprint != base.fingerprint
    assert create_encoder("test_resnet", pool="gem").fingerprint != base.fingerprint
    before = base.fingerprint
    with torch.no_grad():
        base.pool.wq.weight.add_(0.01)
    assert base.fingerprint != before


def test_data_config_describes_preprocessing():
    config = create_encoder("test_resnet").data_config
    assert len(config["mean"]) == 3 and len(config["std"]) == 3
    assert config["input_size"][0] == 3
    assert "interpolation" in config


def test_gamma_with_avg_pool_is_refused():
    with pytest.raises(ValueError, match="gamma applies to pool='simpool'"):
        create_encoder("test_resnet", pool="avg", gamma=2.0)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet_does_not_exist'"):
        create_encoder("resnet_does_not_exist")
    # with timm weights too: a typo is named as such, before any look for weights
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet_does_not_exist'"):
        create_encoder("resnet_does_not_exist", weights="timm")


def test_timm_weights_fail_clearly_offline(monkeypatch):
    """Offline, weights="timm" is refused before timm tries (and retries) a download; the message says how
    to provide the file. (A hung resolver is covered in test_checkpoints.py.)"""
    import timm

    def no_download(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise AssertionError("timm was asked to download")
        return real_create(*args, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(WeightsUnavailableError, match="cannot be reached") as info:
        create_encoder("test_resnet", weights="timm")
    assert "--weights /path/to" in str(info.value) and "huggingface.co/timm/test_resnet" in str(info.value)


def test_device_and_dtype_follow_the_module():
    encoder = create_encoder("test_vit", gamma=1.25).to(torch.float64)
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_warnings_point_at_the_caller(tmp_path):
    """Warnings raised deep inside create_encoder name the line that called it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_encoder("test_resnet", gamma=2.0)
        from simret.models import save_encoder

        save_encoder(create_encoder("test_resnet", gamma=2.0), tmp_path / "e.pth")
        create_encoder(None, gamma=3.0, weights=tmp_path / "e.pth")
    messages = {str(w.message).split(" ")[0]: w.filename for w in caught}
    assert any("RANDOM" in str(w.message) for w in caught) and any("saved with gamma=2.0" in str(w.message)
                                                                  for w in caught)
    assert set(messages.values()) == {__file__}, messages


def test_timm_pretrained_weights_from_a_cached_file(tmp_path, monkeypatch):
    """weights="timm" with timm's file in a local cache: the trunk carries those weights, the pooling is random."""
    import timm

    from simret.models import checkpoints

    source = timm.create_model("test_resnet", num_classes=0)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.5)
    cached = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), cached)
    monkeypatch.setattr(checkpoints, "timm_pretrained_file", lambda arch: str(cached))
    with pytest.warns(RandomWeightsWarning, match="timm's weights cover the test_resnet trunk only"):
        encoder = create_encoder("test_resnet", gamma=2.0, weights="timm")
    assert encoder.config["weights"] == "timm:test_resnet"
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(encoder.trunk.state_dict()[name], tensor)


def test_default_architecture_rule():
    from simret.models import DEFAULT_ARCH, arch_or_default

    assert DEFAULT_ARCH == "resnet50"
    for weights in (None, "none", "random", "timm"):
        assert arch_or_default(None, weights) == DEFAULT_ARCH
    assert arch_or_default(None, "simpool:vits-dino-simpool-ep300") is None  # the weights name it
    assert arch_or_default(None, "ckpt/encoder.safetensors") is None
    assert arch_or_default("test_vit", "timm") == "test_vit"
