"""Extraction parts of the GPU benchmark: image, text and audio throughput through mbm's own code.

Images and audio are decoded and cleaned by the pipeline's cleaners (``pipelines.clean.image``,
``pipelines.clean.audio``) in DataLoader worker processes; the extractors are mbm's registered ones,
called through ``featurize`` as the pipeline's ExtractorHandler calls them. Beam itself is not used.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gpu_inputs import make_clips, make_jpegs, make_sentences, minilm_like, write_wavs
from gpu_monitor import GpuMonitor, Rate, timed, timed_iter
from torch.utils.data import DataLoader, Dataset

from mbm.extractors import text as text_extractor
from mbm.extractors.audio import LogMelExtractor
from mbm.extractors.image import EfficientNetLite0Extractor
from mbm.extractors.text import HFTextConfig, HFTextExtractor, fixed_shape_chunks


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """How much data each part makes and how it batches it."""

    images: int = 2048  # distinct JPEG files
    image_batch: int = 256  # images per featurize call
    image_batches: tuple[int, ...] = (128, 256, 512)  # model-only sweep
    worker_batch: int = 32  # items per DataLoader worker batch (small: less shared memory in flight)
    sentences: int = 8192
    text_batch: int = 1024  # sentences per featurize call
    max_batch_tokens: int = 65536
    clips: int = 512
    wavs: int = 256
    audio_batch: int = 128
    workers: int = 15
    seconds: float = 12.0  # timed seconds per measure: every part of a default run fits its budget
    warmup: int = 3


def result(rate: Rate, unit: str, gpu: Any = None, **extra: Any) -> dict[str, Any]:
    out = {"per_s": round(rate.per_s, 1), "unit": unit, "units": round(rate.units, 1),
           "seconds": round(rate.seconds, 2), "calls": rate.calls, **extra}
    if gpu is not None:
        out["gpu"] = gpu.stats.to_dict()
    return out


class _Files(Dataset):
    """Item ``i`` is file ``i mod n`` through ``load``; the length lets a loader run as long as it is timed."""

    def __init__(self, paths: list[str], load: Callable[[bytes], Any], length: int) -> None:
        self.paths, self.load, self.length = paths, load, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        with open(self.paths[i % len(self.paths)], "rb") as f:
            return self.load(f.read())


class CleanImage:
    """The pipeline's image cleaning at the extractor's input size (picklable)."""

    def __init__(self, size: int) -> None:
        from pipelines.clean.image import ImageCleanConfig

        self.cfg = ImageCleanConfig(size=size)

    def __call__(self, data: bytes) -> np.ndarray:
        from pipelines.clean.image import clean_image

        return clean_image(data, self.cfg)


class CleanAudio:
    """The pipeline's audio cleaning at the extractor's sample rate (picklable)."""

    def __init__(self, sample_rate: int) -> None:
        from pipelines.clean.audio import AudioCleanConfig

        self.cfg = AudioCleanConfig(sample_rate=sample_rate)

    def __call__(self, data: bytes) -> torch.Tensor:
        from pipelines.clean.audio import clean_audio

        return torch.from_numpy(clean_audio(data, self.cfg))


def stack_images(items: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(items))  # one tensor crosses the process boundary via shared memory


def concat_clips(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker batch of clips as one flat tensor and their lengths: two storages cross the process
    boundary (and are pinned) per batch instead of one per clip."""
    return torch.cat(items), torch.tensor([len(t) for t in items], dtype=torch.int64)


def loader(paths: list[str], load: Callable[[bytes], Any], collate: Callable, sizes: Sizes, *,
           pin: bool) -> DataLoader:
    length = 10**9  # endless in practice; the timing loop stops it
    return DataLoader(_Files(paths, load, length), batch_size=sizes.worker_batch, num_workers=sizes.workers,
                      collate_fn=collate, pin_memory=pin, prefetch_factor=4 if sizes.workers else None)


def regroup(batches: Iterator[Any], per_call: int, unpack: Callable[[Any], list]) -> Iterator[list]:
    """Worker batches → lists of ``per_call`` items (what one featurize call gets)."""
    pending: list = []
    for batch in batches:
        pending.extend(unpack(batch))
        while len(pending) >= per_call:
            yield pending[:per_call]
            pending = pending[per_call:]


