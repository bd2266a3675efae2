from collections import Counter

import numpy as np

from pipelines.build import offline_direct_runner
from pipelines.extract import FillBatches, ModalityHandler, _split_failed
from schemas import CleanSample, Reject


class FakeInner:
    """Stands in for ExtractorHandler: counts loads; 'boom' inputs fail, 'nan' inputs give NaN."""

    def __init__(self, batch_size=4, keys=None):
        self.loads = 0
        self.calls = []
        self.batch_size = batch_size
        self._keys = keys or (lambda value: (None, batch_size))
        self.keys_made = 0

    def pass_keys(self):
        self.keys_made += 1
        return self._keys

    def load_model(self):
        self.loads += 1
        return "model"

    def run_inference(self, batch, model):
        assert model == "model"
        self.calls.append(list(batch))
        if "boom" in batch:
            raise RuntimeError("kaput")
        return [np.full((2, 3), np.nan if x == "nan" else len(x), np.float32) for x in batch]


def _s(sid, text=None, **kw):
    return CleanSample(id=sid, key=sid, text=text, **kw)


def test_model_loads_lazily_only_when_something_needs_features():
    inner = FakeInner()
    h = ModalityHandler("text", inner, "fp")
    model = h.load_model()
    out = h.run_inference([_s("a", image=np.zeros((2, 2, 3), np.uint8))], model)
    assert inner.loads == 0 and out[0].features == {}
    h.run_inference([_s("b", text="hello")], model)
    h.run_inference([_s("c", text="hi")], model)
    assert inner.loads == 1


def test_batch_failure_isolates_the_bad_sample_and_nan_is_dropped():
    inner = FakeInner()
    h = ModalityHandler("text", inner, "fp")
    batch = [_s("ok", text="abcd"), _s("bad", text="boom", image=np.zeros((2, 2, 3), np.uint8)), _s("n", text="nan")]
    out = {s.id: s for s in h.run_inference(batch, h.load_model())}
    assert out["ok"].features["text"].dtype == np.float16 and float(out["ok"].features["text"][0, 0]) == 4.0
    assert out["ok"].fingerprints == {"text": "fp"}
    assert "text" not in out["bad"].features and "text.extract_error" in out["bad"].dropped["text"]
    assert "text.non_finite_features" in out["n"].dropped["text"]
    assert len(inner.calls) == 1 + 3  # the batch, then one by one



class FailingInner(FakeInner):
    """Raises ``errors[k]`` on its k-th call (None: succeeds)."""

    def __init__(self, errors, **kw):
        super().__init__(**kw)
        self.errors = list(errors)

    def run_inference(self, batch, model):
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            self.calls.append(list(batch))
            raise error
        return super().run_inference(batch, model)


def test_out_of_memory_stops_the_job_instead_of_rejecting_the_batch(monkeypatch):
    import pytest

    from pipelines.errors import ResourceError

    monkeypatch.setenv("MBM_WORKERS", "16")
    inner = FailingInner([MemoryError()])
    h = ModalityHandler("text", inner, "fp")
    with pytest.raises(ResourceError) as got:
        h.run_inference([_s("a", text="abc"), _s("b", text="de")], h.load_model())
    assert len(inner.calls) == 1  # not retried one by one: no sample is to blame
    message = str(got.value)
    assert message.startswith("extract.text: FailingInner on ") and "ran out of host memory featurizing 2" in message
    assert "[runner] workers, now 16" in message and "[extract.text] batch_size, now 4" in message


def test_a_machine_failure_while_retrying_one_by_one_stops_the_job_too():
    import pytest

    from pipelines.errors import ResourceError

    inner = FailingInner([ValueError("bad input"), None, RuntimeError("CUDA error: an illegal memory access")])
    h = ModalityHandler("text", inner, "fp")
    with pytest.raises(ResourceError, match="failed featurizing 1 input"):
        h.run_inference([_s("a", text="abc"), _s("b", text="de"), _s("c", text="f")], h.load_model())


