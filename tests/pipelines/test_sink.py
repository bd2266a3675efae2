import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipelines.sink import TAR_OVERHEAD, SinkConfig, bucket_of, encode_sample, num_buckets, write_bucket
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
        path = tmp_path / sh["path"]
        with tarfile.open(path) as tf:
            members = tf.getmembers()
            assert all(m.mtime == 0 and not m.pax_headers for m in members)  # plain ustar headers
        # The size estimate's per-member overhead bounds the real one (plus the end-of-archive blocks).
        assert path.stat().st_size <= sum(m.size + TAR_OVERHEAD for m in members) + 10240
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


def _spill(fn, samples):
    fn.start_bundle()
    out = [y for s in samples for y in fn.process(s)]
    fn.finish_bundle()
    return out


def test_staged_samples_write_the_same_shards_and_rows_as_the_samples(tmp_path):
    from apache_beam.coders import coders

    from pipelines.sink import StageSamples, load_staged

    odd = _sample(6).with_(label=3, text="ünïcode ✓", meta={"w": 1.5})
    samples = [_sample(i, n_tokens=1 + i) for i in range(6)] + [odd, _sample(7).with_(features={})]
    # an undecodable byte in the output folder's name, kept as a lone surrogate
    cfg = SinkConfig(staging=str(tmp_path / "b\udcff"), samples_per_shard=3, max_shard_bytes=1 << 20,
                     include_text=True)
    fn = StageSamples(cfg)
    staged = _spill(fn, samples[:4]) + _spill(fn, samples[4:])  # two bundles, two spill files
    assert len(list((tmp_path / "b\udcff" / "spill").iterdir())) == 2
    coder = coders.FastPrimitivesCoder()
    assert all(isinstance(x, tuple) and len(coder.encode(("ok", x))) < 250 for x in staged)
    back = load_staged(list(reversed(staged)))
    assert [p.id for p in back] == [s.id for s in reversed(samples)]
    assert back[1].members["json"] == encode_sample(odd, True)["json"] and back[1].label == 3
    assert back[1].computed == ["text", "image"] and back[0].computed == []
    # Shards and rows written from staged samples are those written from the samples themselves.
    cfg_a = SinkConfig(staging=str(tmp_path / "a"), samples_per_shard=3, max_shard_bytes=1 << 20, include_text=True)
    side_a = write_bucket(0, [("ok", s) for s in samples], cfg_a)
    side_b = write_bucket(0, [("ok", x) for x in staged], cfg)
    assert side_a == side_b and sorted(side_a["labels"], key=str) == [3, "cat"]
    assert side_a["extracted"] == {"samples": 7, "text": 7, "image": 7, "audio": 0}
    tars_a = sorted((tmp_path / "a" / "shards").iterdir())
    tars_b = sorted((tmp_path / "b\udcff" / "shards").iterdir())
    assert [t.name for t in tars_a] == [t.name for t in tars_b] and len(tars_a) == 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(tars_a, tars_b, strict=True))
    got = {s["__key__"]: s for t in tars_b for s in wds.WebDataset(str(t), shardshuffle=False)}
    assert got["s006"]["txt"] == "ünïcode ✓".encode() and {k for k in got["s007"] if not k.startswith("__")} == {"json", "txt"}
    assert np.array_equal(np.load(io.BytesIO(got["s005"]["text.npy"])), samples[5].features["text"])


def test_a_reused_modality_is_read_from_its_previous_shard_at_writing(tmp_path):
    from pipelines.sink import StageSamples, _write_tar

    old = _sample(1)
    (tmp_path / "data" / "shards").mkdir(parents=True)
    members = encode_sample(old)
    _write_tar(str(tmp_path / "data" / "shards" / "v1.tar"), [(old.key, {k: v for k, v in members.items() if k != "__key__"})])
    changed = old.with_(features={"text": old.features["text"]}, reused={"image": "shards/v1.tar"}, text="new caption")
    cfg = SinkConfig(staging=str(tmp_path / "s"), samples_per_shard=3, max_shard_bytes=1 << 20,
                     dataset_dir=str(tmp_path / "data"))
    staged = _spill(StageSamples(cfg), [changed])
    assert staged[0][5] == (("image", "shards/v1.tar"),)
    sidecar = write_bucket(0, [("ok", staged[0])], cfg)
    (row,) = sidecar["rows"]
    assert row["modalities"] == "text,image" and row["shard"] == "shards/b00000-000.tar"
    assert sidecar["extracted"] == {"samples": 1, "text": 1, "image": 0, "audio": 0}
    (got,) = wds.WebDataset(str(tmp_path / "s" / row["shard"]), shardshuffle=False)
    assert got["image.npy"] == members["image.npy"]  # byte for byte from the previous shard
    assert json.loads(got["json"])["modalities"] == ["text", "image"]
    assert json.loads(got["json"])["text"] == "new caption"


def test_a_short_spill_file_is_an_error(tmp_path):
    from pipelines.sink import StageSamples, load_staged

    cfg = SinkConfig(staging=str(tmp_path), samples_per_shard=3, max_shard_bytes=1 << 20)
    staged = _spill(StageSamples(cfg), [_sample(2)])
    spill = next((tmp_path / "spill").iterdir())
    spill.write_bytes(spill.read_bytes()[:10])
    with pytest.raises(RuntimeError, match="is short"):
        load_staged(staged)


def test_a_local_bucket_is_planned_from_headers_and_read_a_sample_at_a_time(tmp_path, monkeypatch):
    import pipelines.sink as sink
    from pipelines.sink import Ref, StageSamples, load_staged

    cfg = SinkConfig(staging=str(tmp_path / "s"), samples_per_shard=2, max_shard_bytes=1 << 20, include_text=True)
    samples = [_sample(i, n_tokens=3 + i).with_(text=f"caption {i}") for i in range(5)]
    staged = _spill(StageSamples(cfg), samples[:3]) + _spill(StageSamples(cfg), samples[3:])
    eager = load_staged(staged)
    lazy = load_staged(staged, lazy=True)
    assert all(isinstance(v, Ref) for p in lazy for v in p.members.values())
    assert [(p.id, p.row, p.label, p.computed) for p in lazy] == [(p.id, p.row, p.label, p.computed) for p in eager]
    assert [{k: bytes(v) for k, v in sink._resolve(p.members).items()} for p in lazy] == [p.members for p in eager]
    # Writing the bucket reads each sample's members in one read, when its tar gets them.
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(sink.os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at))
    sidecar = write_bucket(0, [("ok", x) for x in staged], cfg)
    assert sorted(reads) == sorted(sum(len(v) for v in p.members.values()) for p in eager)
    eager_cfg = SinkConfig(staging=str(tmp_path / "e"), samples_per_shard=2, max_shard_bytes=1 << 20, include_text=True)
    assert write_bucket(0, [("ok", s) for s in samples], eager_cfg) == sidecar
    for tar in sorted((tmp_path / "s" / "shards").iterdir()):
        assert tar.read_bytes() == (tmp_path / "e" / "shards" / tar.name).read_bytes()
    # A spill file cut short is found before any shard is written.
    spill = sorted((tmp_path / "s" / "spill").iterdir())[1]
    spill.write_bytes(spill.read_bytes()[:-1])
    with pytest.raises(RuntimeError, match="is short"):
        load_staged(staged, lazy=True)


def test_a_member_is_read_whole_when_the_kernel_returns_less_per_read(tmp_path, monkeypatch):
    import pipelines.sink as sink

    path = tmp_path / "spill.bin"
    path.write_bytes(bytes(range(256)) * 40)
    real_pread = os.pread
    monkeypatch.setattr(sink.os, "pread", lambda fd, n, at: real_pread(fd, min(n, 1000), at))  # as Linux past 2 GiB
    got = sink._resolve({"a": sink.Ref(str(path), 100, 5000), "b": b"kept"})
    assert bytes(got["a"]) == path.read_bytes()[100:5100] and got["b"] == b"kept"
    with pytest.raises(RuntimeError, match="is short"):
        sink._resolve({"a": sink.Ref(str(path), 10_000, 500)})


def test_only_plain_local_paths_are_read_lazily():
    from pipelines.sink import _local

    assert _local("/tmp/out/.staging/spill/a.bin") and _local("relative/out")
    assert not _local("gs://bucket/out") and not _local("file:///tmp/out")


class _FullDisk(io.RawIOBase):
    """A file on a disk with no space left: every write fails as the kernel says so."""

    def writable(self):
        return True

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_stops_the_job_instead_of_failing_a_bundle_obscurely(tmp_path, monkeypatch):
    import pipelines.sink as sink
    from pipelines.errors import ResourceError, resource_failure
    from pipelines.sink import StageSamples, WriteBucketFn

    monkeypatch.setattr(sink.FileSystems, "create", lambda *a, **k: _FullDisk())
    fn = StageSamples(SinkConfig(staging=str(tmp_path / "staging"), samples_per_shard=3, max_shard_bytes=1 << 20))
    with pytest.raises(ResourceError) as got:
        _spill(fn, [_sample(1)])
    assert str(got.value).startswith(f"writing features: no space left in {tmp_path / 'staging'}")
    assert resource_failure(RuntimeError(f"worker traceback...\npipelines.errors.ResourceError: {got.value}"))
    cfg = SinkConfig(staging=str(tmp_path / "s"), samples_per_shard=3, max_shard_bytes=1 << 20)
    with pytest.raises(ResourceError, match="writing shards: no space left in"):
        list(WriteBucketFn(cfg).process((0, [("ok", _sample(2))])))
    # Any other failure to write is raised as it is.
    monkeypatch.setattr(sink.FileSystems, "create", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "no")))
    with pytest.raises(PermissionError):
        _spill(StageSamples(SinkConfig(staging=str(tmp_path / "other"), samples_per_shard=3, max_shard_bytes=1 << 20)),
               [_sample(3)])


@pytest.mark.parametrize("sizes", [[0], [1, 511, 512, 513], [10_000, 3, 125_440], [10_239], [9_216]])
def test_shards_are_the_bytes_webdatasets_tar_writer_writes(tmp_path, sizes):
    from pipelines.sink import _write_tar

    rng = np.random.default_rng(len(sizes))
    part = []
    for i, n in enumerate(sizes):
        members = {"__key__": f"k{i:04d}", "json": '{"id": "é"}'.encode(), "text.npy": rng.bytes(n), "_meta": "left out"}
        part.append((members["__key__"], members))
    part.append(("ключ-" + "x" * 120, {"__key__": "ключ-" + "x" * 120, "json": b"{}"}))  # not ASCII and over 100 bytes: a pax header
    total = _write_tar(str(tmp_path / "mbm.tar"), part)
    with open(tmp_path / "wds.tar", "wb") as f:
        writer = wds.TarWriter(f, user="mbm", group="mbm", encoder=False, mtime=0)
        want = sum(writer.write(dict(m)) for _, m in part)
        writer.close()
    got = (tmp_path / "mbm.tar").read_bytes()
    assert got == (tmp_path / "wds.tar").read_bytes() and total == want
    assert len(got) % tarfile.RECORDSIZE == 0
    with tarfile.open(tmp_path / "mbm.tar") as tf:
        names = tf.getnames()
        assert tf.extractfile("k0000.text.npy").read() == part[0][1]["text.npy"]
    assert "k0000._meta" not in names and names[-1] == "ключ-" + "x" * 120 + ".json"
    with pytest.raises(TypeError, match="k0000.json: a shard member must be bytes, got str"):
        _write_tar(str(tmp_path / "bad.tar"), [("k0000", {"json": "{}"})])


def test_an_index_row_lists_its_dropped_modalities_stages_and_reasons_in_one_order():
    from pipelines.sink import ok_row

    sample = _sample(1)
    sample.dropped = {"image": "clean.image: image.truncated: cut at byte 90",
                      "audio": "clean.audio: audio.unidentified: not a sound file",
                      "text": "clean.text: text.empty: nothing left"}
    row = ok_row(sample, "s.tar")
    assert row.stage == "clean.audio, clean.image, clean.text"
    assert row.reason == "audio.unidentified; image.truncated; text.empty"
    assert row.detail == ("audio: clean.audio: audio.unidentified: not a sound file; "
                          "image: clean.image: image.truncated: cut at byte 90; text: clean.text: text.empty: nothing left")


def test_another_samples_features_are_read_from_its_previous_shard_by_its_key(tmp_path):
    """A new caption of a known picture: its image features are the picture's sample's, byte for byte."""
    from pipelines.errors import DatasetDamaged
    from pipelines.sink import StageSamples, _write_tar
    from schemas.records import OTHER_KEY

    old = _sample(1)
    old = old.with_(features={**old.features, "image": np.arange(16, dtype=np.float16).reshape(2, 8)})
    (tmp_path / "data" / "shards").mkdir(parents=True)
    members = encode_sample(old)
    _write_tar(str(tmp_path / "data" / "shards" / "v1.tar"), [(old.key, {k: v for k, v in members.items() if k != "__key__"})])
    new = [_sample(7).with_(features={"text": _sample(7).features["text"]},
                            reused={"image": f"shards/v1.tar{OTHER_KEY}{old.key}"}, text=f"caption {i}", id=f"new-{i}",
                            key=f"new-{i}") for i in range(2)]
    cfg = SinkConfig(staging=str(tmp_path / "s"), samples_per_shard=3, max_shard_bytes=1 << 20,
                     dataset_dir=str(tmp_path / "data"))
    sidecar = write_bucket(0, [("ok", s) for s in _spill(StageSamples(cfg), new)], cfg)
    assert [r["id"] for r in sidecar["rows"]] == ["new-0", "new-1"]
    assert sidecar["extracted"] == {"samples": 2, "text": 2, "image": 0, "audio": 0}
    got = list(wds.WebDataset(str(tmp_path / "s" / sidecar["rows"][0]["shard"]), shardshuffle=False))
    assert [g["__key__"] for g in got] == ["new-0", "new-1"]
    assert all(g["image.npy"] == members["image.npy"] for g in got)
    gone = [new[0].with_(reused={"image": f"shards/v1.tar{OTHER_KEY}nobody"})]
    with pytest.raises(DatasetDamaged, match="image features are missing from shards/v1.tar:"):
        write_bucket(1, [("ok", s) for s in _spill(StageSamples(cfg), gone)], cfg)
