"""Structured test media made in code: pictures, tones and speech-like sounds, and deliberately broken files.

Everything here returns bytes (or a PIL image / numpy array) and is deterministic for a given
``index``; nothing is random noise, so decoders and feature extractors see realistic content.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "stripes", "checker", "gradient")


# --------------------------------------------------------------------------- pictures


def picture(width: int, height: int, *, shape: str = "circle", index: int = 0) -> Image.Image:
    """An RGB picture: a two-colour gradient with ``shape`` drawn on it and, when it fits, a caption."""
    hue = (index * 47) % 256
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    a = np.array([hue, 255 - hue, 96], np.float32)
    b = np.array([40, hue // 2 + 64, 255 - hue // 3], np.float32)
    rgb = a * (1 - x) * (1 - y / 2) + b * (x + y) / 2
    if shape == "stripes":
        rgb = rgb * (0.6 + 0.4 * (np.floor(x * 12) % 2))
    elif shape == "checker":
        rgb = rgb * (0.55 + 0.45 * ((np.floor(x * 8) + np.floor(y * 8)) % 2))
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    if min(width, height) >= 16 and shape == "circle":
        r = min(width, height) // 3
        cx, cy = width // 2, height // 2
        ImageDraw.Draw(im).ellipse(
            (cx - r, cy - r, cx + r, cy + r), fill=(220, 40, 40), outline=(255, 255, 255)
        )
    if min(width, height) >= 32:
        draw = ImageDraw.Draw(im)
        draw.rectangle((2, 2, min(width - 3, 90), 14), fill=(0, 0, 0))
        draw.text((4, 3), f"{shape} #{index}", fill=(255, 255, 0), font=ImageFont.load_default())
    return im


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    """``im`` encoded as ``fmt`` by Pillow."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated(im: Image.Image) -> bytes:
    # Pixels are stored sideways; orientation 6 says "rotate 90° clockwise to display".
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=88, exif=exif)


def _palette(im: Image.Image, transparent: bool = False) -> bytes:
    p = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return save(p, "PNG", transparency=0) if transparent else save(p, "PNG")


def _rgba(im: Image.Image) -> bytes:
    alpha = Image.linear_gradient("L").resize(im.size)
    out = im.copy()
    out.putalpha(alpha)
    return save(out, "PNG")


def _la(im: Image.Image) -> bytes:
    out = im.convert("L")
    out.putalpha(Image.linear_gradient("L").rotate(90).resize(im.size))
    return save(out, "PNG")


def _png16(im: Image.Image) -> bytes:
    gray = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    return save(Image.fromarray(gray), "PNG")  # mode I;16


