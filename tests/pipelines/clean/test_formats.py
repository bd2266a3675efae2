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


def _ogg_page(packet: bytes, flags: int, sequence: int) -> bytes:
    """One Ogg page holding ``packet``, its CRC right (libogg skips a page whose CRC is wrong)."""
    lacing = [255] * (len(packet) // 255) + [len(packet) % 255]
    page = b"OggS" + bytes([0, flags]) + struct.pack("<qIII", 0, 1, sequence, 0) + bytes([len(lacing), *lacing])
    page += packet
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = (crc << 1 ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return page[:22] + struct.pack("<I", crc) + page[26:]


def _ogg(first: bytes) -> bytes:
    """An Ogg file whose first stream starts with the packet ``first``, complete to its end-of-stream page."""
    return _ogg_page(first, 0x02, 0) + _ogg_page(b"comments" + bytes(20), 0, 1) + _ogg_page(bytes(200), 0x04, 2)


ADTS = bytes.fromhex("fff15080021ffc") + bytes(300)


@pytest.mark.parametrize(("data", "says"), [
    (ADTS, "this is raw AAC audio (ADTS, as .aac files hold it): convert it to FLAC or WAV first (ffmpeg -i IN"),
    (b"ID3\x04\x00\x00\x00\x00\x00\x05title" + ADTS,
     "this is raw AAC audio (ADTS, as .aac files hold it) behind an ID3 tag: convert it to FLAC or WAV first"),
    (b"\x0b\x77" + bytes(300), "this is Dolby Digital (AC-3) audio: convert it to FLAC or WAV first"),
    (bytes.fromhex("7ffe8001") + bytes(300), "this is DTS audio: convert it to FLAC or WAV first"),
    (_ogg(b"Speex   1.2rc1" + bytes(66)), "this is Speex speech audio in an Ogg file: convert it to FLAC or WAV"),
    (_ogg(b"\x80theora" + bytes(34)), "this is an Ogg Theora video (.ogv): convert it to FLAC or WAV first (ffmpeg "
                                      "-i IN -vn OUT.flac), for its sound"),
])
def test_audio_codecs_libsndfile_does_not_read_are_named(data, says):
    with pytest.raises(CleanError) as e:
        clean_audio(data, AudioCleanConfig())
    assert e.value.reason == "audio.unidentified"  # an Ogg Speex file was 'Unspecified internal error', Theora
    assert says in e.value.detail                  # 'audio.truncated' when its last page was not at the end


def test_an_id3_tag_before_nothing_known_or_before_another_tag_names_nothing():
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x00"
    assert unidentified(tag + bytes(64), "audio", "x") == f"not x; starts with {(tag + bytes(6))!r}"
    assert unidentified(tag * 5000 + ADTS, "audio", "x") == f"not x; starts with {(tag + tag[:6])!r}"
