"""Media that repeat in a caption dataset are featurized once, with real Beam worker processes and the
default models: the dataset is byte for byte the one every copy's own extraction writes."""

import json
import random
import tarfile
import tomllib
from pathlib import Path

import media_synth as ms
import pyarrow.parquet as pq
import pytest

from jobs.cli import main

pytestmark = pytest.mark.slow


def _caption_dataset(root: Path) -> int:
    """A manifest whose pictures come under several captions each, rows in no order; returns the rows."""
    rows = []
    for p in range(5):
        name = f"images/p{p}.png"
        (root / "images").mkdir(exist_ok=True)
        (root / name).write_bytes(ms.save(ms.picture(96, 72, shape=ms.SHAPES[p % len(ms.SHAPES)], index=p), "PNG"))
        rows += [{"id": f"p{p}-{c}", "text": f"caption {c} of picture {p}", "image": name} for c in range(4)]
    # the same bytes under another name, a picture that cannot be read under two captions, a clip under two
    (root / "images" / "same-as-p0.png").write_bytes((root / "images" / "p0.png").read_bytes())
    rows.append({"id": "same", "text": "a copy of picture 0 by another name", "image": "images/same-as-p0.png"})
    (root / "images" / "cut.png").write_bytes((root / "images" / "p1.png").read_bytes()[:60])
    rows += [{"id": f"cut-{c}", "image": "images/cut.png"} for c in range(2)]
    (root / "audio").mkdir()
    (root / "audio" / "clip.wav").write_bytes(ms.encode_variant(ms.AUDIO_VARIANTS["wav-16-16k-mono"],
                                                                seconds=0.6, index=0))
    rows += [{"id": f"clip-{c}", "text": f"transcript {c}", "audio": "audio/clip.wav"} for c in range(2)]
    random.Random(0).shuffle(rows)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def _members(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / "dataset.json").read_text())
    members = {}
    for rel in manifest["shards"]:
        with tarfile.open(out / rel) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    return members


def test_repeated_media_are_featurized_once_and_the_dataset_is_the_same(tmp_path):
    n = _caption_dataset(tmp_path)
    outs = {}
    for dedupe in (True, False):
        out = tmp_path / f"out-{dedupe}"
        spec = tmp_path / f"job-{dedupe}.toml"
        spec.write_text(f'[input]\nmanifest = "manifest.jsonl"\n[output]\ndir = "{out.name}"\n'
                        f"[runner]\nworkers = 2\ndedupe = {str(dedupe).lower()}\n")
        assert main(["preprocess", str(spec), "--no-progress"]) == 0
        outs[dedupe] = out
    on, off = (_members(outs[d]) for d in (True, False))
    assert sorted(on) == sorted(off) and len(on) >= 3 * (n - 2)  # json and features of each landed sample
    assert [k for k in on if on[k] != off[k]] == []  # features, json: byte for byte

    report = json.loads((outs[True] / "report.json").read_text())
    # each picture's 4 rows come together, so 3 of them copy the first; the copy by another name may meet
    # its twin in a batch or the cache too; the clip's second row copies the first
    assert 15 <= report["copies_by_modality"]["image"] <= 16 and report["copies_by_modality"]["audio"] == 1
    assert json.loads((outs[False] / "report.json").read_text())["copies_by_modality"] == {
        "text": 0, "image": 0, "audio": 0}
    assert report["counts"]["ok"] == n - 2 and report["counts"]["rejected"] == 2
    index = {d: pq.read_table(outs[d] / json.loads((outs[d] / "dataset.json").read_text())["index"],
                              columns=["id", "status", "reason"]).to_pylist() for d in outs}
    assert sorted(index[True], key=lambda r: r["id"]) == sorted(index[False], key=lambda r: r["id"])
    assert {r["id"]: r["reason"] for r in index[True] if r["status"] == "rejected"}.keys() == {"cut-0", "cut-1"}
    assert tomllib.loads((outs[True] / "job.toml").read_text())["runner"]["dedupe"] is True


def test_a_new_caption_of_a_known_picture_copies_its_features_from_the_previous_version(tmp_path):
    _caption_dataset(tmp_path)
    spec = tmp_path / "job.toml"
    spec.write_text('[input]\nmanifest = "manifest.jsonl"\n[output]\ndir = "out"\n[runner]\nworkers = 2\n')
    assert main(["preprocess", str(spec), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    rows += [{"id": f"p{p}-new", "text": f"a new caption of picture {p}", "image": f"images/p{p}.png"} for p in range(5)]
    (tmp_path / "images" / "new.png").write_bytes(ms.save(ms.picture(80, 80, shape="square", index=9), "PNG"))
    rows.append({"id": "new-picture", "text": "a picture not seen before", "image": "images/new.png"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["preprocess", str(spec), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["planned"]["new"] == 6 and report["planned"]["unchanged"] == len(rows) - 6  # the rejects too
    assert report["extracted_by_modality"] == {"text": 6, "image": 1, "audio": 0}  # the new picture only
    full = tmp_path / "full"
    assert main(["preprocess", str(spec), "--no-progress", "--full", "--output", str(full)]) == 0
    assert json.loads((full / "report.json").read_text())["extracted_by_modality"]["image"] == 1 + 5 * 4 + 1 + 5
    incremental, everything = _members(tmp_path / "out"), _members(full)
    assert sorted(incremental) == sorted(everything)
    assert [k for k in incremental if incremental[k] != everything[k]] == []
