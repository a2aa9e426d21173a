"""Image loading, listing, resizing and the ImageList dataset, including bad files."""
import numpy as np
import pytest
from PIL import Image

from simret.data.images import (
    Failed,
    ImageList,
    ImageReadError,
    RetrievalTransform,
    collate_skip_failed,
    crop_box,
    list_images,
    load_image,
    resize_long_side,
)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((10, 10), 50, np.uint8)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"definitely not an image")
    good = tmp_path / "a.jpg"
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return tmp_path


def test_list_images_recursive_sorted_relative(folder):
    root, ids = list_images(folder)
    assert root == folder.resolve()
    assert ids == ["a.jpg", "broken.jpg", "sub/b.png", "truncated.jpg"]


def test_list_file_relative_to_its_folder(folder):
    listing = folder / "list.txt"
    listing.write_text("# images\na.jpg\n\nsub/b.png\n")
    root, ids = list_images(listing)
    assert ids == ["a.jpg", "sub/b.png"]
    listing.write_text("missing.jpg\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        list_images(listing)


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)


def test_load_image_converts_to_rgb_and_reports_bad_files(folder):
    assert load_image(folder / "sub" / "b.png").mode == "RGB"
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(folder / "broken.jpg")
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(folder / "truncated.jpg")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 a jpeg header and nothing else")
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        load_image(folder / "garbage.jpg")
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(folder / "nope.jpg")


def test_resize_and_crop():
    image = Image.new("RGB", (400, 200))
    assert resize_long_side(image, 100).size == (100, 50)
    assert resize_long_side(image, 800).size == (400, 200)
    assert resize_long_side(image, 800, upscale=True).size == (800, 400)
    assert crop_box(image, (10.4, 20, 110, 70)).size == (100, 50)
    # past the border: not clipped, the outside is black, as PIL.Image.crop(bbx) in revisitop/cirtorch
    white = Image.new("RGB", (400, 200), "white")
    padded = crop_box(white, (-5, -5.4, 1000, 1000))
    assert padded.size == (1005, 1005)
    assert padded.getpixel((0, 0)) == (0, 0, 0) and padded.getpixel((5, 5)) == (255, 255, 255)
    assert padded.getpixel((404, 204)) == (255, 255, 255) and padded.getpixel((405, 205)) == (0, 0, 0)
    assert padded.tobytes() == white.crop((-5, -5, 1000, 1000)).tobytes()
    with pytest.raises(ValueError, match="empty crop"):
        crop_box(image, (50, 50, 50, 80))
    with pytest.raises(ValueError, match="outside the image"):
        crop_box(image, (400, 0, 500, 100))


def test_image_list_turns_bad_files_into_failures(folder):
    transform = RetrievalTransform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_size=16, upscale=True)
    dataset = ImageList(folder, ["a.jpg", "broken.jpg", "truncated.jpg"], transform)
    items = [dataset[i] for i in range(3)]
    assert items[0][0].shape == (3, 11, 16) and items[0][1] == 0
    assert isinstance(items[1], Failed) and "not an image" in items[1].reason
    assert isinstance(items[2], Failed) and "truncated" in items[2].reason
    images, indices, failed = collate_skip_failed(items)
    assert images.shape == (1, 3, 11, 16) and indices.tolist() == [0] and len(failed) == 2


def test_image_list_crops_boxes(folder):
    transform = RetrievalTransform(mean=(0, 0, 0), std=(1, 1, 1), max_size=None)
    dataset = ImageList(folder, ["a.jpg"], transform, boxes=[(0, 0, 10, 5)])
    tensor, _ = dataset[0]
    assert tensor.shape == (3, 5, 10)


def _jpeg_with_exif(path, exif_bytes, size=(8, 6)):
    Image.new("RGB", size, "red").save(path, "JPEG", exif=exif_bytes)


def test_exif_orientation_is_applied_even_when_other_exif_tags_are_malformed(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    exif[0x010F] = "maker"
    _jpeg_with_exif(tmp_path / "rotated.jpg", exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg").size == (6, 8)
    # the Make tag (0x010F, ASCII) turned into XResolution (0x011A, a RATIONAL) holding BYTEs, as broken
    # camera firmware writes it: PIL's exif_transpose raises TypeError while rewriting the block
    broken = bytearray(exif.tobytes())
    entry = broken.index(b"\x01\x0f\x00\x02")
    broken[entry:entry + 4] = b"\x01\x1a\x00\x01"
    _jpeg_with_exif(tmp_path / "bad_exif.jpg", bytes(broken))
    assert load_image(tmp_path / "bad_exif.jpg").size == (6, 8)  # the pixels are fine: still upright


def test_unexpected_decoder_errors_become_image_read_errors(folder, monkeypatch):
    import struct

    import simret.data.images as images

    def exploding_open(path):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(images.Image, "open", exploding_open)
    with pytest.raises(ImageReadError, match="unreadable .error: unpack requires"):
        load_image(folder / "a.jpg")
    item = ImageList(folder, ["a.jpg"], RetrievalTransform((0, 0, 0), (1, 1, 1), None))[0]
    assert isinstance(item, Failed) and "unpack requires" in item.reason  # a DataLoader worker survives it
