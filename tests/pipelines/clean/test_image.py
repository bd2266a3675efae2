from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.clean.image import ImageCleanConfig, _to_rgb, clean_image
from pipelines.errors import CleanError

RED, GREEN, BLUE = (220, 20, 30), (20, 200, 40), (30, 40, 210)
CFG = ImageCleanConfig(size=32)
PAD = ImageCleanConfig(size=32, fit="pad", background=(0, 0, 0))


def reason(data: bytes, cfg: ImageCleanConfig = CFG) -> CleanError:
    with pytest.raises(CleanError) as info:
        clean_image(data, cfg)
    assert info.value.reason.startswith("image.")
    return info.value


def mean_rgb(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, 3).mean(axis=0)


def assert_output(a: np.ndarray, size: int = 32) -> None:
    assert a.shape == (size, size, 3) and a.dtype == np.uint8 and a.flags.c_contiguous


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": 0}, "size"),
        ({"fit": "stretch"}, "fit"),
        ({"max_pixels": -5}, "max_pixels"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"background": (0, 0)}, "background"),
        ({"background": (0, 0, 256)}, "background"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageCleanConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    cfg = ImageCleanConfig(size=64, fit="pad", background=[1, 2, 3])
    assert cfg.background == (1, 2, 3)
    assert cfg.to_dict() == {
        "size": 64,
        "fit": "pad",
        "max_pixels": 64_000_000,
        "max_bytes": 64 * 1024 * 1024,
        "background": [1, 2, 3],
    }
    assert ImageCleanConfig(**cfg.to_dict()) == cfg


# --- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, fmt, kw, expected",
    [
        ("RGB", "JPEG", {}, RED),
        ("RGB", "JPEG", {"progressive": True, "optimize": True}, RED),
        ("L", "JPEG", {}, (120, 120, 120)),
        ("RGB", "PNG", {}, RED),
        ("RGB", "GIF", {}, RED),
        ("RGB", "TIFF", {"compression": "tiff_lzw"}, RED),
        ("RGB", "WEBP", {"quality": 95}, RED),
        ("RGB", "BMP", {}, RED),
        ("CMYK", "TIFF", {}, (255, 0, 0)),
    ],
)
def test_formats_decode_to_the_right_colour(make_image, mode, fmt, kw, expected):
    colour = {"RGB": RED, "L": 120, "CMYK": (0, 255, 255, 0)}[mode]
    out = clean_image(make_image(Image.new(mode, (40, 30), colour), fmt, **kw), CFG)
    assert_output(out)
    assert np.allclose(mean_rgb(out), expected, atol=6)


