"""Every PIL image mode becomes faithful 8-bit RGB (simret.data.pixels), checked against reference
conversions written here in numpy (never PIL's own convert), on real PNG/TIFF/JPEG/GIF/PGM files where the
mode can be saved, in memory where it cannot."""
import numpy as np
import pytest
from PIL import Image

from simret.data.images import ImageList, RetrievalTransform, load_image, to_tensor
from simret.data.pixels import BACKGROUND, to_rgb

H, W = 7, 9
RNG = np.random.default_rng(11)


def u8(*shape):
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def loaded(image, tmp_path, name):
    """Save ``image`` to ``tmp_path/name``, check it reopens in the expected mode, read it with simret."""
    path = tmp_path / name
    image.save(path)
    return np.asarray(load_image(path)).astype(np.int64), path


def grey(values):
    return np.repeat(np.asarray(values, dtype=np.int64)[..., None], 3, axis=-1)


def over_white(colour, alpha):
    """Straight alpha over the documented background: (c·α + bg·(255 − α)) / 255, rounded."""
    colour, alpha = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
    background = np.asarray(BACKGROUND, dtype=np.float64)
    return np.round((colour * alpha + background * (255.0 - alpha)) / 255.0).astype(np.int64)


def assert_close(actual, expected, tolerance=0):
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= tolerance, f"max difference {difference.max()} > {tolerance}"


# ------------------------------------------------------------------------------------------ 8-bit modes


def test_bilevel_and_grey(tmp_path):
    bits = RNG.integers(0, 2, size=(H, W)).astype(bool)
    for name in ("bits.png", "bits.tif"):
        rgb, path = loaded(Image.fromarray(bits), tmp_path, name)
        assert Image.open(path).mode == "1"
        assert_close(rgb, grey(np.where(bits, 255, 0)))
    values = u8(H, W)
    rgb, _ = loaded(Image.fromarray(values, "L"), tmp_path, "grey.png")
    assert_close(rgb, grey(values))


def test_alpha_modes_are_composited_on_white(tmp_path):
    colour, alpha = u8(H, W, 3), u8(H, W)
    alpha[0, :3] = (0, 255, 128)  # fully transparent, opaque, half
    rgba = Image.fromarray(np.dstack([colour, alpha]), "RGBA")
    for name in ("rgba.png", "rgba.tif"):
        rgb, path = loaded(rgba, tmp_path, name)
        assert Image.open(path).mode == "RGBA"
        assert_close(rgb, over_white(colour, alpha))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == colour[0, 1].tolist()
    level = u8(H, W)
    la = Image.fromarray(np.dstack([level, alpha]), "LA")
    for name in ("la.png", "la.tif"):
        rgb, path = loaded(la, tmp_path, name)
        assert Image.open(path).mode == "LA"
        assert_close(rgb, over_white(grey(level), alpha))


def test_premultiplied_alpha_in_memory():
    alpha = u8(H, W)
    colour = (u8(H, W, 3).astype(np.int64) * alpha[..., None] // 255).astype(np.uint8)  # premultiplied: c ≤ α
    expected = np.minimum(colour.astype(np.int64)
                          + np.round(255.0 * (255 - alpha.astype(np.float64)) / 255.0)[..., None].astype(np.int64),
                          255)
    rgba = Image.frombytes("RGBa", (W, H), np.dstack([colour, alpha]).tobytes())
    assert_close(np.asarray(to_rgb(rgba)), expected)
    la = Image.frombytes("La", (W, H), np.dstack([colour[..., 0], alpha]).tobytes())
    assert_close(np.asarray(to_rgb(la)), np.repeat(expected[..., :1], 3, axis=-1))


def palette_image(indices, palette):
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.reshape(-1).tolist())
    return image


