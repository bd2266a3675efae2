from __future__ import annotations

import struct

import pytest

from pipelines.clean import AudioCleanConfig, ImageCleanConfig, clean_audio, clean_image
from pipelines.clean.formats import unidentified
from pipelines.errors import CleanError


def _mp4(brand: bytes) -> bytes:
    return struct.pack(">I4s4sI", 24, b"ftyp", brand, 0) + brand + b"mif1" + bytes(200)


HTML = b"\r\n  <!DOCTYPE html><html><body>Not Found</body></html>"
SVG = b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'


@pytest.mark.parametrize(("data", "image_says", "audio_says"), [
    (_mp4(b"heic"), "this is an HEIC/HEIF image (as iPhones save photos): convert it to JPEG or PNG first",
     "this is an HEIC/HEIF image (as iPhones save photos), not audio: the path or the file is wrong"),
    (_mp4(b"M4A "), "this is AAC audio in an MP4 container (.m4a), not an image: the path or the file is wrong",
     "this is AAC audio in an MP4 container (.m4a): convert it to FLAC or WAV first (ffmpeg -i IN -vn OUT.flac)"),
    (_mp4(b"isom"), "this is an MP4/QuickTime/3GP file (brand 'isom'), not an image",
     "this is an MP4/QuickTime/3GP file (brand 'isom'): convert it to FLAC or WAV first (ffmpeg -i IN -vn "
     "OUT.flac), for its sound"),
    (HTML, "this is an HTML or XML page (a failed download?), not an image: the path or the file is wrong",
     "this is an HTML or XML page (a failed download?), not audio"),
    (SVG, "this is an SVG drawing: render it to PNG first", "this is an SVG drawing, not audio"),
    (b"%PDF-1.7\n" + bytes(64), "this is a PDF document, not an image", "this is a PDF document, not audio"),
    (b"#!AMR\n" + bytes(64), "this is AMR speech audio, not an image", "this is AMR speech audio: convert it to FLAC"),
    (bytes.fromhex("1a45dfa3") + bytes(64), "this is a WebM/Matroska file, not an image",
     "this is a WebM/Matroska file: convert it to FLAC or WAV first"),
])
def test_an_unidentified_file_says_what_it_is_and_what_to_do(data, image_says, audio_says):
    for clean, cfg, says, decoder in ((clean_image, ImageCleanConfig(), image_says, "an image format Pillow reads"),
                                      (clean_audio, AudioCleanConfig(), audio_says, "an audio format libsndfile reads")):
        with pytest.raises(CleanError) as e:
            clean(data, cfg)
        assert e.value.reason.endswith(".unidentified")
        assert e.value.detail.startswith(f"not {decoder}; starts with {data[:16]!r}; ")
        assert says in e.value.detail


def test_bytes_that_name_no_known_format_are_only_shown():
    data = bytes(range(1, 40))
    assert unidentified(data, "image", "an image format Pillow reads") == (
        f"not an image format Pillow reads; starts with {data[:16]!r}")
    assert unidentified(_mp4(b"avif"), "image", "x") == f"not x; starts with {_mp4(b'avif')[:16]!r}"  # Pillow's own
