"""Training data overhead: the trainer's step time with its streaming loader vs the same batches in memory.

Both runs build the real ``Trainer`` (same settings and seed, so the same initial weights and the
same batch sequence) and time ``Trainer.train_step`` after ``warmup`` untimed steps:

- loader: steps pull batches from ``trainer.loader`` (workers started inside the warm-up);
- memory: ``warmup + steps`` batches are first collected from an identical loader, its workers are
  shut down, then the steps pull them from a list.

overhead = (t_loader - t_memory) / t_loader.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from mbm.train.config import TrainConfig
from mbm.train.distributed import init_distributed
from mbm.train.trainer import Trainer


@dataclass
class StepTimes:
    loader: float  # seconds per step
    memory: float

    @property
    def overhead(self) -> float:
        return (self.loader - self.memory) / self.loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(trainer: Trainer, batches: Iterator[dict[str, Any]], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        trainer.train_step(batches)
    _sync(trainer.env.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
    _sync(trainer.env.device)
    return (time.perf_counter() - start) / steps


def _trainer(cfg: TrainConfig, out: str) -> Trainer:
    return Trainer(replace(cfg, out=out, steps=max(cfg.steps, 1)), init_distributed(cfg.device), progress=False)


def step_with_loader(cfg: TrainConfig, out: str, warmup: int, steps: int) -> float:
    trainer = _trainer(cfg, out)
    batches = iter(trainer.loader)
    try:
        return _timed_steps(trainer, batches, warmup, steps)
    finally:
        batches.close()  # stops the loader's workers


def step_in_memory(cfg: TrainConfig, out: str, warmup: int, steps: int) -> float:
    trainer = _trainer(cfg, out)
    stream = iter(trainer.loader)
    batches = [next(stream) for _ in range(warmup + steps)]
    stream.close()
    return _timed_steps(trainer, iter(batches), warmup, steps)


def overhead(cfg: TrainConfig, tmp: str, warmup: int, steps: int, tag: str, *,
             memory_first: bool = False) -> StepTimes:
    """Step times of one (loader, memory) pair; run folders go under ``tmp``."""
    runs = {"loader": step_with_loader, "memory": step_in_memory}
    order = ["memory", "loader"] if memory_first else ["loader", "memory"]
    times = {name: runs[name](cfg, os.path.join(tmp, f"run-{name}-{tag}"), warmup, steps) for name in order}
    return StepTimes(**times)


@dataclass
class StepBreakdown:
    step_ms: float  # wall time per step
    wait_ms: float  # of which the step waited for its batch
    cpu_ms: float  # CPU time of the training process (all its threads) per step


class _TimedBatches:
    """An iterator that adds up the time spent waiting in ``next``."""

    def __init__(self, it: Iterator[dict[str, Any]]) -> None:
        self.it, self.wait = it, 0.0

    def __iter__(self) -> _TimedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait += time.perf_counter() - start


def step_breakdown(cfg: TrainConfig, out: str, warmup: int, steps: int) -> StepBreakdown:
    """Steps fed by the loader: wall time, time spent waiting for batches, and the process's CPU time."""
    trainer = _trainer(cfg, out)
    stream = iter(trainer.loader)
    batches = _TimedBatches(stream)
    try:
        for _ in range(warmup):
            trainer.train_step(batches)
        batches.wait = 0.0
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches)
        _sync(trainer.env.device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        stream.close()
    return StepBreakdown(wall / steps * 1e3, batches.wait / steps * 1e3, cpu / steps * 1e3)