def _tensor_rows(t: torch.Tensor) -> list[np.ndarray]:
    return list(t.numpy())


def split_clips(batch: tuple[torch.Tensor, torch.Tensor]) -> list[np.ndarray]:
    flat, lengths = batch
    return np.split(flat.numpy(), np.cumsum(lengths.numpy())[:-1])


# -- image ------------------------------------------------------------------------------------------

def conv_layout(extractor: EfficientNetLite0Extractor, model: Any, batch: list, device: str) -> dict[str, Any]:
    """How many convolutions see channels_last inputs and run in bfloat16 during one featurize call.

    On the CPU in float32 the model runs as one fused oneDNN plan (``FusedConvs``), where no module's
    forward runs: its convolutions are counted from the plan."""
    plan = getattr(model, "mbm_fused", None)
    if plan is not None and extractor.config.precision != "bfloat16":
        features = extractor.featurize(model, batch, device)
        return {"convs": len(plan.steps), "fused": True, "output_dtypes": sorted({str(f.dtype) for f in features})}
    seen: list[tuple[bool, str]] = []

    def hook(module: Any, args: tuple, output: Any) -> None:
        seen.append((args[0].is_contiguous(memory_format=torch.channels_last), str(output.dtype)))

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        extractor.featurize(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    dtypes = sorted({d for _, d in seen})
    return {"convs": len(seen), "channels_last_inputs": sum(c for c, _ in seen), "output_dtypes": dtypes}


def run_image(sizes: Sizes, device: str, monitor: GpuMonitor, tmp: str, log: Callable[[str], None]) -> dict:
    extractor = EfficientNetLite0Extractor()
    size = extractor.input_spec()["image_size"]  # what jobs/spec.py gives the image cleaner
    paths = make_jpegs(os.path.join(tmp, "jpeg"), sizes.images, processes=max(1, sizes.workers))
    mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    log(f"image: {len(paths)} JPEGs ({mean_kb:.0f} KB mean), cleaned to {size}x{size}, {sizes.workers} workers")
    clean = CleanImage(size)
    out: dict[str, Any] = {"files": len(paths), "mean_kb": round(mean_kb, 1), "size": size,
                           "workers": sizes.workers}

    files = iter(range(10**9))

    def decode_here() -> int:
        with open(paths[next(files) % len(paths)], "rb") as f:
            clean(f.read())
        return 1

    one = timed(decode_here, seconds=min(3.0, sizes.seconds / 4), warmup=2, device="cpu")
    out["decode_one_core"] = result(one, "images")

    # (a) decode + clean only, in worker processes; the first batches also feed the model-only part.
    pool: list[np.ndarray] = []
    keep = max(sizes.image_batches)

    def consume_decoded(batch: torch.Tensor) -> int:
        if len(pool) < keep:
            pool.extend(_tensor_rows(batch))
        return len(batch)

    rate = timed_iter(loader(paths, clean, stack_images, sizes, pin=False), consume_decoded,
                      seconds=sizes.seconds, warmup=max(sizes.warmup, -(-keep // sizes.worker_batch)), device="cpu")
    out["decode"] = result(rate, "images")
    log(f"  decode+clean: {rate.per_s:,.0f} images/s ({one.per_s:,.0f} on one core)")

    # (b) model only: featurize on pre-decoded arrays.
    model = extractor.load(device)
    out["layout"] = conv_layout(extractor, model, pool[: sizes.image_batches[0]], device)
    out["model"] = {}
    for bs in sizes.image_batches:
        batch = [pool[i % len(pool)] for i in range(bs)]
        with monitor.window() as gpu:
            rate = timed(lambda b=batch: len(extractor.featurize(model, b, device)),
                         seconds=sizes.seconds / len(sizes.image_batches), warmup=sizes.warmup, device=device)
        out["model"][str(bs)] = result(rate, "images", gpu)
        log(f"  model only, batch {bs}: {rate.per_s:,.0f} images/s")

    if torch.backends.cudnn.benchmark:  # what the pipeline gets: it leaves cudnn autotuning off
        torch.backends.cudnn.benchmark = False
        batch = [pool[i % len(pool)] for i in range(sizes.image_batch)]
        try:
            rate = timed(lambda: len(extractor.featurize(model, batch, device)),
                         seconds=sizes.seconds / len(sizes.image_batches), warmup=sizes.warmup, device=device)
        finally:
            torch.backends.cudnn.benchmark = True
        out["model_no_autotune"] = result(rate, "images", batch=sizes.image_batch)
        log(f"  model only, batch {sizes.image_batch}, cudnn.benchmark off: {rate.per_s:,.0f} images/s")

    # (c) end to end: decode workers feed featurize through pinned memory.
    batches = regroup(iter(loader(paths, clean, stack_images, sizes, pin=device.startswith("cuda"))),
                      sizes.image_batch, _tensor_rows)
    with monitor.window() as gpu:
        rate = timed_iter(batches, lambda b: len(extractor.featurize(model, b, device)),
                          seconds=sizes.seconds, warmup=sizes.warmup, device=device)
    batches.close()
    out["e2e"] = result(rate, "images", gpu, batch=sizes.image_batch)
    log(f"  end to end, batch {sizes.image_batch}: {rate.per_s:,.0f} images/s")
    model_best = max(v["per_s"] for v in out["model"].values())
    out["bound"] = "decode" if out["decode"]["per_s"] < model_best else "model"
    return out


# -- text -------------------------------------------------------------------------------------------

def pass_bounds(max_batch_tokens: int, device: str) -> tuple[int, int]:
    """(tokens, rows) bounds of the extractor's forward passes on ``device`` (older text.py: 16 rows)."""
    shape = getattr(text_extractor, "pass_shape", None)
    return shape(max_batch_tokens, device) if shape else (max_batch_tokens, 16)


def passes(lengths: list[int], max_batch_tokens: int, max_length: int, device: str) -> list[tuple[int, int, list]]:
    """The (L, rows, indices) forward passes ``featurize`` runs for texts of these token counts."""
    tokens, rows = pass_bounds(max_batch_tokens, device)
    if hasattr(text_extractor, "pass_shape"):
        return fixed_shape_chunks(lengths, tokens, max_length, rows)
    return fixed_shape_chunks(lengths, tokens, max_length)


def padding_stats(lengths: list[int], per_call: int, max_tokens: int, max_length: int, device: str,
                  rows: int = 64) -> dict[str, float]:
    """Token slots computed per real token: mbm's length buckets (filler rows included) vs passes of
    ``rows`` texts in arrival order, each padded to its longest text."""
    real = sum(lengths)
    bucketed = naive = 0
    for start in range(0, len(lengths), per_call):
        call = lengths[start:start + per_call]
        bucketed += sum(length * n for length, n, _ in passes(call, max_tokens, max_length, device))
        naive += sum(max(call[i:i + rows]) * len(call[i:i + rows]) for i in range(0, len(call), rows))
    return {"bucketed": round(bucketed / real, 3), f"arrival_order_{rows}": round(naive / real, 3)}


def filled_calls(extractor: HFTextExtractor, sentences: list[str], per_call: int, device: str) -> list[list[str]]:
    """The featurize calls the preprocessing job makes of ``sentences``: ``FillBatches`` (whole passes of
    one padded length, up to ``per_call`` texts) over them in one bundle."""
    from mbm.extractors.handler import ExtractorHandler
    from pipelines.extract import FillBatches, ModalityHandler
    from schemas import CleanSample

    handler = ModalityHandler("text", ExtractorHandler(extractor, batch_size=per_call, device=device), "bench")
    fill = FillBatches(handler)
    fill.setup()
    fill.start_bundle()
    samples = (CleanSample(id=f"s{i}", key=f"s{i}", text=t) for i, t in enumerate(sentences))
    batches = [b for s in samples for b in fill.process(s)] + [w.value for w in fill.finish_bundle()]
    return [[s.text for s in b] for b in batches]


@contextlib.contextmanager
def rows_per_pass(device: str, rows: int) -> Iterator[None]:
    """The extractor's passes on ``device`` capped at ``rows`` rows instead of its own cap."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    old = text_extractor.MAX_ROWS[kind]
    text_extractor.MAX_ROWS[kind] = rows
    try:
        yield
    finally:
        text_extractor.MAX_ROWS[kind] = old


def host_profile(step: Callable[[], int], seconds: float, top: int = 12) -> list[str]:
    """The functions ``step`` spends most of its own host time in (cProfile, ``seconds`` of calls)."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    while time.perf_counter() - start < seconds:
        step()
    profile.disable()
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # by own time
    total = sum(v[2] for v in stats.stats.values())
    return [f"{v[2] / total:6.1%} {v[2]:7.3f} s {v[1]:>7} calls  {pstats.func_std_string(k)}" for k, v in rows]


def cuda_checks(extractor: HFTextExtractor, model: Any, texts: list[str], device: str) -> dict[str, Any]:
    """Features through the CUDA graphs vs the eager encoder, and each text alone vs in one call."""
    from mbm.extractors.text import TextModel

    together = extractor.featurize(model, texts, device)
    alone = [f for t in texts[:128] for f in extractor.featurize(model, [t], device)]
    out = {"alone_equal_in_call": sum(np.array_equal(a, b) for a, b in zip(alone, together, strict=False)),
           "alone_checked": len(alone)}
    eager = getattr(model.model, "model", None)
    if eager is not None:
        plain = extractor.featurize(TextModel(model.tokenizer, eager), texts, device)
        diffs = [float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in zip(plain, together,
                                                                                              strict=True)]
        out.update(graphed_equal_eager=sum(d == 0 for d in diffs), graphed_checked=len(diffs),
                   graphed_max_abs_diff=max(diffs))
    return out


def run_text(sizes: Sizes, device: str, monitor: GpuMonitor, tmp: str, log: Callable[[str], None]) -> dict:
    folder = minilm_like(os.path.join(tmp, "minilm-random"))
    max_batch_tokens = sizes.max_batch_tokens if device.startswith("cuda") else HFTextConfig.max_batch_tokens
    extractor = HFTextExtractor(HFTextConfig(path=folder, max_batch_tokens=max_batch_tokens))
    model = extractor.load(device)
    sentences = make_sentences(sizes.sentences)
    lengths = [len(ids) for ids in model.tokenizer(sentences, truncation=True,
                                                    max_length=extractor.config.max_length)["input_ids"]]
    words = [len(s.split()) for s in sentences]
    bounds = pass_bounds(max_batch_tokens, device)
    log(f"text: {len(sentences)} captions, {min(words)}-{max(words)} words, {np.mean(lengths):.0f} tokens mean; "
        f"max_batch_tokens {max_batch_tokens}; featurize passes of <= {bounds[0]} tokens, <= {bounds[1]} rows")
    out: dict[str, Any] = {"sentences": len(sentences), "tokens_mean": round(float(np.mean(lengths)), 1),
                           "max_batch_tokens": max_batch_tokens, "pass_bounds": list(bounds),
                           "batch": sizes.text_batch,
                           "weights": "random (all-MiniLM-L6-v2 architecture and tokenizer)",
                           "padding": padding_stats(lengths, sizes.text_batch, max_batch_tokens,
                                                    extractor.config.max_length, device)}
    arrival = [sentences[i:i + sizes.text_batch] for i in range(0, len(sentences), sizes.text_batch)]
    filled = filled_calls(extractor, sentences, sizes.text_batch, device)
    max_length = extractor.config.max_length

    def pass_list(calls: list[list[str]]) -> list[tuple[int, int, list]]:
        return [p for call in calls for p in passes(
            [len(ids) for ids in model.tokenizer(call, truncation=True, max_length=max_length)["input_ids"]],
            max_batch_tokens, max_length, device)]

    if device.startswith("cuda"):
        out["checks"] = cuda_checks(extractor, model, sentences[:512], device)
        log(f"  checks: {out['checks']}")
    measures = [("featurize", 0.5, arrival, None), ("featurize_filled", 1.0, filled, None)]
    default_rows = bounds[1]
    measures += [(f"featurize_filled_rows{rows}", 0.5, None, rows)
                 for rows in (256, 128, 64, 32) if rows != default_rows]
    for name, share, calls, rows in measures:
        with rows_per_pass(device, rows or default_rows):
            calls = calls or filled_calls(extractor, sentences, sizes.text_batch, device)
            it = iter(range(10**9))

            def step(it=it, calls=calls) -> int:
                batch = calls[next(it) % len(calls)]
                extractor.featurize(model, batch, device)
                return len(batch)

            first = time.perf_counter()  # one pass over the calls first: CUDA graphs are captured per new shape
            for _ in calls:
                step()
            first = time.perf_counter() - first
            with monitor.window() as gpu:
                rate = timed(step, seconds=sizes.seconds * share, warmup=0, device=device)
            shapes = pass_list(calls)
            per_token = sum(length * n for length, n, _ in shapes) / sum(lengths)
            out[name] = result(rate, "sentences", gpu, calls=len(calls), passes=len(shapes),
                               slots_per_token=round(per_token, 2), first_round_s=round(first, 2))
            log(f"  {name}: {rate.per_s:,.0f} sentences/s; {len(shapes)} passes in {len(calls)} calls, "
                f"{per_token:.2f} token slots per token; first round {first:.2f} s")
            if name == "featurize_filled":
                out["padding"]["filled"] = round(per_token, 3)  # what the preprocessing job computes
                out["host_profile"] = host_profile(step, seconds=min(3.0, sizes.seconds * 0.25))
                log("  host time by function, featurize_filled:\n    " + "\n    ".join(out["host_profile"]))
    return out


# -- audio ------------------------------------------------------------------------------------------

def audio_batches(clips: list[np.ndarray], batch: int, *, bucketed: bool, window: int = 8) -> list[list[np.ndarray]]:
    """Arrival order, or sorted by length within windows of ``window`` batches (then shuffled)."""
    if not bucketed:
        return [clips[i:i + batch] for i in range(0, len(clips) - batch + 1, batch)]
    out = []
    span = batch * window
    for start in range(0, len(clips), span):
        group = sorted(clips[start:start + span], key=len)
        out.extend(group[i:i + batch] for i in range(0, len(group) - batch + 1, batch))
    order = np.random.default_rng(0).permutation(len(out))
    return [out[i] for i in order]


def padded_per_real(batches: list[list[np.ndarray]]) -> float:
    return round(sum(max(map(len, b)) * len(b) for b in batches) / sum(len(c) for b in batches for c in b), 3)


def run_audio(sizes: Sizes, device: str, monitor: GpuMonitor, tmp: str, log: Callable[[str], None]) -> dict:
    extractor = LogMelExtractor()
    sr = extractor.config.sample_rate
    model = extractor.load(device)
    clips = make_clips(sizes.clips, sr)
    log(f"audio: {len(clips)} clips of 2-10 s at {sr} Hz, batch {sizes.audio_batch}")
    out: dict[str, Any] = {"clips": len(clips), "sample_rate": sr, "batch": sizes.audio_batch}
    for name, bucketed in (("arrival", False), ("bucketed", True)):
        calls = audio_batches(clips, sizes.audio_batch, bucketed=bucketed)
        it = iter(range(10**9))

        def step(calls=calls, it=it) -> float:
            batch = calls[next(it) % len(calls)]
            extractor.featurize(model, batch, device)
            return sum(len(c) for c in batch) / sr

        with monitor.window() as gpu:
            rate = timed(step, seconds=sizes.seconds / 2, warmup=sizes.warmup, device=device)
        out[name] = result(rate, "audio-seconds", gpu, padded_per_real=padded_per_real(calls))
        log(f"  logmel, {name} batches (decoded clips in memory): {rate.per_s:,.0f} audio-s/s")

    paths = write_wavs(os.path.join(tmp, "wav"), clips[: sizes.wavs], sr)
    clean = CleanAudio(sr)
    rate = timed_iter(loader(paths, clean, concat_clips, sizes, pin=False), lambda b: len(b[0]) / sr,
                      seconds=sizes.seconds / 2, warmup=sizes.warmup, device="cpu")
    out["decode"] = result(rate, "audio-seconds", files=len(paths))
    log(f"  WAV decode+clean only: {rate.per_s:,.0f} audio-s/s")

    def featurize(batch: list[np.ndarray]) -> float:
        extractor.featurize(model, batch, device)
        return sum(len(c) for c in batch) / sr

    batches = regroup(iter(loader(paths, clean, concat_clips, sizes, pin=device.startswith("cuda"))),
                      sizes.audio_batch, split_clips)
    with monitor.window() as gpu:
        rate = timed_iter(batches, featurize, seconds=sizes.seconds / 2, warmup=sizes.warmup, device=device)
    batches.close()
    out["e2e"] = result(rate, "audio-seconds", gpu)
    log(f"  end to end from WAV: {rate.per_s:,.0f} audio-s/s")
    return out
