import json
import os

import pyarrow as pa
import pytest

from pipelines.commit import (
    DatasetStateError,
    _labels,
    build_report,
    check_new_folder,
    current_manifest,
    plan_counts,
    remove_uncommitted,
)
from pipelines.versions import gc
from schemas import DatasetManifest


def _row(sid, status="ok", stage="", reason="", source=None, label=None):
    return {"id": sid, "status": status, "stage": stage, "reason": reason, "source": source or sid, "label": label}


def _table(*rows):
    schema = pa.schema([(k, pa.string()) for k in ("id", "status", "stage", "reason", "source", "label")])
    return pa.Table.from_pylist(list(rows), schema=schema)


def test_a_repeated_id_is_no_change_when_its_first_row_is_unchanged():
    dup = _row("a", "rejected", "read", "read.duplicate_id", "m.jsonl:3")
    previous = _table(_row("a"), _row("b"), dup)
    planned = plan_counts(previous, _table(dup), _table(_row("a"), _row("b")))
    assert planned == {"new": 0, "changed": 0, "unchanged": 3, "removed": 0}


def test_a_landed_sample_that_is_now_rejected_is_a_change():
    previous = _table(_row("a"), _row("b"))
    planned = plan_counts(previous, _table(_row("a", "rejected", "clean.image", "image.truncated")),
                          _table(_row("b")))
    assert planned["changed"] == 1 and planned["removed"] == 0


def test_plan_counts_new_changed_unchanged_removed():
    previous = _table(_row("a"), _row("b"), _row("c"), _row("d"), _row("r", "rejected", "clean.text", "text.empty"),
                      _row("s", "rejected", "clean.text", "text.empty"))
    new = _table(
        _row("b"),  # re-extracted: changed
        _row("e"), _row("e", "rejected", "read", "read.duplicate_id", "m:9"),  # new, and a repeat of it
        _row("r", "rejected", "clean.text", "text.empty"),  # rejected again as before: unchanged
        _row("s", "rejected", "clean.text", "text.too_long"),  # rejected otherwise: new
        _row("c", "rejected", "clean.image", "image.truncated"),  # landed before, rejected now: changed
    )
    planned = plan_counts(previous, new, _table(_row("a")))  # "d" is gone: removed
    assert planned == {"new": 2, "changed": 2, "unchanged": 2, "removed": 1}
    nothing = _table()
    assert plan_counts(nothing, new, nothing) == {"new": 5, "changed": 0, "unchanged": 0, "removed": 0}
    assert plan_counts(previous, nothing, nothing)["removed"] == 4


def test_build_report_counts_statuses_stages_reasons_and_modalities():
    rows = pa.Table.from_pylist([
        {"status": "ok", "stage": "", "reason": "", "modalities": "text,image"},
        {"status": "ok", "stage": "clean.audio", "reason": "audio.silent; image.truncated", "modalities": "text"},
        {"status": "ok", "stage": "clean.audio", "reason": "audio.silent", "modalities": "image"},
        {"status": "rejected", "stage": "read", "reason": "read.bad_json", "modalities": ""},
        {"status": "rejected", "stage": "clean", "reason": "all_modalities_failed", "modalities": ""},
        {"status": "rejected", "stage": "read", "reason": "read.bad_json", "modalities": ""},
    ])
    counts, report = build_report(rows, 2.0)
    assert counts == {"input": 6, "ok": 3, "rejected": 3, "extracted": 3}
    assert report["rejected_by_reason"] == {"all_modalities_failed": 1, "read.bad_json": 2}
    assert report["rejected_by_stage"] == {"clean": 1, "read": 2}
    assert report["dropped_modalities_by_reason"] == {"audio.silent": 2, "image.truncated": 1}
    assert report["modalities"] == {"image": 2, "text": 2}
    assert report["samples_per_second"] == 3.0
    assert build_report(rows.slice(0, 0), 1.0)[1]["modalities"] == {}


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


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_run_killed_before_its_commit_leaves_one_version_which_goes(tmp_path):
    _dataset(tmp_path, [1, 2])
    (tmp_path / "report.json").write_text('{"version": 2}')  # the run that committed 2 wrote it last
    # version 3's files as a run killed before its commit leaves them: no versions/000003.json
    (tmp_path / "versions" / "000003.toml").write_text("# spec of version 3\n")
    (tmp_path / "versions" / "000002.json.tmp").write_text("{")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "000003.parquet").write_bytes(b"")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "v000003-000000.tar").write_bytes(b"")
    (tmp_path / "shards" / "v000002-000000.tar").write_bytes(b"")
    removed = remove_uncommitted(str(tmp_path))
    assert sorted(os.path.basename(f) for f in removed) == [
        "000002.json.tmp", "000003.parquet", "000003.toml", "v000003-000000.tar"]
    assert (tmp_path / "shards" / "v000002-000000.tar").exists()


