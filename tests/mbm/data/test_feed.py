import itertools
import os
from collections import Counter, deque

import numpy as np
import pytest
import torch

import mbm.data.loader as loader_module
from mbm.data import CollateConfig, ShardStream, StreamConfig, StreamLoader, resolve_data, segments
from mbm.data.collate import collate, map_tensors, pack_collate
from mbm.data.decode import Sample
from mbm.data.feed import RegisteredFeed, feed_from_env
from mbm.data.segments import REUSABLE, SegmentPool, header
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset

DIMS = {"text": 4, "image": 3, "audio": 2}
CUDA = torch.device("cuda")  # a name only: the copies below stand in for the device

needs_reuse = pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class LaggingCopies:
    """Stands in for a GPU: a copy reads host memory only when it completes, ``lag`` copies after it was
    queued (or when the test says so), as a DMA on a busy stream would; ``done`` is true from then on."""

    def __init__(self, lag: int | None = None, refuse: bool = False) -> None:
        self.lag, self.refuse = lag, refuse
        self.queued: deque = deque()
        self.locked: set[int] = set()
        self.lock_calls: Counter[int] = Counter()
        self.unlocked: list[int] = []
        self.moved = 0

    def lock(self, segment):
        self.lock_calls[segment.data_ptr()] += 1
        if self.refuse:
            return False
        assert segment.data_ptr() not in self.locked
        self.locked.add(segment.data_ptr())
        return True

    def unlock(self, segment):
        self.locked.remove(segment.data_ptr())
        self.unlocked.append(segment.data_ptr())

    def copy(self, batch):
        for t in _tensors(batch):
            assert t.untyped_storage().data_ptr() in self.locked  # copies read page-locked memory only
        token = {"source": batch, "moved": map_tensors(batch, torch.empty_like), "done": False}
        self.queued.append(token)
        while self.lag is not None and len(self.queued) > self.lag:
            self._complete(self.queued.popleft())
        return token["moved"], token

    def move(self, batch):
        self.moved += 1
        return map_tensors(batch, torch.clone)

    def complete_all(self):
        while self.queued:
            self._complete(self.queued.popleft())

    def _complete(self, token):
        src, dst = list(_tensors(token["source"])), list(_tensors(token["moved"]))
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)
        token["done"] = True

    def done(self, token):
        return token["done"]

    def wait(self, token):
        if not token["done"]:
            self.queued.remove(token)
            self._complete(token)


def sample(sid, fill, **lengths):
    feats = {m: np.full((n, DIMS[m]), fill, np.float16) for m, n in lengths.items()}
    return Sample(id=sid, key=sid, label=1, text=None, features=feats)


@pytest.fixture
def pool():
    old, segments._POOL = segments._POOL, SegmentPool(slots=2)
    try:
        yield segments._POOL
    finally:
        segments._POOL = old
        segments.forget([os.getpid()])


CFG = CollateConfig(feature_dims=DIMS, labels=(1,))


def equal(a, b):
    assert a["ids"] == b["ids"]
    for m in DIMS:
        assert torch.equal(a["features"][m], b["features"][m]) and torch.equal(a["masks"][m], b["masks"][m])
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["present"], b["present"])


@needs_reuse
def test_a_segment_goes_back_to_its_worker_only_once_its_copy_is_done(pool):
    copies = LaggingCopies()
    feed = RegisteredFeed(CUDA, copies)
    first = [sample("a", 1, text=3, image=1)]
    a = pack_collate(first, CFG, shared=True)
    moved_a = feed(a)
    assert copies.lock_calls == {a.buffer.data_ptr(): 1}
    assert header(a.buffer)[1] != a.seq  # not released: the copy has not read it yet
    b = pack_collate([sample("b", 2, text=2)], CFG, shared=True)  # the second slot
    c = pack_collate([sample("c", 3, audio=4)], CFG, shared=True)  # a's slot is still out: a one-off segment
    assert c.seq is None and c.buffer.data_ptr() not in (a.buffer.data_ptr(), b.buffer.data_ptr())
    moved_c = feed(c)  # moved at once, never locked
    assert copies.moved == 1 and len(copies.lock_calls) == 1
    equal(moved_c, collate([sample("c", 3, audio=4)], CFG))
    copies.complete_all()
    equal(moved_a, collate(first, CFG))  # read while a's segment still held a
    moved_b = feed(b)  # releases a (its copy is done), locks b's segment
    assert header(a.buffer)[1] == a.seq
    d = pack_collate([sample("d", 4, image=1)], CFG, shared=True)
    assert d.buffer.data_ptr() == a.buffer.data_ptr()  # a's slot again, now free
    feed(d)
    assert copies.lock_calls[a.buffer.data_ptr()] == 1  # locked once, not per batch
    feed.close()  # waits for b's and d's copies and gives their segments back
    equal(moved_b, collate([sample("b", 2, text=2)], CFG))
    assert header(b.buffer)[1] == b.seq and header(d.buffer)[1] == d.seq
    assert not copies.locked and sorted(copies.unlocked) == sorted({a.buffer.data_ptr(), b.buffer.data_ptr()})