def test_cmyk_jpeg(make_image):
    data = make_image(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.allclose(mean_rgb(clean_image(data, CFG)), (255, 0, 0), atol=8)


def test_format_is_sniffed_from_content_not_name(make_image, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(make_image(Image.new("RGB", (8, 8), GREEN), "PNG"))
    assert np.array_equal(mean_rgb(clean_image(path.read_bytes(), CFG)), GREEN)


def test_trailing_bytes_after_the_image_are_tolerated(make_image):
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        image = make_image(Image.new("RGB", (16, 16), BLUE), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        for junk in (b"\n", b"\x00camera-trailer" * 10):
            assert np.allclose(mean_rgb(clean_image(image + junk, CFG)), BLUE, atol=4), (fmt, junk)


def test_exif_orientation_6_is_applied(make_image):
    # stored 60 wide x 40 high, red left third; orientation 6 = rotate 90 degrees clockwise to display,
    # so the displayed image is 40 wide x 60 high with red on top.
    img = Image.new("RGB", (60, 40), BLUE)
    img.paste(RED, (0, 0, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = clean_image(make_image(img, "JPEG", exif=exif.tobytes(), quality=95), PAD)
    assert_output(out)
    mid = out.shape[1] // 2
    assert np.allclose(out[2, mid], RED, atol=25)
    assert np.allclose(out[-3, mid], BLUE, atol=25)
    assert np.array_equal(out[16, 0], (0, 0, 0)), "portrait: padded left and right"
    assert np.allclose(out[16, mid], BLUE, atol=25)


# --- modes ----------------------------------------------------------------------------------------


def test_palette_png(make_image):
    img = Image.new("P", (10, 10), 1)
    img.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    assert Image.open(io.BytesIO(make_image(img, "PNG"))).mode == "P"
    assert np.array_equal(mean_rgb(clean_image(make_image(img, "PNG"), CFG)), GREEN)


def test_palette_png_with_transparency_uses_background(make_image):
    a = np.ones((10, 20), np.uint8)
    a[:, :10] = 0  # left half index 0: transparent
    img = Image.fromarray(a, mode="L").convert("P")
    img.putpalette([*RED, *BLUE] + [0] * 762)
    data = make_image(img, "PNG", transparency=0)
    out = clean_image(data, ImageCleanConfig(size=20, fit="pad", background=(0, 255, 0)))
    assert np.array_equal(out[10, 2], (0, 255, 0))
    assert np.array_equal(out[10, 17], BLUE)


def test_rgba_alpha_is_composited_over_background(make_image):
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 255
    a[:, 8:, 3] = 255  # right half opaque red, left half fully transparent
    a[:8, :8, 3] = 128  # top-left half-transparent
    out = clean_image(make_image(Image.fromarray(a, "RGBA"), "PNG"), ImageCleanConfig(size=16))
    assert np.array_equal(out[12, 2], (255, 255, 255))
    assert np.array_equal(out[12, 13], (255, 0, 0))
    assert np.allclose(out[2, 2], (255, 127, 127), atol=2)


def test_la_png(make_image):
    a = np.zeros((16, 16, 2), np.uint8)
    a[..., 0] = 40
    a[:, 8:, 1] = 255
    out = clean_image(
        make_image(Image.fromarray(a, "LA"), "PNG"), ImageCleanConfig(size=16, background=(0, 0, 200))
    )
    assert np.array_equal(out[5, 2], (0, 0, 200))
    assert np.array_equal(out[5, 13], (40, 40, 40))


def test_one_bit_png(make_image):
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (8, 0, 16, 16))
    out = clean_image(make_image(img, "PNG"), ImageCleanConfig(size=16))
    assert np.array_equal(out[5, 2], (0, 0, 0)) and np.array_equal(out[5, 13], (255, 255, 255))


def test_16_bit_png_gradient_is_scaled_not_clipped(make_image):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    data = make_image(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = clean_image(data, ImageCleanConfig(size=64, fit="pad"))
    row = out[32, :, 0].astype(int)
    assert row[1] < 10 and row[-2] > 245
    assert 110 < row[32] < 145, "mid-gradient must be mid-grey, not white"
    assert np.all(np.diff(row) >= 0)


def test_16_bit_png_transparency_key_uses_background(make_image):
    grey = np.full((16, 16), 30000, np.uint16)
    grey[:8] = 1234  # the tRNS key: transparent
    data = make_image(Image.fromarray(grey), "PNG", transparency=1234)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = clean_image(data, ImageCleanConfig(size=16, background=(255, 0, 0)))
    assert np.array_equal(out[0, 0], (255, 0, 0)) and np.array_equal(out[-1, -1], (117, 117, 117))


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_wide_modes_in_tiff(make_image, mode):
    if mode == "F":
        a = np.linspace(0.0, 1.0, 64, dtype=np.float32)
        img = Image.fromarray(np.tile(a, (64, 1)), mode="F")
    elif mode == "I":
        img = Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.int32), (64, 1)), mode="I")
    else:
        a = np.tile(np.linspace(0, 65535, 64).astype(">u2"), (64, 1))
        img = Image.frombuffer("I;16B", (64, 64), a.tobytes(), "raw", "I;16B", 0, 1)
    data = make_image(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    row = clean_image(data, ImageCleanConfig(size=64))[10, :, 1].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and 110 < row[32] < 145


def test_in_memory_modes_convert(make_image):
    ycc = Image.new("RGB", (4, 4), RED).convert("YCbCr")
    assert np.allclose(np.asarray(_to_rgb(ycc, (0, 0, 0))), np.full((4, 4, 3), RED), atol=3)
    la = Image.new("LA", (4, 4), (100, 0)).convert("La")
    assert np.array_equal(np.asarray(_to_rgb(la, (9, 8, 7)))[0, 0], (9, 8, 7))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_the_first_frame(make_image, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, GREEN)]
    data = make_image(
        frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True
    )
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert np.allclose(mean_rgb(clean_image(data, CFG)), RED, atol=4)


# --- sizes and fit --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [1, 8])
def test_tiny_images_are_upscaled(make_image, side):
    out = clean_image(make_image(Image.new("RGB", (side, side), GREEN), "PNG"), ImageCleanConfig())
    assert_output(out, 224)
    assert np.array_equal(mean_rgb(out), GREEN)


def test_crop_and_pad_geometry(make_stripes, make_image):
    data = make_image(make_stripes(90, 30), "PNG")  # 3:1, thirds red | green | blue
    crop = clean_image(data, ImageCleanConfig(size=30))
    assert np.array_equal(mean_rgb(crop), GREEN), "center crop keeps the middle third only"
    pad = clean_image(data, ImageCleanConfig(size=30, fit="pad", background=(0, 0, 0)))
    assert np.array_equal(pad[0, 15], (0, 0, 0)) and np.array_equal(pad[-1, 15], (0, 0, 0))
    assert (
        np.array_equal(pad[15, 2], RED)
        and np.array_equal(pad[15, 15], GREEN)
        and np.array_equal(pad[15, 27], BLUE)
    )


def test_crop_resamples_only_the_region_it_keeps(make_image):
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (427, 640, 3), dtype=np.uint8))
    out = clean_image(make_image(photo, "PNG"), ImageCleanConfig())
    whole = photo.resize((336, 224), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((56, 0, 280, 224))
    diff = np.abs(out.astype(int) - np.asarray(whole))
    assert diff.max() <= 1 and diff.mean() < 0.01  # the centre crop of the whole resized image, up to rounding


@pytest.mark.parametrize("size", [(65535, 1), (1, 30000)])
def test_a_thin_strip_is_cropped_without_the_whole_resized_image(make_image, size):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = clean_image(make_image(Image.new("RGB", size, GREEN), "PNG"), ImageCleanConfig())
    assert_output(out, 224)
    assert np.array_equal(mean_rgb(out), GREEN)
    # resizing the whole strip to a short side of 224 would hold 14.7e6 x 224 pixels (~10 GB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_4k_jpeg(jpeg_4k):
    start = time.perf_counter()
    crop = clean_image(jpeg_4k, ImageCleanConfig())
    pad = clean_image(jpeg_4k, ImageCleanConfig(fit="pad", background=(0, 0, 0)))
    assert time.perf_counter() - start < 2.0
    assert_output(crop, 224) and assert_output(pad, 224)
    assert np.allclose(crop[112, 112], GREEN, atol=8)
    assert np.allclose(crop[112, 5], RED, atol=8) and np.allclose(crop[112, -5], BLUE, atol=8)
    assert np.array_equal(pad[3, 112], (0, 0, 0)) and np.allclose(pad[112, 112], GREEN, atol=8)


# --- bad input ------------------------------------------------------------------------------------


def test_zero_bytes_is_empty():
    assert reason(b"").reason == "image.empty"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_files_are_rejected(make_stripes, make_image, fmt):
    data = make_image(make_stripes(64, 48), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    for cut in (0.5, 0.95):
        assert reason(data[: int(len(data) * cut)]).reason == "image.truncated", cut
    assert reason(data[:30]).reason == "image.truncated"


def test_a_gif_cut_inside_a_later_frame_is_truncated(make_image):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    data = make_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert np.array_equal(mean_rgb(clean_image(data, CFG)), RED)
    assert reason(data[:-1]).reason == "image.truncated"  # the trailer is missing
    assert reason(data[:-12]).reason == "image.truncated"  # the last frame is cut


def test_error_details_are_reproducible():
    """Pillow names the stream by its memory address; a reject's detail must not change between runs."""
    detail = reason(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).detail
    assert "0x" not in detail and "<bytes>" in detail


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n",
        b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>",
        b"\x00" * 100,
    ],
    ids=["pdf", "html", "zeros"],
)
def test_non_images_are_unidentified(data):
    assert reason(data).reason == "image.unidentified"


