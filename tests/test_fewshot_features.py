"""Feature banks: HDF5 layout and provenance, exact features, reuse, resume after interruption, bad images."""
import warnings

import h5py
import numpy as np
import pytest
import torch

from simret.data.images import classification_transform, load_image
from simret.data.samples import write_fewshot_sample
from simret.data.splits import load_split
from simret.fewshot import feature_bank, load_feature_bank
from simret.fewshot import features as features_module
from simret.fewshot.features import bank_path, extract_features
from simret.models import RandomWeightsWarning, create_encoder

SIZE = 32


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("test_resnet")


@pytest.fixture
def split(tmp_path):
    write_fewshot_sample(tmp_path / "data", per_class=4, image_size=24)
    return load_split(tmp_path / "data", "test")


def _count_forwards(encoder, fail_after=None):
    calls = []

    def hook(module, inputs, output):
        calls.append(int(inputs[0].shape[0]))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("interrupted")

    return calls, encoder.register_forward_hook(hook)


def test_bank_layout_provenance_and_exact_features(encoder, split, tmp_path):
    path = tmp_path / "banks" / "features-test.h5"
    bank = extract_features(encoder, split, path, batch_size=7, image_size=SIZE)
    assert path.is_file() and not path.with_name(path.name + ".partial").exists()
    with h5py.File(path, "r") as handle:  # readable with plain h5py
        assert handle["features"].shape == (20, encoder.dim) and handle["features"].dtype == np.float32
        assert handle["labels"].dtype == np.int64
        assert list(handle["ids"].asstr()[()]) == split.ids
        assert list(handle["classes"].asstr()[()]) == split.classes
        attrs = dict(handle.attrs)
    for key, value in encoder.provenance().items():
        assert attrs[key] == value, key
    assert attrs["image_size"] == SIZE and attrs["crop_pct"] == pytest.approx(0.95)
    assert attrs["split"] == "test" and attrs["split_format"] == "folders" and attrs["n_images"] == 20
    assert attrs["complete"] and attrs["created"]
    np.testing.assert_array_equal(bank.labels, split.labels)
    # the stored features are exactly the encoder's pooled, unnormalised descriptors of the transformed images
    transform = classification_transform(encoder.data_config, input_size=(3, SIZE, SIZE), crop_pct=0.95)
    images = torch.stack([transform(load_image(split.root / split.ids[i])) for i in (0, 13)])
    assert images.shape == (2, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = encoder(images).numpy()
    np.testing.assert_allclose(bank.features[[0, 13]], expected, rtol=1e-5, atol=1e-5)
    assert bank.mean().shape == (encoder.dim,)
    np.testing.assert_allclose(bank.mean(), bank.features.astype(np.float64).mean(0), rtol=1e-6)


def test_bank_is_reused_when_it_fits_and_remade_when_not(encoder, split, tmp_path, monkeypatch):
    first = feature_bank(encoder, split, tmp_path, image_size=SIZE, batch_size=8)
    assert bank_path(tmp_path, "test").is_file()

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(features_module, "extract_features", no_extraction)
    again = feature_bank(encoder, split, tmp_path, image_size=SIZE)
    np.testing.assert_array_equal(again.features, first.features)
    monkeypatch.undo()
    calls, handle = _count_forwards(encoder)
    try:
        other = feature_bank(encoder, split, tmp_path, image_size=48, batch_size=8)  # another image size
    finally:
        handle.remove()
    assert sum(calls) == 20 and other.attrs["image_size"] == 48
    assert load_feature_bank(bank_path(tmp_path, "test")).attrs["image_size"] == 48


def test_interrupted_extraction_resumes_where_it_stopped(encoder, split, tmp_path):
    path = tmp_path / "features-test.h5"
    calls, handle = _count_forwards(encoder, fail_after=2)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            extract_features(encoder, split, path, batch_size=6, image_size=SIZE)
    finally:
        handle.remove()
    partial = path.with_name(path.name + ".partial")
    assert not path.exists() and partial.exists()
    with h5py.File(partial, "r") as stored:
        assert int(stored["done"][()].sum()) == 12  # two batches were written before the failure
    calls, handle = _count_forwards(encoder)
    try:
        resumed = extract_features(encoder, split, path, batch_size=6, image_size=SIZE)
    finally:
        handle.remove()
    assert sum(calls) == 8 and not partial.exists()
    clean = extract_features(encoder, split, tmp_path / "clean.h5", batch_size=20, image_size=SIZE)
    np.testing.assert_allclose(resumed.features, clean.features, rtol=1e-5, atol=1e-6)


def test_unreadable_image_is_an_error_naming_it_and_the_rest_is_kept(encoder, split, tmp_path):
    bad = split.root / split.ids[5]
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not a png at all")
    path = tmp_path / "features-test.h5"
    with pytest.raises(ValueError, match=r"1 image\(s\) of split 'test' could not be read \(digit_6/0001\.png: "
                                         r"not an image.*19 features already computed are kept"):
        extract_features(encoder, split, path, batch_size=8, image_size=SIZE)
    assert not path.exists()
    bad.write_bytes(good_bytes)  # fixed: the next run computes that image only
    calls, handle = _count_forwards(encoder)
    try:
        bank = extract_features(encoder, split, path, batch_size=8, image_size=SIZE)
    finally:
        handle.remove()
    assert calls == [1] and len(bank) == 20


def test_load_feature_bank_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such feature bank"):
        load_feature_bank(tmp_path / "features-test.h5")
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["descriptors"] = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="not a feature bank: missing dataset"):
        load_feature_bank(tmp_path / "other.h5")


def test_bad_sizes(encoder, split, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        extract_features(encoder, split, tmp_path / "f.h5", image_size=4)
    with pytest.raises(ValueError, match="crop_pct must lie in"):
        extract_features(encoder, split, tmp_path / "f.h5", crop_pct=1.5)
    assert not (tmp_path / "f.h5").exists()
