import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipelines.sink import SinkConfig, bucket_of, encode_sample, num_buckets, write_bucket
from schemas import CleanSample, Reject, sample_key


def _sample(i: int, n_tokens: int = 3, label="cat") -> CleanSample:
    sid = f"s{i:03d}"
    return CleanSample(
        id=sid, key=sample_key(sid), label=label, text=f"caption {i}",
        features={"text": np.full((n_tokens, 4), i, dtype=np.float16), "image": np.ones((2, 8), np.float16)},
        fingerprints={"text": "ft", "image": "fi"}, content_hash=f"h{i}", source=f"m.jsonl:{i + 1}",
    )


def test_num_buckets_and_bucket_of_are_stable():
    assert num_buckets(0, 10) == 1
    assert num_buckets(10, 10) == 1
    assert num_buckets(11, 10) == 2
    assert bucket_of("abc", 7) == bucket_of("abc", 7)
    assert {bucket_of(f"k{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def test_encode_sample_members_are_pickle_free_npy_and_json():
    members = encode_sample(_sample(5))
    assert set(members) == {"__key__", "json", "text.npy", "image.npy"}
    arr = np.load(io.BytesIO(members["text.npy"]), allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == (3, 4) and float(arr[0, 0]) == 5.0
    doc = json.loads(members["json"])
    assert doc["id"] == "s005" and doc["modalities"] == ["text", "image"] and doc["schema_version"] == 1
    assert doc["fingerprint"] == {"text": "ft", "image": "fi"}


def test_write_bucket_rolls_over_sorts_and_is_deterministic(tmp_path):
    items = [("ok", _sample(i)) for i in (4, 1, 3, 0, 2)] + [("reject", Reject("bad", "clean.image", "image.truncated"))]
    cfg = SinkConfig(staging=str(tmp_path / "a"), samples_per_shard=2, max_shard_bytes=1 << 30)
    sidecar = write_bucket(0, items, cfg)
    assert [s["samples"] for s in sidecar["shards"]] == [2, 2, 1]
    keys = []
    for sh in sidecar["shards"]:
        keys += [s["__key__"] for s in wds.WebDataset(str(tmp_path / "a" / sh["path"]), shardshuffle=False)]
    assert keys == ["s000", "s001", "s002", "s003", "s004"]
    rows = {r["id"]: r for r in sidecar["rows"]}
    assert rows["bad"]["status"] == "rejected" and rows["bad"]["reason"] == "image.truncated"
    assert rows["s003"]["shard"] == sidecar["shards"][1]["path"] and rows["s003"]["status"] == "ok"
    assert sidecar["labels"] == ["cat"]
    assert json.loads((tmp_path / "a/parts/b00000.json").read_text()) == sidecar
    # Same input in another order → byte-identical tars.
    cfg_b = SinkConfig(staging=str(tmp_path / "b"), samples_per_shard=2, max_shard_bytes=1 << 30)
    write_bucket(0, list(reversed(items)), cfg_b)
    for sh in sidecar["shards"]:
        assert (tmp_path / "a" / sh["path"]).read_bytes() == (tmp_path / "b" / sh["path"]).read_bytes()


def test_write_bucket_rolls_over_by_bytes(tmp_path):
    items = [("ok", _sample(i, n_tokens=400)) for i in range(4)]  # ~3.2 KB of text features each
    cfg = SinkConfig(staging=str(tmp_path), samples_per_shard=100, max_shard_bytes=14000)
    sidecar = write_bucket(3, items, cfg)
    assert len(sidecar["shards"]) == 2
    for sh in sidecar["shards"]:
        with tarfile.open(tmp_path / sh["path"]) as tf:
            assert all(m.mtime == 0 for m in tf.getmembers())
        assert sh["path"].startswith("shards/b00003-")


def test_write_bucket_with_only_rejects_writes_no_shard(tmp_path):
    cfg = SinkConfig(staging=str(tmp_path), samples_per_shard=10, max_shard_bytes=1 << 30)
    sidecar = write_bucket(1, [("reject", Reject("x", "read", "read.bad_json", source="m.jsonl:3"))], cfg)
    assert sidecar["shards"] == [] and len(sidecar["rows"]) == 1
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("sid", ["a.b", "dir/file.jpg", "h-looks-hashed", "x" * 81, "ünïcode"])
def test_unsafe_ids_get_hashed_keys(sid):
    key = sample_key(sid)
    assert key.startswith("h-") and "." not in key and "/" not in key and len(key) == 42