def test_palette_with_and_without_transparency(tmp_path):
    palette = u8(16, 3)
    indices = RNG.integers(0, 16, size=(H, W)).astype(np.uint8)
    rgb, path = loaded(palette_image(indices, palette), tmp_path, "palette.png")
    assert Image.open(path).mode == "P"
    assert_close(rgb, palette[indices].astype(np.int64))
    # PNG tRNS: one alpha per palette entry
    alphas = u8(16)
    image = palette_image(indices, palette)
    image.info["transparency"] = alphas.tobytes()
    rgb, path = loaded(image, tmp_path, "palette_trns.png")
    assert "transparency" in Image.open(path).info
    assert_close(rgb, over_white(palette[indices], alphas[indices]))
    # GIF: one transparent index
    image = palette_image(indices, palette)
    image.save(tmp_path / "palette.gif", transparency=3)
    rgb = np.asarray(load_image(tmp_path / "palette.gif")).astype(np.int64)
    opened = Image.open(tmp_path / "palette.gif")
    gif_palette = np.asarray(opened.getpalette(), dtype=np.int64).reshape(-1, 3)
    gif_indices = np.asarray(opened)
    expected = np.where((gif_indices == opened.info["transparency"])[..., None], 255, gif_palette[gif_indices])
    assert_close(rgb, expected)
    assert (gif_indices == 3).any() and (rgb[indices == 3] == 255).all()


def test_palette_alpha_mode(tmp_path):
    palette = u8(8, 3)
    indices, alpha = RNG.integers(0, 8, size=(H, W)).astype(np.uint8), u8(H, W)
    image = Image.frombytes("PA", (W, H), np.dstack([indices, alpha]).tobytes())
    image.putpalette(palette.reshape(-1).tolist())
    rgb, path = loaded(image, tmp_path, "pa.tif")
    assert Image.open(path).mode == "PA"
    assert_close(rgb, over_white(palette[indices], alpha))


def test_grey_and_rgb_colour_key_transparency(tmp_path):
    level = u8(H, W)
    level[0, 0] = 7
    Image.fromarray(level, "L").save(tmp_path / "key.png", transparency=7)
    rgb = np.asarray(load_image(tmp_path / "key.png")).astype(np.int64)
    assert_close(rgb, np.where((level == 7)[..., None], 255, grey(level)))
    colour = u8(H, W, 3)
    colour[1, 1] = (1, 2, 3)
    Image.fromarray(colour, "RGB").save(tmp_path / "rgbkey.png", transparency=(1, 2, 3))
    rgb = np.asarray(load_image(tmp_path / "rgbkey.png")).astype(np.int64)
    keyed = (colour == (1, 2, 3)).all(-1)[..., None]
    assert_close(rgb, np.where(keyed, 255, colour.astype(np.int64)))


def test_rgbx_cmyk_ycbcr(tmp_path):
    colour = u8(H, W, 3)
    rgbx = Image.frombytes("RGBX", (W, H), np.dstack([colour, u8(H, W)]).tobytes())
    assert_close(np.asarray(to_rgb(rgbx)), colour)
    cmyk = u8(H, W, 4)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    expected = np.round(np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255.0)
    rgb, path = loaded(Image.fromarray(cmyk, "CMYK"), tmp_path, "cmyk.tif")
    assert Image.open(path).mode == "CMYK"
    assert_close(rgb, expected.astype(np.int64))
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)  # lossy: convert what was decoded
    decoded = np.asarray(Image.open(tmp_path / "cmyk.jpg")).astype(np.float64)
    c, m, y, k = (decoded[..., i] for i in range(4))
    expected = np.round(np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255.0)
    assert_close(np.asarray(load_image(tmp_path / "cmyk.jpg")), expected.astype(np.int64))
    ycc = u8(H, W, 3)
    rgb, path = loaded(Image.fromarray(ycc, "YCbCr"), tmp_path, "ycbcr.tif")
    assert Image.open(path).mode == "YCbCr"
    yy, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    expected = np.stack([yy + 1.402 * (cr - 128), yy - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         yy + 1.772 * (cb - 128)], -1)  # JFIF, full range
    assert_close(rgb, np.clip(np.round(expected), 0, 255), tolerance=1)  # PIL's fixed-point arithmetic


