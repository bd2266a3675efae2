"""Builds the data of "Preprocessing on other data" in docs/benchmarks.md.

- ``--audio DIR``: an audiofolder of 240 clips (3, 12, 30 and 60 s in turn; WAV, every fifth FLAC;
  44.1, 16, 22.05 and 48 kHz; every third stereo): a tone plus noise, with ``metadata.csv`` holding
  a transcript of 5-700 words per clip (the texts MiniLM cuts at 512 tokens among them);
- ``--images DIR``: an imagefolder of 400 JPEG photos-like images (smooth colour fields plus grain,
  quality 88) of 0.8-12 megapixels in two class folders;
- ``--mixed DIR``: a manifest of 600 samples shaped like a small real multimodal corpus, about 500
  texts, 370 images and 390 audio clips, each sample any mix of them: captions of 5-60 words, photo-like
  JPEGs (every eighth a PNG) of 320x240 to 1024x768 px, clips of 2-15 s (WAV, every third FLAC; 16,
  22.05, 44.1 and 48 kHz; every fourth stereo).

    .venv/bin/python benchmarks/other_data.py --audio /tmp/aud --images /tmp/big --mixed /tmp/mixed
    .venv/bin/python benchmarks/preprocess.py --source /tmp/aud --reps 2
    .venv/bin/python benchmarks/preprocess.py --source /tmp/mixed --samples 0 --reps 3
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

WORDS = ("the a quick brown fox jumps over lazy dog speech recognition model audio sample long sentence "
         "with many different words").split()


def audio_folder(out: Path, n: int = 240) -> None:
    import soundfile as sf

    rng = np.random.default_rng(1)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rate, seconds = (44100, 16000, 22050, 48000)[i % 4], (3, 12, 30, 60)[i % 4]
        t = np.arange(rate * seconds) / rate
        x = (0.3 * np.sin(2 * np.pi * (200 + i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        if i % 3 == 0:
            x = np.stack([x, 0.5 * x], 1)
        name = f"clips/{i:04d}.{'flac' if i % 5 == 0 else 'wav'}"
        sf.write(out / name, x, rate)
        rows.append((name, " ".join(rng.choice(WORDS, size=int(rng.integers(5, 700))))))
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "transcription"])
        w.writerows(rows)


def image_folder(out: Path, n: int = 400) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (out / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = [(1600, 1200), (1200, 1600), (2048, 1365), (800, 600), (4000, 3000)][i % 5]
        Image.fromarray(_photo(rng, w, h, i)).save(out / ("cats" if i % 2 else "dogs") / f"{i:04d}.jpg", quality=88)


def _photo(rng: np.random.Generator, w: int, h: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth colour fields plus grain."""
    from PIL import Image

    y, x = np.mgrid[0:h:8, 0:w:8]
    field = np.stack([np.sin(x / (30 + seed % 17)) * 90 + 128, np.cos(y / (25 + seed % 11)) * 90 + 128,
                      (x + y) % 255], -1)
    small = Image.fromarray(field.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return (np.asarray(small).astype(np.int16) + rng.integers(-12, 12, (h, w, 1))).clip(0, 255).astype(np.uint8)


def mixed_manifest(out: Path, n: int = 600) -> None:
    """``manifest.jsonl`` of ``n`` samples with media under ``media/`` (see the module's docstring)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(2)
    (out / "media").mkdir(parents=True, exist_ok=True)
    text, image, audio = (rng.random(n) < p for p in (500 / 600, 370 / 600, 390 / 600))
    text |= ~(image | audio)  # every sample holds something
    sizes = [(640, 480), (480, 640), (800, 600), (1024, 768), (500, 375), (320, 240), (640, 427)]
    with open(out / "manifest.jsonl", "w") as f:
        for i in range(n):
            row: dict = {"id": f"m{i:04d}", "label": ("a", "b", "c")[i % 3]}
            if text[i]:
                row["text"] = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 61))))
            if image[i]:
                w, h = sizes[i % len(sizes)]
                name = f"media/{i:04d}.{'png' if i % 8 == 0 else 'jpg'}"
                Image.fromarray(_photo(rng, w, h, i)).save(out / name, **({} if i % 8 == 0 else {"quality": 88}))
                row["image"] = name
            if audio[i]:
                rate, seconds = (16000, 22050, 44100, 48000)[i % 4], float(rng.uniform(2, 15))
                t = np.arange(int(rate * seconds)) / rate
                x = (0.3 * np.sin(2 * np.pi * (150 + i) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
                     + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
                if i % 4 == 1:
                    x = np.stack([x, 0.8 * x], 1)
                name = f"media/{i:04d}.{'flac' if i % 3 == 0 else 'wav'}"
                sf.write(out / name, x, rate, subtype="PCM_16")
                row["audio"] = name
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio", type=Path, help="folder for the audiofolder")
    ap.add_argument("--images", type=Path, help="folder for the imagefolder")
    ap.add_argument("--mixed", type=Path, help="folder for the 600-sample mixed manifest")
    args = ap.parse_args(argv)
    if not (args.audio or args.images or args.mixed):
        ap.error("give one or more of --audio DIR, --images DIR, --mixed DIR")
    if args.audio:
        audio_folder(args.audio)
    if args.images:
        image_folder(args.images)
    if args.mixed:
        mixed_manifest(args.mixed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
