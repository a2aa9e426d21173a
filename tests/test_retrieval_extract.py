"""Descriptor extraction: multi-scale cirtorch convention, batching that never changes a descriptor,
boxes, and bad files reported instead of fatal."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simret.data.images import crop_box, load_image, resize_long_side, to_tensor
from simret.models import create_encoder
from simret.retrieval import extract


@pytest.fixture(scope="module")
def encoder():
    import warnings

    from simret.models import RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("test_resnet", weights=None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (48, 64), (64, 48), (80, 80), (64, 48), (30, 50)]
    for number, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{number}.png")
    (root / "notes.png").write_text("this is not an image")
    good = root / "img0.png"
    (root / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return root


def reference(encoder, path, scales, max_size, box=None):
    """The cirtorch recipe written out for one image: crop, long side, per scale L2N, mean, L2N."""
    config = encoder.data_config
    image = resize_long_side(crop_box(load_image(path), box), max_size)
    tensor = to_tensor(image, config["mean"], config["std"])[None]
    total = 0
    with torch.no_grad():
        for scale in scales:
            scaled = tensor if scale == 1 else F.interpolate(tensor, scale_factor=scale, mode="bilinear",
                                                             align_corners=False)
            total = total + F.normalize(encoder(scaled), dim=-1)
    return F.normalize(total / len(scales), dim=-1)[0].numpy()


def test_multiscale_descriptors_follow_cirtorch_and_keep_input_order(encoder, folder):
    ids = ["img3.png", "img0.png", "notes.png", "img1.png", "truncated.png", "img5.png"]
    scales = (1.0, 0.707, 0.5)
    result = extract(encoder, folder, ids, scales=scales, max_size=56, batch_size=3, workers=0, progress=False)
    assert result.ids == ["img3.png", "img0.png", "img1.png", "img5.png"]
    assert result.positions.tolist() == [0, 1, 3, 5]
    assert result.descriptors.shape == (4, encoder.dim) and result.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1.0, atol=1e-5)
    for row, image_id in zip(result.descriptors, result.ids):
        np.testing.assert_allclose(row, reference(encoder, folder / image_id, scales, 56), atol=1e-5)
    reasons = dict(result.failures)
    assert set(reasons) == {"notes.png", "truncated.png"}
    assert "not an image" in reasons["notes.png"] and "truncated" in reasons["truncated.png"]


def test_a_descriptor_does_not_depend_on_its_batch(encoder, folder):
    ids = [f"img{i}.png" for i in range(6)]
    together = extract(encoder, folder, ids, batch_size=4, max_size=None, workers=0, progress=False)
    for image_id, row in zip(together.ids, together.descriptors):
        alone = extract(encoder, folder, [image_id], batch_size=1, max_size=None, workers=0, progress=False)
        np.testing.assert_allclose(row, alone.descriptors[0], atol=1e-5)


def test_worker_processes_give_the_same_result(encoder, folder):
    ids = [f"img{i}.png" for i in range(6)] + ["notes.png"]
    serial = extract(encoder, folder, ids, batch_size=2, workers=0, progress=False)
    parallel = extract(encoder, folder, ids, batch_size=2, workers=2, progress=False)
    assert parallel.ids == serial.ids and parallel.failures == serial.failures
    np.testing.assert_allclose(parallel.descriptors, serial.descriptors, atol=1e-6)


def test_boxes_crop_before_resizing(encoder, folder):
    box = (5, 4, 41, 30)
    with Image.open(folder / "img3.png") as image:
        image.crop(box).save(folder / "crop_of_img3.png")  # PNG: lossless, same pixels
    boxed = extract(encoder, folder, ["img3.png", "img1.png"], boxes=[box, None], scales=(1, 0.5), max_size=24,
                    workers=0, progress=False)
    cropped = extract(encoder, folder, ["crop_of_img3.png"], scales=(1, 0.5), max_size=24, workers=0, progress=False)
    np.testing.assert_allclose(boxed.descriptors[0], cropped.descriptors[0], atol=1e-5)
    np.testing.assert_allclose(boxed.descriptors[0], reference(encoder, folder / "img3.png", (1, 0.5), 24, box),
                               atol=1e-5)
    empty = extract(encoder, folder, ["img3.png"], boxes=[(500, 500, 600, 600)], workers=0, progress=False)
    assert not empty.ids and "lies outside the image" in empty.failures[0][1]


def test_images_too_small_for_the_model_are_reported_not_fatal(folder, tmp_path):
    convnext = create_encoder("test_convnext", weights=None)
    Image.new("RGB", (6, 5), "red").save(tmp_path / "tiny.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    result = extract(convnext, tmp_path, ["tiny.png", "ok.png"], batch_size=4, workers=0, progress=False)
    assert result.ids == ["ok.png"]
    assert result.failures[0][0] == "tiny.png" and "cannot process" in result.failures[0][1]


def test_half_precision_stays_close_and_float32(encoder, folder):
    full = extract(encoder, folder, ["img0.png", "img3.png"], workers=0, progress=False)
    with pytest.warns(DeprecationWarning, match="half=True is deprecated"):
        half = extract(encoder, folder, ["img0.png", "img3.png"], workers=0, half=True, progress=False)
    assert half.descriptors.dtype == np.float32
    assert (np.sum(full.descriptors * half.descriptors, axis=1) > 0.98).all()


def test_bad_arguments_are_refused(encoder, folder):
    with pytest.raises(ValueError, match="scales"):
        extract(encoder, folder, ["img0.png"], scales=(1, 0), workers=0)
    with pytest.raises(ValueError, match="batch size"):
        extract(encoder, folder, ["img0.png"], batch_size=0, workers=0)
    with pytest.raises(ValueError, match="2 boxes for 1 images"):
        extract(encoder, folder, ["img0.png"], boxes=[None, None], workers=0)
    nothing = extract(encoder, folder, [], workers=0, progress=False)
    assert nothing.descriptors.shape == (0, encoder.dim) and nothing.ids == [] and nothing.failures == []


def test_extract_is_one_function_whatever_the_import_order():
    """``simret.retrieval.extract`` is the function of ``simret.retrieval.extraction`` however it is reached:
    importing the module (before or after the package export) never shadows it, and there is no module of that
    name to shadow it with."""
    import subprocess
    import sys

    script = (
        "import importlib.util, inspect\n"
        "from simret.retrieval import extract as first\n"  # the package export first …
        "import simret.retrieval.extraction as module\n"  # … then the module it lives in
        "import simret.retrieval as package\n"
        "assert first is module.extract is package.extract, (first, module.extract, package.extract)\n"
        "assert inspect.isfunction(first) and first.__module__ == 'simret.retrieval.extraction'\n"
        "assert 'scales' in inspect.signature(first).parameters\n"
        "assert importlib.util.find_spec('simret.retrieval.extract') is None\n"
        "assert 'extract' in dir(package) and 'extract' in package.__all__\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
