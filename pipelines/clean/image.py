"""Image cleaner: bytes of any Pillow-readable format -> uint8 (size, size, 3) RGB.

The format is sniffed from the content, never from a file name. Steps: byte limit, ``Image.open``
(header only), pixel limit from the header, JPEG draft decoding for large images, ``load()`` of the first
frame (truncated files are rejected: ``LOAD_TRUNCATED_IMAGES`` stays off), EXIF orientation, conversion
to RGB (alpha composited over ``background``; 16-bit and float images rescaled, not clipped), resize with
BICUBIC and center-crop (``fit="crop"``) or pad (``fit="pad"``). Every failure is a ``CleanError``
with an ``image.*`` reason.

``max_pixels`` is the decompression-bomb limit: Pillow's own (``Image.MAX_IMAGE_PIXELS``, 179 M pixels
for an error) is off while a header is read, so that a larger ``max_pixels`` is honoured and a refusal
names the setting that decides. Colour profiles are not applied, so a PNG
whose compressed metadata (an ICC profile, Photoshop's XMP) unpacks past Pillow's text limits is decoded
without its text and profile chunks rather than refused.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.clean.formats import unidentified
from pipelines.errors import CleanError

log = logging.getLogger(__name__)

FITS = ("crop", "pad")
_REDUCING_GAP = 2.0  # JPEG draft keeps >= 2x the target size, then BICUBIC does the rest
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# PNG chunks of text and colour profile: Pillow unpacks them at open and refuses the whole file when one
# unpacks past PngImagePlugin.MAX_TEXT_CHUNK (1 MB) or all past MAX_TEXT_MEMORY; mbm uses none of them
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP"})
_PNG_TEXT_LIMIT = "PngImagePlugin.MAX_TEXT"
# held while Pillow's pixel limit is off: opening reads headers only, and max_pixels is checked right after
_HEADER_ONLY = threading.Lock()
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


@dataclass(kw_only=True)
class ImageCleanConfig:
    """Output size and fit, safety limits, and the colour transparent pixels and padding get."""

    size: int = 224  # output is (size, size, 3) uint8 RGB
    fit: str = "crop"  # crop (resize short side, center-crop) | pad (resize long side, pad to square)
    max_pixels: int = 64_000_000  # checked from the header, before any pixel is decoded
    max_bytes: int = 64 * 1024 * 1024
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        for name in ("size", "max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageCleanConfig.{name} must be an integer >= 1, got {value!r}")
        if self.fit not in FITS:
            raise ValueError(f"ImageCleanConfig.fit must be one of {', '.join(FITS)}; got {self.fit!r}")
        bg = self.background
        if (
            not isinstance(bg, tuple | list)
            or len(bg) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in bg)
        ):
            raise ValueError(
                f"ImageCleanConfig.background must be 3 integers in 0..255 (R, G, B), got {bg!r}"
            )
        self.background = tuple(bg)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["background"] = list(self.background)  # JSON/TOML friendly; the constructor takes a list back
        return d


def clean_image(data: bytes, cfg: ImageCleanConfig) -> np.ndarray:
    """Decode, orient, convert and fit one image; returns C-contiguous uint8 (size, size, 3)."""
    if len(data) == 0:
        raise CleanError("image.empty", "0 bytes")
    if len(data) > cfg.max_bytes:
        raise CleanError("image.file_too_large", f"{len(data)} bytes, limit is {cfg.max_bytes}")
    img = _open(data, cfg)
    img = _orient(img)
    img = _to_rgb(img, cfg.background)
    img = _fit(img, cfg)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _open(data: bytes, cfg: ImageCleanConfig) -> Image.Image:
    """Open, check the header's pixel count, then decode the first frame's pixels. A PNG refused for
    metadata past Pillow's text limits is decoded again without its text and profile chunks (the
    pixels are fine; photos edited in Photoshop carry megabytes of XMP history)."""
    try:
        return _decode(data, cfg)
    except _PngTextTooLarge as e:
        log.debug("PNG metadata past Pillow's limits (%s): decoding without its text and profile chunks", e)
        return _decode(_without_png_text(data), cfg, retry=False)


def _open_header(data: bytes) -> Image.Image:
    """``Image.open`` (the header; no pixel decoded) without Pillow's pixel limit, which would refuse
    images a ``max_pixels`` above 179 M allows; the caller checks ``max_pixels`` before decoding."""
    with _HEADER_ONLY:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


class _PngTextTooLarge(Exception):
    """Pillow refused a PNG for the size of its text or colour profile chunks, not for its pixels."""


def _decode(data: bytes, cfg: ImageCleanConfig, retry: bool = True) -> Image.Image:
    try:
        img = _open_header(data)
    except Image.DecompressionBombError as e:
        raise CleanError("image.too_large", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, or a plugin failing outside Pillow's identify loop
        raise _error(data, e, "open", retry=retry) from None
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise CleanError(
            "image.too_large",
            f"{img.format} header says {w}x{h} = {w * h} pixels, limit is {cfg.max_pixels} ([image] max_pixels)",
        )
    if w < 1 or h < 1:
        raise CleanError("image.unreadable", f"{img.format} header says {w}x{h}")
    if img.format == "JPEG":
        side = int(cfg.size * _REDUCING_GAP)
        img.draft(None, (side, side))  # DCT scaling: a 4K JPEG decodes at 1/8 the cost
    try:
        img.load()
    except Exception as e:
        raise _error(data, e, "load", img.format, retry) from None
    if _looks_truncated(data, _sniff(data)):  # pixels complete but the file cut short (PNG without IEND)
        raise CleanError("image.truncated", f"{img.format} ({len(data)} bytes) ends before its last chunk")
    return img


def _error(data: bytes, e: Exception, phase: str, fmt: str | None = None, retry: bool = False) -> Exception:
    """Map a Pillow exception to a reason code; the message alone is not reliable, so sniff the bytes too.
    With ``retry``, a PNG refused for its text chunks' size is ``_PngTextTooLarge``, to decode without them."""
    fmt = fmt or _sniff(data)
    if retry and fmt == "PNG" and isinstance(e, ValueError) and _PNG_TEXT_LIMIT in str(e):
        return _PngTextTooLarge(str(e))
    message = _OBJECT_REPR.sub("<bytes>", str(e))  # Pillow names the BytesIO by its address: not reproducible
    what = f"{fmt or 'unknown format'} ({len(data)} bytes): {type(e).__name__}: {message}"
    if isinstance(e, Image.DecompressionBombError | MemoryError):
        return CleanError("image.too_large", what)
    if isinstance(e, EOFError) or "truncated" in str(e).lower() or _looks_truncated(data, fmt):
        return CleanError("image.truncated", what)
    if phase == "open" and fmt is None:
        return CleanError("image.unidentified", unidentified(data, "image", "an image format Pillow reads"))
    return CleanError("image.unreadable", what)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)


def _looks_truncated(data: bytes, fmt: str | None) -> bool:
    """True when the container's own framing says bytes are missing at the end."""
    if fmt == "PNG":
        return not _png_has_iend(data)
    if fmt == "JPEG":  # no EOI after the first start-of-scan (markers cannot occur inside scan data)
        sos = data.find(b"\xff\xda")
        return sos < 0 or data.rfind(b"\xff\xd9") < sos
    if fmt == "GIF":
        return not _gif_has_trailer(data)
    if fmt == "WEBP":
        return len(data) < 8 + struct.unpack("<I", data[4:8])[0]
    return False


def _gif_has_trailer(data: bytes) -> bool:
    """Walk the GIF's blocks: True when its trailer (``;``) is reached or a block is not GIF's (Pillow
    judged the pixels; junk after the trailer is tolerated), False when the data ends first."""
    pos = 13
    if len(data) < pos:
        return False
    if data[10] & 0x80:  # global colour table
        pos += 3 << ((data[10] & 7) + 1)
    while pos < len(data):
        kind = data[pos]
        if kind == 0x3B:
            return True
        if kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif kind == 0x2C:  # image: descriptor, local colour table, LZW code size, then sub-blocks
            if pos + 10 > len(data):
                return False
            packed = data[pos + 9]
            pos += 10 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0) + 1
        else:
            return True
        while pos < len(data) and data[pos]:  # sub-blocks: a length byte, that many bytes; 0 ends them
            pos += 1 + data[pos]
        pos += 1
    return False