def test_huge_header_is_rejected_before_decoding(make_png_header):
    start = time.perf_counter()
    err = reason(make_png_header(100_000, 100_000))
    assert err.reason == "image.too_large"
    assert time.perf_counter() - start < 0.5
    err = reason(make_png_header(9000, 9000), ImageCleanConfig(max_pixels=50_000_000))
    assert err.reason == "image.too_large" and "9000x9000" in err.detail


def test_max_bytes(make_image):
    data = make_image(Image.new("RGB", (8, 8)), "PNG")
    assert reason(data, ImageCleanConfig(max_bytes=len(data) - 1)).reason == "image.file_too_large"


def _tiff_entry_offset(data: bytes, tag: int) -> int:
    """Byte offset of the value field of ``tag`` in a little-endian TIFF's first IFD."""
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == tag:
            return entry + 8
    raise AssertionError(f"tag {tag} not found")


def test_tiff_with_corrupt_strip_is_unreadable(make_stripes, make_image):
    data = bytearray(make_image(make_stripes(64, 48), "TIFF", compression="tiff_deflate"))
    strip = struct.unpack("<I", data[_tiff_entry_offset(bytes(data), 273) :][:4])[0]
    data[strip : strip + 64] = b"\xab" * 64
    assert reason(bytes(data)).reason == "image.unreadable"


