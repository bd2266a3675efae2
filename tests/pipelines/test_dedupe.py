from __future__ import annotations

import numpy as np
import pytest

from pipelines import dedupe
from pipelines.dedupe import GroupByMedia, LRUCache, media_key
from schemas import Media, RawSample, Reject


def test_media_key_is_the_image_else_the_audio_where_it_lies():
    img = Media(uri="/data/a.jpg", name="a.jpg")
    member = Media(uri="/data/s.tar", offset=512, size=100)
    assert media_key(RawSample(id="1", text="x", image=img)) == media_key(RawSample(id="2", text="y", image=img))
    assert media_key(RawSample(id="1", image=img, audio=Media(uri="/a.wav"))) == "image:/data/a.jpg"
    assert media_key(RawSample(id="1", audio=Media(uri="/a.wav"))) == "audio:/a.wav"
    assert media_key(RawSample(id="1", image=member)) == "image:/data/s.tar:512:100"
    assert media_key(RawSample(id="1", image=Media(uri="/data/s.tar", offset=612, size=100))) != media_key(
        RawSample(id="1", image=member))
    # bytes in hand (no spool: a remote output folder) are not grouped: they would cross one more shuffle
    assert media_key(RawSample(id="a", image=Media(data=b"\xff\xd8 bytes", name="a.jpg"))) is None
    assert media_key(RawSample(id="t", text="a caption alone")) is None
    assert media_key(Reject(id="r", stage="read", reason="read.duplicate_id")) is None


def test_lru_cache_drops_the_least_recently_used_beyond_its_bytes():
    cache = LRUCache(max_bytes=3000)
    for key in "abc":
        cache.put(key, np.zeros(1000, np.uint8))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", np.zeros(1000, np.uint8))
    assert "b" not in cache and all(k in cache for k in "acd") and len(cache) == 3
    cache.put("huge", np.zeros(5000, np.uint8))  # larger than the whole cache: not kept, nothing dropped
    assert "huge" not in cache and len(cache) == 3
    cache.put("a", "extract.image: image.extract_error: kaput")  # a failure is kept too, replacing
    assert cache.get("a").startswith("extract.image") and cache.get("zz", "none") == "none"


def test_ungroup_keeps_a_group_together_up_to_group_max_and_spreads_the_rest(monkeypatch):
    import apache_beam as beam

    monkeypatch.setattr(dedupe, "GROUP_MAX", 3)
    out = list(dedupe._ungroup(("image:/a.jpg", [f"s{i}" for i in range(5)])))
    assert out[:3] == ["s0", "s1", "s2"]
    assert all(isinstance(o, beam.pvalue.TaggedOutput) for o in out[3:]) and [o.value for o in out[3:]] == ["s3", "s4"]


@pytest.mark.parametrize("copies", [5, 150])  # 150: more than GROUP_MAX, the rest spread
def test_group_by_media_puts_a_pictures_rows_together_and_loses_none(tmp_path, copies):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    samples = [RawSample(id=f"p{p}-{c}", text=f"caption {c}", image=Media(uri=f"/img/{p}.jpg"))
               for c in range(copies) for p in range(4)]  # the rows of each picture apart, as in COCO's captions

    def runs(batch):
        """(picture, run length) for each run of one picture's rows in a bundle's order."""
        ids = [s.id.split("-")[0] for s in batch if s.id.startswith("p")]
        out = []
        for i in ids:
            if out and out[-1][0] == i:
                out[-1][1] += 1
            else:
                out.append([i, 1])
        return out

    with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as p:
        out = p | beam.Create([(media_key(s), s) for s in samples]) | GroupByMedia()
        assert_that(out | beam.Map(lambda s: s.id), equal_to([s.id for s in samples]))
        if copies <= dedupe.GROUP_MAX:  # one element of the grouping: one picture's rows in a row
            together = (out | beam.combiners.ToList() | beam.Map(runs)
                        | beam.Map(lambda r: sorted(n for _, n in r)))
            assert_that(together, equal_to([[copies] * 4]), label="together")


def test_a_job_run_after_another_in_one_process_starts_with_an_empty_cache():
    first = dedupe.feature_cache("image", "fp:run-1")
    first.put("h", np.zeros(4, np.float16))
    assert dedupe.feature_cache("image", "fp:run-1") is first and "h" in first
    second = dedupe.feature_cache("image", "fp:run-2")
    assert "h" not in second and "image:fp:run-1" not in dedupe._FEATURES  # the other job's is dropped
    assert dedupe.feature_cache("text", "fp:run-3") is not second
