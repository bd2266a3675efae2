"""What a file that no media decoder reads is, from its first bytes, for the ``*.unidentified`` rejects.

Pillow and libsndfile only say that they do not know a format. Phones, browsers and failed downloads
leave files they cannot read under image and audio names (iPhone photos in HEIC, voice memos in M4A, a
web page saved as ``.jpg``), and the user needs to know which, and how to get a file mbm reads.
"""

from __future__ import annotations

import re

# ISO base media file format (the MP4 family): the major brand after "ftyp" says what the file holds
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AUDIO_MP4_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}

_TO_AUDIO = "convert it to FLAC or WAV first (ffmpeg -i IN -vn OUT.flac)"
_FIX = {  # kind of file -> what to do when it stands where media of that kind are read
    "image": "convert it to JPEG or PNG first",
    "audio": _TO_AUDIO,
    "video": f"{_TO_AUDIO}, for its sound",
    "drawing": "render it to PNG first",
}

# (signature at offset 0, what it is, its kind: image, audio, video, drawing, or None for no media)
_SIGNATURES: tuple[tuple[bytes, str, str | None], ...] = (
    (b"%PDF-", "a PDF document", None),
    (b"PK\x03\x04", "a ZIP archive (or a document format built on one)", None),
    (b"\x1f\x8b", "gzip-compressed data", None),
    (b"\x1a\x45\xdf\xa3", "a WebM/Matroska file", "video"),
    (b"#!AMR", "AMR speech audio", "audio"),
    (b"wvpk", "WavPack audio", "audio"),
    (b"MAC ", "Monkey's Audio (APE)", "audio"),
    (b"MThd", "a MIDI file (notes, not sound)", None),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "a Windows Media file (ASF: WMA or WMV)", "video"),
    (b"\x00\x00\x01\xba", "an MPEG program stream", "video"),
)
_MARKUP = re.compile(rb"\s*(<!doctype html|<html|<\?xml|<svg)", re.IGNORECASE)


def _identify(data: bytes) -> tuple[str, str | None] | None:
    """(what the bytes are, their kind) for a format Pillow and libsndfile do not read, or None."""
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            return "an HEIC/HEIF image (as iPhones save photos)", "image"
        if brand in _AUDIO_MP4_BRANDS:
            return "AAC audio in an MP4 container (.m4a)", "audio"
        if brand[:3] in (b"avi", b"avs"):
            return None  # AVIF: Pillow reads it where it was built with libavif
        return f"an MP4/QuickTime/3GP file (brand {brand.decode('latin-1')!r})", "video"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "an AVI video", "video"
    if _MARKUP.match(data[:512]):
        if b"<svg" in data[:2048].lower():
            return "an SVG drawing", "drawing"
        return "an HTML or XML page (a failed download?)", None
    return next(((what, kind) for signature, what, kind in _SIGNATURES if data.startswith(signature)), None)


def unidentified(data: bytes, column: str, decoder: str) -> str:
    """The detail of an ``image.unidentified`` / ``audio.unidentified`` reject: what the decoder does not
    read, the first bytes, and, where they name a known format, what it is and what to do about it."""
    detail = f"not {decoder}; starts with {data[:16]!r}"
    known = _identify(data)
    if known is None:
        return detail
    what, kind = known
    if kind == column or (column == "audio" and kind == "video") or (column == "image" and kind == "drawing"):
        return f"{detail}; this is {what}: {_FIX[kind]}"
    return f"{detail}; this is {what}, not {'an image' if column == 'image' else 'audio'}: the path or the file is wrong"
