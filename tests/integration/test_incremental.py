"""Incremental reprocessing on the bundled sample data: only what changed is recomputed."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from jobs.cli import main

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


def _setup(tmp_path: Path, extra_spec: str = "") -> Path:
    shutil.copytree(SAMPLE, tmp_path / "data")
    spec = tmp_path / "job.toml"
    spec.write_text('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\nsamples_per_shard = 8\n'
                    '[runner]\nworkers = 1\n' + extra_spec)
    return spec


def _run(spec: Path, *args: str) -> dict:
    assert main(["preprocess", str(spec), "--no-progress", *args]) == 0
    return json.loads((spec.parent / "out" / "report.json").read_text())


def _members(out: Path, version: int) -> dict[str, dict[str, bytes]]:
    """id -> {member suffix: bytes} for a version, read with plain webdataset."""
    manifest = json.loads((out / "versions" / f"{version:06d}.json").read_text())
    found: dict[str, dict[str, bytes]] = {}
    for rel in manifest["shards"]:
        for s in wds.WebDataset(str(out / rel), shardshuffle=False):
            sid = json.loads(s["json"])["id"]
            assert sid not in found, f"{sid} twice in version {version}"
            found[sid] = {k: v for k, v in s.items() if k.endswith(".npy") or k == "json"}
    assert len(found) == manifest["num_samples"] == sum(manifest["shard_sizes"])
    return found


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_no_change_then_edits_recompute_only_what_changed(tmp_path):
    spec = _setup(tmp_path)
    out = tmp_path / "out"
    first = _run(spec)
    assert first["planned"]["new"] == 36 and first["new_version"] and first["counts"]["extracted"] == 34
    shards_v1 = sorted(p.name for p in (out / "shards").iterdir())

    again = _run(spec)
    assert again["counts"]["extracted"] == 0 and not again["new_version"]
    assert again["planned"] == {"new": 0, "changed": 0, "unchanged": 36, "removed": 0}
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards_v1
    assert json.loads((out / "dataset.json").read_text())["version"] == 1
    assert sorted(p.name for p in (out / "versions").iterdir()) == ["000001.json", "000001.toml"]

    manifest = tmp_path / "data" / "manifest.jsonl"
    rows = _rows(manifest)
    ok_with_text_only_change = [r for r in rows if r["text"] and r["image"] and not r["audio"]
                                and not r["id"].startswith("bad")][:3]
    for r in ok_with_text_only_change:
        r["text"] += " (caption revised)"
    # Replace three images: new bytes under a new file name.
    image_rows = [r for r in rows if r["image"] and r not in ok_with_text_only_change
                  and not r["id"].startswith("bad") and r["image"].endswith(".jpg")][:3]
    for i, r in enumerate(image_rows):
        src = tmp_path / "data" / r["image"]
        dst = src.with_name(f"replaced-{i}.jpg")
        from PIL import Image

        Image.open(src).rotate(90, expand=True).save(dst, quality=90)
        r["image"] = f"images/{dst.name}"
    removed = [r["id"] for r in rows if r not in ok_with_text_only_change + image_rows
               and not r["id"].startswith("bad")][:2]
    rows = [r for r in rows if r["id"] not in removed]
    template = next(r for r in rows if r["text"] and r["image"] and not r["audio"] and r["id"] not in
                    {x["id"] for x in ok_with_text_only_change + image_rows})
    added = [{**template, "id": f"new-{i}", "text": f"A new caption number {i}."} for i in range(4)]
    _write_rows(manifest, rows + added)

    second = _run(spec)
    assert second["new_version"] and second["version"] == 2
    assert second["planned"] == {"new": 4, "changed": 6, "unchanged": 36 - 6 - 2, "removed": 2}
    assert second["counts"]["extracted"] == 10
    # the new samples' picture is the template's: its features are copied from that sample, not extracted
    assert second["extracted_by_modality"] == {"text": 3 + 4, "image": 3, "audio": 0}

    v1, v2 = _members(out, 1), _members(out, 2)
    assert set(v2) == (set(v1) - set(removed)) | {a["id"] for a in added}
    assert all(v2[a["id"]]["image.npy"] == v1[template["id"]]["image.npy"] for a in added)
    text_changed = {r["id"] for r in ok_with_text_only_change}
    image_changed = {r["id"] for r in image_rows}
    for sid in set(v1) & set(v2):
        if sid not in text_changed:
            assert v1[sid].get("text.npy") == v2[sid].get("text.npy"), sid
        else:
            assert v1[sid]["text.npy"] != v2[sid]["text.npy"] and v1[sid]["image.npy"] == v2[sid]["image.npy"]
        if sid not in image_changed:
            assert v1[sid].get("image.npy") == v2[sid].get("image.npy"), sid
            assert v1[sid].get("audio.npy") == v2[sid].get("audio.npy"), sid
        else:
            assert v1[sid]["image.npy"] != v2[sid]["image.npy"] and v1[sid]["text.npy"] == v2[sid]["text.npy"]
    m1 = json.loads((out / "versions/000001.json").read_text())
    m2 = json.loads((out / "versions/000002.json").read_text())
    assert set(m1["shards"]) & set(m2["shards"]), "untouched shards are shared between versions"
    assert _members(out, 1) == v1  # the old version is still readable and unchanged

    # Changing only the audio extractor's settings recomputes audio features only.
    spec.write_text(spec.read_text() + '[extract.audio]\nname = "logmel"\nn_mels = 64\n')
    third = _run(spec)
    n_audio = sum(1 for s in v2.values() if "audio.npy" in s)
    assert third["extracted_by_modality"] == {"text": 0, "image": 0, "audio": n_audio}
    v3 = _members(out, 3)
    for sid, s in v3.items():
        assert s.get("text.npy") == v2[sid].get("text.npy") and s.get("image.npy") == v2[sid].get("image.npy")
        if "audio.npy" in s:
            import numpy as np

            assert np.load(io.BytesIO(s["audio.npy"]), allow_pickle=False).shape[1] == 64

    full = _run(spec, "--full")
    assert full["counts"]["extracted"] == len(v3) and full["version"] == 4


def test_versions_diff_and_gc_commands(tmp_path, capsys):
    spec = _setup(tmp_path)
    out = tmp_path / "out"
    _run(spec)
    manifest = tmp_path / "data" / "manifest.jsonl"
    rows = _rows(manifest)
    rows[0]["text"] += " Edited."
    _write_rows(manifest, rows[1:] + [rows[0], {**rows[1], "id": "added-1"}])
    _run(spec)
    capsys.readouterr()
    assert main(["versions", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "1" in listing and "2" in listing and "current" in listing
    assert main(["diff", str(out), "1", "2", "--json"]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff == {"added": ["added-1"], "changed": [rows[0]["id"]], "removed": []}
    v1_shards = set(json.loads((out / "versions/000001.json").read_text())["shards"])
    assert main(["gc", str(out), "--keep", "1"]) == 0
    v2_shards = set(json.loads((out / "versions/000002.json").read_text())["shards"])
    left = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert left == v2_shards and not (out / "versions/000001.json").exists()
    assert v1_shards - v2_shards, "the edit rewrote at least one shard, which gc removed"
    assert main(["diff", str(out), "1", "2"]) == 2  # version 1 is gone: a clear error, exit 2


def test_killed_run_leaves_previous_version_and_rerun_matches_clean_run(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    spec = _setup(tmp_path)
    out = tmp_path / "out"
    _run(spec)
    v1 = _members(out, 1)
    rows = _rows(tmp_path / "data" / "manifest.jsonl")
    _write_rows(tmp_path / "data" / "manifest.jsonl",
                [{**r, "text": (r["text"] or "") + " v2"} if r["text"] else r for r in rows])
    temp = tmp_path / "tmp"
    temp.mkdir()
    rng = random.Random(0)
    for delay in (rng.uniform(2.0, 6.0), rng.uniform(6.0, 9.0)):
        # a killed driver cannot remove Beam's temp folder: give it one under the test's
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "preprocess", str(spec), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(temp)})
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        current = json.loads((out / "dataset.json").read_text())["version"]
        assert _members(out, current) == v1 if current == 1 else True
        for p in (out / "shards").iterdir():  # no partial shard under a final name
            with tarfile.open(p) as tf:
                tf.getmembers()
    _run(spec)
    resumed = _members(out, json.loads((out / "dataset.json").read_text())["version"])
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean_spec = _setup(clean_dir)
    shutil.copy(tmp_path / "data" / "manifest.jsonl", clean_dir / "data" / "manifest.jsonl")
    _run(clean_spec)
    clean = _members(clean_dir / "out", 1)
    assert set(resumed) == set(clean)
    for sid in clean:
        assert resumed[sid].keys() == clean[sid].keys()
        for k in clean[sid]:
            if k.endswith(".npy"):  # extraction runs fixed shapes, so features are bit-identical
                assert resumed[sid][k] == clean[sid][k], (sid, k)


def test_small_shards_left_by_many_small_updates_are_merged(tmp_path):
    """Each run that changes a caption adds a shard of one sample; the eighth such shard triggers a merge,
    and every version still reads back as exactly its own samples."""
    import io

    import pyarrow.parquet as pq
    import webdataset as wds

    rows = [{"id": f"s{i:02d}", "text": f"sample number {i}", "label": "ab"[i % 2]} for i in range(24)]
    manifest = tmp_path / "m.jsonl"
    spec = tmp_path / "job.toml"
    spec.write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\nsamples_per_shard = 8\n'
                    '[runner]\nworkers = 1\n')
    out = tmp_path / "out"
    counts = []
    for edit in range(10):
        if edit:
            rows[edit]["text"] += " (edited)"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _run(spec)
        counts.append(len(json.loads((out / "dataset.json").read_text())["shards"]))
    assert max(counts) <= counts[0] + 8 and counts[-1] < max(counts), counts
    for path in sorted((out / "versions").glob("*.json")):
        version = json.loads(path.read_text())
        found = {}
        for shard in version["shards"]:
            for s in wds.WebDataset(str(out / shard), shardshuffle=False, empty_check=False):
                doc = json.loads(s["json"])
                assert doc["id"] not in found
                found[doc["id"]] = (shard, io.BytesIO(s["text.npy"]).getvalue())
        index = {r["id"]: r["shard"] for r in pq.read_table(out / version["index"]).to_pylist() if r["status"] == "ok"}
        assert {k: v[0] for k, v in found.items()} == index, path.name
        assert version["shard_sizes"] == [sum(v[0] == sh for v in found.values()) for sh in version["shards"]]


def test_a_modality_that_failed_extraction_is_retried_once_its_extractor_changes(tmp_path):
    """Its sample landed with its other modalities and counted as unchanged, so another extractor (a
    fixed model, other settings) never retried it; the same extractor does not try again."""
    import numpy as np
    import soundfile as sf

    (tmp_path / "data").mkdir()
    rows = []
    for i, text in enumerate(["a fine caption", "a bad caption", "another fine one"]):
        sf.write(tmp_path / "data" / f"{i}.wav", np.sin(np.arange(8000) * (0.05 + i / 100)).astype("float32"), 16000)
        rows.append({"id": f"s{i}", "text": text, "audio": f"{i}.wav"})
    _write_rows(tmp_path / "data" / "m.jsonl", rows)
    spec = tmp_path / "job.toml"

    def write_spec(trigger: str) -> None:
        spec.write_text('[input]\nmanifest = "data/m.jsonl"\n[output]\ndir = "out"\n[runner]\nworkers = 1\n'
                        f'[extract.text]\nname = "failing-text"\ntrigger = "{trigger}"\nerror = "ValueError"\n')

    def text_of(version: int) -> dict[str, bool]:
        return {sid: "text.npy" in m for sid, m in _members(tmp_path / "out", version).items()}

    import tests.support.failing_extractor  # noqa: F401  registers failing-text

    write_spec("bad")
    _run(spec)
    assert text_of(1) == {"s0": True, "s1": False, "s2": True}
    again = _run(spec)  # the same extractor: it would fail again, so nothing to do
    assert not again["new_version"] and again["extracted_by_modality"]["text"] == 0
    write_spec("never there")
    fixed = _run(spec)
    assert fixed["version"] == 2 and text_of(2) == {"s0": True, "s1": True, "s2": True}
    assert fixed["extracted_by_modality"] == {"text": 3, "image": 0, "audio": 0}  # the audio is copied


def test_shards_that_max_shard_bytes_cut_are_full_and_not_merged(tmp_path):
    """Samples of ~200 KB in shards of at most 1 MiB hold 4 each, a fiftieth of samples_per_shard: every
    shard counted as small, so one changed caption merged the whole dataset into one 8 MB shard."""
    import tests.support.failing_extractor  # noqa: F401  registers failing-text

    rows = [{"id": f"s{i:02d}", "text": " ".join(["word"] * 10) + f" {i}"} for i in range(40)]
    manifest = tmp_path / "m.jsonl"
    spec = tmp_path / "job.toml"
    spec.write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\nsamples_per_shard = 400\n'
                    'max_shard_bytes = 1048576\n[runner]\nworkers = 1\n'
                    '[extract.text]\nname = "failing-text"\ntrigger = "never there"\ndim = 9000\n')
    out = tmp_path / "out"
    _write_rows(manifest, rows)
    _run(spec)
    first = json.loads((out / "dataset.json").read_text())
    assert len(first["shards"]) >= 8 and max(first["shard_sizes"]) < 100
    rows[3]["text"] += " (edited)"
    _write_rows(manifest, rows)
    _run(spec)
    second = json.loads((out / "dataset.json").read_text())
    assert len(set(first["shards"]) & set(second["shards"])) == len(first["shards"]) - 1  # one rewritten
    assert all((out / s).stat().st_size <= 1048576 + 64 * 1024 for s in second["shards"])
    assert set(_members(out, 2)) == {r["id"] for r in rows}


def test_settings_of_an_extractor_no_sample_uses_make_no_new_version(tmp_path):
    import tests.support.failing_extractor  # noqa: F401  registers failing-text

    _write_rows(tmp_path / "m.jsonl", [{"id": f"s{i}", "text": f"caption {i}"} for i in range(4)])
    spec = tmp_path / "job.toml"
    base = ('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n[runner]\nworkers = 1\n'
            '[extract.text]\nname = "failing-text"\n')
    spec.write_text(base)
    assert _run(spec)["version"] == 1
    spec.write_text(base + "[extract.audio]\nname = \"logmel\"\nn_mels = 40\n")  # captions only: no audio
    again = _run(spec)
    assert not again["new_version"] and again["version"] == 1
    spec.write_text(base.replace('"failing-text"\n', '"failing-text"\ndim = 5\n'))  # the one in use: recomputed
    assert _run(spec)["version"] == 2


def test_a_run_in_which_every_input_is_rejected_commits_nothing(tmp_path, capsys):
    """Its version would hold no sample, removing every one of the version before (a moved media
    folder rejects every row at once); a first run of such inputs exited 0 with a version of nothing."""
    import tests.support.failing_extractor  # noqa: F401  registers failing-text

    spec = tmp_path / "job.toml"
    spec.write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n[runner]\nworkers = 1\n'
                    '[extract.text]\nname = "failing-text"\n')
    _write_rows(tmp_path / "m.jsonl", [{"id": f"s{i}", "text": f"caption {i}"} for i in range(4)])
    assert _run(spec)["version"] == 1
    _write_rows(tmp_path / "m.jsonl", [{"id": f"s{i}", "audio": f"moved/{i}.wav"} for i in range(4)])
    capsys.readouterr()
    assert main(["preprocess", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "every one of the 4 inputs was rejected (file.missing 4): a version of that would hold no sample, " \
           "removing the 4 of version 1, so nothing was committed" in err, err
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["version"] == 1
    assert not (tmp_path / "out" / ".staging").exists()
    capsys.readouterr()
    assert main(["preprocess", str(spec), "--no-progress", "--output", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err
    assert "every one of the 4 inputs was rejected (file.missing 4), so nothing was committed: a first version " \
           "would hold no sample (s0: audio: " in err, err
    assert not (tmp_path / "fresh" / "dataset.json").exists() and not (tmp_path / "fresh" / ".staging").exists()


def test_a_folder_whose_current_files_were_changed_by_hand_says_so_and_full_rebuilds_it(tmp_path, capsys):
    spec = _setup(tmp_path)
    out = tmp_path / "out"
    _run(spec)
    manifest = json.loads((out / "dataset.json").read_text())
    rows = _rows(tmp_path / "data" / "manifest.jsonl")
    rows[0]["text"] = "a caption edited"
    _write_rows(tmp_path / "data" / "manifest.jsonl", rows)
    # a shard cut short by hand: the run that would reuse its features stops with one line, commits nothing
    index = pq.read_table(out / manifest["index"]).to_pylist()
    shard = next(r["shard"] for r in index if r["id"] == rows[0]["id"])
    whole = (out / shard).read_bytes()
    (out / shard).write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    cut_message = (f"mbm: error: [output] dir {out}: the shard {shard} of its current version 1 is cut short or "
                   "damaged (its size is not the one recorded, or it does not end as a tar does): the folder was "
                   "changed by hand; put it back, or rerun with --full (every sample computed again into a new "
                   "version)")
    assert main(["preprocess", str(spec), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == cut_message
    # the same with no sample of that shard changed: its samples were carried into version 2 unread
    _write_rows(tmp_path / "data" / "manifest.jsonl", [rows[0] | {"text": "another"}] + rows[1:])
    other = next(r["shard"] for r in index if r["shard"] != shard)
    (out / shard).write_bytes(whole)
    (out / other).write_bytes((out / other).read_bytes()[:-512])
    assert main(["preprocess", str(spec), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == cut_message.replace(shard, other)
    assert json.loads((out / "dataset.json").read_text())["version"] == 1
    # the index deleted by hand: refused before any work, and --full makes a whole new version
    (out / manifest["index"]).unlink()
    assert main(["preprocess", str(spec), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mbm: error: [output] dir {out}: 1 of the files of its current version 1 are missing (e.g. "
        f"{manifest['index']}): the folder was changed by hand; put them back, or rerun with --full (every sample "
        "computed again into a new version)")
    report = _run(spec, "--full")
    assert report["new_version"] and report["version"] == 2 and report["counts"]["extracted"] == 34
    assert len(_members(out, 2)) == 34
    # the index cut short by hand: one line before any work (it was a 124-line traceback from the workers), and
    # --full makes a whole new version (it failed at the commit)
    index2 = out / json.loads((out / "dataset.json").read_text())["index"]
    index2.write_bytes(index2.read_bytes()[:1000])
    assert main(["preprocess", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the index of its current version 2, index/000002.parquet, cannot be read (" in err[0]
    assert _run(spec, "--full")["version"] == 3


def test_a_full_disk_once_the_version_is_committed_does_not_say_it_is_not(tmp_path, monkeypatch, caplog):
    import errno

    from pipelines import commit as commit_mod

    spec = _setup(tmp_path)
    out = tmp_path / "out"
    real = commit_mod.write_atomic

    def full_after_dataset_json(path, *args, **kwargs):
        if path.endswith(("job.toml", "report.json")):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(commit_mod, "write_atomic", full_after_dataset_json)
    with caplog.at_level("WARNING", logger="pipelines.commit"):
        assert main(["preprocess", str(spec), "--no-progress"]) == 0
    assert json.loads((out / "dataset.json").read_text())["version"] == 1 and len(_members(out, 1)) == 34
    assert any("version 1 of" in r.getMessage() and "is committed, but writing its job.toml and report.json failed"
               in r.getMessage() for r in caplog.records)


def test_media_files_are_read_again_only_when_changed_on_disk_even_if_size_and_mtime_stay(tmp_path):
    """Each landed row records its media files' keys (``media_stats``); a re-run takes an unchanged file's hash
    from it. A file rewritten in place with its size and modification time kept (``cp -p``) is still seen."""
    import os
    import time

    from pipelines.media import SETTLED

    spec = _setup(tmp_path)
    out = tmp_path / "out"
    time.sleep(SETTLED + 0.2)  # files written in the last SETTLED seconds are read on every run
    first = _run(spec)
    rows = {r["id"]: r for r in pq.read_table(out / "index" / "000001.parquet").to_pylist() if r["status"] == "ok"}
    for r in rows.values():
        files = {m for m in ("image", "audio") if m in r["modalities"].split(",")}
        assert set(json.loads(r["media_stats"] or "{}")) == files, r["id"]
    again = _run(spec)
    assert not again["new_version"] and again["planned"]["unchanged"] == first["planned"]["new"]

    picture = tmp_path / "data" / "images" / "astronaut.jpg"
    users = {r["id"] for r in _rows(tmp_path / "data" / "manifest.jsonl") if r["image"] == "images/astronaut.jpg"}
    st = picture.stat()
    data = bytearray(picture.read_bytes())
    data[-3] ^= 0xFF  # the same size, other bytes (the scan data's end: it still decodes)
    picture.write_bytes(bytes(data))
    os.utime(picture, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (picture.stat().st_size, picture.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    time.sleep(SETTLED + 0.2)  # settled again: only its status-change time tells
    third = _run(spec)
    assert third["new_version"] and third["planned"]["changed"] == len(users) >= 1
    assert third["extracted_by_modality"] == {"text": 0, "image": len(users), "audio": 0}
    rows3 = {r["id"]: r for r in pq.read_table(out / "index" / "000002.parquet").to_pylist() if r["status"] == "ok"}
    for sid in users:
        assert json.loads(rows3[sid]["modality_hashes"])["image"] != json.loads(rows[sid]["modality_hashes"])["image"]
        assert rows3[sid]["media_stats"] != rows[sid]["media_stats"]


def test_a_restored_copy_of_the_media_is_read_once_and_its_keys_recorded_without_a_new_version(tmp_path, capsys):
    """Media restored from a copy keep their bytes and mtimes but get new inodes: the first run after reads
    them, changes nothing, and records their keys in the version's keys file; the next run finds them there."""
    import time

    from pipelines.commit import keys_path
    from pipelines.media import SETTLED

    spec = _setup(tmp_path)
    out = tmp_path / "out"
    time.sleep(SETTLED + 0.2)
    first = _run(spec)
    assert first["media_keys_updated"] == 0
    index_bytes = (out / "index" / "000001.parquet").read_bytes()
    rows = {r["id"]: r for r in pq.read_table(out / "index" / "000001.parquet").to_pylist() if r["status"] == "ok"}
    keyed = {sid for sid, r in rows.items() if r["media_stats"]}
    assert len(keyed) >= 20

    shutil.copytree(tmp_path / "data", tmp_path / "restored")  # copy2: bytes and mtimes kept, new inodes
    shutil.rmtree(tmp_path / "data")
    (tmp_path / "restored").rename(tmp_path / "data")
    time.sleep(SETTLED + 0.2)
    capsys.readouterr()
    second = _run(spec)
    assert not second["new_version"] and second["planned"]["unchanged"] == first["planned"]["new"]
    assert second["media_keys_updated"] == len(keyed)
    assert "media keys" in capsys.readouterr().out
    assert (out / "index" / "000001.parquet").read_bytes() == index_bytes  # the version is as it was written
    keys_file = out / keys_path("index/000001.parquet")
    recorded = {r["id"]: r["media_stats"] for r in pq.read_table(keys_file).to_pylist()}
    assert set(recorded) == set(rows) and all(recorded[sid] != rows[sid]["media_stats"] for sid in keyed)

    third = _run(spec)
    assert not third["new_version"] and third["media_keys_updated"] == 0

    # the next version's index carries the recorded keys of the samples it did not change
    manifest = tmp_path / "data" / "manifest.jsonl"
    entries = _rows(manifest)
    entries[0]["text"] = "A new caption."
    _write_rows(manifest, entries)
    fourth = _run(spec)
    assert fourth["new_version"] and fourth["planned"]["changed"] == 1
    assert fourth["extracted_by_modality"] == {"text": 1, "image": 0, "audio": 0}
    rows2 = {r["id"]: r for r in pq.read_table(out / "index" / "000002.parquet").to_pylist() if r["status"] == "ok"}
    assert {sid: r["media_stats"] for sid, r in rows2.items()} == recorded
    assert main(["gc", str(out), "--keep", "1"]) == 0
    assert sorted(p.name for p in (out / "index").iterdir()) == ["000002.parquet"]
