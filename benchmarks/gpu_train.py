"""Training part of the GPU benchmark: ``Trainer.train_step`` on batches in memory, then fed by its StreamLoader.

The dataset is ``mbm.data.synthetic`` in the on-disk contract of ``mbm preprocess``, with feature
shapes of the default extractors: text 20-60 x 384, image 49 x 1280 (7x7 EfficientNet-Lite0 patches),
audio 100-400 x 80 (1-4 s of log-mel frames). ``max_tokens`` keeps those lengths (audio is not pooled).
Both runs use the same Trainer (bf16 autocast on CUDA, AdamW, gradient clipping, the cosine schedule):
first a few batches are taken from its loader and cycled from memory, then the loader feeds every step.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from gpu_extract import result
from gpu_handover import HandOver
from gpu_monitor import GpuMonitor, timed

LENGTHS = {"text": (20, 60), "image": (49, 49), "audio": (100, 400)}
MAX_TOKENS = {"text": 64, "image": 64, "audio": 400}


@dataclass(frozen=True, kw_only=True)
class TrainSizes:
    samples: int = 8192  # written to disk
    samples_per_shard: int = 256
    batch: int = 256
    workers: int = 8
    more_workers: tuple[int, ...] = ()  # loader worker counts also measured, each with a new trainer
    cached_batches: int = 6  # taken from the loader once, then cycled
    d_model: int = 128  # mbm train's defaults
    layers: int = 2
    heads: int = 4
    seconds: float = 12.0
    warmup: int = 3


def run_train(sizes: TrainSizes, device: str, monitor: GpuMonitor, tmp: str, log: Callable[[str], None]) -> dict:
    from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from mbm.train.config import TrainConfig
    from mbm.train.distributed import init_distributed
    from mbm.train.trainer import Trainer

    data = os.path.join(tmp, "train-data")
    start = time.perf_counter()
    write_synthetic_dataset(data, SyntheticConfig(num_samples=sizes.samples, lengths=LENGTHS,
                                                  samples_per_shard=sizes.samples_per_shard))
    log(f"train: {sizes.samples} synthetic samples written in {time.perf_counter() - start:.1f} s; batch "
        f"{sizes.batch}, d_model {sizes.d_model}, {sizes.layers} layers, {sizes.workers} loader workers")
    cfg = TrainConfig(data=data, out=os.path.join(tmp, "train-run"), batch_size=sizes.batch, workers=sizes.workers,
                      device="cuda" if device.startswith("cuda") else "cpu", max_tokens=dict(MAX_TOKENS),
                      d_model=sizes.d_model, layers=sizes.layers, heads=sizes.heads, steps=10**6,
                      warmup_steps=10, eval_every=10**6, log_every=10**6)
    trainer = Trainer(cfg, init_distributed(cfg.device), progress=False)
    params = sum(p.numel() for p in trainer.model.parameters())
    out: dict[str, Any] = {"samples": sizes.samples, "batch": sizes.batch, "workers": sizes.workers,
                           "d_model": sizes.d_model, "layers": sizes.layers, "parameters": params}

    stream = iter(trainer.loader)
    cached = [next(stream) for _ in range(sizes.cached_batches)]
    stream.close()
    shapes = {m: list(cached[0]["features"][m].shape) for m in cached[0]["features"]}
    out["batch_shapes"] = shapes
    log(f"  batch shapes {shapes}, {params / 1e6:.1f} M parameters")

    for name, batches in (("memory", itertools.cycle(cached)), ("loader", iter(trainer.loader))):
        def step(batches=batches) -> int:
            return len(trainer.train_step(batches)[1])

        rate, gpu, probe = probed(step, sizes.seconds, sizes.warmup, device, monitor, probe=name == "loader")
        if hasattr(batches, "close"):
            batches.close()  # stops the loader's workers
        out[name] = result(rate, "samples", gpu, steps_per_s=round(rate.calls / rate.seconds, 2))
        log(f"  train step, batches from {name}: {rate.calls / rate.seconds:.2f} steps/s, "
            f"{rate.per_s:,.0f} samples/s")
        if probe is not None:
            out[name]["hand_over"] = probe.summary(rate.calls * cfg.accum_steps)
            log(probe.line(rate.calls * cfg.accum_steps))
    out["data_overhead"] = round(1 - out["loader"]["per_s"] / out["memory"]["per_s"], 3)
    out.update(held_out(trainer, log))
    # On the CPU the feed setting changes nothing (no pinning there): the smoke run still goes through it.
    try:
        out.update(registered_feed(cfg, trainer.env, sizes, device, monitor, out["memory"]["per_s"], log))
    except Exception as e:  # noqa: BLE001 - an opt-in path not yet measured on a GPU: keep the other figures
        out["loader_registered_error"] = f"{type(e).__name__}: {e}"
        log(f"  registered feed failed: {out['loader_registered_error']}")
    # Does the loader scale with its workers, or is the training process the bound? The loader alone
    # (batches taken, no step), then the step fed by it, per worker count.
    for workers in sizes.more_workers:
        other = Trainer(replace(cfg, workers=workers), trainer.env, progress=False)
        out.update(loader_measures(other, ((f"loader_alone_{workers}", False), (f"loader_{workers}_workers", True)),
                                   f"with {workers} workers", sizes, device, monitor, out["memory"]["per_s"], log))
    return out


def held_out(trainer: Any, log: Callable[[str], None], passes: int = 2) -> dict:
    """Held-out evaluation (what ``Trainer.validate`` runs) read by the trainer's evaluation workers, then in
    this process as before they existed: samples/s over ``passes`` passes each, after one untimed pass (the
    workers' start and their scans of the shards)."""
    from mbm.data.loader import PassLoader
    from mbm.data.stream import ShardStream
    from mbm.train.evaluate import evaluate

    out: dict[str, Any] = {}
    workers = trainer.val_loader.workers
    with PassLoader(ShardStream(trainer.val_stream)) as alone:
        for name, loader in ((f"eval_{workers}_workers", trainer.val_loader), ("eval_in_process", alone)):
            samples = evaluate(trainer.model, loader, trainer.env.device)["samples"]
            start = time.perf_counter()
            for _ in range(passes):
                evaluate(trainer.model, loader, trainer.env.device)
            seconds = time.perf_counter() - start
            out[name] = {"per_s": round(passes * samples / seconds, 1), "unit": "samples", "samples": samples,
                         "seconds_per_pass": round(seconds / passes, 3)}
            where = f"by {workers} workers" if loader is not alone else "in the training process"
            log(f"  held-out evaluation read {where}: {samples} samples, {seconds / passes:.3f} s a pass, "
                f"{passes * samples / seconds:,.0f} samples/s")
    trainer.val_loader.close()
    return out


def loader_measures(trainer: Any, names: tuple[tuple[str, bool], ...], label: str, sizes: TrainSizes, device: str,
                    monitor: GpuMonitor, memory_rate: float, log: Callable[[str], None]) -> dict:
    """For each (name, train): the step fed by ``trainer``'s loader (train) or that loader alone, with the
    hand-over probe, its data overhead against ``memory_rate`` samples/s; the loader's workers stopped after."""
    out: dict[str, Any] = {}
    for name, train in names:
        batches = iter(trainer.loader)

        def step(batches=batches, train=train) -> int:
            return len(trainer.train_step(batches)[1]) if train else len(next(batches)["ids"])

        rate, gpu, probe = probed(step, sizes.seconds * (1.0 if train else 0.5), sizes.warmup, device, monitor)
        batches.close()
        used = rate.calls * (trainer.cfg.accum_steps if train else 1)
        out[name] = result(rate, "samples", gpu, steps_per_s=round(rate.calls / rate.seconds, 2),
                           data_overhead=round(1 - rate.per_s / memory_rate, 3), hand_over=probe.summary(used))
        log(f"  {'train step, batches from' if train else 'batches alone from'} the loader {label}: "
            f"{rate.calls / rate.seconds:.2f} batches/s, {rate.per_s:,.0f} samples/s"
            + (f", data overhead {out[name]['data_overhead']:.1%}" if train else ""))
        log(probe.line(used))
    return out


def registered_feed(cfg: Any, env: Any, sizes: TrainSizes, device: str, monitor: GpuMonitor, memory_rate: float,
                    log: Callable[[str], None]) -> dict:
    """The step fed by the loader with ``MBM_LOADER_FEED=registered`` (batches copied to the GPU straight
    from the workers' page-locked segments, ``mbm.data.feed``), then that loader alone."""
    from mbm.train.trainer import Trainer

    before = os.environ.get("MBM_LOADER_FEED")
    os.environ["MBM_LOADER_FEED"] = "registered"
    try:
        other = Trainer(cfg, env, progress=False)
    finally:
        if before is None:
            del os.environ["MBM_LOADER_FEED"]
        else:
            os.environ["MBM_LOADER_FEED"] = before
    return loader_measures(other, (("loader_registered", True), ("loader_registered_alone", False)),
                           f"with the registered feed ({sizes.workers} workers)", sizes, device, monitor, memory_rate,
                           log)


def probed(step: Callable[[], int], seconds: float, warmup: int, device: str, monitor: GpuMonitor,
           probe: bool = True) -> tuple[Any, Any, HandOver | None]:
    """``timed(step)`` after ``warmup`` untimed steps, with the GPU monitor and (``probe``) the hand-over
    probe of ``gpu_handover`` open over the timed steps only."""
    for _ in range(warmup):
        step()
    hand_over = HandOver() if probe else None
    with monitor.window() as gpu, hand_over or contextlib.nullcontext():
        rate = timed(step, seconds=seconds, warmup=0, device=device)
    return rate, gpu, hand_over
