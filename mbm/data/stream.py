"""``ShardStream``: an IterableDataset of collated batches whose order is fixed by (seed, epoch, rank, world).

Pipeline (every rank and every data-loader worker runs it whole, reading every shard):

    shards (shuffled per epoch) → raw samples → this split's ids → decode (corrupt: skip + count) → select (task)
    → shuffle buffer → rank slice (groups of world size) → batches → this worker's batches → collate

Splitting at sample level after a global, seeded shuffle makes ranks disjoint and equally sized
even when the dataset is a single shard; the price is that each rank reads all shards. Workers take
batches round-robin (batch i goes to worker i mod W), which is the order in which the DataLoader
returns them, so the batch sequence is the same for any number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mbm.data.collate import TASKS, CollateConfig, collate
from mbm.data.decode import Sample
from mbm.data.errors import SkipLog
from mbm.data.shards import read_shards
from mbm.data.source import label_key
from mbm.data.split import SPLITS, split_of
from mbm.data.stages import batched, decoded, epoch_rng, rank_slice, selected, shard_order, shuffled


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    shards: tuple[str, ...]
    collate: CollateConfig
    task: str = "classify"
    split: str = "train"  # "train" | "val"
    val_fraction: float = 0.1
    pair: tuple[str, str] | None = None  # retrieve: both modalities required
    batch_size: int = 32
    shuffle: bool = True
    shuffle_buffer: int = 500
    drop_last: bool = True
    seed: int = 0
    max_samples: int | None = None  # cap per epoch (before the rank split), e.g. for evaluation

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.task == "retrieve" and (self.pair is None or len(set(self.pair)) != 2):
            raise ValueError(f"--pair needs two different modalities for retrieve, got {self.pair}")


class Selector:
    """Which samples a split and task use; task misfits are counted under a reason (picklable)."""

    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self.label_keys = {label_key(v) for v in cfg.collate.labels}

    def in_split(self, sample_id: str) -> bool:
        return split_of(sample_id, self.cfg.val_fraction) == self.cfg.split

    def __call__(self, s: Sample, skips: SkipLog) -> bool:
        cfg = self.cfg
        used = [m for m in s.features if m in cfg.collate.feature_dims]
        if not used:
            skips.count("task.no_used_modality")
            return False
        if cfg.task == "classify":
            if s.label is None:
                skips.count("task.no_label")
                return False
            if label_key(s.label) not in self.label_keys:
                skips.count("task.unknown_label")
                return False
        elif cfg.task == "retrieve":
            if not all(m in s.features for m in cfg.pair):
                skips.count("task.pair_missing")
                return False
        elif cfg.task == "generate" and not s.text:
            skips.count("task.no_text")
            return False
        return True


class ShardStream(IterableDataset):
    """Batches of one epoch for one rank, starting after ``skip_batches`` already-consumed batches."""

    def __init__(self, cfg: StreamConfig, *, rank: int = 0, world: int = 1, epoch: int = 0,
                 skip_batches: int = 0) -> None:
        super().__init__()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.epoch, self.skip_batches = epoch, skip_batches

    def at(self, epoch: int, skip_batches: int = 0) -> ShardStream:
        """The same stream at another position."""
        return ShardStream(self.cfg, rank=self.rank, world=self.world, epoch=epoch, skip_batches=skip_batches)

    def sample_batches(self, skips: SkipLog) -> Iterator[list[Sample]]:
        """This rank's batches of samples for the epoch, all of them (nothing skipped yet)."""
        cfg = self.cfg
        shards = shard_order(list(cfg.shards), cfg.seed, self.epoch) if cfg.shuffle else list(cfg.shards)
        select = Selector(cfg)
        samples = decoded(read_shards(shards, skips), cfg.collate.feature_dims, skips, keep_id=select.in_split)
        samples = selected(samples, select, skips)
        if cfg.max_samples is not None:
            samples = itertools.islice(samples, cfg.max_samples)
        if cfg.shuffle and cfg.shuffle_buffer > 1:
            samples = shuffled(samples, cfg.shuffle_buffer, epoch_rng(cfg.seed, self.epoch, "samples"))
        return batched(rank_slice(samples, self.rank, self.world), cfg.batch_size, cfg.drop_last)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipLog(quiet=self.rank != 0 or worker != 0)
        for i, samples in enumerate(self.sample_batches(skips)):
            if i < self.skip_batches or (i - self.skip_batches) % workers != worker:
                continue
            batch = collate(samples, self.cfg.collate)
            batch["position"] = torch.tensor([self.epoch, i])
            batch["skipped"] = skips.snapshot()
            yield batch

