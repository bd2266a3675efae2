import os

import numpy as np
import pytest
import torch

from mbm.data import segments
from mbm.data.collate import IGNORE, CollateConfig, PackedBatch, collate, fit_length, pack_collate
from mbm.data.decode import Sample
from mbm.data.segments import REUSABLE
from mbm.data.synthetic import write_tiny_tokenizer

DIMS = {"text": 4, "image": 3, "audio": 2}


def sample(sid, label=None, caption=None, **lengths):
    feats = {m: np.full((n, DIMS[m]), i + 1, np.float16) for i, (m, n) in enumerate(lengths.items())}
    return Sample(id=sid, key=sid, label=label, text=caption, features=feats)


def test_pads_each_modality_and_masks_real_tokens_only():
    batch = collate([sample("a", "cat", text=2, image=3), sample("b", 1, audio=5, text=4)],
                    CollateConfig(feature_dims=DIMS, labels=(1, "cat")))
    assert batch["features"]["text"].shape == (2, 4, 4)
    assert batch["masks"]["text"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["masks"]["image"].tolist() == [[True] * 3, [False] * 3]
    assert batch["masks"]["audio"].tolist() == [[False] * 5, [True] * 5]
    assert batch["features"]["image"][1].abs().sum() == 0  # missing modality is zeros
    assert batch["features"]["text"][0, 2:].abs().sum() == 0  # padding is zeros
    assert batch["present"].tolist() == [[True, True, False], [True, False, True]]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["features"]["text"].dtype == torch.float16  # as stored; the model casts


def test_modality_absent_from_whole_batch_gets_one_masked_slot():
    batch = collate([sample("a", text=2)], CollateConfig(feature_dims=DIMS))
    assert batch["features"]["audio"].shape == (1, 1, 2)
    assert not batch["masks"]["audio"].any()


def test_labels_map_by_type_and_unknown_or_null_is_ignored():
    cfg = CollateConfig(feature_dims=DIMS, labels=(1, "1", "dog"))
    batch = collate([sample("a", "1", text=1), sample("b", 1, text=1), sample("c", None, text=1),
                     sample("d", "emu", text=1)], cfg)
    assert batch["labels"].tolist() == [1, 0, IGNORE, IGNORE]


def test_fit_length_cuts_text_and_pools_other_modalities():
    arr = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert fit_length(arr, 4, "text").tolist() == arr[:4].tolist()
    pooled = fit_length(arr, 3, "audio")
    assert pooled.shape == (3, 2)
    assert pooled[:, 0].tolist() == [1.0, 5.0, 9.0]
    assert fit_length(arr, 10, "audio") is arr


def test_max_tokens_applies_in_collate():
    batch = collate([sample("a", audio=9)], CollateConfig(feature_dims=DIMS, max_tokens={"audio": 4}))
    assert batch["features"]["audio"].shape == (1, 4, 2)


def test_generate_targets_are_bos_text_eos_padded(tmp_path):
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    cfg = CollateConfig(feature_dims=DIMS, tokenizer=tok, with_targets=True, max_target_len=8)
    batch = collate([sample("a", caption="a red cat", image=1), sample("b", caption="dog", image=1)], cfg)
    # tiny vocab: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 a=5 cat=6 dog=7 ... red=14
    assert batch["target_ids"].tolist() == [[2, 5, 14, 6, 3], [2, 7, 3, 0, 0]]
    assert batch["target_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]


def test_every_byte_of_a_batch_is_written_whatever_its_buffer_held(tmp_path, monkeypatch):
    """Buffers come uninitialized (a reused worker segment holds an earlier batch): padding, masks and
    absent modalities must come out as from a zeroed buffer."""
    import importlib

    collate_module = importlib.import_module("mbm.data.collate")  # mbm.data.collate is also the function

    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    cfg = CollateConfig(feature_dims=DIMS, labels=(1, "cat"), tokenizer=tok, with_targets=True, max_target_len=8)
    batch = [sample("a", "cat", caption="a red cat", text=2, image=3), sample("b", 1, caption="dog", audio=5, text=4),
             sample("c", None, caption="", image=1)]
    want = collate(batch, cfg)
    allocate = collate_module._Layout.allocate

    def dirty(self, shared):
        buffer, seq, key = allocate(self, shared)
        buffer.fill_(0xFF)  # float16 NaN, bool True, int64 -1
        return buffer, seq, key

    monkeypatch.setattr(collate_module._Layout, "allocate", dirty)
    got = collate(batch, cfg)
    for key in ("features", "masks"):
        for m in DIMS:
            assert torch.equal(got[key][m], want[key][m]), (key, m)
    for key in ("present", "labels", "target_ids", "target_mask"):
        assert torch.equal(got[key], want[key]), key
    assert got["features"]["text"][0, 2:].abs().sum() == 0 and got["features"]["image"][1].abs().sum() == 0
    assert got["masks"]["audio"].tolist() == [[False] * 5, [True] * 5, [False] * 5]
    assert got["target_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2, [True] * 2 + [False] * 3]


def read_only(a):
    out = np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)  # as decoded from a shard
    assert not out.flags.writeable
    return out


def reference_batch(samples, cfg):
    """The classify batch written plainly: one float16 array per modality, one copy per sample."""
    feats, masks = {}, {}
    for m, dim in cfg.feature_dims.items():
        arrays = [fit_length(s.features[m], cfg.max_tokens.get(m), m) if m in s.features else None for s in samples]
        T = max([a.shape[0] for a in arrays if a is not None], default=1)
        feats[m] = np.zeros((len(samples), T, dim), np.float16)
        masks[m] = np.zeros((len(samples), T), bool)
        for i, a in enumerate(arrays):
            if a is not None:
                feats[m][i, : a.shape[0]] = a.astype(np.float16)
                masks[m][i, : a.shape[0]] = True
    return feats, masks


def random_samples(rng, n):
    out = []
    for i in range(n):
        lengths = {m: int(rng.integers(1, 40)) for m in DIMS if rng.random() < 0.7}
        feats = {m: read_only(rng.normal(size=(k, DIMS[m])).astype(np.float16)) for m, k in lengths.items()}
        out.append(Sample(id=f"s{i}", key=f"s{i}", label=int(rng.integers(0, 3)), features=feats))
    return out


def test_batches_match_a_plain_reference_shared_or_not():
    rng = np.random.default_rng(0)
    cfg = CollateConfig(feature_dims=DIMS, max_tokens={"audio": 16}, labels=(0, 1, 2))
    for n in (1, 5, 17):
        samples = random_samples(rng, n)
        want_feats, want_masks = reference_batch(samples, cfg)
        for shared in (False, True):
            packed = pack_collate(samples, cfg, shared=shared)
            assert packed.buffer.is_shared() == shared
            batch = packed.unpack()
            for m in DIMS:
                assert batch["features"][m].dtype == torch.float16
                np.testing.assert_array_equal(batch["features"][m].numpy(), want_feats[m])  # padding zeros too
                np.testing.assert_array_equal(batch["masks"][m].numpy(), want_masks[m])
            assert batch["labels"].tolist() == [s.label for s in samples]
            assert batch["present"].tolist() == [[m in s.features for m in DIMS] for s in samples]
            assert batch["ids"] == [s.id for s in samples]


def test_a_packed_batch_is_one_buffer_that_crosses_processes_as_one_segment():
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions

    samples = [sample("a", "cat", text=2, image=3), sample("b", 1, audio=5, text=4)]
    packed = pack_collate(samples, CollateConfig(feature_dims=DIMS, labels=(1, "cat")), shared=True)
    assert packed.buffer.is_shared() and (packed.seq is not None) == REUSABLE
    copy = pickle.loads(ForkingPickler.dumps(packed))  # torch shares the storage, as between processes
    assert isinstance(copy, PackedBatch) and copy.seq == packed.seq
    got = copy.unpack()
    bases = {t.untyped_storage().data_ptr() for t in (*got["features"].values(), *got["masks"].values(),
                                                       got["labels"], got["present"])}
    assert len(bases) == 1 and not got["features"]["text"].is_shared()  # copied out of the segment
    want = collate(samples, CollateConfig(feature_dims=DIMS, labels=(1, "cat")))
    assert torch.equal(got["features"]["text"], want["features"]["text"])
    assert got["masks"]["audio"].tolist() == [[False] * 5, [True] * 5]
    segments.forget([os.getpid()])


@pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")
def test_a_reused_segment_crosses_once_and_later_batches_name_it():
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions

    cfg = CollateConfig(feature_dims=DIMS, labels=(1, "cat"))
    pool = segments.SegmentPool(slots=1)
    old, segments._POOL = segments._POOL, pool
    try:
        first = [sample("a", "cat", text=2, image=3)]
        packed = pack_collate(first, cfg, shared=True)
        sent = ForkingPickler.dumps(packed)  # as a worker's queue sends it
        got = pickle.loads(sent)  # as the training process receives it: keeps the segment
        assert got.key == packed.key == (os.getpid(), pool.token, 1)
        assert torch.equal(got.unpack()["features"]["text"], collate(first, cfg)["features"]["text"])
        second = [sample("b", 1, text=4, audio=2)]
        again = pack_collate(second, cfg, shared=True)  # the same segment, released by the unpack above
        assert again.key == packed.key
        named = ForkingPickler.dumps(again)
        assert len(named) < len(sent) and b"rebuild_storage" not in named  # the key alone, no descriptor
        got = pickle.loads(named)
        assert got.buffer is segments.received(packed.key)
        assert torch.equal(got.unpack()["features"]["text"], collate(second, cfg)["features"]["text"])
        segments.forget([os.getpid()])
        with pytest.raises(RuntimeError, match="has not received or has let go of"):
            pickle.loads(ForkingPickler.dumps(pack_collate(second, cfg, shared=True)))
    finally:
        segments._POOL = old
        segments.forget([os.getpid()])


@pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")
def test_a_segment_a_worker_outgrows_is_let_go_of_on_both_sides():
    pool = segments.SegmentPool(slots=1)
    small, seq, key = pool.take(1000)
    segments.receive(key, small)
    segments.header(small)[1] = seq  # the training process is done with it
    big, _, bigger = pool.take(10_000)  # too small now: a new segment under a new key
    assert bigger != key and bigger[2] == 2 and big.numel() >= 10_000
    assert segments.header(small)[2] == 1  # flagged dropped
    segments.receive(bigger, big)  # the larger one arrives; the dropped one goes
    assert segments.received(bigger) is big
    with pytest.raises(RuntimeError):
        segments.received(key)
    segments.forget([os.getpid()])
    with pytest.raises(RuntimeError):
        segments.received(bigger)


@pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")
def test_worker_segments_are_reused_only_once_released():
    from mbm.data.segments import HEADER, SegmentPool

    cfg = CollateConfig(feature_dims=DIMS, labels=(1, "cat"))
    big = [sample("a", "cat", text=30, image=3), sample("b", 1, audio=5, text=4)]
    small = [sample("c", 1, text=1)]
    pool = SegmentPool(slots=2)
    import mbm.data.segments as segments

    old, segments._POOL = segments._POOL, pool
    try:
        a = pack_collate(big, cfg, shared=True)
        b = pack_collate(big, cfg, shared=True)
        c = pack_collate(small, cfg, shared=True)  # both slots out: a one-off segment
        assert c.seq is None and len(pool.segments) == 2
        want_a = collate(big, cfg)
        got_a = a.unpack()  # copies out, releases a's slot
        d = pack_collate(small, cfg, shared=True)  # reuses a's slot, holding a's bytes: all of d's written
        assert d.buffer.data_ptr() == a.buffer.data_ptr() and d.seq == 4
        assert torch.equal(got_a["features"]["text"], want_a["features"]["text"])  # a's copy is untouched
        got_d, want_d = d.unpack(), collate(small, cfg)
        for key in ("features", "masks"):
            for m in DIMS:
                assert torch.equal(got_d[key][m], want_d[key][m]), (key, m)
        with pytest.raises(RuntimeError, match="reused before it was read"):
            a.unpack()  # its slot now holds another batch
        assert b.unpack()["ids"] == ["a", "b"] and HEADER == 64
    finally:
        segments._POOL = old


def test_fit_length_pools_in_float32_exactly_as_before():
    rng = np.random.default_rng(1)
    for n, max_len in ((9, 4), (265, 128), (400, 128), (129, 128)):
        arr = read_only(rng.normal(size=(n, 80)).astype(np.float16))
        starts = np.linspace(0, n, max_len + 1).astype(np.int64)
        want = (np.add.reduceat(arr.astype(np.float32), starts[:-1], axis=0) / np.diff(starts)[:, None])
        got = fit_length(arr, max_len, "audio")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_dataloader_pinning_pins_the_one_buffer(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []

    def fake_pin(self, *args, **kwargs):  # no accelerator here: stand in for page-locking
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    packed = pack_collate([sample("a", "cat", text=2, image=3)], CollateConfig(feature_dims=DIMS, labels=("cat",)))
    out = pin_memory(packed)  # what DataLoader(pin_memory=True) does to each batch
    assert isinstance(out, PackedBatch) and pinned == [packed.buffer]
    assert out.buffer.data_ptr() != packed.buffer.data_ptr()
    assert torch.equal(out.unpack()["features"]["text"], packed.unpack()["features"]["text"])


@pytest.mark.skipif(not REUSABLE, reason="segments are reused on x86-64 only")
def test_pinning_a_batch_in_a_reused_segment_copies_it_out_and_releases_the_segment(monkeypatch):
    from mbm.data.segments import header

    real_empty, pinned = torch.empty, []

    def fake_empty(*args, pin_memory=False, **kwargs):  # no accelerator here: stand in for page-locking
        out = real_empty(*args, **kwargs)
        if pin_memory:
            pinned.append(out)
        return out

    monkeypatch.setattr(torch, "empty", fake_empty)
    samples = [sample("a", "cat", text=2, image=3)]
    cfg = CollateConfig(feature_dims=DIMS, labels=("cat",))
    packed = pack_collate(samples, cfg, shared=True)
    assert packed.seq is not None and header(packed.buffer)[1] != packed.seq
    out = packed.pin_memory()
    assert out.seq is None and out.buffer is pinned[0] and header(packed.buffer)[1] == packed.seq
    assert out.key == packed.key  # the loader learns from it whose segments this process keeps
    assert torch.equal(out.unpack()["features"]["text"], collate(samples, cfg)["features"]["text"])


def test_fit_length_sums_each_segment_in_order():
    rng = np.random.default_rng(2)
    for n, max_len in ((3000, 128), (1000, 999), (17, 16), (50, 7)):
        arr = read_only(rng.normal(-20, 10, size=(n, 6)).astype(np.float16))
        starts = np.linspace(0, n, max_len + 1).astype(np.int64)
        want = np.empty((max_len, 6), np.float32)
        for i, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            acc = arr[a].astype(np.float32)
            for row in arr[a + 1: b]:
                acc = acc + row.astype(np.float32)
            want[i] = acc / np.float32(b - a)
        np.testing.assert_array_equal(fit_length(arr, max_len, "audio"), want)


def test_without_segment_reuse_every_batch_gets_its_own_segment(monkeypatch):
    import mbm.data.segments as segments

    monkeypatch.setattr(segments, "REUSABLE", False)
    monkeypatch.setattr(segments, "_POOL", None)  # the next pool is built without reuse
    cfg = CollateConfig(feature_dims=DIMS, labels=("cat",))
    samples = [sample("a", "cat", text=2, image=3)]
    packed = [pack_collate(samples, cfg, shared=True) for _ in range(3)]
    assert all(p.seq is None and p.buffer.is_shared() for p in packed)
    assert len({p.buffer.data_ptr() for p in packed}) == 3
    assert torch.equal(packed[0].unpack()["features"]["text"], collate(samples, cfg)["features"]["text"])


def test_content_ids_are_equal_for_the_same_input_and_distinct_without_one():
    cfg = CollateConfig(feature_dims={"text": 2, "image": 3})
    img = np.ones((1, 3), np.float16)
    samples = [Sample(id="a", key="a", features={"text": np.ones((2, 2), np.float16), "image": img},
                      content={"text": "aa" * 32, "image": "f0" * 32}),
               Sample(id="b", key="b", features={"text": np.ones((2, 2), np.float16), "image": img},
                      content={"text": "bb" * 32, "image": "f0" * 32}),  # the same picture, another caption
               Sample(id="c", key="c", features={"image": img}),  # no hashes (an older dataset)
               Sample(id="d", key="d", features={"image": img})]
    batch = collate(samples, cfg)
    image, text = batch["content"]["image"].tolist(), batch["content"]["text"].tolist()
    assert image[0] == image[1] == int("f0" * 7 + "f", 16) and image[2] != image[3] and min(image[2:]) < 0
    assert text[0] != text[1] and len(set(text + image)) == 7
    assert batch["content"]["image"].dtype == torch.int64


def test_a_content_hash_that_is_not_hex_still_groups_equal_strings():
    from mbm.data.collate import content_id

    assert content_id("image-0007", 0) == content_id("image-0007", 5) != content_id("image-0008", 0)
    assert content_id("image-0007", 0) >= 0 and content_id(None, 3) == content_id("", 3) == -4