def test_out_of_gpu_memory_is_tried_once_more_with_the_cache_emptied(monkeypatch):
    import pytest
    import torch

    import pipelines.extract as extract
    from pipelines.errors import ResourceError

    emptied = []
    monkeypatch.setattr(extract, "_empty_gpu_cache", lambda: emptied.append(1) or True)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    inner = FailingInner([oom])
    h = ModalityHandler("text", inner, "fp")
    out = h.run_inference([_s("a", text="abc")], h.load_model())
    assert float(out[0].features["text"][0, 0]) == 3.0 and len(emptied) == 1
    inner = FailingInner([oom, oom])
    h = ModalityHandler("text", inner, "fp")
    with pytest.raises(ResourceError, match="ran out of GPU memory"):
        h.run_inference([_s("a", text="abc")], h.load_model())
    assert len(inner.calls) == 2
    # Without CUDA in the process there is no cache to empty: no second try.
    monkeypatch.setattr(extract, "_empty_gpu_cache", lambda: False)
    inner = FailingInner([oom, None])
    h = ModalityHandler("text", inner, "fp")
    with pytest.raises(ResourceError):
        h.run_inference([_s("a", text="abc")], h.load_model())
    assert len(inner.calls) == 1

def test_reused_modalities_are_not_recomputed_but_get_the_fingerprint():
    inner = FakeInner()
    h = ModalityHandler("text", inner, "fp")
    out = h.run_inference([_s("r", text="same", reused={"text": "shards/v000001-000000.tar"})], h.load_model())
    assert inner.loads == 0 and out[0].fingerprints == {"text": "fp"} and out[0].text == "same"


def test_samples_left_without_features_become_rejects():
    lost = _s("x", dropped={"image": "extract.image: image.extract_error: kaput"})
    (reject,) = [o.value for o in _split_failed(lost)]
    assert isinstance(reject, Reject) and reject.stage == "extract.image"
    assert reject.reason == "image.extract_error"
    kept = _s("y", reused={"image": "shards/a.tar"})
    assert list(_split_failed(kept)) == [kept]


def _fill(samples, batch_size=4, keys=None, modality="text"):
    """The batches FillBatches gives ``samples`` in one bundle (the inner handler's pass keys: ``keys``)."""
    inner = FakeInner(batch_size, keys)
    fill = FillBatches(ModalityHandler(modality, inner, "fp"))
    fill.setup()
    fill.start_bundle()
    streamed = [b for s in samples for b in fill.process(s)]
    inner.streamed = len(streamed)  # batches before the end of the bundle
    return streamed + [w.value for w in fill.finish_bundle()], inner


def _ids(batches):
    return sorted(s.id for b in batches for s in b)


def test_batches_hold_batch_size_samples_to_featurize_and_the_others_ride_along():
    # 3 in 4 samples carry text: every batch but the last holds exactly 4 texts.
    samples = [_s(f"s{i:02d}", text="x" if i % 4 else None) for i in range(40)]
    batches, _ = _fill(samples)
    texts = [sum(s.text is not None for s in b) for b in batches]
    assert texts[:-1] == [4] * (len(texts) - 1) and sum(texts) == 30
    assert _ids(batches) == [s.id for s in samples]  # every sample once, none lost


def test_batches_take_whole_passes_of_one_shape():
    # key = the text's length; passes of 3 one-letter texts, 2 two-letter texts, 4 three-letter ones
    rows = {1: 3, 2: 2, 3: 4}
    texts = ["a", "bb", "ccc", "d", "ee", "f", "ggg", "hh", "i", "jj", "kkk", "l", "mm", "nnn", "o", "p"]
    samples = [_s(f"s{i:02d}", text=t) for i, t in enumerate(texts)]
    batches, inner = _fill(samples, batch_size=6, keys=lambda t: (len(t), rows[len(t)]))
    assert _ids(batches) == [s.id for s in samples]
    for b in batches[:inner.streamed]:  # before the end of the bundle: whole passes, at most 6 texts
        counts = Counter(len(s.text) for s in b)
        assert len(b) <= 6 and all(n % rows[k] == 0 for k, n in counts.items()), counts
    assert inner.streamed == 3 and [len(b) for b in batches] == [5, 2, 4, 3, 2]


