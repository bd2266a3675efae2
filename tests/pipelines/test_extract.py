import numpy as np

from pipelines.build import offline_direct_runner
from pipelines.extract import ModalityHandler, _split_failed
from schemas import CleanSample, Reject


class FakeInner:
    """Stands in for ExtractorHandler: counts loads; 'boom' inputs fail, 'nan' inputs give NaN."""

    def __init__(self):
        self.loads = 0
        self.calls = []

    def load_model(self):
        self.loads += 1
        return "model"

    def batch_elements_kwargs(self):
        return {"min_batch_size": 4, "max_batch_size": 4}

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


def test_batches_fill_up_with_samples_that_carry_the_modality():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from pipelines.extract import FEATURIZE_WEIGHT

    h = ModalityHandler("text", FakeInner(), "fp")
    kwargs = h.batch_elements_kwargs()
    assert kwargs["min_batch_size"] == kwargs["max_batch_size"] == 5 * FEATURIZE_WEIGHT - 1
    size = kwargs["element_size_fn"]
    assert size(_s("t", text="x")) == FEATURIZE_WEIGHT
    assert size(_s("i", image=np.zeros((2, 2, 3), np.uint8))) == 1
    assert size(_s("r", text="x", reused={"text": "shards/a.tar"})) == 1
    # 3 in 4 samples carry text: every batch holds at most 4 texts, and all full batches hold exactly 4.
    samples = [_s(f"s{i:02d}", text="x" if i % 4 else None) for i in range(40)]

    def check(batches):
        texts = [sum(s.text is not None for s in b) for b in batches]
        assert sum(texts) == 30 and max(texts) == 4
        assert sorted(texts)[1:] == [4] * (len(texts) - 1)  # one bundle: only the last batch may be short

    with beam.Pipeline(offline_direct_runner()) as p:
        batches = p | beam.Create(samples, reshuffle=False) | beam.BatchElements(**kwargs)
        assert_that(batches, check)


def test_num_bytes_counts_only_the_modalitys_inputs():
    h = ModalityHandler("image", FakeInner(), "fp")
    batch = [_s("a", text="hello", image=np.zeros((4, 4, 3), np.uint8)), _s("b", text="x")]
    assert h.get_num_bytes(batch) == 48
    assert ModalityHandler("text", FakeInner(), "fp").get_num_bytes(batch) == 6
