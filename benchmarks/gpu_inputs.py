"""Inputs of the GPU benchmark, made at run time from the bundled sample (nothing is downloaded).

- JPEGs: the sample photos at their own sizes (400-640 px), each copy a different random crop and
  JPEG quality, so every file is distinct;
- captions of 5-60 words, drawn from the sample's captions;
- audio clips of 2-10 s at 16 kHz (speech from the sample, tiled, with noise), in memory or as WAV;
- a MiniLM-shaped text encoder: all-MiniLM-L6-v2's config and tokenizer (``benchmarks/minilm_config/``)
  with random weights from a fixed seed. Throughput depends on the architecture, not the weight values.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
MINILM_CONFIG = Path(__file__).resolve().parent / "minilm_config"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _sample_rows() -> list[dict]:
    with open(SAMPLE / "manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sample_photos() -> list[Path]:
    """The sample's readable photos (the deliberately broken one is left out)."""
    paths = {SAMPLE / r["image"] for r in _sample_rows() if r.get("image")}
    return sorted(p for p in paths if p.is_file() and p.name != "broken.jpg")


def _write_jpeg(job: tuple[str, str, int]) -> int:
    from PIL import Image

    src, dst, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(src) as img:
        img.load()
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.85, 1.0)), int(h * rng.uniform(0.85, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch))
        if crop.mode not in ("RGB", "L"):
            crop = crop.convert("RGB")
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(80, 93)))
    Path(dst).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_jpegs(folder: str, count: int, *, seed: int = 0, processes: int = 1) -> list[str]:
    """``count`` distinct JPEG files under ``folder``, cropped from the sample photos."""
    os.makedirs(folder, exist_ok=True)
    photos = sample_photos()
    jobs = [(str(photos[i % len(photos)]), os.path.join(folder, f"img{i:06d}.jpg"), seed * 1_000_003 + i)
            for i in range(count)]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_jpeg(job)
    return [dst for _, dst, _ in jobs]


def make_sentences(count: int, *, seed: int = 0, words: tuple[int, int] = (5, 60)) -> list[str]:
    """``count`` captions of ``words`` words (uniform), spliced from the sample's captions in several languages."""
    rng = np.random.default_rng(seed)
    captions = [r["text"].split() for r in _sample_rows() if r.get("text")]
    out = []
    for _ in range(count):
        n = int(rng.integers(words[0], words[1] + 1))
        picked: list[str] = []
        while len(picked) < n:
            caption = captions[int(rng.integers(len(captions)))]
            picked.extend(caption[int(rng.integers(len(caption))):] if not picked else caption)
        out.append(" ".join(picked[:n]))
    return out


def _speech(sample_rate: int) -> np.ndarray:
    """The sample's WAV clips joined (they are 16 kHz mono already); noise when they cannot be read."""
    import soundfile as sf

    parts = []
    for path in sorted((SAMPLE / "audio").glob("*.wav")):
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        if sr == sample_rate:
            parts.append(data.mean(axis=1))
    return np.concatenate(parts) if parts else np.random.default_rng(0).normal(0, 0.1, sample_rate * 10)


def make_clips(count: int, sample_rate: int, *, seconds: tuple[float, float] = (2.0, 10.0),
               seed: int = 0) -> list[np.ndarray]:
    """``count`` float32 mono clips of uniform random length, speech with a little noise."""
    rng = np.random.default_rng(seed)
    speech = _speech(sample_rate)
    clips = []
    for _ in range(count):
        n = int(rng.uniform(*seconds) * sample_rate)
        start = int(rng.integers(len(speech)))
        wave = np.resize(np.roll(speech, -start), n) + rng.normal(0, 0.01, n)
        clips.append((0.9 * wave / np.abs(wave).max()).astype(np.float32))
    return clips


def write_wavs(folder: str, clips: list[np.ndarray], sample_rate: int) -> list[str]:
    """Each clip as 16-bit PCM WAV under ``folder``."""
    import soundfile as sf

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, clip in enumerate(clips):
        path = os.path.join(folder, f"clip{i:06d}.wav")
        sf.write(path, clip, sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def minilm_like(folder: str, *, seed: int = 0) -> str:
    """A local HF model folder: all-MiniLM-L6-v2's architecture and tokenizer, random weights."""
    import torch
    from transformers import BertConfig, BertModel

    os.makedirs(folder, exist_ok=True)
    config = BertConfig.from_pretrained(str(MINILM_CONFIG), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_CONFIG / name, folder)
    return folder
