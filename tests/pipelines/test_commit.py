import json

from pipelines.commit import _labels, plan_counts, remove_uncommitted
from pipelines.versions import gc
from schemas import DatasetManifest


def _row(sid, status="ok", stage="", reason="", source=None, label=None):
    return {"id": sid, "status": status, "stage": stage, "reason": reason, "source": source or sid, "label": label}


def test_a_repeated_id_is_no_change_when_its_first_row_is_unchanged():
    dup = _row("a", "rejected", "read", "read.duplicate_id", "m.jsonl:3")
    previous = [_row("a"), _row("b"), dup]
    planned = plan_counts(previous, new_rows=[dup], same_rows=[_row("a"), _row("b")])
    assert planned == {"new": 0, "changed": 0, "unchanged": 3, "removed": 0}


def test_a_landed_sample_that_is_now_rejected_is_a_change():
    previous = [_row("a"), _row("b")]
    planned = plan_counts(previous, new_rows=[_row("a", "rejected", "clean.image", "image.truncated")],
                          same_rows=[_row("b")])
    assert planned["changed"] == 1 and planned["removed"] == 0


def test_label_vocabulary_keeps_1_and_the_string_1_apart():
    previous = DatasetManifest(version=1, shards=[], shard_sizes=[], num_samples=0, counts={}, index="",
                               labels=[1, "1", "x"])
    same = [{**_row("a", label="1"), "label_value": 1}, {**_row("b", label="1"), "label_value": "1"}]
    assert _labels([{"labels": ["x"]}], same, previous) == [1, "1", "x"]
    # rows from before the typed value travelled: the previous vocabulary decides
    assert _labels([], [_row("c", label="x")], previous) == ["x"]


def _dataset(root, versions):
    (root / "versions").mkdir(parents=True)
    for v in versions:
        m = DatasetManifest(version=v, shards=[], shard_sizes=[], num_samples=0, counts={}, index=f"index/{v:06d}.parquet")
        (root / "versions" / f"{v:06d}.json").write_text(m.to_json())
        (root / "versions" / f"{v:06d}.toml").write_text(f"# spec of version {v}\n")
    (root / "dataset.json").write_text((root / "versions" / f"{versions[-1]:06d}.json").read_text())


def test_a_kill_between_the_commit_and_job_toml_is_repaired_by_the_next_run(tmp_path):
    _dataset(tmp_path, [1, 2])
    (tmp_path / "job.toml").write_text("# spec of version 1\n")  # dataset.json moved on, job.toml did not
    (tmp_path / "versions" / "000003.toml").write_text("# a version never committed\n")
    removed = remove_uncommitted(str(tmp_path))
    assert (tmp_path / "job.toml").read_text() == "# spec of version 2\n"
    assert not (tmp_path / "versions" / "000003.toml").exists()
    assert str(tmp_path / "versions" / "000003.toml") in removed
    assert remove_uncommitted(str(tmp_path)) == []  # nothing left to do


def test_gc_deletes_the_specs_of_deleted_versions(tmp_path):
    _dataset(tmp_path, [1, 2, 3])
    result = gc(str(tmp_path), keep=2)
    assert result["deleted_versions"] == [1]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == [
        "000002.json", "000002.toml", "000003.json", "000003.toml"]
    assert json.loads((tmp_path / "dataset.json").read_text())["version"] == 3


def test_diff_in_a_folder_whose_name_is_not_utf8(tmp_path):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.versions import diff_versions

    root = tmp_path / os.fsdecode(b"caf\xe9")
    _dataset(root, [1, 2])
    (root / "index").mkdir()
    for v, ids in ((1, ["a", "b"]), (2, ["b", "c"])):
        table = pa.table({"id": ids, "status": ["ok"] * 2, "content_hash": ["h"] * 2, "fingerprint": ["{}"] * 2})
        with open(root / "index" / f"{v:06d}.parquet", "wb") as f:
            pq.write_table(table, f)
    assert diff_versions(str(root), 1, 2) == {"added": ["c"], "changed": [], "removed": ["a"]}