def test_leftovers_that_fill_no_pass_leave_once_twice_batch_size_wait():
    samples = [_s(f"s{i:02d}", text="x" * (i + 1)) for i in range(10)]  # ten shapes, passes of 4 rows
    batches, _ = _fill(samples, batch_size=4, keys=lambda t: (len(t), 4))
    assert [len(b) for b in batches] == [4, 4, 2]  # at 8 waiting, then 8 again, then the end
    assert _ids(batches) == [s.id for s in samples]


def test_samples_without_the_modality_leave_in_bounded_batches_and_load_nothing():
    samples = [_s(f"s{i:03d}", image=np.zeros((1, 1, 3), np.uint8)) for i in range(70)]
    for batch_size in (4, 128):  # riders hold decoded media: a few dozen at most, whatever the batch size
        batches, inner = _fill(samples, batch_size=batch_size)
        assert [len(b) for b in batches] == [32, 32, 6] and inner.keys_made == 0  # no tokenizer for nothing
    assert _ids(batches) == [s.id for s in samples]


def test_reused_samples_ride_along_and_bad_keys_still_batch():
    samples = [_s("r", text="x", reused={"text": "shards/a.tar"}), _s("a", text="boom"), _s("b", text="y")]

    def keys(t):
        if t == "boom":
            raise ValueError("cannot tokenize")
        return 1, 2

    batches, _ = _fill(samples, batch_size=4, keys=keys)
    assert _ids(batches) == ["a", "b", "r"]


def test_fill_batches_feed_run_inference_in_a_pipeline():
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that, equal_to

    handler = ModalityHandler("text", FakeInner(3), "fp")
    samples = [_s(f"s{i}", text="ab" if i % 2 else None) for i in range(11)]
    with beam.Pipeline(offline_direct_runner()) as p:
        out = (p | beam.Create(samples, reshuffle=False) | beam.ParDo(FillBatches(handler)) | RunInference(handler)
               | beam.Map(lambda s: (s.id, float(s.features["text"][0, 0]) if "text" in s.features else None)))
        assert_that(out, equal_to([(f"s{i}", 2.0 if i % 2 else None) for i in range(11)]))


def test_num_bytes_counts_only_the_modalitys_inputs():
    h = ModalityHandler("image", FakeInner(), "fp")
    batch = [_s("a", text="hello", image=np.zeros((4, 4, 3), np.uint8)), _s("b", text="x")]
    assert h.get_num_bytes(batch) == 48
    assert ModalityHandler("text", FakeInner(), "fp").get_num_bytes(batch) == 6


