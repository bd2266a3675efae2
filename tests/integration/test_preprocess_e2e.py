"""The preprocessing job end to end on the messy corpus, with real Beam worker processes."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from jobs.cli import main

pytestmark = pytest.mark.slow

DIMS = {"text": 384, "image": 1280, "audio": 80}


@pytest.fixture(scope="module")
def job(messy_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / os.fsdecode(b"out-caf\xe9")  # a folder name that is not UTF-8
    spec = out.parent / "job.toml"
    spec.write_text(f'[input]\nmanifest = "{messy_corpus.manifest}"\n[output]\ndir = "elsewhere"\n'
                    'samples_per_shard = 20\n[runner]\nworkers = 2\n')
    assert main(["preprocess", str(spec), "--no-progress", "--output", str(out)]) == 0
    return messy_corpus, out


def _read_dataset(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "dataset.json").read_text())
    samples = {}
    for rel in manifest["shards"]:
        for s in wds.WebDataset(str(out / rel), shardshuffle=False):
            doc = json.loads(s["json"])
            assert doc["id"] not in samples, f"{doc['id']} landed twice"
            feats = {m: np.load(io.BytesIO(s[f"{m}.npy"]), allow_pickle=False) for m in doc["modalities"]}
            samples[doc["id"]] = {"doc": doc, "features": feats, "key": s["__key__"]}
    return samples


def test_every_good_sample_lands_once_with_finite_consistent_features(job):
    corpus, out = job
    samples = _read_dataset(out)
    expected = {**corpus.good, **corpus.repaired, **{k: v[0] for k, v in corpus.partial.items()}}
    assert set(samples) == set(expected)
    for sid, mods in expected.items():
        got = samples[sid]
        assert set(got["doc"]["modalities"]) == mods, sid
        for m, arr in got["features"].items():
            assert arr.dtype == np.float16 and arr.ndim == 2 and arr.shape[1] == DIMS[m], (sid, m, arr.shape)
            assert arr.shape[0] >= 1 and np.isfinite(arr).all(), (sid, m)
    image_shapes = {s["features"]["image"].shape for s in samples.values() if "image" in s["features"]}
    assert image_shapes == {(49, 1280)}


def test_index_has_a_row_for_every_input_line_with_stage_and_reason(job):
    corpus, out = job
    manifest = json.loads((out / "dataset.json").read_text())
    with open(out / manifest["index"], "rb") as f:  # pyarrow takes only UTF-8 path strings
        rows = pq.read_table(f).to_pylist()
    assert len(rows) == corpus.n_lines
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
        by_id.setdefault(r["source"], []).append(r)
    for key, stage in corpus.rejected.items():
        matches = [r for r in by_id.get(key, []) if r["status"] == "rejected"]
        assert matches, f"{key} should be rejected"
        assert matches[0]["stage"].startswith(stage) and matches[0]["reason"], (key, matches[0])
    for sid, (mods, reason) in corpus.partial.items():
        row = next(r for r in by_id[sid] if r["status"] == "ok")
        assert row["modalities"].split(",") == [m for m in ("text", "image", "audio") if m in mods]
        assert any(code.startswith(reason) for code in row["reason"].split("; ")), (sid, row["reason"])
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["shard"] in manifest["shards"] for r in ok)
    assert all(r["version"] == 1 for r in rows)


def test_report_and_versions(job):
    corpus, out = job
    report = json.loads((out / "report.json").read_text())
    c = report["counts"]
    landed = len(corpus.good) + len(corpus.repaired) + len(corpus.partial)
    assert c == {"input": corpus.n_lines, "ok": landed, "rejected": corpus.n_lines - landed, "extracted": landed}
    assert sum(report["rejected_by_reason"].values()) == c["rejected"]
    assert report["samples_per_second"] > 0 and report["seconds"] > 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset == json.loads((out / "versions/000001.json").read_text())
    assert dataset["version"] == 1 and sum(dataset["shard_sizes"]) == landed
    assert all((out / s).is_file() for s in dataset["shards"]) and len(dataset["shards"]) >= 3
    assert (out / "job.toml").is_file() and not (out / ".staging").exists()
    # Two Beam SDK worker processes did the work.
    assert (out / ".worker.log").read_text().count("Logging handler created") == 2
