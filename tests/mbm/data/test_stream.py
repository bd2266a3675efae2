import io
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import webdataset as wds

from mbm.data import CollateConfig, ShardStream, StreamConfig, StreamLoader, resolve_data, split_of
from mbm.data.errors import SkipLog
from mbm.data.loader import PassLoader
from mbm.data.segments import REUSABLE, SLOTS
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
from tests.support.scans import settle_shards

DIMS = {"text": 8, "image": 6, "audio": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=150, samples_per_shard=40, feature_dims=DIMS,
                                                 lengths={"text": (2, 5), "image": (3, 3), "audio": (2, 6)}))
    return out


def scan_files(folder):
    """The scan files in ``folder`` (not its ``.pruned`` marker), sorted."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".scan"))


def stream_cfg(source, **kw):
    collate = CollateConfig(feature_dims=source.feature_dims, labels=tuple(source.labels))
    defaults = dict(shards=tuple(source.shards), collate=collate, batch_size=4, shuffle_buffer=16, seed=3)
    return StreamConfig(**{**defaults, **kw})


def ids_of(batches):
    return [b["ids"] for b in batches]


def test_order_is_fixed_by_seed_and_epoch(dataset):
    src = resolve_data(dataset)
    a = ids_of(ShardStream(stream_cfg(src)))
    assert a == ids_of(ShardStream(stream_cfg(src)))
    assert a != ids_of(ShardStream(stream_cfg(src), epoch=1))
    assert a != ids_of(ShardStream(stream_cfg(src, seed=4)))
    whole = stream_cfg(src, drop_last=False)
    assert sorted(sum(ids_of(ShardStream(whole)), [])) == sorted(sum(ids_of(ShardStream(whole, epoch=1)), []))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_get_equal_batches(dataset, world):
    src = resolve_data(dataset)
    cfg = stream_cfg(src)  # training's: whole batches
    per_rank = [sum(ids_of(ShardStream(cfg, rank=r, world=world)), []) for r in range(world)]
    everything = sum(ids_of(ShardStream(replace(cfg, drop_last=False))), [])
    assert len({len(ids) for ids in per_rank}) == 1
    assert len({len(ids_of(ShardStream(cfg, rank=r, world=world))) for r in range(world)}) == 1
    flat = sum(per_rank, [])
    assert len(flat) == len(set(flat))
    # left out: under one group of ``world`` samples, and under a batch on each rank
    assert set(flat) <= set(everything) and len(everything) - len(flat) < world * cfg.batch_size + world


def test_split_is_a_hash_of_the_id_and_train_val_partition(dataset):
    src = resolve_data(dataset)
    train = set(sum(ids_of(ShardStream(stream_cfg(src, drop_last=False))), []))
    val = set(sum(ids_of(ShardStream(stream_cfg(src, split="val", shuffle=False, drop_last=False))), []))
    assert val and not train & val
    assert all(split_of(i, 0.1) == "val" for i in val) and all(split_of(i, 0.1) == "train" for i in train)
    assert split_of("s000001", 0.1) == split_of("s000001", 0.1)


def test_tasks_select_usable_samples(dataset):
    src = resolve_data(dataset)
    skips = SkipLog()
    cls = [s for b in ShardStream(stream_cfg(src, drop_last=False)).sample_batches(skips) for s in b]
    assert all(s.label is not None for s in cls) and skips.counts["task.no_label"] > 0
    ret = [s for b in ShardStream(stream_cfg(src, task="retrieve", pair=("text", "image"), drop_last=False))
           .sample_batches(SkipLog()) for s in b]
    assert all({"text", "image"} <= set(s.features) for s in ret)
    assert any(s.label is None for s in ret)  # unlabeled samples serve retrieval
    gen = [s for b in ShardStream(stream_cfg(src, task="generate", drop_last=False)).sample_batches(SkipLog())
           for s in b]
    assert all(s.text for s in gen)


def test_state_round_trip_resumes_with_exactly_the_unseen_batches(dataset):
    src = resolve_data(dataset)
    cfg = stream_cfg(src)
    reference = [b["ids"] for b in itertools.islice(StreamLoader(ShardStream(cfg, rank=1, world=2)), 40)]
    for cut in (5, 13, 27):  # mid-epoch, at an epoch's end, in a later epoch (13 batches per epoch here)
        first = StreamLoader(ShardStream(cfg, rank=1, world=2))
        seen = [b["ids"] for b in itertools.islice(first, cut)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = StreamLoader(ShardStream(cfg, rank=1, world=2))
        resumed.load_state_dict(state)
        rest = [b["ids"] for b in itertools.islice(resumed, 40 - cut)]
        assert seen + rest == reference, cut
    assert first.state_dict()["world_size"] == 2


def test_state_from_another_layout_is_refused(dataset):
    src = resolve_data(dataset)
    loader = StreamLoader(ShardStream(stream_cfg(src), world=2))
    with pytest.raises(ValueError, match="batch_size 4 → 8"):
        StreamLoader(ShardStream(stream_cfg(src, batch_size=8), world=2)).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match=r"world_size 2 → 1 changed since the checkpoint; resume with 2 processes "
                                         r"\(torchrun --nproc_per_node 2 ...\)"):
        StreamLoader(ShardStream(stream_cfg(src), world=1)).load_state_dict(loader.state_dict())


def test_workers_yield_the_same_batches_in_the_same_order(dataset):
    src = resolve_data(dataset)
    cfg = stream_cfg(src)
    alone = StreamLoader(ShardStream(cfg))
    pooled = StreamLoader(ShardStream(cfg), workers=2)
    a = [b["ids"] for b in itertools.islice(alone, 30)]
    b = [b["ids"] for b in itertools.islice(pooled, 30)]
    assert a == b
    assert pooled.state_dict() == alone.state_dict()


def test_workers_start_after_the_shards_are_scanned_once(tmp_path, monkeypatch):
    import mbm.data.loader as loader_module
    import mbm.data.scan as scan

    out = str(tmp_path / "ds")
    write_synthetic_dataset(out, SyntheticConfig(num_samples=60, samples_per_shard=10, feature_dims=DIMS,
                                                 lengths={"text": (2, 5), "image": (3, 3), "audio": (2, 6)}))
    src = resolve_data(out)
    settle_shards(monkeypatch, *src.shards)
    folder = tmp_path / "scans"
    monkeypatch.setattr(scan, "_CACHE", scan.ScanCache(limit=0, folder=str(folder)))
    calls = []

    def spy(paths, processes, *, start=0):
        calls.append((len(scan_files(folder)) if folder.exists() else 0, processes, start))
        done = scan.index_shards(paths, processes, start=start)
        assert done == len(src.shards) == len(scan_files(folder))
        return done

    monkeypatch.setattr(loader_module, "index_shards", spy)
    monkeypatch.setattr(scan, "POOL_SAMPLES", 0)  # 60 samples: scanned in parallel as a large dataset would be
    cfg = stream_cfg(src, drop_last=False)
    pooled = StreamLoader(ShardStream(cfg, rank=1, world=2), workers=2)
    try:
        assert [b["ids"] for b in pooled.one_pass()] == [b["ids"] for b in ShardStream(cfg, rank=1, world=2)]
    finally:
        pooled.close()
    assert calls == [(0, 2, 3)]  # before the workers started, none kept; rank 1 of 2 begins half-way


def test_empty_split_is_an_error_not_a_hang(dataset):
    src = resolve_data(dataset)
    loader = StreamLoader(ShardStream(stream_cfg(src, batch_size=10_000)))
    with pytest.raises(ValueError, match="no batch"):
        next(iter(loader))


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _write_bad_shard(path):
    good_json = {"id": "ok1", "label": "cat", "text": "t", "modalities": ["text"], "schema_version": 1}
    samples = [
        {"__key__": "ok1", "json": json.dumps(good_json).encode(), "text.npy": _npy(np.ones((2, 8), np.float16))},
        {"__key__": "pickled", "json": json.dumps({**good_json, "id": "pickled"}).encode(),
         "text.npy": _npy(np.array([{"evil": 1}], dtype=object))},
        {"__key__": "garbage", "json": json.dumps({**good_json, "id": "garbage"}).encode(), "text.npy": b"\x93NUMPY!"},
        {"__key__": "wrongdim", "json": json.dumps({**good_json, "id": "wrongdim"}).encode(),
         "text.npy": _npy(np.ones((2, 5), np.float16))},
        {"__key__": "nofeat", "json": json.dumps({**good_json, "id": "nofeat"}).encode()},
        {"__key__": "badjson", "json": b"{not json", "text.npy": _npy(np.ones((2, 8), np.float16))},
    ]
    with wds.TarWriter(path, encoder=False) as sink:
        for s in samples:
            sink.write(s)


def test_corrupt_shards_and_samples_are_skipped_counted_and_warned(dataset, tmp_path, caplog):
    src = resolve_data(dataset)
    truncated = tmp_path / "truncated.tar"
    data = open(src.shards[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    cut_at_member = tmp_path / "cut.tar"
    cut_at_member.write_bytes(data[:2048])  # tarfile alone would read this as a complete, shorter archive
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(3000))
    bad_samples = tmp_path / "bad.tar"
    _write_bad_shard(str(bad_samples))
    shards = (str(truncated), str(cut_at_member), str(garbage), str(bad_samples), *src.shards[1:], str(tmp_path / "missing.tar"))
    cfg = stream_cfg(src, shards=shards, shuffle=False, drop_last=False, val_fraction=0.0)
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        ids = [s.id for b in ShardStream(cfg).sample_batches(skips) for s in b]
    assert skips.counts["shard.corrupt"] == 4
    assert skips.counts["npy.bad"] == 2 and skips.counts["npy.dim"] == 1
    assert skips.counts["npy.missing"] == 1 and skips.counts["json.bad"] == 1
    assert "ok1" in ids and "pickled" not in ids
    intact = sum(ids_of(ShardStream(stream_cfg(src, shards=tuple(src.shards[1:]), shuffle=False,
                                                drop_last=False, val_fraction=0.0))), [])
    assert set(intact) < set(ids)  # the good shards and the truncated shard's head all still arrive
    assert any("shard.corrupt" in r.getMessage() for r in caplog.records)
    # a bad member's warning names its shard (it named the sample's key alone)
    for reason in ("npy.bad", "npy.dim", "json.bad"):
        assert any(r.getMessage().startswith(f"skipped {reason}: {bad_samples}: ") for r in caplog.records), reason


def test_pattern_and_pinned_versions(dataset, tmp_path):
    out = str(tmp_path / "ds")
    write_synthetic_dataset(out, SyntheticConfig(num_samples=30, samples_per_shard=10, feature_dims=DIMS))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=20, samples_per_shard=20, feature_dims=DIMS,
                                                 labels=("x", "y"), seed=5), version=2)
    current, pinned = resolve_data(out), resolve_data(out + "/@1")
    assert current.version == 2 and current.labels == ["x", "y"] and len(current.shards) == 1
    assert pinned.version == 1 and len(pinned.shards) == 3
    pattern = resolve_data(out + "/shards/v000001-{000000..000002}.tar")
    assert pattern.shard_sizes == [10, 10, 10] and pattern.feature_dims == DIMS
    assert pattern.labels == pinned.labels
    with pytest.raises(ValueError, match="--data"):
        resolve_data(out + "/@7")
    with pytest.raises(ValueError, match="missing"):
        resolve_data(out + "/shards/v000009-{000000..000001}.tar")


def test_npy_pickles_are_refused_outright():
    from mbm.data.decode import load_npy

    with pytest.raises(ValueError):
        load_npy(_npy(np.array([{"a": 1}], dtype=object)))


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


CORRUPT = {  # sample → (reason, its broken member); s18..s21 fill one whole batch
    "s01": ("npy.bad", {"text.npy": b"\x93NUMPY garbage"}),
    "s06": ("npy.dim", {"text.npy": _npy_bytes(np.ones((2, 5), np.float16))}),
    "s09": ("npy.missing", {"image.npy": None}),
    "s13": ("npy.nonfinite", {"text.npy": _npy_bytes(np.full((2, 8), np.inf, np.float16))}),
    **{f"s{i}": ("npy.bad", {"text.npy": _npy_bytes(np.ones((2, 8), np.float16))[:-3]}) for i in range(18, 22)},
    "s24": ("npy.shape", {"image.npy": _npy_bytes(np.ones(6, np.float16))}),
    "s27": ("npy.out_of_range", {"image.npy": _npy_bytes(np.full((3, 6), 7e4, np.float32))}),  # inf as float16
}


def _write_partly_corrupt(path):
    """30 samples: a bad json (s03) and an unlabelled one (s11) are left out by the stream, CORRUPT by decoding."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(30):
            sid = f"s{i:02d}"
            doc = {"id": sid, "label": None if sid == "s11" else "cat", "text": "t", "modalities": ["text", "image"]}
            members = {"__key__": sid, "json": b"{bad" if sid == "s03" else json.dumps(doc).encode(),
                       "text.npy": _npy_bytes(np.full((2, 8), i, np.float16)),
                       "image.npy": _npy_bytes(np.full((3, 6), i, np.float16))}
            members.update(CORRUPT.get(sid, (None, {}))[1])
            sink.write({k: v for k, v in members.items() if v is not None})


