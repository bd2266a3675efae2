"""A messy end-to-end corpus built in code, a look-alike of the real one the preprocessing job is accepted on.

``build_corpus`` writes ``n_good`` good samples that cycle through every image format / pixel mode /
size and every audio container / codec / rate / channel count in ``media_synth``, with texts in many
scripts, plus about 35 bad inputs (one sample per kind), and returns what the pipeline must do with
each: land it, land it after repair, land it with a modality dropped, or reject it.

Layout: ``ROOT/data/manifest.jsonl`` with media under ``ROOT/data/{images,audio,bad}/``; media paths
in the manifest are relative to ``ROOT/data``. ``ROOT/outside.png`` exists only so that the
folder-escaping path points at a real file.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import media_synth as ms
import numpy as np

MANIFEST = "manifest.jsonl"

TEXTS: tuple[str, ...] = (
    "A red circle on a blue gradient, seen from above.",
    "Un cercle rouge sur un dégradé bleu — déjà vu, naïve façade.",
    "Größe, Maß und Übermut: ein grünes Quadrat auf weißem Grund.",
    "Tiếng Việt có sáu thanh điệu và nhiều dấu phụ.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق",
    "דג סקרן שט בים מאוכזב ולפתע מצא חברה",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णु",
    "我能吞下玻璃而不伤身体。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "다람쥐 헌 쳇바퀴에 타고파",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน",
    "Sunset 🌅 over the sea 🌊 with family 👩‍👩‍👧 and a 🇯🇵 flag, skin tones 👍🏽",
    "Combining marks: Cafe\u0301 (NFD) next to Café (NFC), and Å vs A\u030a.",
    "Mixed direction: the word שלום and the word مرحبا both mean a greeting.",
)

LONG_TEXT = " ".join(TEXTS[:3]) * 120  # ~20 000 characters: the text cleaner must truncate, not fail

# Modalities of good sample i cycle through these (T = text, I = image, A = audio).
PATTERNS: tuple[str, ...] = ("TI", "TIA", "TA", "TI", "I", "TIA", "A", "TI", "TA", "T", "IA", "TI")

# Every tenth good sample gets an id that is not tar-safe, so the shard key must be a hash.
ODD_IDS: tuple[str, ...] = (
    "photos/2019/IMG_{i:04d}.JPG",
    "ünïcødé id {i}",
    "a.b.c.{i}",
    "h-looks-hashed-{i}",
)


@dataclass
class Corpus:
    """A built corpus and what the pipeline must do with each manifest line.

    Keys are sample ids, or ``"manifest.jsonl:LINE"`` (1-based physical line, the reject's ``source``)
    for lines without a usable id and for the second occurrence of a duplicated id, whose first
    occurrence is good. ``root`` is the folder given to ``build_corpus``; media paths in the manifest
    are relative to ``manifest.parent``.
    """

    root: Path
    manifest: Path
    good: dict[str, set[str]]  # id -> modalities that must land with features
    repaired: dict[str, set[str]]  # id accepted after repair -> modalities that must land
    partial: dict[str, tuple[set[str], str]]  # id -> (modalities that land, reason prefix of the dropped one)
    rejected: dict[str, str]  # id or "manifest.jsonl:LINE" -> expected stage prefix ("read", "clean")
    n_lines: int  # non-blank manifest lines = index rows expected
    missing: set[str] = field(default_factory=set)  # manifest paths that deliberately do not exist
    escaping: set[str] = field(default_factory=set)  # manifest paths that deliberately leave the data folder
    variants: dict[str, str] = field(default_factory=dict)  # good id -> "image:png-16bit audio:opus-48k-mono"

    @property
    def bad(self) -> int:
        """Number of deliberately bad inputs (repaired, partial or rejected)."""
        return len(self.repaired) + len(self.partial) + len(self.rejected)


@dataclass(frozen=True)
class _Expect:
    kind: str  # good | repaired | partial | rejected
    lands: frozenset[str] = frozenset()
    prefix: str = ""  # partial: reason prefix of the dropped modality; rejected: stage prefix


def _repaired(*mods: str) -> _Expect:
    return _Expect("repaired", frozenset(mods))


def _partial(reason: str, *mods: str) -> _Expect:
    return _Expect("partial", frozenset(mods), reason)


def _rejected(stage: str) -> _Expect:
    return _Expect("rejected", prefix=stage)


@dataclass
class _Line:
    raw: bytes
    key: str | None  # None: keyed by line number
    expect: _Expect | None  # None: a blank line
    variant: str = ""
    after: str = ""  # id of a line this one must follow (a duplicate id follows its original)


class _Builder:
    """Writes media files and collects manifest lines with their expected outcomes."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.lines: list[_Line] = []
        self.missing: set[str] = set()
        self.escaping: set[str] = set()

    def file(self, rel: str, content: bytes) -> str:
        path = self.data / rel.removeprefix("./")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return rel

    def sample(self, sid: str, expect: _Expect | None = None, *, variant: str = "", **fields: object) -> None:
        record: dict[str, object] = {"id": sid}
        for name in ("text", "image", "audio", "label"):
            value = fields.get(name)
            if value is not None or len(self.lines) % 2:  # absent keys and explicit nulls, alternately
                record[name] = value
        if expect is None:
            present = {m for m in ("text", "image", "audio") if fields.get(m)}
            expect = _Expect("good", frozenset(present))
        self.line(json.dumps(record, ensure_ascii=False).encode("utf-8"), sid, expect, variant)

    def line(self, raw: bytes, key: str | None, expect: _Expect | None, variant: str = "") -> None:
        self.lines.append(_Line(raw, key, expect, variant))


def build_corpus(root: Path, *, n_good: int = 60, big_image: bool = False, seed: int = 0) -> Corpus:
    """Write the messy corpus under ``root`` and return its manifest and expected outcomes."""
    if n_good < 1:
        raise ValueError(f"n_good must be at least 1, got {n_good}")
    root = Path(root)
    b = _Builder(root / "data")
    first_id = _add_good(b, n_good, big_image)
    _add_bad_images(b)
    _add_bad_audio(b)
    _add_repairable(b)
    _add_bad_text(b)
    _add_escape(b, root)
    rng = random.Random(seed)
    lines = list(b.lines)
    rng.shuffle(lines)
    for line in _bad_lines(first_id):
        low = 1 + next(i for i, x in enumerate(lines) if x.key == line.after) if line.after else 0
        lines.insert(rng.randint(low, len(lines)), line)
    lines.insert(3, _Line(b"", None, None))
    lines.insert(len(lines) // 2, _Line(b"  \t ", None, None))
    manifest = b.data / MANIFEST
    # the last line gets no newline, as in the wild
    manifest.write_bytes(b"\n".join(line.raw for line in lines))
    return _collect(root, manifest, lines, b)


def _collect(root: Path, manifest: Path, lines: list[_Line], b: _Builder) -> Corpus:
    c = Corpus(root, manifest, {}, {}, {}, {}, 0, b.missing, b.escaping)
    for number, line in enumerate(lines, start=1):
        if line.expect is None:
            continue
        c.n_lines += 1
        key = line.key or f"{MANIFEST}:{number}"
        e = line.expect
        if e.kind == "good":
            c.good[key] = set(e.lands)
            c.variants[key] = line.variant
        elif e.kind == "repaired":
            c.repaired[key] = set(e.lands)
        elif e.kind == "partial":
            c.partial[key] = (set(e.lands), e.prefix)
        else:
            c.rejected[key] = e.prefix
    return c


def _good_id(i: int) -> str:
    if i % 10 == 9:
        return ODD_IDS[(i // 10) % len(ODD_IDS)].format(i=i)
    return f"good-{i:04d}"


def _add_good(b: _Builder, n_good: int, big_image: bool) -> str:
    images, audios = list(ms.IMAGE_VARIANTS), list(ms.AUDIO_VARIANTS)
    n_img = n_aud = n_txt = 0
    for i in range(n_good):
        mods, shape = PATTERNS[i % len(PATTERNS)], ms.SHAPES[i % len(ms.SHAPES)]
        fields: dict[str, object] = {"label": shape}
        variant = []
        if "T" in mods:
            fields["text"] = LONG_TEXT if i == 15 else "" if i == 7 else TEXTS[n_txt % len(TEXTS)]
            n_txt += 1
        if "I" in mods:
            name = images[n_img % len(images)]
            v = ms.IMAGE_VARIANTS[name]
            stem = f"{i:04d} café photo" if i == 3 else f"{i:04d}-{name}"  # spaces and non-ASCII in a path
            rel = f"./images/{stem}{v.ext}" if i == 4 else f"images/{stem}{v.ext}"
            fields["image"] = b.file(rel, ms.encode_image(v, shape=shape, index=i))
            variant.append(f"image:{name}")
            n_img += 1
        if "A" in mods:
            name = audios[n_aud % len(audios)]
            v = ms.AUDIO_VARIANTS[name]
            data = ms.encode_variant(v, seconds=0.4 + 0.15 * (i % 5), index=i)
            fields["audio"] = b.file(f"audio/{i:04d}-{name}{v.ext}", data)
            variant.append(f"audio:{name}")
            n_aud += 1
        b.sample(_good_id(i), variant=" ".join(variant), **fields)
    if big_image:
        for name, v in ms.BIG_IMAGE_VARIANTS.items():
            image = b.file(f"images/big-{name}{v.ext}", ms.encode_image(v, shape="circle", index=0))
            b.sample(
                f"good-big-{name}", variant=f"image:{name}", text="A 4K frame.", image=image, label="circle"
            )
    return _good_id(0)


def _add_bad_images(b: _Builder) -> None:
    jpeg = ms.encode_image(ms.IMAGE_VARIANTS["jpeg-rgb"], shape="stripes", index=900)
    png = ms.encode_image(ms.IMAGE_VARIANTS["png-rgb"], shape="checker", index=901)
    good_audio = ms.encode_variant(ms.AUDIO_VARIANTS["wav-16-16k-mono"], seconds=0.5, index=902)
    text = "A caption whose image is broken."
    no_image = _partial("image.", "text")
    b.sample(
        "bad-truncated-jpeg", _rejected("clean"), image=b.file("bad/truncated.jpg", jpeg[: len(jpeg) // 2])
    )
    b.sample(
        "bad-truncated-png", no_image, text=text, image=b.file("bad/truncated.png", png[: len(png) // 2])
    )
    b.sample("bad-zero-byte-jpg", _rejected("clean"), image=b.file("bad/empty.jpg", b""))
    b.sample("bad-pdf-as-jpg", no_image, text=text, image=b.file("bad/document.jpg", ms.PDF_BYTES))
    b.sample(
        "bad-html-as-png",
        _partial("image.", "audio"),
        image=b.file("bad/not_found.png", ms.HTML_BYTES),
        audio=b.file("bad/fine-audio-next-to-html.wav", good_audio),
    )
    b.sample(
        "bad-huge-header-png",
        no_image,
        text=text,
        image=b.file("bad/huge.png", ms.png_claiming(100_000, 100_000)),
    )
    b.sample(
        "bad-huge-header-bmp",
        _rejected("clean"),
        image=b.file("bad/huge.bmp", ms.bmp_claiming(100_000, 100_000)),
    )
    b.sample(
        "bad-unreadable-tiff",
        no_image,
        text=text,
        image=b.file("bad/unknown-codec.tif", ms.tiff_unknown_compression()),
    )
    b.missing.add("images/does-not-exist.jpg")
    b.sample(
        "bad-missing-image", _partial("file.missing", "text"), text=text, image="images/does-not-exist.jpg"
    )


def _add_bad_audio(b: _Builder) -> None:
    speech = ms.sound("speech", 16000, 1, 0.6, index=910)
    wav = ms.encode_audio(speech, 16000, "WAV", "PCM_16")
    ogg = ms.encode_audio(ms.sound("speech", 22050, 1, 1.5, index=911), 22050, "OGG", "VORBIS")
    flac = ms.encode_audio(ms.sound("chirp", 44100, 2, 1.0, index=912), 44100, "FLAC", "PCM_16")
    nan, inf = speech.copy(), speech.copy()
    nan[100:400] = np.nan
    inf[500:520] = np.inf
    text = "A caption whose audio is broken."
    no_audio = _partial("audio.", "text")
    b.sample(
        "bad-zero-byte-wav", _partial("file.empty", "text"), text=text, audio=b.file("bad/empty.wav", b"")
    )
    b.sample(
        "bad-wav-broken-header",
        _rejected("clean"),
        audio=b.file("bad/broken-header.wav", ms.wav_broken_header(wav)),
    )
    b.sample(
        "bad-wav-zero-channels",
        no_audio,
        text=text,
        audio=b.file("bad/zero-channels.wav", ms.wav_with_channels(wav, 0)),
    )
    b.sample(
        "bad-wav-unknown-codec",
        no_audio,
        text=text,
        audio=b.file("bad/wma-codec.wav", ms.wav_with_codec(wav, 0x0161)),
    )
    b.sample(
        "bad-truncated-ogg", _rejected("clean"), audio=b.file("bad/truncated.ogg", ogg[: len(ogg) * 3 // 5])
    )
    good_image = b.file(
        "bad/fine-image-next-to-flac.png",
        ms.encode_image(ms.IMAGE_VARIANTS["png-rgb"], shape="circle", index=913),
    )
    corrupt = b.file("bad/corrupt.flac", ms.flac_corrupt_frames(flac))
    b.sample(
        "bad-corrupt-flac", _partial("audio.", "text", "image"), text=text, image=good_image, audio=corrupt
    )
    b.sample(
        "bad-nan-samples",
        no_audio,
        text=text,
        audio=b.file("bad/nan.wav", ms.encode_audio(nan, 16000, "WAV", "FLOAT")),
    )
    b.sample(
        "bad-inf-samples",
        _rejected("clean"),
        audio=b.file("bad/inf.wav", ms.encode_audio(inf, 16000, "WAV", "FLOAT")),
    )
    zero = ms.encode_audio(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16")
    b.sample("bad-zero-frame-wav", no_audio, text=text, audio=b.file("bad/zero-frames.wav", zero))
    b.missing.add("audio/does-not-exist.wav")
    b.sample("bad-missing-audio", _rejected("clean"), audio="audio/does-not-exist.wav")
    b.sample(
        "bad-all-modalities",
        _rejected("clean"),
        image=b.file(
            "bad/truncated-again.jpg",
            ms.encode_image(ms.IMAGE_VARIANTS["jpeg-gray"], shape="circle", index=914)[:600],
        ),
        audio=b.file("bad/zero-frames-again.wav", zero),
    )


def _add_repairable(b: _Builder) -> None:
    png = ms.encode_image(ms.IMAGE_VARIANTS["png-rgba"], shape="circle", index=920)
    mp3 = ms.encode_variant(ms.AUDIO_VARIANTS["mp3-44k-stereo"], seconds=0.8, index=921)
    photo = ms.encode_image(ms.IMAGE_VARIANTS["jpeg-rgb"], shape="gradient", index=922)
    b.sample(
        "bad-png-named-jpg",
        _repaired("text", "image"),
        text="A PNG saved with a .jpg name.",
        image=b.file("bad/really-a-png.jpg", png),
    )
    b.sample("bad-mp3-named-wav", _repaired("audio"), audio=b.file("bad/really-an-mp3.wav", mp3))
    b.sample(
        "bad-bom-crlf-text",
        _repaired("text", "image"),
        text="\ufeffFirst line of a note written on Windows.\r\nSecond line.\r\n",
        image=b.file("images/bom-crlf-photo.jpg", photo),
    )
    control = "Tab\there, bell\x07, NUL\x00, ANSI \x1b[31mred\x1b[0m, DEL\x7f, NEL\x85, LS\u2028, zero-width\u200bjoin."
    b.sample("bad-control-chars", _repaired("text"), text=control)


def _add_bad_text(b: _Builder) -> None:
    # Raw Latin-1 bytes inside the JSON line, i.e. invalid UTF-8 in the manifest file itself.
    latin1 = "Café crème brûlée, naïve façade, 25 °C, £5".encode("latin-1")
    for sid, expect, image in (
        ("bad-latin1-text", _rejected("clean"), None),
        ("bad-latin1-text-with-image", _partial("text.invalid_utf8", "image"), "images/latin1-photo.png"),
    ):
        record: dict[str, object] = {"id": sid, "text": "@@LATIN1@@", "label": "gradient"}
        if image:
            record["image"] = b.file(
                image, ms.encode_image(ms.IMAGE_VARIANTS["png-rgb"], shape="gradient", index=930)
            )
        raw = json.dumps(record, ensure_ascii=False).encode("utf-8").replace(b"@@LATIN1@@", latin1)
        b.line(raw, sid, expect)


def _add_escape(b: _Builder, root: Path) -> None:
    (root / "outside.png").write_bytes(
        ms.encode_image(ms.IMAGE_VARIANTS["png-rgb"], shape="circle", index=940)
    )
    b.escaping.add("../outside.png")
    b.sample(
        "bad-path-escape", _rejected("read"), text="Points outside the data folder.", image="../outside.png"
    )


def _bad_lines(first_id: str) -> list[_Line]:
    """Manifest lines the reader must reject; all but one have no usable id."""
    read = _rejected("read")
    return [
        _Line(b'{"id": "bad-not-json", "text": "the line stops in the middle of a str', None, read),
        _Line(json.dumps({"text": "A line without an id.", "label": "circle"}).encode(), None, read),
        _Line(json.dumps({"id": "", "text": "A line with an empty id."}).encode(), None, read),
        _Line(json.dumps({"id": ["bad-id-is-a-list"], "text": "The id is a list."}).encode(), None, read),
        _Line(json.dumps(["bad-array-line", "not an object"]).encode(), None, read),
        _Line(
            json.dumps({"id": "bad-wrong-type-field", "text": "Fine text.", "image": 42}).encode(),
            "bad-wrong-type-field",
            read,
        ),
        _Line(
            json.dumps({"id": first_id, "text": "A second sample with the same id."}).encode(),
            None,
            read,
            after=first_id,
        ),
    ]


def write_wds_corpus(root: Path, n: int = 20, *, per_shard: int = 8) -> Path:
    """img2dataset-layout WebDataset tars (``{key}.jpg``, ``{key}.txt``, ``{key}.json``) under ``root``; returns ``root``."""
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range((n + per_shard - 1) // per_shard):
        count = min(per_shard, n - shard * per_shard)
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for j in range(count):
                i = shard * per_shard + j
                key = f"{shard:05d}{j:04d}"
                caption = TEXTS[i % len(TEXTS)]
                width, height = 256, (256 if i % 3 else 192)
                data = ms.save(ms.picture(width, height, shape=ms.SHAPES[i % 4], index=i), "JPEG", quality=90)
                meta = {
                    "url": f"https://example.com/images/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "caption": caption,
                    "width": width,
                    "height": height,
                    "original_width": width * 2,
                    "original_height": height * 2,
                    "exif": "{}",
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                sink.write(
                    {
                        "__key__": key,
                        "jpg": data,
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8"),
                    }
                )
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return root


if __name__ == "__main__":  # python tests/support/corpus.py ROOT [N_GOOD]: the corpus for a benchmark run
    import sys

    built = build_corpus(Path(sys.argv[1]), n_good=int(sys.argv[2]) if len(sys.argv) > 2 else 60)
    print(f"{built.manifest}: {built.n_lines} lines, {len(built.good)} good, {built.bad} bad")
