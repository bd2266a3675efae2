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
FIX = {  # kind of file -> what to do when it stands where media of that kind are read
    "image": "convert it to JPEG or PNG first",
    "audio": _TO_AUDIO,
    "video": f"{_TO_AUDIO}, for its sound",
    "drawing": "render it to PNG first",
}

# extensions of media that the cleaners do not decode here, by kind: their files are named with what to do
UNREAD_EXTENSIONS = {
    **dict.fromkeys(("heic", "heif", "jxl"), "image"),
    **dict.fromkeys(("m4a", "m4b", "aac", "wma", "amr", "awb", "ape", "wv", "ac3", "dts", "spx", "mka"), "audio"),
    **dict.fromkeys(("mp4", "m4v", "mov", "webm", "mkv", "avi", "ogv", "3gp", "wmv"), "video"),
    **dict.fromkeys(("svg", "eps"), "drawing"),
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
    (b"\x0b\x77", "Dolby Digital (AC-3) audio", "audio"),
    (b"\x7f\xfe\x80\x01", "DTS audio", "audio"),
)
# the first packet of an Ogg file names its first stream's codec; these are ones libsndfile does not read
# (it reads Vorbis, Opus and FLAC), and it fails on them with an internal or "unimplemented" error
_OGG_CODECS: tuple[tuple[bytes, str, str], ...] = (
    (b"Speex   ", "Speex speech audio in an Ogg file", "audio"),
    (b"\x80theora", "an Ogg Theora video (.ogv)", "video"),
    (b"fishead\x00", "an Ogg file with a Skeleton stream, as Ogg videos (.ogv) have", "video"),
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
    if data[:3] == b"ID3" and len(data) > 10:  # an MP3 behind it libsndfile reads: what else is there?
        rest = data[_id3_end(data):]
        found = None if rest[:3] == b"ID3" else _identify(rest)
        return (f"{found[0]} behind an ID3 tag", found[1]) if found else None
    if data[:1] == b"\xff" and data[1:2] and data[1] & 0xF6 == 0xF0:  # MPEG audio's sync with layer 0
        return "raw AAC audio (ADTS, as .aac files hold it)", "audio"
    if data[:4] == b"OggS":
        return ogg_codec(data)
    return next(((what, kind) for signature, what, kind in _SIGNATURES if data.startswith(signature)), None)


def _id3_end(data: bytes) -> int:
    """Where the audio starts after the ID3v2 tag at the start of ``data``: its size is four 7-bit bytes."""
    size = 0
    for b in data[6:10]:
        size = size << 7 | b & 0x7F
    return 10 + size + (10 if data[5] & 0x10 else 0)  # flag 0x10: a footer follows


def ogg_codec(data: bytes) -> tuple[str, str] | None:
    """(what, kind) for an Ogg file whose first stream has a codec libsndfile does not read, or None."""
    if len(data) < 27:
        return None
    packet = 27 + data[26]  # after the header's segment table
    return next(((what, kind) for start, what, kind in _OGG_CODECS if data.startswith(start, packet)), None)


def unidentified(data: bytes, column: str, decoder: str) -> str:
    """The detail of an ``image.unidentified`` / ``audio.unidentified`` reject: what the decoder does not
    read, the first bytes, and, where they name a known format, what it is and what to do about it."""
    detail = f"not {decoder}; starts with {data[:16]!r}"
    known = _identify(data)
    if known is None:
        return detail
    what, kind = known
    if kind == column or (column == "audio" and kind == "video") or (column == "image" and kind == "drawing"):
        return f"{detail}; this is {what}: {FIX[kind]}"
    return f"{detail}; this is {what}, not {'an image' if column == 'image' else 'audio'}: the path or the file is wrong"