def test_tiff_with_bogus_compression_is_unreadable(make_stripes, make_image):
    data = bytearray(make_image(make_stripes(64, 48), "TIFF"))
    at = _tiff_entry_offset(bytes(data), 259)
    data[at : at + 2] = struct.pack("<H", 12345)
    err = reason(bytes(data))
    assert err.reason == "image.unreadable" and "TIFF" in err.detail


# --- PNG metadata past Pillow's text limits ----------------------------------------------------------


def _png_with(make_image, **save) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in save.pop("text", {}).items():
        info.add_itxt(key, value, zip=True)
    return make_image(Image.new("RGB", (16, 12), RED), "PNG", pnginfo=info, **save)


@pytest.mark.parametrize("what", ["xmp", "icc"])
def test_png_with_metadata_past_pillows_text_limit_is_read(make_image, what):
    """Photoshop's XMP history and big ICC profiles unpack past Pillow's 1 MB text limit
    (``PngImagePlugin.MAX_TEXT_CHUNK``), which refuses the whole file; mbm uses neither, so the pixels land."""
    big = "x" * (2 * 1024 * 1024)
    data = (_png_with(make_image, text={"XML:com.adobe.xmp": big}) if what == "xmp"
            else _png_with(make_image, icc_profile=big.encode()))
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):
        Image.open(io.BytesIO(data)).load()
    assert np.array_equal(mean_rgb(clean_image(data, CFG)), RED)


def test_png_metadata_stripped_keeps_transparency_and_truncation_checks(make_image):
    big = "x" * (2 * 1024 * 1024)
    img = Image.new("RGBA", (16, 12), (*RED, 255))
    img.paste((0, 0, 0, 0), (0, 0, 8, 12))  # left half transparent: the background shows there
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", big, zip=True)
    data = make_image(img, "PNG", pnginfo=info)
    out = clean_image(data, ImageCleanConfig(size=12, fit="pad", background=(0, 0, 255)))
    assert tuple(out[6, 1]) == (0, 0, 255) and tuple(out[6, 10]) == RED
    assert reason(data[:-20]).reason == "image.truncated"  # IEND cut off: still a truncated file


# --- max_pixels and Pillow's decompression-bomb limit ------------------------------------------------


def test_max_pixels_above_pillows_limit_is_honoured(make_image, monkeypatch):
    """Pillow refuses images past 2 x Image.MAX_IMAGE_PIXELS (179 M pixels) whatever [image] max_pixels
    says; a larger max_pixels (scans, satellite tiles) must let them through. Pillow's limit is made
    small here so that a small image stands for a 200 M pixel one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = make_image(Image.new("RGB", (60, 40), RED), "PNG")  # 2400 pixels > 2 x 100
    assert np.array_equal(mean_rgb(clean_image(data, ImageCleanConfig(size=32, max_pixels=10_000))), RED)
    err = reason(data, ImageCleanConfig(size=32, max_pixels=1_000))
    assert err.reason == "image.too_large" and err.detail == "PNG header says 60x40 = 2400 pixels, limit is 1000 ([image] max_pixels)"


def test_pillows_bomb_error_names_max_pixels(make_png_header):
    """An image past Pillow's own limit too is refused naming the setting that decides, not Pillow's 179 M."""
    err = reason(make_png_header(100_000, 100_000), ImageCleanConfig(max_pixels=64_000_000))
    assert err.reason == "image.too_large"
    assert err.detail == "PNG header says 100000x100000 = 10000000000 pixels, limit is 64000000 ([image] max_pixels)"