def _gif_animated(im: Image.Image) -> bytes:
    frames = [im.rotate(angle).convert("P", palette=Image.Palette.ADAPTIVE) for angle in (0, 120, 240)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _webp_rgba(im: Image.Image) -> bytes:
    out = im.copy()
    out.putalpha(Image.linear_gradient("L").resize(im.size))
    return save(out, "WEBP", lossless=True)


@dataclass(frozen=True)
class ImageVariant:
    """One file format / pixel mode / size combination a good image can come in."""

    ext: str
    size: tuple[int, int]
    encode: Callable[[Image.Image], bytes]


# Order matters: build_corpus cycles through these, so the tiny ones come first.
IMAGE_VARIANTS: dict[str, ImageVariant] = {
    "png-1x1": ImageVariant(".png", (1, 1), lambda im: save(im, "PNG")),
    "jpeg-8x8": ImageVariant(".jpg", (8, 8), lambda im: save(im, "JPEG", quality=90)),
    "jpeg-rgb": ImageVariant(".jpg", (320, 240), lambda im: save(im, "JPEG", quality=90)),
    "jpeg-gray": ImageVariant(".jpg", (200, 150), lambda im: save(im.convert("L"), "JPEG", quality=85)),
    "jpeg-cmyk": ImageVariant(".jpg", (160, 120), lambda im: save(im.convert("CMYK"), "JPEG", quality=85)),
    "jpeg-exif-rotated": ImageVariant(".jpg", (240, 160), _exif_rotated),
    "jpeg-progressive": ImageVariant(".jpeg", (256, 256), lambda im: save(im, "JPEG", progressive=True)),
    "jpeg-large-upper-ext": ImageVariant(".JPG", (1024, 768), lambda im: save(im, "JPEG", quality=80)),
    "png-rgb": ImageVariant(".png", (300, 200), lambda im: save(im, "PNG")),
    "png-palette": ImageVariant(".png", (128, 96), _palette),
    "png-palette-transparent": ImageVariant(".png", (96, 128), lambda im: _palette(im, transparent=True)),
    "png-rgba": ImageVariant(".png", (200, 200), _rgba),
    "png-la": ImageVariant(".png", (96, 96), _la),
    "png-1bit": ImageVariant(".png", (64, 64), lambda im: save(im.convert("1"), "PNG")),
    "png-16bit": ImageVariant(".png", (120, 80), _png16),
    "png-tall-strip": ImageVariant(".png", (16, 400), lambda im: save(im, "PNG")),
    "gif": ImageVariant(
        ".gif", (100, 100), lambda im: save(im.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    ),
    "gif-animated": ImageVariant(".gif", (64, 64), _gif_animated),
    "tiff-rgb-lzw": ImageVariant(".tiff", (150, 100), lambda im: save(im, "TIFF", compression="tiff_lzw")),
    "tiff-gray": ImageVariant(".tif", (90, 60), lambda im: save(im.convert("L"), "TIFF")),
    "webp-lossy": ImageVariant(".webp", (180, 120), lambda im: save(im, "WEBP", quality=80)),
    "webp-lossless-rgba": ImageVariant(".webp", (120, 180), _webp_rgba),
    "bmp-rgb": ImageVariant(".bmp", (64, 48), lambda im: save(im, "BMP")),
}

BIG_IMAGE_VARIANTS: dict[str, ImageVariant] = {
    "jpeg-4k": ImageVariant(".jpg", (3840, 2160), lambda im: save(im, "JPEG", quality=85)),
    "png-4k": ImageVariant(".png", (3840, 2160), lambda im: save(im, "PNG", compress_level=1)),
}


def written_by_hand(ext: str, rgb: np.ndarray) -> bytes:
    """``rgb`` (uint8 (H, W, 3)) as a file of a format Pillow reads but cannot write (CUR, DCX, PSD, Sun
    raster, XPM (black and white), FITS (grey), GIMP brush), built from the format's layout."""
    h, w, _ = rgb.shape
    if ext == "cur":  # an ICO holding a BMP, typed as a cursor
        b = bytearray(save(Image.fromarray(rgb), "ICO", sizes=[(w, h)], bitmap_format="bmp"))
        b[2:4] = struct.pack("<H", 2)
        return bytes(b)
    if ext == "dcx":  # a PCX behind DCX's page table
        return struct.pack("<III", 0x3ADE68B1, 12, 0) + save(Image.fromarray(rgb), "PCX")
    if ext == "psd":  # RGB, 8 bits, no colour data, resources or layers; raw planar pixels
        head = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3) + struct.pack(">III", 0, 0, 0)
        return head + struct.pack(">H", 0) + np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    if ext == "ras":  # 24-bit BGR, rows padded to 16 bits
        rows = rgb[:, :, ::-1].reshape(h, w * 3)
        data = np.pad(rows, ((0, 0), (0, (w * 3) % 2))).tobytes()
        return struct.pack(">8I", 0x59A66A95, w, h, 24, len(data), 1, 0, 0) + data
    if ext == "xpm":  # two colours, one character a pixel
        white = rgb.mean(axis=2) > 127
        rows = ",\n".join('"' + "".join("a" if v else "b" for v in r) + '"' for r in white)
        return (f'/* XPM */\nstatic char *x[] = {{\n"{w} {h} 2 1",\n"a c #FFFFFF",\n"b c #000000",\n'
                f"{rows}\n}};\n").encode()
    if ext in ("fit", "fits"):  # 8-bit grey, bottom row first; header and data in 2880-byte blocks
        cards = [f"SIMPLE  = {'T':>20}", f"BITPIX  = {8:>20}", f"NAXIS   = {2:>20}", f"NAXIS1  = {w:>20}",
                 f"NAXIS2  = {h:>20}", "END"]
        data = rgb.mean(axis=2).astype(np.uint8)[::-1].tobytes()
        return "".join(c.ljust(80) for c in cards).ljust(2880).encode() + data + bytes(-len(data) % 2880)
    if ext == "gbr":  # GIMP brush version 2, RGBA
        rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=2)
        return struct.pack(">7I", 30, 2, w, h, 4, 0x47494D50, 10) + b"b\0" + rgba.tobytes()
    raise ValueError(f"no hand-written layout for .{ext}")