def test_a_run_killed_between_its_commit_and_its_versions_manifest_gets_it_written(tmp_path):
    _dataset(tmp_path, [1, 2])
    (tmp_path / "versions" / "000002.json").unlink()
    (tmp_path / "job.toml").write_text("# spec of version 2\n")
    assert remove_uncommitted(str(tmp_path)) == []
    assert (tmp_path / "versions" / "000002.json").read_text() == (tmp_path / "dataset.json").read_text()


def test_a_version_rolled_back_by_hand_is_never_taken_for_leftovers(tmp_path):
    """dataset.json put back to version 1 and report.json deleted looked like a run killed before committing 2,
    and the next run deleted version 2's manifest, spec and shards."""
    _dataset(tmp_path, [1, 2])
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "v000002-000000.tar").write_bytes(b"")
    (tmp_path / "dataset.json").write_text((tmp_path / "versions" / "000001.json").read_text())
    before = _files(tmp_path)
    with pytest.raises(DatasetStateError, match=r"holds version 2 above its current one \(dataset.json names version 1\)"):
        remove_uncommitted(str(tmp_path))
    assert _files(tmp_path) == before


@pytest.mark.parametrize("state", ["no dataset.json", "an older dataset.json", "the one before put back"])
def test_versions_no_interrupted_run_leaves_stop_the_run_and_nothing_is_deleted(tmp_path, state):
    """A deleted dataset.json, or an older copy put back, made every version above it a leftover to delete."""
    _dataset(tmp_path, [1, 2, 3])
    (tmp_path / "report.json").write_text('{"version": 3}')  # written by the run that committed 3
    if state == "no dataset.json":
        (tmp_path / "dataset.json").unlink()
        above, now = "1, 2, 3", "it has no dataset.json"
    elif state == "an older dataset.json":
        (tmp_path / "dataset.json").write_text((tmp_path / "versions" / "000001.json").read_text())
        above, now = "2, 3", "dataset.json names version 1"
    else:  # one version behind, as a killed run leaves it, but report.json says 3 was committed
        (tmp_path / "dataset.json").write_text((tmp_path / "versions" / "000002.json").read_text())
        above, now = "3", "dataset.json names version 2"
    before = _files(tmp_path)
    with pytest.raises(DatasetStateError) as e:
        remove_uncommitted(str(tmp_path))
    assert str(e.value) == (
        f"{tmp_path} holds version{'s' if ',' in above else ''} {above} above its current one ({now}), which no "
        "interrupted run leaves: was "
        "dataset.json deleted, or restored from an older copy? Nothing was changed. Make the version you want "
        f"current (the newest: cp {tmp_path}/versions/000003.json {tmp_path}/dataset.json) and run again")
    assert _files(tmp_path) == before


def test_an_unreadable_dataset_json_says_how_to_make_the_folder_whole(tmp_path):
    _dataset(tmp_path, [1, 2])
    for text in ('{"version": 2, "sha', "{}", "[]"):
        (tmp_path / "dataset.json").write_text(text)
        with pytest.raises(DatasetStateError, match=rf"^{tmp_path}/dataset.json cannot be read \(\w+: .*\); it names "
                                                    rf"the dataset's current version: copy the version to make current "
                                                    rf"over it \(the newest: cp {tmp_path}/versions/000002.json "):
            current_manifest(str(tmp_path))