def test_a_model_that_does_not_fit_stops_the_job_at_load():
    import pytest
    import torch

    from pipelines.errors import ResourceError

    class NoRoom(FakeInner):
        device = "cuda:0"

        def load_model(self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 MiB")

    h = ModalityHandler("text", NoRoom(), "fp")
    with pytest.raises(ResourceError, match=r"on cuda:0 ran out of GPU memory loading its model .*device = \"cpu\""):
        h.run_inference([_s("a", text="abc")], h.load_model())
    bad = FakeInner()
    bad.load_model = lambda: (_ for _ in ()).throw(OSError("no such weights file"))
    h = ModalityHandler("text", bad, "fp")
    with pytest.raises(OSError, match="no such weights"):  # not the machine's limit: raised as it is
        h.run_inference([_s("a", text="abc")], h.load_model())


def test_long_texts_leave_once_four_whole_passes_wait_not_batch_size_texts():
    # a text of length >= 3 fills a pass of its own; shorter ones need 8 to a pass
    samples = [_s(f"s{i:02d}", text="x" * (3 + i % 2) if i < 9 else "y") for i in range(20)]
    batches, inner = _fill(samples, batch_size=128, keys=lambda t: (len(t), 1 if len(t) >= 3 else 8))
    assert [len(b) for b in batches[:inner.streamed]] == [4, 4]  # texts 0-3, then 4-7: not the bundle's end
    assert _ids(batches) == [s.id for s in samples]
    assert [len(b) for b in batches[inner.streamed:]] == [9, 3]  # at the end: whole passes (text 8, 8 "y"s), then the rest


def _fill_deduped(samples, fingerprint, batch_size=4, handler=None):
    """The batches FillBatches gives ``samples`` with dedupe on (a fresh cache under ``fingerprint``, or
    ``handler``'s)."""
    handler = handler or ModalityHandler("text", FakeInner(batch_size), fingerprint, dedupe=True)
    fill = FillBatches(handler)
    fill.setup()
    fill.start_bundle()
    batches = [b for s in samples for b in fill.process(s)]
    return batches + [w.value for w in fill.finish_bundle()], handler


def _h(sid, text, digest):
    return _s(sid, text=text, modality_hashes={"text": digest})


def test_copies_wait_with_the_sample_they_copy_and_take_no_row_of_a_pass():
    # pictures a..f, the rows of a and b five times each: 4 distinct inputs fill a batch of 4
    samples = [_h(f"{d}{i}", d * 3, d) for d in "ab" for i in range(5)] + [_h(d, d * 3, d) for d in "cdef"]
    batches, handler = _fill_deduped(samples, "fp-copies-wait")
    assert _ids(batches) == sorted(s.id for s in samples)
    distinct = [len({s.modality_hashes["text"] for s in b}) for b in batches]
    assert distinct == [4, 2] and [len(b) for b in batches] == [12, 2]
    first = batches[0]
    for d in "ab":  # each copy right after the sample it copies, in that one's batch
        rows = [s.id for s in first if s.modality_hashes["text"] == d]
        assert rows == [f"{d}{i}" for i in range(5)]


def test_run_inference_featurizes_each_input_once_and_copies_get_the_same_features():
    handler = ModalityHandler("text", FakeInner(), "fp-run-once", dedupe=True)
    model = handler.load_model()
    batch = [_h("a0", "aaa", "a"), _h("b0", "bb", "b"), _h("a1", "aaa", "a"), _h("n", None, "")]
    out = {s.id: s for s in handler.run_inference(batch, model)}
    inner = handler._inner
    assert inner.calls == [["aaa", "bb"]]
    assert np.array_equal(out["a1"].features["text"], out["a0"].features["text"])
    assert float(out["a1"].features["text"][0, 0]) == 3.0 and float(out["b0"].features["text"][0, 0]) == 2.0
    assert out["a1"].fingerprints == {"text": "fp-run-once"} and out["n"].features == {}
    # a later batch: "aaa" is in the worker's cache, "boom" fails once for both of its rows
    later = [_h("a2", "aaa", "a"), _h("x0", "boom", "x"), _h("x1", "boom", "x"), _h("c", "c", "c")]
    out = {s.id: s for s in handler.run_inference(later, model)}
    assert inner.calls[1:] == [["boom", "c"], ["boom"], ["c"]]  # the batch, then one by one
    assert float(out["a2"].features["text"][0, 0]) == 3.0
    assert "text.extract_error" in out["x0"].dropped["text"] and out["x1"].dropped == out["x0"].dropped
    handler.run_inference([_h("x2", "boom", "x")], model)  # the failure is cached too: no call
    assert len(inner.calls) == 4


def test_without_dedupe_every_row_is_featurized():
    handler = ModalityHandler("text", FakeInner(), "fp-no-dedupe")
    batch = [_h("a0", "aaa", "a"), _h("a1", "aaa", "a")]
    handler.run_inference(batch, handler.load_model())
    assert handler._inner.calls == [["aaa", "aaa"]]
    batches, _ = _fill([_h(f"a{i}", "aaa", "a") for i in range(8)])
    assert [len(b) for b in batches] == [4, 4]


def test_a_cached_input_rides_along_without_a_row():
    samples = [_h("a0", "aaa", "a")]
    _, handler = _fill_deduped(samples, "fp-rides")
    handler.run_inference(samples, handler.load_model())  # now in the cache
    batches, _ = _fill_deduped([_h("a1", "aaa", "a")] + [_h(d, d, d) for d in "bcde"], "fp-rides", handler=handler)
    assert [[s.id for s in b] for b in batches] == [["b", "c", "d", "e", "a1"]]
    # another job (another handler) in this process does not see this one's cache
    batches, _ = _fill_deduped([_h("a2", "aaa", "a")] + [_h(d, d, d) for d in "bcd"], "fp-rides")
    assert [[s.id for s in b] for b in batches] == [["a2", "b", "c", "d"]]