HAND_WRITTEN = ("cur", "dcx", "psd", "ras", "xpm", "fit", "fits", "gbr")


def encode_image(variant: ImageVariant, *, shape: str, index: int) -> bytes:
    """The bytes of a picture in ``variant``'s format."""
    return variant.encode(picture(*variant.size, shape=shape, index=index))


# --------------------------------------------------------------------------- sounds


def sound(kind: str, sr: int, channels: int, seconds: float, index: int = 0) -> np.ndarray:
    """A (frames, channels) float32 signal: ``tone`` (harmonic), ``chirp`` (sweep) or ``speech`` (AM voice-like)."""
    t = np.arange(int(sr * seconds), dtype=np.float64) / sr
    nyq = sr / 2
    if kind == "tone":
        f0 = 220.0 * 2 ** ((index % 12) / 12)
        y = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6) if f0 * k < nyq * 0.9)
    elif kind == "chirp":
        f1 = min(4000.0, nyq * 0.8)
        y = np.sin(2 * np.pi * (100.0 * t + (f1 - 100.0) * t**2 / (2 * seconds)))
    elif kind == "speech":
        f0 = 120.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t + index)  # gliding pitch
        phase = 2 * np.pi * np.cumsum(f0) / sr
        # harmonics weighted around two formant-like peaks, gated by a ~4 Hz syllable envelope
        y = sum(
            np.sin(k * phase)
            * (np.exp(-(((k * 150 - 700) / 300) ** 2)) + 0.6 * np.exp(-(((k * 150 - 1200) / 400) ** 2)))
            for k in range(1, 20)
            if k * 180 < nyq * 0.9
        )
        y = y * np.clip(np.sin(2 * np.pi * 4.0 * t) ** 2 * 1.4 - 0.1, 0, 1)
    else:
        raise ValueError(f"unknown sound kind {kind!r}")
    y = 0.5 * y / max(np.abs(y).max(), 1e-9)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)  # 10 ms fades, no clicks
    y = y * fade
    if channels == 1:
        return y[:, None].astype(np.float32)
    shift = int(sr * 0.0005)  # second channel: 0.5 ms later and quieter
    return np.stack([y, 0.7 * np.roll(y, shift)], axis=1).astype(np.float32)


