"""Builds the two folders of "Preprocessing on other data" in docs/benchmarks.md.

- ``--audio DIR``: an audiofolder of 240 clips (3, 12, 30 and 60 s in turn; WAV, every fifth FLAC;
  44.1, 16, 22.05 and 48 kHz; every third stereo): a tone plus noise, with ``metadata.csv`` holding
  a transcript of 5-700 words per clip (the texts MiniLM cuts at 512 tokens among them);
- ``--images DIR``: an imagefolder of 400 JPEG photos-like images (smooth colour fields plus grain,
  quality 88) of 0.8-12 megapixels in two class folders.

    .venv/bin/python benchmarks/other_data.py --audio /tmp/aud --images /tmp/big
    .venv/bin/python benchmarks/preprocess.py --source /tmp/aud --reps 2
"""

from __future__ import annotations

import argparse
import csv
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
        y, x = np.mgrid[0:h:8, 0:w:8]
        field = np.stack([np.sin(x / (30 + i % 17)) * 90 + 128, np.cos(y / (25 + i % 11)) * 90 + 128, (x + y) % 255], -1)
        small = Image.fromarray(field.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(small).astype(np.int16) + rng.integers(-12, 12, (h, w, 1))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            out / ("cats" if i % 2 else "dogs") / f"{i:04d}.jpg", quality=88)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio", type=Path, help="folder for the audiofolder")
    ap.add_argument("--images", type=Path, help="folder for the imagefolder")
    args = ap.parse_args(argv)
    if not (args.audio or args.images):
        ap.error("give --audio DIR, --images DIR or both")
    if args.audio:
        audio_folder(args.audio)
    if args.images:
        image_folder(args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