def test_hsv_in_memory():
    hsv = u8(H, W, 3)
    hsv[0, :4] = [(0, 255, 255), (85, 255, 255), (170, 255, 128), (12, 0, 77)]
    h, s, v = (hsv[..., i].astype(np.float64) / 255.0 for i in range(3))
    sector = np.floor(h * 6.0) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    expected = np.zeros(hsv.shape)
    for i, channels in enumerate(table):
        expected[sector == i] = np.stack(channels, -1)[sector == i]
    rgb = np.asarray(to_rgb(Image.fromarray(hsv, "HSV")))
    assert_close(rgb, np.round(expected * 255.0), tolerance=1)
    assert rgb[0, :4].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 128], [77, 77, 77]]


def reference_lab_to_srgb(lab):
    """CIE L*a*b* (D50) → XYZ → Bradford to D65 → sRGB, built from the primaries (not simret's matrix)."""
    lightness = lab[..., 0].astype(np.float64) * 100.0 / 255.0
    a, b = lab[..., 1].view(np.int8).astype(np.float64), lab[..., 2].view(np.int8).astype(np.float64)
    fy = (lightness + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    epsilon = 216 / 24389
    kappa = 24389 / 27
    xr = np.where(fx ** 3 > epsilon, fx ** 3, (116 * fx - 16) / kappa)
    yr = np.where(lightness > kappa * epsilon, fy ** 3, lightness / kappa)
    zr = np.where(fz ** 3 > epsilon, fz ** 3, (116 * fz - 16) / kappa)
    d50, d65 = np.array([0.96422, 1.0, 0.82521]), np.array([0.3127 / 0.3290, 1.0, (1 - 0.3127 - 0.3290) / 0.3290])
    xyz50 = np.stack([xr, yr, zr], -1) * d50
    bradford = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    adapt = np.linalg.inv(bradford) @ np.diag((bradford @ d65) / (bradford @ d50)) @ bradford
    primaries = np.array([[0.64, 0.33], [0.30, 0.60], [0.15, 0.06]])
    xyz_primaries = np.stack([primaries[:, 0] / primaries[:, 1], np.ones(3),
                              (1 - primaries.sum(1)) / primaries[:, 1]])  # columns: R, G, B
    to_xyz = xyz_primaries * np.linalg.solve(xyz_primaries, d65)
    linear = np.clip(xyz50 @ adapt.T @ np.linalg.inv(to_xyz).T, 0, 1)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255)


def test_lab(tmp_path):
    lab = u8(H, W, 3)
    lab[..., 1:] = RNG.integers(-60, 60, size=(H, W, 2)).astype(np.int8).view(np.uint8)
    lab[0, 0], lab[0, 1], lab[0, 2] = (255, 0, 0), (0, 0, 0), (128, 0, 0)  # white, black, mid grey
    rgb, path = loaded(Image.fromarray(lab, "LAB"), tmp_path, "lab.tif")
    assert Image.open(path).mode == "LAB"
    assert_close(rgb, reference_lab_to_srgb(lab), tolerance=1)
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 0]
    assert len(set(rgb[0, 2].tolist())) == 1  # a* = b* = 0 is neutral


# ------------------------------------------------------------------------------ 16-bit, 32-bit, float


def by_257(values):
    return grey(np.round(np.asarray(values, dtype=np.float64) / 257.0))


def sixteen_bit():
    values = RNG.integers(0, 65536, size=(H, W)).astype(np.uint16)
    values[0, :6] = [0, 128, 129, 257, 65535, 65407]
    return values


def test_16bit_grey_files_use_the_full_range(tmp_path):
    values = sixteen_bit()
    for name, save_mode, opened_mode in (("g16.png", "I;16", "I;16"), ("g16.tif", "I;16", "I;16"),
                                         ("g16b.tif", "I;16B", "I;16B"), ("g16l.tif", "I;16L", "I;16")):
        image = Image.frombytes(save_mode, (W, H), values.astype(">u2" if save_mode == "I;16B" else "<u2").tobytes())
        rgb, path = loaded(image, tmp_path, name)
        assert Image.open(path).mode == opened_mode
        assert_close(rgb, by_257(values))
    assert rgb[0, :6, 0].tolist() == [0, 0, 1, 1, 255, 255]  # not clipped: 65535 is white, 257 is 1
    native = Image.frombytes("I;16N", (W, H), values.astype("=u2").tobytes())
    assert_close(np.asarray(to_rgb(native)), by_257(values))