def encode_audio(data: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    """``data`` encoded by libsndfile as ``fmt``/``subtype`` (WAV, FLAC, OGG, MP3)."""
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@dataclass(frozen=True)
class AudioVariant:
    """One container / codec / rate / channel-count combination a good clip can come in."""

    ext: str
    format: str
    subtype: str
    sr: int
    channels: int
    kind: str = "tone"


AUDIO_VARIANTS: dict[str, AudioVariant] = {
    "wav-u8-8k-mono": AudioVariant(".wav", "WAV", "PCM_U8", 8000, 1, "speech"),
    "wav-16-16k-mono": AudioVariant(".wav", "WAV", "PCM_16", 16000, 1, "speech"),
    "wav-24-48k-stereo": AudioVariant(".wav", "WAV", "PCM_24", 48000, 2, "chirp"),
    "wav-float-44k-mono": AudioVariant(".wav", "WAV", "FLOAT", 44100, 1, "tone"),
    "wav-ulaw-8k-mono": AudioVariant(".wav", "WAV", "ULAW", 8000, 1, "speech"),
    "wav-16-96k-stereo": AudioVariant(".wav", "WAV", "PCM_16", 96000, 2, "chirp"),
    "wav-32-22k-mono": AudioVariant(".wav", "WAV", "PCM_32", 22050, 1, "tone"),
    "wav-16-11k-stereo": AudioVariant(".wav", "WAV", "PCM_16", 11025, 2, "speech"),
    "flac-16-44k-stereo": AudioVariant(".flac", "FLAC", "PCM_16", 44100, 2, "speech"),
    "flac-24-96k-mono": AudioVariant(".flac", "FLAC", "PCM_24", 96000, 1, "chirp"),
    "ogg-vorbis-22k-mono": AudioVariant(".ogg", "OGG", "VORBIS", 22050, 1, "speech"),
    "ogg-vorbis-48k-stereo": AudioVariant(".ogg", "OGG", "VORBIS", 48000, 2, "tone"),
    "opus-48k-mono": AudioVariant(".opus", "OGG", "OPUS", 48000, 1, "speech"),
    "opus-16k-stereo": AudioVariant(".opus", "OGG", "OPUS", 16000, 2, "tone"),
    "mp3-44k-stereo": AudioVariant(".mp3", "MP3", "MPEG_LAYER_III", 44100, 2, "speech"),
    "mp3-16k-mono": AudioVariant(".mp3", "MP3", "MPEG_LAYER_III", 16000, 1, "chirp"),
}


def encode_variant(variant: AudioVariant, *, seconds: float, index: int) -> bytes:
    """The bytes of a clip in ``variant``'s format."""
    data = sound(variant.kind, variant.sr, variant.channels, seconds, index)
    return encode_audio(data, variant.sr, variant.format, variant.subtype)


# --------------------------------------------------------------------------- broken files


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width``×``height`` RGB pixels but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bmp_claiming(width: int, height: int) -> bytes:
    """A small BMP whose info header was rewritten to claim ``width``×``height`` pixels."""
    data = bytearray(save(picture(16, 16), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_unknown_compression() -> bytes:
    """A TIFF whose Compression tag names a codec no reader knows (50123), so it cannot be decoded."""
    data = bytearray(save(picture(48, 32, shape="checker"), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", data[entry : entry + 2])[0] == 259:  # Compression, type SHORT
            data[entry + 8 : entry + 10] = struct.pack("<H", 50123)
            return bytes(data)
    raise RuntimeError("Pillow wrote a TIFF without a Compression tag")


PDF_BYTES = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
    b"trailer << /Root 1 0 R >>\n%%EOF\n"
)

HTML_BYTES = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL /photos/cat.png was not found on this server.</p></body></html>\n"
)


def _wav_fmt_offset(wav: bytes) -> int:
    pos = wav.find(b"fmt ")
    if pos < 0:
        raise RuntimeError("no fmt chunk")
    return pos + 8  # start of the fmt payload


def wav_with_channels(wav: bytes, channels: int) -> bytes:
    """``wav`` with the channel count in its fmt chunk overwritten."""
    out = bytearray(wav)
    at = _wav_fmt_offset(wav) + 2
    out[at : at + 2] = struct.pack("<H", channels)
    return bytes(out)


def wav_with_codec(wav: bytes, format_tag: int) -> bytes:
    """``wav`` with the codec (format tag) in its fmt chunk overwritten, e.g. 0x0161 (WMA v2)."""
    out = bytearray(wav)
    at = _wav_fmt_offset(wav)
    out[at : at + 2] = struct.pack("<H", format_tag)
    return bytes(out)


def wav_broken_header(wav: bytes) -> bytes:
    """``wav`` whose chunk headers after ``RIFF....WAVE`` are garbage."""
    return wav[:12] + b"\xde\xad\xbe\xef" * 6 + wav[36:]


def flac_corrupt_frames(flac: bytes) -> bytes:
    """``flac`` with its metadata intact but every 37th byte of the audio frames flipped."""
    pos, last = 4, False  # skip "fLaC", then the metadata blocks
    while not last:
        last = bool(flac[pos] & 0x80)
        pos += 4 + int.from_bytes(flac[pos + 1 : pos + 4], "big")
    out = bytearray(flac)
    for i in range(pos + 16, len(out), 37):
        out[i] ^= 0x5A
    return bytes(out)