@needs_reuse
def test_a_segment_the_driver_will_not_lock_is_copied_out_and_released_at_once(pool):
    copies = LaggingCopies(refuse=True)
    feed = RegisteredFeed(CUDA, copies)
    for i in range(3):
        samples = [sample(f"s{i}", i + 1, text=2, audio=3)]
        packed = pack_collate(samples, CFG, shared=True)
        equal(feed(packed), collate(samples, CFG))
        assert header(packed.buffer)[1] == packed.seq
    assert list(copies.lock_calls.values()) == [1]  # asked once per segment, not per batch
    assert copies.moved == 3
    feed.close()
    assert not copies.unlocked


@needs_reuse
def test_a_segment_its_worker_outgrew_is_unlocked(pool):
    copies = LaggingCopies(lag=0)
    feed = RegisteredFeed(CUDA, copies)
    segments._POOL = SegmentPool(slots=1)
    small = pack_collate([sample("a", 1, text=1)], CFG, shared=True)
    feed(small)
    feed(pack_collate([sample("b", 1, text=1)], CFG, shared=True))  # releases small's batch; the same segment
    big = pack_collate([sample("c", 1, text=5000)], CFG, shared=True)  # outgrows it: dropped, a new one
    assert header(small.buffer)[2] == 1 and big.buffer.data_ptr() != small.buffer.data_ptr()
    feed(big)
    assert copies.unlocked == [small.buffer.data_ptr()] and copies.locked == {big.buffer.data_ptr()}
    feed.close()
    assert not copies.locked


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=150, samples_per_shard=40, feature_dims={"text": 8, "image": 6},
                                                 lengths={"text": (2, 9), "image": (3, 3)}))
    return out


@needs_reuse
@pytest.mark.parametrize("lag", [0, 3])
def test_workers_batches_reach_the_device_intact_across_epochs(dataset, monkeypatch, lag):
    """The training loader on a (stand-in) GPU: every batch equals the one the loader gives without
    workers, each worker segment is locked once and unlocked at the end, every copy read its batch."""
    src = resolve_data(dataset)
    collate_cfg = CollateConfig(feature_dims=src.feature_dims, labels=tuple(src.labels))
    cfg = StreamConfig(shards=tuple(src.shards), collate=collate_cfg, batch_size=4, shuffle_buffer=16, seed=3)
    want = list(itertools.islice(StreamLoader(ShardStream(cfg)), 40))  # 3 epochs of 13 batches, and one
    copies = LaggingCopies(lag=lag)
    monkeypatch.setattr(loader_module, "RegisteredFeed", lambda device: RegisteredFeed(device, copies))
    loader = StreamLoader(ShardStream(cfg), workers=2, pin_memory=True, feed_device=CUDA)
    assert not loader.pin_memory  # the feed replaces the pin thread
    batches = iter(loader)
    got = [next(batches) for _ in range(40)]
    batches.close()  # the last copies complete here
    for a, b in zip(got, want, strict=True):
        assert a["ids"] == b["ids"]
        for m in src.feature_dims:
            assert torch.equal(a["features"][m], b["features"][m]) and torch.equal(a["masks"][m], b["masks"][m])
        assert torch.equal(a["labels"], b["labels"])
    # locked once each (a segment a worker outgrew is unlocked, and a later one may map at its address)
    locks = sum(copies.lock_calls.values())
    assert 2 <= locks <= 12 and locks == len(copies.unlocked) and not copies.locked
    assert not copies.queued and not segments._RECEIVED


def test_feed_names_are_checked():
    assert feed_from_env(None) == "pinned" and feed_from_env(" Registered ") == "registered"
    with pytest.raises(ValueError, match="MBM_LOADER_FEED='gpu': use one of pinned, registered"):
        feed_from_env("gpu")
    with pytest.raises(ValueError, match="must be a CUDA device"):
        StreamLoader(None, workers=1, feed_device=torch.device("cpu"))
