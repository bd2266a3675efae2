"""Media generators for the cleaner tests: every file is built in code, nothing is read from disk."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

RED, GREEN, BLUE = (220, 20, 30), (20, 200, 40), (30, 40, 210)


def encode_image(img: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def stripes(w: int, h: int, colours: tuple[tuple[int, int, int], ...] = (RED, GREEN, BLUE)) -> Image.Image:
    """RGB image of vertical stripes of equal width, left to right."""
    a = np.empty((h, w, 3), np.uint8)
    for i, c in enumerate(colours):
        a[:, i * w // len(colours) : (i + 1) * w // len(colours)] = c
    return Image.fromarray(a)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking RGB PNG whose IHDR (correct CRC) claims width x height; the pixels are not there."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_audio(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def dominant_hz(y: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spectrum)) * sr / len(y)


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    return encode_image


@pytest.fixture
def make_stripes() -> Callable[..., Image.Image]:
    return stripes


@pytest.fixture
def make_png_header() -> Callable[[int, int], bytes]:
    return png_header_only


@pytest.fixture
def make_sine() -> Callable[..., np.ndarray]:
    return sine


@pytest.fixture
def make_audio() -> Callable[..., bytes]:
    return encode_audio


@pytest.fixture
def peak_hz() -> Callable[[np.ndarray, int], float]:
    return dominant_hz


@pytest.fixture(scope="session")
def jpeg_4k() -> bytes:
    """3840x2160 JPEG with red, green and blue vertical thirds; built once per test session."""
    return encode_image(stripes(3840, 2160), "JPEG", quality=90)


@pytest.fixture(scope="session")
def wav_16k() -> bytes:
    """1 s of a 440 Hz sine, amplitude 0.5, 16-bit 16 kHz mono WAV."""
    return encode_audio(sine(440, 1.0, 16000), 16000, "WAV", "PCM_16")