@pytest.fixture(scope="module")
def partly_corrupt(tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "c.tar"
    _write_partly_corrupt(path)
    collate = CollateConfig(feature_dims={"text": 8, "image": 6}, labels=("cat",))
    return StreamConfig(shards=(str(path),), collate=collate, batch_size=4, shuffle=False, drop_last=False,
                        val_fraction=0.0)


def expected_batches():
    kept = [f"s{i:02d}" for i in range(30) if f"s{i:02d}" not in ("s03", "s11")]
    batches = [[s for s in kept[i:i + 4] if s not in CORRUPT] for i in range(0, len(kept), 4)]
    return [b for b in batches if b], len(batches)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_corrupt_arrays_are_dropped_from_their_batch_and_counted_the_same_for_any_worker_count(
        partly_corrupt, workers, caplog):
    want, positions = expected_batches()
    loader = StreamLoader(ShardStream(partly_corrupt), workers=workers)
    with caplog.at_level(logging.WARNING):
        got = [b["ids"] for b in itertools.islice(loader, len(want))]
    assert got == want  # the batch of s18..s21 is gone, the others keep their surviving samples
    assert loader.state_dict()["batch"] == positions  # the dropped batch counts as consumed
    assert loader.skipped == {"json.bad": 1, "npy.bad": 5, "npy.dim": 1, "npy.missing": 1,
                              "npy.nonfinite": 1, "npy.out_of_range": 1, "npy.shape": 1, "task.no_label": 1}
    if workers == 0:
        assert any("all 4 samples corrupt" in r.getMessage() for r in caplog.records)


def test_resuming_around_a_dropped_batch_gives_the_rest(partly_corrupt):
    want, _ = expected_batches()
    for cut in (3, 4, 5):  # before, at and after the dropped batch (position 4)
        first = StreamLoader(ShardStream(partly_corrupt))
        seen = [b["ids"] for b in itertools.islice(first, cut)]
        resumed = StreamLoader(ShardStream(partly_corrupt), workers=2)
        resumed.load_state_dict(first.state_dict())
        rest = [b["ids"] for b in itertools.islice(resumed, len(want) - cut)]
        assert seen + rest == want, cut


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counters_continue_across_a_resume(partly_corrupt, workers):
    """A resumed stream does not decode the consumed batches: their decode counters come with the state."""
    want, _ = expected_batches()
    reference = StreamLoader(ShardStream(partly_corrupt))
    counters = [dict(reference.skipped) for _ in itertools.islice(reference, len(want))]
    assert counters[1]["npy.bad"] == 1 and counters[4]["npy.bad"] == 5  # after the dropped batch
    for cut in (2, 4, 5):
        first = StreamLoader(ShardStream(partly_corrupt))
        list(itertools.islice(first, cut))
        resumed = StreamLoader(ShardStream(partly_corrupt), workers=workers)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert [dict(resumed.skipped) for _ in itertools.islice(resumed, len(want) - cut)] == counters[cut:], cut


def test_only_the_owner_of_a_batch_decodes_it(partly_corrupt):
    """Each rank counts the corrupt arrays of its own samples; together, those of every sample."""
    counts = []
    for rank in range(2):
        skips = SkipLog(quiet=True)
        for _ in ShardStream(partly_corrupt, rank=rank, world=2).sample_batches(skips):
            pass
        counts.append({k: v for k, v in skips.counts.items() if k.startswith("npy.")})
    assert counts[0] and counts[1]
    total = {k: counts[0].get(k, 0) + counts[1].get(k, 0) for k in {*counts[0], *counts[1]}}
    assert total == {"npy.bad": 5, "npy.dim": 1, "npy.missing": 1, "npy.nonfinite": 1, "npy.out_of_range": 1,
                     "npy.shape": 1}


def test_loader_workers_persist_across_epochs_and_stop_when_iteration_stops(dataset):
    import multiprocessing

    src = resolve_data(dataset)
    cfg = stream_cfg(src)
    alone = [b["ids"] for b in itertools.islice(StreamLoader(ShardStream(cfg)), 33)]  # 13 batches per epoch
    loader = StreamLoader(ShardStream(cfg), workers=2)
    batches = iter(loader)
    got, workers = [], []
    for _ in range(30):
        got.append(next(batches)["ids"])
        workers.append({p.pid for p in multiprocessing.active_children()})
    assert got == alone[:30]
    assert len(workers[0]) == 2 and all(w == workers[0] for w in workers)  # the same two across 3 epochs
    batches.close()
    assert not multiprocessing.active_children()
    assert [b["ids"] for b in itertools.islice(loader, 3)] == alone[30:33]  # iterating again starts new ones


@pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")
def test_each_worker_segment_crosses_once_across_epochs_and_is_let_go_of_at_close(dataset, monkeypatch):
    """A worker sends its few reused segments again and again: each crosses to the training process
    (a file descriptor, a mapping) with its first batch only, not again every batch or every epoch."""
    import torch.multiprocessing.reductions as reductions

    from mbm.data import segments

    lookups = []
    real = reductions.storage_from_cache

    def spy(cls, key):
        found = real(cls, key)
        lookups.append((key, found is not None))
        return found

    monkeypatch.setattr(reductions, "storage_from_cache", spy)
    cfg = stream_cfg(resolve_data(dataset))
    alone = [b["ids"] for b in itertools.islice(StreamLoader(ShardStream(cfg)), 40)]
    loader = StreamLoader(ShardStream(cfg), workers=2)
    batches = iter(loader)
    got = [next(batches)["ids"] for _ in range(40)]  # 13 batches per epoch
    assert got == alone
    held = dict(segments._RECEIVED)
    assert 2 <= len(held) <= 2 * SLOTS and {key[0] for key in held} == loader._senders
    assert len(lookups) == len({key for key, _ in lookups}) == len(held)  # each received once
    assert not any(found for _, found in lookups)
    batches.close()
    assert not segments._RECEIVED and not loader._senders


def test_remembered_scans_give_the_same_batches_and_counters(dataset, monkeypatch, tmp_path):
    import mbm.data.scan as scan

    src = resolve_data(dataset)
    cfg = stream_cfg(src, drop_last=False)

    def epochs(cache):
        monkeypatch.setattr(scan, "_CACHE", cache)
        return [[(b["ids"], b["skipped"]["stream"]) for b in ShardStream(cfg, epoch=e)] for e in range(3)]

    remembered = scan.ScanCache(limit=10_000, folder=None)
    first = epochs(remembered)
    assert remembered.size > 0  # every shard was remembered after the first epoch
    assert epochs(remembered) == first == epochs(scan.ScanCache(limit=0, folder=None))
    folder = tmp_path / "scans"
    settle_shards(monkeypatch, *src.shards)  # written long enough ago: their scans are kept on disk
    assert epochs(scan.ScanCache(limit=0, folder=str(folder))) == first  # scanned once, then replayed from disk
    assert len(scan_files(folder)) == len(src.shards)


def test_a_shard_deleted_during_the_run_stops_it_at_the_next_epoch(tmp_path):
    out = str(tmp_path / "ds")
    write_synthetic_dataset(out, SyntheticConfig(num_samples=40, samples_per_shard=10, feature_dims=DIMS))
    src = resolve_data(out)
    os.remove(src.shards[0])  # missing from the start: skipped with a warning, as before
    loader = iter(StreamLoader(ShardStream(stream_cfg(src, batch_size=5, shuffle=False))))
    per_epoch = 30 // 5
    assert len([next(loader) for _ in range(per_epoch)]) == per_epoch
    next(loader)  # epoch 2 starts: nothing new is missing
    os.remove(src.shards[1])  # `mbm gc` of the version under a running training
    with pytest.raises(ValueError, match="1 shard.* disappeared during the run"):
        for _ in range(2 * per_epoch):
            next(loader)


def _write_samples(path, n, *, label="cat", text=None):
    """``n`` samples with text and image arrays; ``text`` (.npy bytes) replaces every text array."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(n):
            doc = {"id": f"s{i:02d}", "label": label, "text": "t", "modalities": ["text", "image"]}
            sink.write({"__key__": f"s{i:02d}", "json": json.dumps(doc).encode(),
                        "text.npy": _npy_bytes(np.full((2, 8), i, np.float16)) if text is None else text,
                        "image.npy": _npy_bytes(np.full((3, 6), i, np.float16))})


@pytest.mark.parametrize("workers", [0, 2])
def test_a_split_without_a_batch_says_what_was_skipped(tmp_path, workers):
    collate = CollateConfig(feature_dims={"text": 8, "image": 6}, labels=("cat",))

    def error(name, batch_size=4, **samples):
        _write_samples(tmp_path / f"{name}.tar", 10, **samples)
        cfg = StreamConfig(shards=(str(tmp_path / f"{name}.tar"),), collate=collate, batch_size=batch_size,
                           val_fraction=0.0)
        with pytest.raises(ValueError) as exn:
            next(iter(StreamLoader(ShardStream(cfg, world=2), workers=workers)))
        return str(exn.value)

    unlabelled = error("unlabelled", label=None)
    assert unlabelled == ("the train split has no sample the classify task can use "
                          "(skipped 10 samples without a label (classify needs one) (task.no_label))")
    assert error("few", batch_size=8) == ("the train split yields no batch of 8 on 2 rank(s): 10 usable sample(s) "
                                          "(skipped nothing); lower --batch-size or add data")
    corrupt = error("corrupt", text=_npy_bytes(np.full((2, 8), np.nan, np.float16)))
    assert corrupt.endswith("every sample in this rank's batches has corrupt arrays (skipped 4 npy.nonfinite)")


def test_a_later_epoch_without_a_batch_is_passed_over(tmp_path, caplog):
    """One good sample among five, batches of four: an epoch whose batch leaves the good one out drops
    it (all corrupt) and gives nothing; training goes on with the next epoch instead of stopping."""
    nan = _npy_bytes(np.full((2, 8), np.nan, np.float16))
    with wds.TarWriter(str(tmp_path / "d.tar"), encoder=False) as sink:
        for i in range(5):
            doc = {"id": f"s{i:02d}", "label": "cat", "text": "t", "modalities": ["text"]}
            sink.write({"__key__": f"s{i:02d}", "json": json.dumps(doc).encode(),
                        "text.npy": _npy_bytes(np.ones((2, 8), np.float16)) if i == 0 else nan})
    cfg = StreamConfig(shards=(str(tmp_path / "d.tar"),), collate=CollateConfig(feature_dims={"text": 8}, labels=("cat",)),
                       batch_size=4, val_fraction=0.0, seed=1, shuffle_buffer=8)
    loader = StreamLoader(ShardStream(cfg))
    with caplog.at_level(logging.WARNING, logger="mbm.data.loader"):
        batches = list(itertools.islice(iter(loader), 12))
    assert all(b["ids"] == ["s00"] for b in batches)  # each batch keeps its one good sample
    assert loader.epoch >= 12 and "gave this rank no batch" in caplog.text  # some epochs gave none
    nothing = tmp_path / "nothing.tar"
    _write_samples(nothing, 4, text=nan)
    resumed = StreamLoader(ShardStream(replace(cfg, shards=(str(nothing),))))
    resumed.load_state_dict({**resumed.state_dict(), "epoch": 3})  # a resumed run: epochs after the first
    with pytest.raises(ValueError, match="corrupt arrays"):  # many empty epochs in a row: the data gives nothing
        next(iter(resumed))


@pytest.mark.parametrize("settings", [{}, {"max_tokens": {"text": 3, "audio": 4}}, {"with_targets": True}])
def test_batches_read_into_place_equal_batches_of_whole_decoded_arrays(dataset, settings, tmp_path, monkeypatch):
    import torch

    import mbm.data.decode as decode_module
    from mbm.data.collate import collate
    from mbm.data.stages import decoded
    from mbm.data.synthetic import write_tiny_tokenizer

    source = resolve_data(dataset)
    extra = {"tokenizer": write_tiny_tokenizer(str(tmp_path / "tok"))} if settings.get("with_targets") else {}
    collate_cfg = CollateConfig(feature_dims=source.feature_dims, labels=tuple(source.labels), **settings, **extra)
    stream = ShardStream(stream_cfg(source, collate=collate_cfg, task="generate" if extra else "classify"))
    in_shard = decode_module._in_shard
    placed = []
    monkeypatch.setattr(decode_module, "_in_shard", lambda *a: placed.append(in_shard(*a)) or placed[-1])
    monkeypatch.setattr("mbm.data.stream.settled", lambda *a: pytest.fail("an array read into place was refused"))
    got = list(stream.batches())
    assert sum(p is not None for p in placed) > 100
    want = [collate(decoded(raw, collate_cfg.feature_dims, SkipLog()), collate_cfg)
            for raw in stream.raw_batches(SkipLog(quiet=True))]
    assert len(got) == len(want) > 10

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    for g, w in zip(got, want, strict=True):
        assert g["ids"] == w["ids"]
        assert all(same(g[k], w[k]) for k in w if k not in ("position", "skipped")), g["ids"]


# A training process's freed heap at the moment its loader forks a worker: 768 MiB of tensors freed
# under a live block (so free() cannot shrink the heap), with mbm's allocator settings. The worker's
# resident MiB after its first batch: every resident page of the parent is mapped in the child too.
FORK_AFTER_FREE = textwrap.dedent("""
    import itertools, sys
    import torch
    import mbm.data.loader as loader_module
    from mbm.alloc import tune_malloc
    from mbm.data import CollateConfig, ShardStream, StreamConfig, StreamLoader, resolve_data

    if sys.argv[2] == "keep":
        loader_module.release_free_heap = lambda: False
    tune_malloc()
    freed = torch.ones(768 << 18)  # 768 MiB of float32, in the heap
    pin = torch.ones(1 << 16)  # above it
    del freed
    source = resolve_data(sys.argv[1])
    cfg = StreamConfig(shards=tuple(source.shards), batch_size=4, shuffle_buffer=16, seed=3,
                       collate=CollateConfig(feature_dims=source.feature_dims, labels=tuple(source.labels)))
    loader = StreamLoader(ShardStream(cfg), workers=1)
    batches = iter(loader)
    next(batches)
    (pid,) = [w.pid for w in loader._loader._iterator._workers]
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/smaps_rollup") if ":" in line)
    print(int(fields["Rss"].split()[0]) >> 10)
    batches.close()
""")


def test_loader_workers_do_not_share_the_freed_heap_of_the_training_process(dataset):
    from mbm.alloc import _glibc

    if _glibc() is None or not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("glibc and Linux's /proc only")

    def worker_rss(mode):
        out = subprocess.run([sys.executable, "-c", FORK_AFTER_FREE, dataset, mode], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    kept, released = worker_rss("keep"), worker_rss("release")
    assert kept - released > 600, (kept, released)  # the 768 MiB are resident in the worker only when kept


def _failing_segments(monkeypatch, message, good=2):
    """Workers (forked after this) get a segment for each of their first ``good`` batches, then
    ``RuntimeError(message)`` (counted per batch, not per new segment: how many segments a worker
    makes depends on how fast the training process gives them back)."""
    import mbm.data.segments as seg

    taken = [0]
    real = seg.SegmentPool.take

    def take(self, nbytes):
        taken[0] += 1
        if taken[0] > good:
            raise RuntimeError(message)
        return real(self, nbytes)

    monkeypatch.setattr(seg.SegmentPool, "take", take)


@pytest.mark.skipif(not REUSABLE, reason="workers reuse segments on x86-64 only")
def test_workers_out_of_shared_memory_hand_over_to_the_training_process_with_the_same_batches(
        dataset, monkeypatch, caplog):
    src = resolve_data(dataset)
    cfg = stream_cfg(src)
    alone = StreamLoader(ShardStream(cfg))
    want = ids_of(itertools.islice(alone, 40))  # into the second epoch
    _failing_segments(monkeypatch, "unable to allocate shared memory(shm) for file </torch_1_2_3>: "
                                   "No space left on device (28)")
    loader = StreamLoader(ShardStream(cfg), workers=2)
    with caplog.at_level(logging.WARNING, logger="mbm.data.loader"):
        got = ids_of(itertools.islice(loader, 40))
    assert got == want
    assert loader.workers == 0 and loader.state_dict() == alone.state_dict() and alone.state_dict()["epoch"] == 1
    assert "ran out of shared memory (/dev/shm" in caplog.text and "--shm-size" in caplog.text


@pytest.mark.skipif(not REUSABLE, reason="workers reuse segments on x86-64 only")
def test_other_worker_errors_still_stop_the_loader(dataset, monkeypatch):
    _failing_segments(monkeypatch, "boom", good=0)
    loader = StreamLoader(ShardStream(stream_cfg(resolve_data(dataset))), workers=1)
    with pytest.raises(RuntimeError, match="boom"):
        next(iter(loader))


def test_which_errors_are_shared_memory_ones():
    from mbm.data.loader import out_of_shared_memory

    assert out_of_shared_memory(RuntimeError("Caught RuntimeError in DataLoader worker process 1.\nOriginal "
                                             "Traceback...\nRuntimeError: unable to allocate shared memory(shm) "
                                             "for file </torch_9_1_2>: No space left on device (28)"))
    assert out_of_shared_memory(RuntimeError("DataLoader worker (pid 12) is killed by signal: Bus error. It is "
                                             "possible that dataloader's workers are out of shared memory."))
    assert not out_of_shared_memory(RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed."))
    assert not out_of_shared_memory(RuntimeError("No space left on device: /tmp/x"))


def test_the_workers_niceness_comes_from_the_environment_with_a_clear_error():
    from mbm.data.loader import DEFAULT_NICE, loader_nice

    assert loader_nice(None) == DEFAULT_NICE == loader_nice(" ") and loader_nice("0") == 0 and loader_nice("5") == 5
    with pytest.raises(ValueError, match=r"MBM_LOADER_NICE='abc': give the loader workers' niceness as a whole"):
        loader_nice("abc")


def test_a_process_that_exits_with_a_loader_open_does_not_wait_on_its_workers(tmp_path):
    # Python's exit terminates daemonic children (the loader's workers) with SIGTERM and waits for them;
    # the workers' SIGTERM handling (they outlast a process group's SIGTERM) must not make that wait hang
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "left_open.py"
    script.write_text(textwrap.dedent("""
        import functools
        import torch
        from torch.utils.data import DataLoader, IterableDataset
        from mbm.data.loader import _start_worker

        class Endless(IterableDataset):
            def __iter__(self):
                while True:
                    yield torch.zeros(4)

        loader = DataLoader(Endless(), batch_size=None, num_workers=2, persistent_workers=True,
                            worker_init_fn=functools.partial(_start_worker, 0))
        batches = iter(loader)
        next(batches)
        left_open = [loader, batches]
    """))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    done = subprocess.run([sys.executable, str(script)], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_split_by_a_modality_keeps_samples_sharing_its_content_on_one_side(tmp_path):
    """COCO-style data (five captions per image): split by sample id, one picture's captions trained while
    another of them was held out, and retrieval recall measured memorised pairs."""
    from mbm.data.split import split_key

    out = str(tmp_path / "ds")
    write_synthetic_dataset(out, SyntheticConfig(num_samples=200, samples_per_shard=50, feature_dims=DIMS,
                                                 missing={}, media_repeats=5, lengths={"text": (2, 3), "image": (3, 3),
                                                                                      "audio": (2, 3)}))
    src = resolve_data(out)

    def sides(split_by):
        picture = {}
        for split in ("train", "val"):
            cfg = stream_cfg(src, split=split, split_by=split_by, shuffle=False, drop_last=False, val_fraction=0.3)
            for sid in sum(ids_of(ShardStream(cfg)), []):
                picture.setdefault(int(sid[1:]) // 5, set()).add(split)
        return picture

    by_id, by_image = sides("id"), sides("image")
    assert len(by_id) == len(by_image) == 40
    assert sum(len(s) == 2 for s in by_id.values()) > 10  # most pictures on both sides
    assert all(len(s) == 1 for s in by_image.values())
    assert 0.15 < sum(s == {"val"} for s in by_image.values()) / 40 < 0.45
    assert split_key({"id": "a", "modality_hashes": {"image": "ff"}}, "image") == "image:ff"
    assert split_key({"id": "a", "modality_hashes": {"text": "ff"}}, "image") == "a"  # no image: its id
    assert split_key({"id": "a"}, "audio") == split_key({"id": "a", "modality_hashes": {"image": "ff"}}, "id") == "a"
    with pytest.raises(ValueError, match="--split-by must be one of id, text, image, audio, split, got 'picture'"):
        stream_cfg(src, split_by="picture")


def test_split_by_split_follows_the_datasets_own_split(dataset):
    """A torchvision ImageFolder's or an imagefolder's train/ and test/ (a manifest's 'split' column): split by
    id, test images were trained on and a tenth of the train images held out instead."""
    from mbm.data.split import sample_split
    from mbm.data.stream import Selector

    src = resolve_data(dataset)
    docs = {name: {"id": f"{name}/1.jpg", "meta": {"split": name}}
            for name in ("train", "Training", "test", "validation", "val", "dev", "eval")}
    val = Selector(stream_cfg(src, split="val", split_by="split", val_fraction=0.0))
    train = Selector(stream_cfg(src, split="train", split_by="split", val_fraction=0.0))
    assert {n for n, d in docs.items() if val.in_split(d)} == {"test", "validation", "val", "dev", "eval"}
    assert {n for n, d in docs.items() if train.in_split(d)} == {"train", "Training"}
    # no split, or one of another name: by the id's hash, as --split-by id
    for doc in ({"id": "s000007"}, {"id": "s000007", "meta": {"split": "unlabeled"}}, {"id": "s000007", "meta": {}}):
        assert [sample_split(doc, f, "split") for f in (0.0, 0.999999)] == ["train", "val"]
    with pytest.raises(ValueError, match="--split-by must be one of id, text, image, audio, split, got 'folder'"):
        stream_cfg(src, split_by="folder")


def test_a_dataset_naming_validation_and_test_splits_keeps_the_test_split_apart(tmp_path):
    """Hugging Face's train/validation/test: validation is what training evaluates on, and test is read only
    as --split test; a dataset naming test alone holds it out, as before."""
    from mbm.data.split import holds_test_apart, sample_split
    from mbm.data.stream import Selector

    names = ("train", "Training", "test", "Testing", "validation", "valid", "val", "dev", "eval")
    docs = {name: {"id": f"{name}/1.jpg", "meta": {"split": name}} for name in names}
    assert holds_test_apart({"train": 8, "validation": 1, "test": 1})
    assert holds_test_apart({"dev": 1, "testing": 2})
    assert not holds_test_apart({"train": 8, "test": 2}) and not holds_test_apart({"train": 8, "validation": 2})
    assert not holds_test_apart({"validation": 0, "test": 2}) and not holds_test_apart({})
    pattern = tmp_path / "shards"
    write_synthetic_dataset(str(pattern), SyntheticConfig(num_samples=30, samples_per_shard=10,
                                                          feature_dims={"text": 8}, null_label=0.0, splits=("train", "validation",
                                                                                            " Test ")))
    manifest = json.loads((pattern / "dataset.json").read_text())
    assert manifest["splits"] == {"test": 10, "train": 10, "validation": 10}
    src = resolve_data(str(pattern))
    glob_src = resolve_data(str(pattern / "shards" / "*.tar"))  # no manifest: counted while scanning
    assert src.splits == glob_src.splits == {"test": 10, "train": 10, "validation": 10}
    chosen = {}
    for split in ("train", "val", "test"):
        cfg = stream_cfg(src, split=split, split_by="split", val_fraction=0.0, test_apart=True)
        chosen[split] = {n for n, d in docs.items() if Selector(cfg).in_split(d)}
    assert chosen == {"train": {"train", "Training"}, "val": {"validation", "valid", "val", "dev", "eval"},
                      "test": {"test", "Testing"}}
    assert sample_split({"id": "s000007"}, 0.999999, "split", test_apart=True) == "val"  # naming none: by hash
    assert sample_split(docs["test"], 0.0, "split") == "val"  # no validation split: test is held out
    for kw in ({"split_by": "split"}, {"split_by": "id", "test_apart": True}):
        with pytest.raises(ValueError, match="--split test needs --split-by split on a dataset naming both"):
            stream_cfg(src, split="test", **kw)
    batches = list(ShardStream(stream_cfg(src, split="test", split_by="split", test_apart=True, drop_last=False,
                                          shuffle=False)))
    assert sorted(i for b in batches for i in b["ids"]) == [f"s{i:06d}" for i in range(2, 30, 3)]


def _held_out(source):
    return stream_cfg(source, split="val", val_fraction=0.3, shuffle=False, drop_last=False, batch_size=3)


def test_held_out_passes_equal_the_stream_and_keep_their_workers_between_passes(dataset):
    import multiprocessing

    def children():  # this process's, less those other tests left
        return {p.pid for p in multiprocessing.active_children()} - before

    before = {p.pid for p in multiprocessing.active_children()}
    cfg = _held_out(resolve_data(dataset))
    stream = ShardStream(cfg)
    want = ids_of(stream)
    assert len(want) > 4
    with PassLoader(ShardStream(cfg), workers=2) as loader:
        assert loader.cfg is cfg
        first = ids_of(loader)
        workers = children()
        second = ids_of(loader)
        assert first == second == want  # in the stream's order, whole, every pass
        assert len(workers) == 2 and children() == workers
        assert loader.skipped() == stream.skipped()
    assert not children()
    with PassLoader(ShardStream(cfg)) as alone:  # without workers: this process
        assert ids_of(alone) == want and not children()


def test_a_held_out_pass_given_up_half_way_stops_its_workers(dataset):
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    cfg = _held_out(resolve_data(dataset))
    want = ids_of(ShardStream(cfg))
    loader = PassLoader(ShardStream(cfg), workers=2)
    batches = iter(loader)
    assert next(batches)["ids"] == want[0]
    assert len({p.pid for p in multiprocessing.active_children()} - before) == 2
    batches.close()
    assert not {p.pid for p in multiprocessing.active_children()} - before
    assert ids_of(loader) == want  # the next pass whole, from new workers
    loader.close()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_pass_counts_what_it_skipped_after_its_last_batch(tmp_path, workers, caplog):
    """Samples left out after the last batch is full still count: each worker ends its pass with its final
    counters."""
    path = tmp_path / "t.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i in range(11):
            doc = {"id": f"s{i:02d}", "label": "cat" if i < 8 else None, "text": "t", "modalities": ["text"]}
            sink.write({"__key__": f"s{i:02d}", "json": json.dumps(doc).encode(),
                        "text.npy": _npy_bytes(np.full((2, 8), i, np.float16))})
    collate = CollateConfig(feature_dims={"text": 8}, labels=("cat",))
    cfg = StreamConfig(shards=(str(path),), collate=collate, batch_size=4, shuffle=False, drop_last=False,
                       val_fraction=0.0)
    with PassLoader(ShardStream(cfg), workers=workers) as loader:
        assert ids_of(loader) == [[f"s{i:02d}" for i in range(j, j + 4)] for j in (0, 4)]
        assert loader.skipped() == {"task.no_label": 3}
    training = StreamLoader(ShardStream(cfg), workers=workers)  # an epoch of training counts them too
    with caplog.at_level(logging.INFO, logger="mbm.data.loader"):
        assert [b["ids"][0] for b in itertools.islice(training, 3)] == ["s00", "s04", "s00"]
    assert "epoch 0: skipped {'task.no_label': 3}" in caplog.text


def test_rank_shares_of_an_evaluation_hold_every_sample_once():
    from mbm.data.stages import rank_slice

    items = list(range(11))
    training = [list(rank_slice(items, r, 3)) for r in range(3)]
    assert training == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # equal shares: the last incomplete group dropped
    shares = [list(rank_slice(items, r, 3, whole=True)) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def test_an_evaluation_stream_over_ranks_keeps_every_sample(dataset):
    cfg = _held_out(resolve_data(dataset))
    whole = sorted(i for b in ShardStream(cfg) for i in b["ids"])
    shares = [[i for b in ShardStream(cfg, rank=r, world=3) for i in b["ids"]] for r in range(3)]
    assert sorted(sum(shares, [])) == whole and len(whole) % 3  # a remainder to place
    assert max(map(len, shares)) - min(map(len, shares)) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_tells_corrupt_arrays_from_what_the_stream_left_out(partly_corrupt, workers):
    with PassLoader(ShardStream(partly_corrupt), workers=workers) as loader:
        assert ids_of(loader) == expected_batches()[0]
        assert loader.skipped() == {"json.bad": 1, "npy.bad": 5, "npy.dim": 1, "npy.missing": 1, "npy.nonfinite": 1,
                                    "npy.out_of_range": 1, "npy.shape": 1, "task.no_label": 1}
        assert loader.decode_skipped() == {"npy.bad": 5, "npy.dim": 1, "npy.missing": 1, "npy.nonfinite": 1,
                                           "npy.out_of_range": 1, "npy.shape": 1}
        assert ids_of(loader) == expected_batches()[0]  # a second pass counts afresh
        assert sum(loader.skipped().values()) == 12


@pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")
def test_held_out_pass_workers_let_go_of_their_shared_memory_after_each_pass(dataset, monkeypatch):
    """The workers of held-out passes idle between evaluations: their segments are let go of after each pass
    (on both sides), so /dev/shm holds the training loader's alone meanwhile; the next pass takes new ones."""
    from mbm.data import segments

    received = []
    real = segments.receive
    monkeypatch.setattr(segments, "receive", lambda key, segment: (received.append(key), real(key, segment)))
    monkeypatch.setattr(segments, "_RECEIVED", {})  # this test's loader's alone, whatever an earlier test left
    cfg = _held_out(resolve_data(dataset))
    want = ids_of(ShardStream(cfg))
    with PassLoader(ShardStream(cfg), workers=2) as loader:
        for _ in range(2):
            before = len(received)
            assert ids_of(loader) == want
            new = received[before:]
            assert len(new) >= 2 and len({key[1] for key in new}) == 2  # each worker's segments, a new pool each
            assert not segments._RECEIVED and not loader.loader._senders
        tokens = {key[1] for key in received}
        assert len(tokens) == 4  # no pool of the first pass was used again


def test_the_selector_knows_labels_as_their_json_does():
    from mbm.data.stream import Selector

    cfg = StreamConfig(shards=(), collate=CollateConfig(feature_dims={"text": 4},
                                                        labels=("1", 2, 1.5, False, [1, 2], 0.0)))
    select = Selector(cfg)
    cases = [("1", True), (1, False), (2, True), ("2", False), (2.0, False), (1.5, True), (False, True), (0, False),
             (True, False), ([1, 2], True), ([2, 1], False), ({"a": 1}, False), (float("nan"), False), (0.0, True),
             (-0.0, False)]
    for _ in range(2):  # the second time from memory
        assert [select.known_label(label) for label, _ in cases] == [known for _, known in cases]
    for n in range(10_050):  # labels that never repeat are remembered up to a bound
        select.known_label(f"x{n}")
    assert len(select._known) == 10_000
