"""Attention maps: API, pictures, colour maps and the ``simret attention`` command."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from simret.cli import cli
from simret.models import create_encoder
from simret.visualize import attention_maps, colorize, normalise_map, render_overlay, upsample_map


@pytest.fixture
def photos(tmp_path):
    from simret.data.samples import load_photo

    folder = tmp_path / "photos"
    folder.mkdir()
    load_photo("chelsea").resize((90, 60)).save(folder / "cat.jpg")
    load_photo("rocket").resize((50, 75)).save(folder / "rocket.png")
    return folder


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_attention_maps_api(photos, arch):
    encoder = create_encoder(arch, gamma=2.0)
    results = attention_maps(encoder, [photos / "cat.jpg", photos / "rocket.png"], max_size=64)
    assert [r.image_id for r in results] == ["cat.jpg", "rocket.png"]
    for result in results:
        assert result.map.ndim == 2 and result.map.dtype == np.float32
        assert abs(float(result.map.sum()) - 1.0) < 1e-4
        assert max(result.image.size) == 64
    if arch == "test_vit":  # 64x43 → nearest multiples of the 16-pixel patch: 64x48 → a 3x4 grid
        assert results[0].map.shape == (3, 4)


def test_vit_accepts_sizes_that_are_not_patch_multiples():
    encoder = create_encoder("test_vit")
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 50, 70)).shape == (1, encoder.dim)
        assert encoder.attention(torch.randn(1, 3, 50, 70)).shape == (1, 3, 4)


def test_colour_maps_and_scaling():
    assert colorize(np.array([0.0]), "gray").tolist() == [[0, 0, 0]]
    assert colorize(np.array([1.0]), "gray").tolist() == [[255, 255, 255]]
    assert colorize(np.zeros((2, 3)), "inferno").shape == (2, 3, 3)
    with pytest.raises(ValueError, match="unknown colour map"):
        colorize(np.zeros(2), "rainbow")
    np.testing.assert_allclose(normalise_map(np.array([[1.0, 3.0]])), [[0.0, 1.0]])
    assert normalise_map(np.ones((2, 2))).max() == 0.0
    big = upsample_map(np.array([[0.0, 1.0]], dtype=np.float32), (8, 4))
    assert big.shape == (4, 8) and big[:, 0].max() < big[:, -1].min()


def test_render_overlay_side_by_side():
    image = Image.new("RGB", (40, 30), (10, 200, 10))
    picture = render_overlay(image, np.random.rand(3, 4).astype(np.float32))
    assert picture.size == (88, 30)
    assert np.asarray(picture)[0, 0].tolist() == [10, 200, 10]  # left half is the untouched image
    assert render_overlay(image, np.zeros((3, 4)), side_by_side=False).size == (40, 30)


def test_attention_command_writes_png_and_npy(photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "maps"
    result = CliRunner().invoke(cli, ["attention", str(photos), "--model", "test_resnet", "--weights", "none",
                                      "--gamma", "2", "-o", str(out), "--max-size", "64"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["photos__cat.npy", "photos__cat.png",
                                                      "photos__rocket.npy", "photos__rocket.png"]
    saved = np.load(out / "photos__cat.npy")
    assert abs(float(saved.sum()) - 1.0) < 1e-4
    assert "photos/cat.jpg" in result.stdout
    assert "skipped 1 unreadable" in result.output


def test_attention_command_needs_simpool(photos, tmp_path):
    result = CliRunner().invoke(cli, ["attention", str(photos / "cat.jpg"), "--model", "test_resnet",
                                      "--weights", "none", "--pool", "avg", "-o", str(tmp_path / "m")])
    assert result.exit_code == 1 and "need --pool simpool" in result.output


def test_attention_command_never_overwrites_one_picture_with_another(photos, tmp_path):
    """Same file name in two folders, or the same stem with two extensions: one picture each."""
    other = tmp_path / "other"
    other.mkdir()
    Image.open(photos / "rocket.png").convert("RGB").save(other / "cat.jpg")
    Image.open(photos / "rocket.png").save(other / "cat.png")
    out = tmp_path / "maps"
    args = ["attention", str(photos / "cat.jpg"), str(other / "cat.jpg"), str(other / "cat.png"),
            "--model", "test_resnet", "--weights", "none", "-o", str(out), "--max-size", "48"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cat-2.npy", "cat-2.png", "cat-3.npy", "cat-3.png",
                                                      "cat.npy", "cat.png"]
    first, second = Image.open(out / "cat.png"), Image.open(out / "cat-2.png")
    assert first.size != second.size  # the cat (landscape) and the rocket (portrait) are both there
    assert not list(out.glob(".*.tmp"))