def test_gc_after_a_rollback_by_hand_deletes_nothing(tmp_path):
    """With dataset.json put back to version 1, gc deleted version 2's shards and index as unreferenced and
    kept its manifest, so making version 2 current again, as the preprocess refusal advises, failed."""
    _dataset(tmp_path, [1, 2])
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "v000002-000000.tar").write_bytes(b"")
    (tmp_path / "dataset.json").write_text((tmp_path / "versions" / "000001.json").read_text())
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"holds version 2 above its current one \(1; dataset.json was put back by "
                                         r"hand\?\): gc deletes nothing"):
        gc(str(tmp_path), keep=1)
    assert _files(tmp_path) == before


def test_gc_deletes_the_specs_of_deleted_versions(tmp_path):
    _dataset(tmp_path, [1, 2, 3])
    result = gc(str(tmp_path), keep=2)
    assert result["deleted_versions"] == [1]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == [
        "000002.json", "000002.toml", "000003.json", "000003.toml"]
    assert json.loads((tmp_path / "dataset.json").read_text())["version"] == 3


@pytest.mark.parametrize("lost", ["all", "current"])
def test_gc_keeps_the_current_version_whose_versions_file_is_gone(tmp_path, lost):
    # a copy of the folder without versions/, or without the current version's file: dataset.json still
    # names the current version, and gc must not take its shards and index for unreferenced files
    from pipelines.versions import list_versions

    _dataset(tmp_path, [1, 2])
    for v in (2, 1) if lost == "all" else (2,):
        (tmp_path / "versions" / f"{v:06d}.json").unlink()
    current = DatasetManifest.from_json((tmp_path / "dataset.json").read_text())
    current.shards, current.shard_sizes = ["shards/v000002-000000.tar"], [1]
    (tmp_path / "dataset.json").write_text(current.to_json())
    for name in ("shards/v000001-000000.tar", "shards/v000002-000000.tar", "index/000001.parquet",
                 "index/000002.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [m.version for m in list_versions(str(tmp_path))] == ([2] if lost == "all" else [1, 2])
    result = gc(str(tmp_path), keep=1)
    assert result["kept_versions"] == [2]
    assert sorted(result["deleted_files"]) == ["index/000001.parquet", "shards/v000001-000000.tar"]
    assert (tmp_path / "shards" / "v000002-000000.tar").exists() and (tmp_path / "index" / "000002.parquet").exists()


def test_diff_of_a_version_whose_index_is_gone_says_so(tmp_path):
    from pipelines.versions import diff_versions

    _dataset(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=r"^version 1's index index/000001.parquet cannot be read \(No such file or "
                                         r"directory\): the folder was changed by hand"):
        diff_versions(str(tmp_path), 1, 2)


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


def test_the_index_is_written_in_order_a_slice_at_a_time_with_ties_kept_in_place(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from pipelines import commit as commit_mod
    from schemas.arrow import index_table

    ids = ["b", "a", "c", "a", "b", "a"] * 50
    rows = index_table([
        {"id": sid, "key": f"k{i}", "shard": None, "content_hash": "", "fingerprint": "{}",
         "status": "rejected" if i % 7 == 0 else "ok", "stage": "", "reason": "", "detail": str(i),
         "modalities": "", "label": None, "source": "m.jsonl", "version": 1, "modality_hashes": "{}"}
        for i, sid in enumerate(ids)])
    whole = tmp_path / "whole.parquet"
    commit_mod.write_atomic(str(whole), lambda f: commit_mod.write_index(rows, f))
    monkeypatch.setattr(commit_mod, "INDEX_SLICE_BYTES", rows.nbytes // 10)
    sliced = tmp_path / "sliced.parquet"
    commit_mod.write_atomic(str(sliced), lambda f: commit_mod.write_index(rows, f))

    assert pq.ParquetFile(whole).metadata.num_row_groups == 1
    assert pq.ParquetFile(sliced).metadata.num_row_groups >= 10
    got = pq.read_table(sliced)
    assert got.equals(pq.read_table(whole)) and got.schema.equals(rows.schema)
    expected = sorted(rows.to_pylist(), key=lambda r: (r["id"], r["source"], r["status"]))  # stable, as Python's
    assert got.to_pylist() == expected
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("jemalloc", [True, False])
def test_the_commit_allocates_from_jemalloc_or_else_the_system_pool_and_restores_the_default(monkeypatch, jemalloc):
    from pipelines.commit import _arrow_pool

    if not jemalloc:  # a pyarrow built without jemalloc raises this
        def missing():
            raise NotImplementedError("jemalloc support is not built")

        monkeypatch.setattr(pa, "jemalloc_memory_pool", missing)
    elif not hasattr(pa, "jemalloc_memory_pool"):
        pytest.skip("no jemalloc here")
    before = pa.default_memory_pool().backend_name
    with _arrow_pool():
        assert pa.default_memory_pool().backend_name == ("jemalloc" if jemalloc else "system")
        assert pa.array(["x"] * 10).to_pylist() == ["x"] * 10  # allocates from it
    assert pa.default_memory_pool().backend_name == before


def test_a_killed_first_run_leaves_only_what_goes(tmp_path):
    """No dataset.json yet: a first run killed before its commit leaves staging, temp files and its version's
    files; the next run deletes exactly those."""
    (tmp_path / ".lock").write_text("{}")
    (tmp_path / ".worker.log").write_text("")
    (tmp_path / ".staging" / "run").mkdir(parents=True)
    (tmp_path / "dataset.json.tmp").write_text("{")
    for folder, name in [("versions", "000001.toml"), ("index", "000001.parquet"), ("shards", "v000001-000000.tar")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    removed = remove_uncommitted(str(tmp_path))
    assert sorted(os.path.basename(f) for f in removed) == [
        ".staging", "000001.parquet", "000001.toml", "dataset.json.tmp", "v000001-000000.tar"]
    assert _files(tmp_path) == [".lock", ".worker.log"]


@pytest.mark.parametrize("foreign", ["job.toml", "notes.txt", "index/000001.parquet.bak", "shards/part-0.tar", "data/"])
def test_a_folder_that_is_no_dataset_is_refused_and_nothing_is_deleted(tmp_path, foreign):
    """A user's folder given as [output] dir: its index/NNNNNN.parquet, shards/vNNNNNN-*.tar and *.tmp files were
    taken for a killed run's leftovers and deleted, and its job.toml overwritten by the commit."""
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "000001.parquet").write_bytes(b"the user's")
    (tmp_path / "draft.tmp").write_text("the user's")
    path = tmp_path / foreign
    if foreign.endswith("/"):
        path.mkdir()
    else:
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's")
    before = _files(tmp_path)
    with pytest.raises(DatasetStateError) as e:
        remove_uncommitted(str(tmp_path))
    assert str(e.value) == (
        f"{tmp_path} is not empty and is no mbm dataset (it has no dataset.json; it holds 1 other entry: "
        f"{foreign.rstrip('/')}): nothing was changed. Give an [output] dir (or --output) that is new or empty")
    assert _files(tmp_path) == before
    check_new_folder(str(tmp_path / "new"))  # a folder still to be made, or an empty one, is fine
    (tmp_path / "empty").mkdir()
    check_new_folder(str(tmp_path / "empty"))


def test_a_shard_that_lost_samples_stops_the_copy_naming_it(tmp_path):
    """A carried shard damaged after the run's checks: assemble_shards gave a traceback from tarfile, or copied
    fewer samples than the new version's index lists."""
    import io
    import tarfile

    from pipelines.commit import _copy_members

    src = tmp_path / "v000001-000000.tar"
    with tarfile.open(src, "w", format=tarfile.USTAR_FORMAT) as t:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.npy")
            info.size = 4000
            t.addfile(info, io.BytesIO(b"\1" * 4000))
    assert _copy_members(str(src), str(tmp_path / "copy.tar"), {"a", "b"}) == 2
    with pytest.raises(DatasetStateError, match=rf"^the shard {src} holds 1 of the 2 samples its index lists: put it "
                                                 r"back, or rerun with --full$"):
        _copy_members(str(src), str(tmp_path / "copy.tar"), {"a", "c"})
    src.write_bytes(src.read_bytes()[:3000])
    with pytest.raises(DatasetStateError, match=rf"^the shard {src}, which this version carries samples of, cannot be "
                                                 r"read \(.+\): put it back, or rerun with --full$"):
        _copy_members(str(src), str(tmp_path / "copy.tar"), {"a", "b"})


def test_every_input_rejected_gives_advice_that_fits_its_reasons():
    """Every row a read.path_escape (allow_outside unset) was told to look for a moved media folder."""
    from pipelines.commit import Staged, _check_some_land

    def staged(reason, detail):
        table = pa.Table.from_pylist([{"id": f"s{i}", "status": "rejected", "reason": reason, "detail": detail}
                                      for i in range(3)])
        return Staged(new=table, same=table.slice(0, 0), shards=[], extracted={}, labels=[])

    with pytest.raises(DatasetStateError) as e:
        _check_some_land(staged("read.path_escape", "set allow_outside = true to allow it"), None)
    assert str(e.value) == (
        "every one of the 3 inputs was rejected (read.path_escape 3), so nothing was committed: a first version "
        "would hold no sample (s0: set allow_outside = true to allow it). Fix what these say")
    with pytest.raises(DatasetStateError, match=r"Fix what they lack \(a moved media folder, a drive not mounted\?\)$"):
        _check_some_land(staged("file.missing", "/m/a.jpg does not exist"), None)


def test_copied_members_keep_their_bytes_and_long_names(tmp_path):
    """The copy-on-write of a touched shard parses headers itself (tarfile's stream reading took 43 s of a
    400,000-sample commit): each kept member's header and data are copied as they are, pax long names
    included, and the result is a tar that tarfile and webdataset read."""
    import io
    import tarfile

    import webdataset as wds

    from pipelines.commit import _copy_many
    from pipelines.sink import tar_member

    long_key = "k" * 120  # a name over 100 bytes: a pax header before its member
    members = [(f"{key}.{suffix}", bytes([i]) * (700 * i + 1))
               for i, (key, suffix) in enumerate([("a", "json"), ("a", "image.npy"), ("b", "json"),
                                                  (long_key, "json"), ("c", "json")])]
    src = tmp_path / "v000001-000000.tar"
    blobs = {}
    with open(src, "wb") as f:
        for name, data in members:
            blobs[name] = tar_member(name, data) + data + bytes(-len(data) % 512)
            f.write(blobs[name])
        f.write(bytes(10240 - f.tell() % 10240 + 1024))
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w", format=tarfile.GNU_FORMAT) as t:  # another writer's tar: GNU long names
        info = tarfile.TarInfo("d" * 150 + ".json")
        info.size = 3
        t.addfile(info, io.BytesIO(b"xyz"))
    dst = tmp_path / "copy.tar"
    assert _copy_many([(str(src), {"a", long_key}), (str(other), {"d" * 150})], str(dst)) == 3
    out = dst.read_bytes()
    kept = b"".join(blobs[name] for name, _ in members if name.partition(".")[0] in {"a", long_key})
    assert out.startswith(kept) and len(out) % 10240 == 0 and not any(out[-1024:])
    with tarfile.open(dst) as t:
        assert [(m.name, t.extractfile(m).read()) for m in t] == [
            *[(name, data) for name, data in members if name.partition(".")[0] in {"a", long_key}],
            ("d" * 150 + ".json", b"xyz")]
    assert [s["__key__"] for s in wds.WebDataset(str(dst), shardshuffle=False, empty_check=False)] == [
        "a", long_key, "d" * 150]
    bad = bytearray(src.read_bytes())
    bad[100] ^= 1  # a header byte: its checksum no longer holds
    src.write_bytes(bytes(bad))
    with pytest.raises(DatasetStateError, match="bad checksum"):
        _copy_many([(str(src), {"a"})], str(dst))


def test_gc_keeps_a_version_a_running_reader_holds(tmp_path):
    """mbm gc deleted the version a running training read, which then stopped at its next epoch."""
    import subprocess
    import sys

    _dataset(tmp_path, [1, 2, 3])
    for v in (1, 2, 3):
        current = DatasetManifest.from_json((tmp_path / "versions" / f"{v:06d}.json").read_text())
        current.shards, current.shard_sizes = [f"shards/v{v:06d}-000000.tar"], [1]
        current.feature_dims = {"text": 4}
        (tmp_path / "versions" / f"{v:06d}.json").write_text(current.to_json())
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"v{v:06d}-000000.tar").write_bytes(b"x")
    (tmp_path / "dataset.json").write_text((tmp_path / "versions" / "000003.json").read_text())
    reader = subprocess.Popen(  # a training of version 1: holds it until told to stop
        [sys.executable, "-c", "import sys; from mbm.data.source import resolve_data; "
         f"resolve_data({str(tmp_path)!r} + '/@1').hold(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "held\n"
        assert gc(str(tmp_path), keep=1, dry_run=True)["in_use"] == [1]
        result = gc(str(tmp_path), keep=1)
        assert result["kept_versions"] == [1, 3] and result["in_use"] == [1] and result["deleted_versions"] == [2]
        assert (tmp_path / "shards" / "v000001-000000.tar").exists()
        assert not (tmp_path / "shards" / "v000002-000000.tar").exists()
    finally:
        reader.communicate("")
    result = gc(str(tmp_path), keep=1)  # the reader has ended
    assert result["deleted_versions"] == [1] and result["in_use"] == []


def _index_with_keys(root, keys, column=True):
    """Version 1 of a dataset at ``root`` whose index holds a landed row per id in ``keys`` (id -> its
    media_stats) and one reject; ``column=False`` writes an index from before media keys."""
    from pipelines.commit import write_index
    from schemas.arrow import index_table

    _dataset(root, [1])
    rows = [{"id": sid, "key": sid, "shard": "shards/v000001-000000.tar", "content_hash": "c", "fingerprint": "{}",
             "status": "ok", "stage": "", "reason": "", "detail": "", "modalities": "image", "source": f"m:{sid}",
             "version": 1, "modality_hashes": "{}", "media_stats": stats} for sid, stats in keys.items()]
    rows.append({**rows[0], "id": "rej", "key": "rej", "shard": None, "status": "rejected", "stage": "read",
                 "reason": "read.missing_file", "modalities": "", "media_stats": None})
    table = index_table(rows)
    if not column:
        table = table.drop_columns(["media_stats"])
    (root / "index").mkdir()
    with open(root / "index" / "000001.parquet", "wb") as f:
        write_index(table, f)
    return current_manifest(str(root)), index_table([r for r in rows if r["status"] == "ok"])


def test_a_run_that_changes_nothing_records_the_media_keys_it_found_beside_the_index(tmp_path):
    """A folder copied or touched keeps its samples but not its files' keys: the run that finds them writes
    them to the version's keys file (the version's own files stay as they were), once."""
    import pyarrow.parquet as pq

    from pipelines.commit import keys_path, record_media_keys, recorded_keys

    manifest, same = _index_with_keys(tmp_path, {"b": '{"image": "k1"}', "a": '{"image": "k2"}', "c": None})
    index = tmp_path / manifest.index
    before = index.read_bytes()
    assert keys_path(manifest.index) == "index/_000001.keys.parquet"
    keys_file = tmp_path / keys_path(manifest.index)
    assert record_media_keys(str(tmp_path), manifest, same) == 0 and not keys_file.exists()  # the index's keys

    moved = same.set_column(same.schema.get_field_index("media_stats"), "media_stats",
                            pa.array(['{"image": "k1-moved"}', '{"image": "k2"}', '{"image": "k3"}']))
    moved = moved.take([2, 0, 1])  # the order the run staged them in
    assert record_media_keys(str(tmp_path), manifest, moved) == 2  # b moved, c got its first key
    assert index.read_bytes() == before
    assert pq.read_table(keys_file).to_pylist() == [  # in the index's order
        {"id": "a", "source": "m:a", "media_stats": '{"image": "k2"}'},
        {"id": "b", "source": "m:b", "media_stats": '{"image": "k1-moved"}'},
        {"id": "c", "source": "m:c", "media_stats": '{"image": "k3"}'}]
    landed = pq.read_table(index).filter(pa.compute.equal(pq.read_table(index).column("status"), "ok"))
    assert recorded_keys(str(index), landed).to_pylist() == ['{"image": "k2"}', '{"image": "k1-moved"}',
                                                             '{"image": "k3"}']
    written = keys_file.stat().st_mtime_ns
    assert record_media_keys(str(tmp_path), manifest, moved) == 0 and keys_file.stat().st_mtime_ns == written
    # a key lost (a file changed less than SETTLED ago gets none) is recorded as lost
    lost = moved.set_column(moved.schema.get_field_index("media_stats"), "media_stats",
                            pa.array([None, '{"image": "k1-moved"}', '{"image": "k2"}']))
    assert record_media_keys(str(tmp_path), manifest, lost) == 1
    assert pq.read_table(keys_file).column("media_stats").to_pylist() == ['{"image": "k2"}', '{"image": "k1-moved"}',
                                                                          None]


def test_an_index_from_before_media_keys_gets_a_keys_file_without_a_new_version(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.commit import keys_path, record_media_keys

    manifest, same = _index_with_keys(tmp_path, {"a": '{"image": "k"}', "b": None}, column=False)
    assert record_media_keys(str(tmp_path), manifest, same) == 1
    assert pq.read_table(tmp_path / keys_path(manifest.index)).column("media_stats").to_pylist() == [
        '{"image": "k"}', None]


@pytest.mark.parametrize("damage", ["other samples", "not parquet", "no media_stats"])
def test_a_keys_file_that_does_not_fit_the_index_is_ignored_with_a_warning(tmp_path, caplog, damage):
    import pyarrow.parquet as pq

    from pipelines.commit import keys_path, recorded_keys

    manifest, same = _index_with_keys(tmp_path, {"a": '{"image": "k"}', "b": None})
    keys_file = tmp_path / keys_path(manifest.index)
    if damage == "other samples":
        pq.write_table(pa.table({"id": ["a", "x"], "source": ["m:a", "m:x"], "media_stats": ["1", "2"]}), keys_file)
    elif damage == "not parquet":
        keys_file.write_bytes(b"PAR1 cut short")
    else:
        pq.write_table(pa.table({"id": ["a", "b"], "source": ["m:a", "m:b"]}), keys_file)
    with caplog.at_level("WARNING", logger="pipelines.commit"):
        assert recorded_keys(str(tmp_path / manifest.index), same.select(["id", "source"])) is None
    assert any(f"ignoring the media keys in {keys_file}" in r.getMessage() for r in caplog.records)
    assert recorded_keys(str(tmp_path / "index" / "000009.parquet"), same) is None  # no keys file: no warning


def test_gc_and_leftover_removal_treat_a_keys_file_as_part_of_its_version(tmp_path):
    from pipelines.commit import keys_path

    _dataset(tmp_path, [1, 2, 3])
    (tmp_path / "index").mkdir()
    for v in (1, 2, 3, 4):
        (tmp_path / "index" / f"{v:06d}.parquet").write_bytes(b"x")
        (tmp_path / keys_path(f"index/{v:06d}.parquet")).write_bytes(b"k")
    (tmp_path / "index" / "_000003.keys.parquet.tmp").write_bytes(b"cut")
    (tmp_path / "index" / "notes.parquet").write_bytes(b"a user's")  # not mbm's
    removed = remove_uncommitted(str(tmp_path))  # version 4 was never committed
    assert sorted(os.path.basename(f) for f in removed) == [
        "000004.parquet", "_000003.keys.parquet.tmp", "_000004.keys.parquet"]
    (tmp_path / "index" / "notes.parquet").unlink()
    result = gc(str(tmp_path), keep=2)
    assert sorted(result["deleted_files"]) == ["index/000001.parquet", "index/_000001.keys.parquet"]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "000002.parquet", "000003.parquet", "_000002.keys.parquet", "_000003.keys.parquet"]


def test_a_keys_file_that_cannot_be_written_is_a_warning(tmp_path, caplog, monkeypatch):
    import pipelines.commit as commit_mod
    from pipelines.commit import keys_path, record_media_keys

    manifest, same = _index_with_keys(tmp_path, {"a": '{"image": "k"}'})
    moved = same.set_column(same.schema.get_field_index("media_stats"), "media_stats", pa.array(['{"image": "k2"}']))

    def full(path, data, mime="application/octet-stream"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commit_mod, "write_atomic", full)
    with caplog.at_level("WARNING", logger="pipelines.commit"):
        assert record_media_keys(str(tmp_path), manifest, moved) == 0
    assert any("could not record the media keys of 1 samples" in r.getMessage() and "No space left" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / keys_path(manifest.index)).exists()