def _without_png_text(data: bytes) -> bytes:
    """``data`` (a PNG) without its text and colour profile chunks; every other chunk, and any bytes
    after the last whole chunk (a cut file stays cut), as they are."""
    parts, pos = [data[:8]], 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            break
        if kind not in _PNG_TEXT_CHUNKS:
            parts.append(data[pos:end])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def _png_has_iend(data: bytes) -> bool:
    """Walk the chunk list: True when a complete IEND chunk is reached (junk after it is tolerated)."""
    pos = 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        pos += 12 + length
        if kind == b"IEND":
            return pos <= len(data)
    return False


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; broken EXIF keeps the stored orientation (pixels are still fine)."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception as e:
        log.debug("ignoring unreadable EXIF orientation: %s: %s", type(e).__name__, e)
        return img


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB; alpha (or a transparency key) is composited over ``background``."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        values = np.asarray(img)
        rgb = np.repeat(_scale_to_uint8(values)[..., None], 3, axis=2)
        key = img.info.get("transparency")
        if isinstance(key, int | float) and not isinstance(key, bool):  # a PNG tRNS grey key: that value is transparent
            rgb[values == key] = background
        return Image.fromarray(rgb, mode="RGB")
    try:
        if img.mode == "La":  # premultiplied; Pillow converts it to LA only
            img = img.convert("LA")
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as e:
        raise CleanError("image.unreadable", f"cannot convert mode {img.mode} to RGB: {e}") from None


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Rescale one band of a 16-bit, 32-bit int or float image to 0..255 (never clip to white).

    16-bit: /257 (65535 -> 255). 32-bit int: as is when within 0..255, /257 when within 0..65535 (how
    16-bit PNG/TIFF used to open), else min-max. Float: x255 when within 0..1, else min-max. NaN/Inf -> 0.
    """
    kind = a.dtype.kind
    x = a.astype(np.float32)  # enough for 16 bits, half the memory of float64 on huge scans
    x[~np.isfinite(x)] = 0.0
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if kind == "u" and a.dtype.itemsize == 2:
        x = x / 257.0
    elif kind == "f" and lo >= 0.0 and hi <= 1.0:
        x = x * 255.0
    elif kind == "i" and lo >= 0 and hi <= 255:
        pass  # already 0..255
    elif kind == "i" and lo >= 0 and hi <= 65535:
        x = x / 257.0
    elif hi > lo:
        x = (x - lo) * (255.0 / (hi - lo))
    else:
        x = np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _fit(img: Image.Image, cfg: ImageCleanConfig) -> Image.Image:
    """Resize (BICUBIC, antialiased) so the short side (crop) or long side (pad) is ``size``, then square it.

    A crop resamples only the region it keeps (``box``, in source pixels): the centre crop of the whole
    resized image up to rounding, without ever holding that image (a 65535x1 strip would be 14.7
    million pixels wide at 224 high) or resampling pixels that are cropped away.
    """
    w, h = img.size
    s = cfg.size
    if cfg.fit == "crop":
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = (nw - s) // 2, (nh - s) // 2
        if (nw, nh) == (w, h):
            return img.crop((left, top, left + s, top + s))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        return img.resize((s, s), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    scale = s / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (s, s), cfg.background)
    canvas.paste(img, ((s - nw) // 2, (s - nh) // 2))
    return canvas
