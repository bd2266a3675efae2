"""The preprocessing job itself on the GPU: ``mbm preprocess`` (Beam, one worker per core) with ``device = "cuda"``.

The other parts time mbm's extractors outside Beam; this one runs the job a user runs, as a
subprocess: the bundled sample media repeated to a few thousand samples with unique ids (as in
``benchmarks/preprocess.py``), MiniLM's architecture with random weights for text (the real weights
are too large to carry), EfficientNet-Lite0 and log-mel. Each run's wall time covers the whole
process: imports, CUDA start-up and model loading in every worker, extraction, shards and commit.
Two dataset sizes with the same settings give the marginal rate (extra samples over extra seconds),
which leaves those fixed costs out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_inputs import minilm_like
from gpu_monitor import GpuMonitor
from incremental import build

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class PreprocessSizes:
    small: int = 8000  # samples in the first run
    large: int = 24000  # samples in the second and third runs
    workers: int = 0  # Beam workers; 0: one per core (the job's default)
    gpu_batches: tuple[int, int] = (512, 128)  # text and image batch sizes of the last run
    timeout: float = 240.0  # seconds per run


def job_spec(folder: Path, model: str, device: str, workers: int, batches: tuple[int, int] | None) -> Path:
    """A job spec next to ``folder/data``: hf-text on ``model``, the default image and audio extractors."""
    text_batch = f"batch_size = {batches[0]}\n" if batches else ""
    image = f"[extract.image]\nbatch_size = {batches[1]}\n" if batches else ""
    spec = folder / "job.toml"
    spec.write_text(
        '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'
        f'[extract.text]\nname = "hf-text"\npath = {json.dumps(model)}\n{text_batch}{image}'
        f'[runner]\ndevice = "{device}"\nworkers = {workers}\n'
        "dedupe = false\n")  # the inputs repeat the sample media: each one is extracted, as a pass of its own
    return spec


def run_job(spec: Path, monitor: GpuMonitor, timeout: float) -> dict[str, Any]:
    """One ``mbm preprocess`` process: wall seconds, what it extracted, and the GPU while it ran."""
    cmd = [sys.executable, "-m", "jobs.cli", "preprocess", str(spec), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with monitor.window() as window:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mbm preprocess exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    report = json.loads((spec.parent / "out" / "report.json").read_text())
    extracted = report.get("extracted_by_modality", {})
    return {"wall_s": round(wall, 2), "samples": report["counts"]["ok"], "images": extracted.get("image", 0),
            "texts": extracted.get("text", 0), "clips": extracted.get("audio", 0),
            "job_seconds": report.get("seconds"), "gpu": window.stats.to_dict()}


def marginal(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """Units of ``key`` per second between two runs of different sizes (the fixed costs cancel)."""
    dt = b["wall_s"] - a["wall_s"]
    return round((b[key] - a[key]) / dt, 1) if dt > 0 else None


def run_preprocess(sizes: PreprocessSizes, device: str, monitor: GpuMonitor, tmp: str, log) -> dict[str, Any]:
    try:
        import apache_beam  # noqa: F401 - the job needs it; say so plainly when it is missing
    except ImportError:
        raise RuntimeError("apache_beam is not installed: `make gpu-wheels` brings it as wheels") from None
    model = minilm_like(os.path.join(tmp, "minilm"))
    runs: dict[str, dict[str, Any]] = {}
    plan = [("default", sizes.small, None), ("default", sizes.large, None),
            ("gpu batches", sizes.large, sizes.gpu_batches)]
    for label, n, batches in plan:
        folder = Path(tmp) / f"{label.replace(' ', '-')}-{n}"
        build(folder / "data", n)
        spec = job_spec(folder, model, device, sizes.workers, batches)
        r = run_job(spec, monitor, sizes.timeout)
        shutil.rmtree(folder)  # a few GB of shards per run at the full sizes
        runs[f"{label} {n}"] = r
        log(f"  mbm preprocess, {label} batches, {n} samples: {r['wall_s']:.1f} s whole process "
            f"({r['samples'] / r['wall_s']:,.0f} samples/s, {r['images'] / r['wall_s']:,.0f} images/s), "
            f"GPU util {r['gpu']['util_mean_pct']}%")
    a, b = runs[f"default {sizes.small}"], runs[f"default {sizes.large}"]
    from jobs.runner_config import auto_workers  # what the job ran with workers = 0

    out = {"runs": runs, "workers": sizes.workers or auto_workers("cuda"),
           "marginal": {"samples_per_s": marginal(a, b, "samples"), "images_per_s": marginal(a, b, "images"),
                        "texts_per_s": marginal(a, b, "texts")},
           "gpu_batches": list(sizes.gpu_batches)}
    log(f"  marginal rate, default batches ({sizes.small} -> {sizes.large} samples): "
        f"{out['marginal']['samples_per_s']} samples/s, {out['marginal']['images_per_s']} images/s")
    return out