def test_16bit_pgm_opens_as_I_and_looks_the_same(tmp_path):
    values = sixteen_bit()
    (tmp_path / "g16.pgm").write_bytes(b"P5\n%d %d\n65535\n" % (W, H) + values.astype(">u2").tobytes())
    assert Image.open(tmp_path / "g16.pgm").mode == "I"
    assert_close(np.asarray(load_image(tmp_path / "g16.pgm")), by_257(values))


def test_32bit_integer(tmp_path):
    values = RNG.integers(0, 65536, size=(H, W)).astype(np.int32)
    rgb, path = loaded(Image.fromarray(values, "I"), tmp_path, "i32.tif")
    assert Image.open(path).mode == "I"
    assert_close(rgb, by_257(values))  # within 0–65535: the 16-bit rule
    wide = RNG.integers(-2_000_000, 3_000_000, size=(H, W)).astype(np.int32)
    rgb, _ = loaded(Image.fromarray(wide, "I"), tmp_path, "i32wide.tif")
    low, high = wide.min(), wide.max()
    assert_close(rgb, grey(np.round((wide - low) * 255.0 / (high - low))))  # the image's own range
    assert rgb.min() == 0 and rgb.max() == 255


def test_float(tmp_path):
    unit = RNG.random((H, W)).astype(np.float32)
    unit[0, :3] = [0.0, 1.0, 0.5]
    rgb, path = loaded(Image.fromarray(unit, "F"), tmp_path, "unit.tif")
    assert Image.open(path).mode == "F"
    assert_close(rgb, grey(np.round(unit.astype(np.float64) * 255.0)))  # 0–1 convention
    wide = (RNG.random((H, W)) * 4000 - 1000).astype(np.float32)
    wide[0, :3] = [np.nan, np.inf, -np.inf]
    rgb, _ = loaded(Image.fromarray(wide, "F"), tmp_path, "wide.tif")
    finite = wide[np.isfinite(wide)].astype(np.float64)
    low, high = finite.min(), finite.max()
    expected = np.round((np.where(np.isfinite(wide), wide, 0).astype(np.float64) - low) * 255.0 / (high - low))
    expected[0, :3] = [0, 255, 0]  # NaN black, +inf top, −inf bottom
    assert_close(rgb, grey(expected))
    assert_close(np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 7e5, np.float32), "F"))), grey(np.zeros((2, 2))))


def test_every_pil_mode_is_covered():
    """Each mode PIL knows gives an RGB picture of the same size (a new PIL mode shows up here)."""
    covered = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
               "I;16", "I;16L", "I;16B", "I;16N", "F"}
    modes = set(getattr(Image, "MODES", covered))
    assert covered <= modes | {"RGBa", "La", "I;16N"}
    for mode in sorted(modes | covered):
        out = to_rgb(Image.new(mode, (W, H)))
        assert out.mode == "RGB" and out.size == (W, H), mode


def test_the_dataset_reads_the_same_pixels(tmp_path):
    """index/search/eval (ImageList + RetrievalTransform) see the converted pixels, not PIL's clipped ones."""
    values = sixteen_bit()
    Image.frombytes("I;16", (W, H), values.astype("<u2").tobytes()).save(tmp_path / "g16.png")
    transform = RetrievalTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), max_size=None)
    tensor, index = ImageList(tmp_path, ["g16.png"], transform)[0]
    expected = to_tensor(Image.fromarray(by_257(values).astype(np.uint8), "RGB"), (0.5,) * 3, (0.25,) * 3)
    assert index == 0 and np.allclose(tensor.numpy(), expected.numpy())
    assert tensor.max() > 1.9  # white pixels present: 65535 was not lost to clipping at 255 … of 65535


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "LA"])
def test_exif_orientation_still_applies(tmp_path, mode):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: the stored W×H picture is shown H×W
    Image.new(mode, (W, H)).save(tmp_path / "o.png", exif=exif.tobytes())
    assert load_image(tmp_path / "o.png").size == (H, W)
