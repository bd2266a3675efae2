import argparse
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from incremental import build  # noqa: E402
from preprocess import dataset, precision_arg  # noqa: E402

from jobs.spec import create_extractors, load_spec  # noqa: E402


def test_precision_argument_is_checked():
    assert precision_arg("text=bfloat16") == ("text", "bfloat16")
    for bad in ("text", "txt=bfloat16", "image=float16", "=auto"):
        with pytest.raises(argparse.ArgumentTypeError, match="MODALITY=PRECISION"):
            precision_arg(bad)


def test_dataset_spec_carries_the_precision_to_every_pipelines_extractors(tmp_path):
    spec = load_spec(str(dataset(tmp_path, 12, {"text": "bfloat16"})))
    extractors = create_extractors(spec)
    assert extractors["text"].config.precision == "bfloat16"
    assert extractors["image"].config.precision == "auto" and extractors["audio"].config.precision == "auto"
    manifest = (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 12
    plain = load_spec(str(dataset(tmp_path / "plain", 3)))
    assert all(ex.config.precision == "auto" for ex in create_extractors(plain).values())


def test_another_corpus_is_linked_and_its_rows_repeated_with_unique_ids(tmp_path):
    import json

    source = tmp_path / "corpus"
    (source / "img").mkdir(parents=True)
    (source / "img" / "a.png").write_bytes(b"not really a png")
    rows = [{"id": "x", "text": "one", "image": "img/a.png"}, {"id": "bad", "image": "img/missing.png"}]
    (source / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source / "manifest.jsonl").write_bytes((source / "manifest.jsonl").read_bytes() + b"{broken\n\xff\n")
    build(tmp_path / "once", 0, source)  # the manifest as it is, malformed lines too: the pipelines judge them
    assert (tmp_path / "once" / "manifest.jsonl").read_bytes() == (source / "manifest.jsonl").read_bytes()
    assert (tmp_path / "once" / "img").is_symlink() and not (tmp_path / "once" / "img" / "missing.png").exists()
    five = build(tmp_path / "five", 5, source)
    assert [r["id"] for r in five] == ["x", "bad", "x-00002", "bad-00003", "x-00004"]
    assert [r.get("text") for r in five] == ["one", None, "one (copy 2)", None, "one (copy 4)"]
    written = [json.loads(x) for x in (tmp_path / "five" / "manifest.jsonl").read_text().splitlines()]
    assert written == five and (source / "manifest.jsonl").read_bytes().count(b"\n") == 4  # the source is untouched
    spec = load_spec(str(dataset(tmp_path / "spec", 3, source=source)))
    assert spec.input.manifest == str(tmp_path / "spec" / "data" / "manifest.jsonl")
    with pytest.raises(SystemExit, match="expected one manifest"):
        build(tmp_path / "none", 3, tmp_path / "img-only")


def test_a_csv_or_parquet_corpus_is_repeated_as_jsonl_or_taken_as_it_is(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.png").write_bytes(b"x")
    (source / "manifest.csv").write_bytes(b'id,text,image,label\n1,"multi\nline",a.png,3\n2,two,,\n')
    rows = build(tmp_path / "rep", 3, source)
    assert [(r["id"], r["text"]) for r in rows] == [("1", "multi\nline"), ("2", "two"), ("1-00002", "multi\nline (copy 2)")]
    spec = load_spec(str(dataset(tmp_path / "spec", 3, source=source)))
    assert spec.input.manifest.endswith("data/manifest.jsonl")
    as_is = load_spec(str(dataset(tmp_path / "as-is", 0, source=source)))
    assert as_is.input.manifest.endswith("data/manifest.csv")
    assert (tmp_path / "as-is" / "data" / "manifest.csv").read_bytes() == (source / "manifest.csv").read_bytes()
    pq.write_table(pa.table({"id": ["p"], "text": ["from parquet"]}), tmp_path / "m.parquet")
    assert [r["text"] for r in build(tmp_path / "pq", 2, tmp_path / "m.parquet")] == ["from parquet",
                                                                                      "from parquet (copy 1)"]
    pq.write_table(pa.table({"id": ["q"], "image": [{"bytes": b"\x89PNG", "path": "q.png"}]}), tmp_path / "b.parquet")
    with pytest.raises(SystemExit, match="--samples 0"):
        build(tmp_path / "bytes", 2, tmp_path / "b.parquet")
    assert json.loads((tmp_path / "rep" / "manifest.jsonl").read_text().splitlines()[0])["label"] == "3"


def test_hf_baseline_rows_survive_mixed_types_and_keep_the_first_of_an_id(tmp_path):
    """``Dataset.from_list`` needs one Arrow type per column: rows travel as JSON; duplicates go as in mbm."""
    import json

    from baseline_hf import read_rows

    (tmp_path / "a.png").write_bytes(b"x")
    lines = [b'{"id": "a", "text": "one", "label": 1}', b'{"id": "b", "text": "two", "label": "cat", "meta": [1, 2]}',
             b'{"id": "a", "text": "again"}', b'{"id": "c", "text": "caf\xe9"}', b'{broken', b'{"id": "d"}',
             b'{"id": "d", "image": "a.png"}']
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    rows = [json.loads(r["row"]) for r in read_rows(str(manifest), False)]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "d"]  # the second "a" dropped; "d" without media is
    assert rows[0]["text"] == "one" and rows[1]["meta"] == [1, 2]  # not valid, so the next "d" is its first
    assert all(isinstance(r["row"], str) for r in read_rows(str(manifest), False))
