"""Deterministic stream stages: each a small generator (or, per batch, function) whose output is fixed by
its arguments and seed.

Exact resumption relies on this: the samples of (seed, epoch, rank, world size) come in one order
only, so a resumed run can skip exactly the batches it had consumed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, TypeVar

from mbm.data.decode import Sample, Undecoded, decode, parse_doc, settle, undecoded
from mbm.data.errors import CorruptSample, SkipLog, in_shard

T = TypeVar("T")


def epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    """A ``random.Random`` fixed by (seed, epoch, purpose); string seeds hash the same in every process."""
    return random.Random(f"mbm:{seed}:{epoch}:{purpose}")


def shard_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shards in this epoch's shuffled order."""
    order = list(shards)
    epoch_rng(seed, epoch, "shards").shuffle(order)
    return order


def parsed(raws: Iterable[dict[str, Any]], skips: SkipLog, keep_doc: Callable[[dict], bool] = lambda _: True,
           modalities: Collection[str] | None = None) -> Iterator[Undecoded]:
    """Raw samples whose json doc passes ``keep_doc`` (a split), checked, with the arrays not decoded.

    Only the .npy members of ``modalities`` (None: all listed) are kept; corrupt docs are counted.
    """
    for raw in raws:
        try:
            doc = parse_doc(raw)
            if keep_doc(doc):
                yield undecoded(raw, doc, modalities)
        except CorruptSample as exn:
            skips.skip(exn.reason, in_shard(raw.get("__url__"), exn.detail))


def selected(items: Iterable[T], keep: Callable[[T, SkipLog], bool], skips: SkipLog) -> Iterator[T]:
    for item in items:
        if keep(item, skips):
            yield item


def decoded(batch: Iterable[Undecoded], feature_dims: dict[str, int], skips: SkipLog,
            in_place: dict[str, int | None] | None = None) -> list[Sample]:
    """The batch's samples whose arrays decode, in order; corrupt ones are counted and left out
    (``in_place``: see ``decode``)."""
    out = []
    for item in batch:
        try:
            out.append(decode(item, feature_dims, in_place))
        except CorruptSample as exn:
            skips.skip(exn.reason, in_shard(item.shard, exn.detail))
    return out


def settled(samples: Iterable[Sample], feature_dims: dict[str, int], skips: SkipLog) -> list[Sample]:
    """``decode.settle`` of each sample, in order; those that turn out corrupt are counted and left out."""
    out = []
    for sample in samples:
        try:
            out.append(settle(sample, feature_dims))
        except CorruptSample as exn:
            skips.skip(exn.reason, in_shard(sample.shard, exn.detail))
    return out


def shuffled(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer: each output is a random pick among the next ``buffer_size`` pending items."""
    buf: list[T] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = rng.randrange(buffer_size)
        out, buf[i] = buf[i], item
        yield out
    rng.shuffle(buf)
    yield from buf


def rank_slice(items: Iterable[T], rank: int, world: int, *, whole: bool = False) -> Iterator[T]:
    """Rank ``rank``'s share: item ``rank`` of each complete group of ``world`` consecutive items.

    Ranks get disjoint items and the same count (the last incomplete group is dropped), so no rank
    waits for another at the end of an epoch. ``whole`` (an evaluation, where every item counts): the
    last incomplete group too, so the ranks' shares make up all the items.
    """
    group: list[T] = []
    for item in items:
        group.append(item)
        if len(group) == world:
            yield group[rank]
            group = []
    if whole and rank < len(group):
        yield group[rank]


def batched(items: Iterable[T], size: int, drop_last: bool) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch
