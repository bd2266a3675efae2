"""A dataset folder and inputs in an object store (``tests.support.objstore``: no folders, exact keys)."""

import io
import tarfile
import time
import uuid

import numpy as np
import pytest

from pipelines.commit import (
    DatasetStateError,
    check_new_folder,
    commit,
    current_manifest,
    load_index,
    write_atomic,
)
from pipelines.readers.source import SourceConfig, expand_shards, list_inputs
from pipelines.sink import SinkConfig, write_bucket
from schemas import CleanSample, sample_key
from schemas.arrow import INDEX_SCHEMA
from tests.support import objstore

OUT = "mbmstore://bkt/out"


@pytest.fixture(autouse=True)
def _store():
    objstore.clear()
    yield
    objstore.clear()


def _sample(i, value=None):
    sid = f"s{i:03d}"
    v = i if value is None else value
    return CleanSample(id=sid, key=sample_key(sid), label="cat", text=f"caption {i}",
                       features={"text": np.full((3, 4), v, dtype=np.float16)}, fingerprints={"text": "ft"},
                       content_hash=f"h{i}-{v}", source=f"m.jsonl:{i + 1}")


def _run(new, keep=()):
    """The writing stage and the commit of a run that computed ``new`` and found the ids ``keep`` unchanged."""
    staging = f"{OUT}/.staging/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    previous = current_manifest(OUT)
    same = []
    if previous is not None and keep:
        rows = load_index(OUT, previous, tuple(INDEX_SCHEMA.names)).to_pylist()
        same = [("same", {**r, "label_value": r["label"]}) for r in rows if r["id"] in keep and r["status"] == "ok"]
    write_bucket(0, [("ok", s) for s in new] + same,
                 SinkConfig(staging=staging, samples_per_shard=100, max_shard_bytes=1 << 30, dataset_dir=OUT))
    return commit(OUT, staging, job_toml="# spec\n", clock=time.monotonic, started=time.monotonic(),
                  fingerprints={"text": "ft"}, feature_dims={"text": 4}, samples_per_shard=100)


def test_a_commit_in_an_object_store_leaves_no_staging(monkeypatch):
    first = _run([_sample(i) for i in range(3)])
    assert first.manifest.version == 1 and objstore.keys(f"{OUT}/.staging") == []
    monkeypatch.setattr(objstore, "MODE", "azure")  # a delete of a missing object is an error there
    second = _run([_sample(i, 7) for i in range(4)])
    assert second.manifest.version == 2 and objstore.keys(f"{OUT}/.staging") == []
    assert current_manifest(OUT).version == 2


def test_a_run_on_a_remote_folder_rolled_back_by_hand_overwrites_no_committed_file():
    _run([_sample(i) for i in range(3)])
    _run([_sample(i, 7) for i in range(4)])
    objstore.OBJECTS[f"{OUT}/dataset.json"] = objstore.OBJECTS[f"{OUT}/versions/000001.json"]  # put back by hand
    before = {k: v[0] for k, v in objstore.OBJECTS.items()}
    with pytest.raises(DatasetStateError, match=r"versions/000002.json already exists, above the current version 1"):
        _run([_sample(i, 9) for i in range(5)])
    assert all(objstore.OBJECTS[k][0] == data for k, data in before.items() if "/.staging/" not in k)


def test_write_atomic_in_an_object_store_keeps_the_old_object_when_the_rename_fails(monkeypatch):
    write_atomic(f"{OUT}/dataset.json", b"old")
    assert objstore.keys(OUT) == [f"{OUT}/dataset.json"]

    def cut(self, src, dst):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(objstore.MemoryStore, "rename", cut)
        with pytest.raises(KeyboardInterrupt):
            write_atomic(f"{OUT}/dataset.json", b"new")
    assert objstore.OBJECTS[f"{OUT}/dataset.json"][0] == b"old"  # was deleted before the rename
    write_atomic(f"{OUT}/dataset.json", b"new")
    assert objstore.OBJECTS[f"{OUT}/dataset.json"][0] == b"new" and f"{OUT}/dataset.json.tmp" not in objstore.OBJECTS


def test_a_remote_output_folder_holding_other_things_is_refused_and_a_killed_first_runs_is_not():
    objstore.put(f"{OUT}/.staging/20260101-x/parts/b00000.json", b"{}")
    objstore.put(f"{OUT}/index/000001.parquet", b"")
    objstore.put(f"{OUT}/shards/v000001-000000.tar", b"")
    check_new_folder(OUT)  # a killed first run's leftovers
    check_new_folder("mbmstore://bkt/new")  # nothing under it
    objstore.put(f"{OUT}/holiday.jpg", b"x")
    objstore.put(f"{OUT}/index/notes.parquet", b"x")
    with pytest.raises(DatasetStateError, match=r"mbmstore://bkt/out is not empty and is no mbm dataset .* 2 other "
                                                 r"entries: holiday.jpg, index/notes.parquet"):
        check_new_folder(OUT)
    objstore.put(f"{OUT}/dataset.json", b"{}")
    check_new_folder(OUT)  # a dataset


def _tar(*names):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 5
            t.addfile(info, io.BytesIO(b"hello"))
    return buf.getvalue()


def test_remote_input_folders_are_listed_as_an_object_store_has_them():
    objstore.put("mbmstore://bkt/imgs/cat/a.png", b"x")
    for folder in ("mbmstore://bkt/imgs", "mbmstore://bkt/imgs/"):
        (item,) = list_inputs(SourceConfig(folder=folder))
        assert (item.kind, item.path) == ("folder", "mbmstore://bkt/imgs")
    with pytest.raises(ValueError, match="does not exist"):
        list_inputs(SourceConfig(folder="mbmstore://bkt/nothing"))
    objstore.put("mbmstore://bkt/tars/000.tar", _tar("k1.txt"))
    objstore.put("mbmstore://bkt/tars/001.tar.gz", b"gz")
    objstore.put("mbmstore://bkt/tars/notes.txt", b"x")
    expected = ["mbmstore://bkt/tars/000.tar", "mbmstore://bkt/tars/001.tar.gz"]
    assert expand_shards("mbmstore://bkt/tars") == expand_shards("mbmstore://bkt/tars/") == expected
    assert expand_shards("mbmstore://bkt/tars/*.tar") == expected[:1]
