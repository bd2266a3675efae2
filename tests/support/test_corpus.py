"""Self-checks for the messy test corpus: it builds fast, its expectations add up, and its media are what they claim."""

from __future__ import annotations

import io
import json
import tarfile
import time
import unicodedata
from pathlib import Path

import corpus
import media_synth as ms
import numpy as np
import pytest
import soundfile as sf
from PIL import Image


def _records(c: corpus.Corpus) -> dict[str, dict]:
    """Manifest records that parse as JSON objects with a string id, by id (first occurrence wins)."""
    out: dict[str, dict] = {}
    for raw in c.manifest.read_bytes().split(b"\n"):
        try:
            rec = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec["id"]:
            out.setdefault(rec["id"], rec)
    return out


def _decode_image(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return im


def _decode_audio(path: Path) -> tuple[np.ndarray, int]:
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    if data.shape[0] == 0 or not np.isfinite(data).all():
        raise ValueError(f"{path.name}: empty or non-finite")
    return data, sr


def test_builds_fast_and_outcomes_add_up(tmp_path: Path) -> None:
    start = time.perf_counter()
    c = corpus.build_corpus(tmp_path, n_good=60)
    assert time.perf_counter() - start < 10.0
    assert len(c.good) == 60
    assert c.bad >= 30
    groups = [set(c.good), set(c.repaired), set(c.partial), set(c.rejected)]
    assert sum(len(g) for g in groups) == c.n_lines == len(set().union(*groups))
    physical = c.manifest.read_bytes().split(b"\n")
    assert c.n_lines == sum(1 for line in physical if line.strip())
    assert set(c.rejected.values()) <= {"read", "clean"}
    assert all(reason.split(".")[0] in {"text", "image", "audio", "file"} for _, reason in c.partial.values())


def test_same_seed_same_manifest(tmp_path: Path) -> None:
    a = corpus.build_corpus(tmp_path / "a", n_good=12, seed=3)
    b = corpus.build_corpus(tmp_path / "b", n_good=12, seed=3)
    other = corpus.build_corpus(tmp_path / "c", n_good=12, seed=4)
    assert a.manifest.read_bytes() == b.manifest.read_bytes() != other.manifest.read_bytes()
    assert a.rejected == b.rejected


def test_referenced_files_exist_except_deliberately_missing(messy_corpus: corpus.Corpus) -> None:
    c = messy_corpus
    data = c.manifest.parent
    seen_missing = set()
    for rec in _records(c).values():
        for m in ("image", "audio"):
            rel = rec.get(m)
            if not isinstance(rel, str):
                continue
            path = data / rel
            if rel in c.missing:
                assert not path.exists()
                seen_missing.add(rel)
            elif rel in c.escaping:
                assert path.exists() and not path.resolve().is_relative_to(data.resolve())
            else:
                assert path.is_file(), rel
    assert seen_missing == c.missing and len(c.missing) == 2


def test_every_variant_and_script_is_covered(messy_corpus: corpus.Corpus) -> None:
    used = {v for names in messy_corpus.variants.values() for v in names.split()}
    assert {f"image:{n}" for n in ms.IMAGE_VARIANTS} <= used
    assert {f"audio:{n}" for n in ms.AUDIO_VARIANTS} <= used
    texts = " ".join(
        r["text"] for k, r in _records(messy_corpus).items() if k in messy_corpus.good and r.get("text")
    )
    names = {unicodedata.name(ch, "").split(" ")[0] for ch in texts}
    assert {
        "LATIN",
        "CYRILLIC",
        "GREEK",
        "ARABIC",
        "HEBREW",
        "DEVANAGARI",
        "CJK",
        "HIRAGANA",
        "HANGUL",
        "THAI",
    } <= names
    assert any(unicodedata.category(ch) == "So" and ord(ch) > 0x1F000 for ch in texts)  # emoji


def test_good_media_decode_as_their_variant_says(messy_corpus: corpus.Corpus) -> None:
    data = messy_corpus.manifest.parent
    records = _records(messy_corpus)
    for sid, variant in messy_corpus.variants.items():
        rec = records[sid]
        for part in variant.split():
            kind, name = part.split(":")
            if kind == "image":
                im = _decode_image(data / rec["image"])
                v = ms.IMAGE_VARIANTS[name]
                assert im.size == (v.size if name != "jpeg-exif-rotated" else v.size[::-1]), sid
                assert {"jpeg-cmyk": "CMYK", "png-16bit": "I;16", "png-1bit": "1", "png-la": "LA"}.get(
                    name, im.mode
                ) == im.mode
                if name == "jpeg-exif-rotated":
                    assert im.getexif()[0x0112] == 6
                if name == "jpeg-progressive":
                    assert im.info.get("progressive")
            else:
                audio, sr = _decode_audio(data / rec["audio"])
                v = ms.AUDIO_VARIANTS[name]
                assert (sr, audio.shape[1]) == (v.sr, v.channels), sid
                assert np.abs(audio).max() > 0.05  # not silence


def test_bad_media_fail_to_decode_and_repairable_ones_decode(messy_corpus: corpus.Corpus) -> None:
    data = messy_corpus.manifest.parent
    records = _records(messy_corpus)
    dropped = {sid: reason for sid, (_, reason) in messy_corpus.partial.items()}
    dropped.update({sid: "" for sid, stage in messy_corpus.rejected.items() if stage == "clean"})
    for sid, reason in dropped.items():
        rec = records[sid]
        for m, decode in (("image", _decode_image), ("audio", _decode_audio)):
            if isinstance(rec.get(m), str) and (reason.startswith((m, "file")) or not reason):
                with pytest.raises(Exception):  # noqa: B017 - any decoder error will do
                    decode(data / rec[m])
    assert _decode_image(data / records["bad-png-named-jpg"]["image"]).format == "PNG"
    assert _decode_audio(data / records["bad-mp3-named-wav"]["audio"])[1] == 44100


def test_text_traps_are_in_the_manifest(messy_corpus: corpus.Corpus) -> None:
    raw = messy_corpus.manifest.read_bytes()
    latin1 = [line for line in raw.split(b"\n") if b"bad-latin1-text" in line]
    assert len(latin1) == 2
    for line in latin1:
        with pytest.raises(UnicodeDecodeError):
            line.decode("utf-8")
    records = _records(messy_corpus)
    assert records["bad-bom-crlf-text"]["text"].startswith("\ufeff")
    assert "\r\n" in records["bad-bom-crlf-text"]["text"]
    assert "\x00" in records["bad-control-chars"]["text"] and "\u2028" in records["bad-control-chars"]["text"]
    assert not raw.endswith(b"\n")


def test_wds_corpus_has_img2dataset_layout(tmp_path: Path) -> None:
    root = corpus.write_wds_corpus(tmp_path / "wds", n=20)
    names = []
    for tar in sorted(root.glob("*.tar")):
        with tarfile.open(tar) as tf:
            names += tf.getnames()
            first = tf.getnames()[0].split(".")[0]
            meta = json.load(tf.extractfile(f"{first}.json"))
            assert meta["key"] == first and meta["status"] == "success"
            assert Image.open(io.BytesIO(tf.extractfile(f"{first}.jpg").read())).format == "JPEG"
    keys = {n.split(".")[0] for n in names}
    assert len(keys) == 20 and len(names) == 60
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
