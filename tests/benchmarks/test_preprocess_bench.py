import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from baseline_loop import iter_source  # noqa: E402
from incremental import SAMPLE, build  # noqa: E402
from preprocess import (  # noqa: E402
    TreeMemory,
    check_args,
    commands,
    dataset,
    input_count,
    landed,
    main,
    parser,
    parts_text,
    precision_arg,
    repeat_folder,
    repeat_spec,
    repeat_tars,
    source_kind,
)

from jobs.spec import create_extractors, load_spec  # noqa: E402
from schemas import RawSample  # noqa: E402


def imagefolder(root: Path) -> Path:
    """A tiny imagefolder: a metadata.jsonl in ``train/`` naming files relative to that folder (captions,
    an audio file, a broken image, a file that is no media, a repeated file name) and a metadata.csv at the
    root naming class photos with labels: 8 rows, of which 5 land."""
    for rel, name in [("train/images/astronaut.jpg", "images/astronaut.jpg"), ("train/images/coffee.jpg", "images/coffee.jpg"),
                      ("train/images/broken.jpg", "images/broken.jpg"), ("train/sounds/cat.wav", "audio/cat_caption.wav"),
                      ("photos/cat/chelsea.png", "images/chelsea.png"), ("photos/man/camera.png", "images/camera.png")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / name, root / rel)
    (root / "train" / "notes.txt").write_text("not a sample")
    rows = [{"file_name": "images/astronaut.jpg", "text": "an astronaut"}, {"file_name": "images/coffee.jpg",
            "caption": "a cup of coffee"}, {"file_name": "images/broken.jpg"}, {"file_name": "sounds/cat.wav",
            "transcription": "a cat"}, {"file_name": "notes.txt"}, {"file_name": "images/coffee.jpg", "text": "again"}]
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "metadata.csv").write_text("file_name,label\nphotos/cat/chelsea.png,cat\nphotos/man/camera.png,man\n")
    return root


def tar_set(root: Path) -> str:
    """Four tiny WebDataset tars, as a brace pattern: three img2dataset shards (10 samples, images and
    captions) and a fourth holding an audio sample, a sample with only a json, and again the key of the
    first shard's first sample (a duplicate across tars, which only the first keeps)."""
    import webdataset as wds
    from corpus import write_wds_corpus

    write_wds_corpus(root, 10, per_shard=4)
    with wds.TarWriter(str(root / "00003.tar")) as sink:
        sink.write({"__key__": "voice", "flac": (SAMPLE / "audio" / "harvard_03.flac").read_bytes(), "txt": b"hi"})
        sink.write({"__key__": "failed", "json": json.dumps({"status": "failed_to_download"}).encode()})
        sink.write({"__key__": "000000000", "txt": b"a second sample with the first key"})
    return f"{root}/{{00000..00003}}.tar"


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
    assert build(tmp_path / "bytes", 2, tmp_path / "b.parquet") == []  # bytes cells: repeated in Arrow
    copied = pq.read_table(tmp_path / "bytes" / "manifest.parquet").to_pylist()
    assert [(r["id"], r["image"]["bytes"]) for r in copied] == [("q", b"\x89PNG"), ("q-00001", b"\x89PNG")]
    assert json.loads((tmp_path / "rep" / "manifest.jsonl").read_text().splitlines()[0])["label"] == "3"


@pytest.mark.parametrize("n", [0, 5])
def test_another_manifest_beside_the_source_is_neither_written_nor_read(tmp_path, n):
    """The folder's manifest.jsonl was linked into the copy, and the copy written through the link: the
    user's own manifest overwritten. With n = 0 the copy of train.v2.jsonl was named manifest.v2.jsonl,
    which no lookup found (IndexError), or the linked neighbour was benchmarked instead."""
    from incremental import manifest_of

    src = tmp_path / "src"
    src.mkdir()
    own = '{"id": "m1", "text": "mine"}\n'
    (src / "manifest.jsonl").write_text(own)
    (src / "manifest.csv").write_text("id,text\nx,other\n")
    (src / "train.v2.jsonl").write_text('{"id": "c1", "text": "a caption"}\n{"id": "c2", "text": "another"}\n')
    (src / "img.png").write_bytes(b"png")
    data = tmp_path / "data"
    build(data, n, src / "train.v2.jsonl")
    assert (src / "manifest.jsonl").read_text() == own
    assert manifest_of(data) == "manifest.jsonl" and (data / "img.png").is_symlink()
    ids = [json.loads(line)["id"] for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert ids == (["c1", "c2"] if n == 0 else ["c1", "c2", "c1-00002", "c2-00003", "c1-00004"])

def test_hf_baseline_rows_survive_mixed_types_and_keep_the_first_of_an_id(tmp_path):
    """Arrow needs one type per column: samples travel pickled, whole; duplicates and rejects go as in mbm."""
    import pickle

    from baseline_hf import samples

    (tmp_path / "a.png").write_bytes(b"x")
    lines = [b'{"id": "a", "text": "one", "label": 1}', b'{"id": "b", "text": "two", "label": "cat", "meta": [1, 2]}',
             b'{"id": "a", "text": "again"}', b'{"id": "c", "text": "caf\xe9"}', b'{broken', b'{"id": "d"}',
             b'{"id": "d", "image": "a.png"}']
    (tmp_path / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "manifest.jsonl"\n[output]\ndir = "out"\n')
    rows = list(samples(str(tmp_path / "job.toml")))
    assert all(set(r) == {"sample"} and isinstance(r["sample"], bytes) for r in rows)
    raws = [pickle.loads(r["sample"]) for r in rows]
    assert [r.id for r in raws] == ["a", "b", "c", "d"]  # the second "a" dropped; "d" without media is not
    assert raws[0].label == 1 and raws[1].label == "cat" and raws[1].meta == {"meta": [1, 2]}  # valid, so the
    assert raws[3].image.uri == str(tmp_path / "a.png")  # next "d" is its first


def test_source_kind_tells_every_input_mbm_preprocess_reads(tmp_path):
    folder = imagefolder(tmp_path / "folder")
    pattern = tar_set(tmp_path / "tars")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text("id,text\n1,x\n")
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "manifest.tsv.gz").write_bytes(b"")  # any name mbm reads: not taken for an imagefolder
    (tmp_path / "job.toml").write_text("")
    (tmp_path / "plain.tgz").write_bytes(b"")  # named as a tar: mbm judges it
    (tmp_path / "notes.txt").write_text("x")
    kinds = {folder: "folder", folder / "train": "folder", tmp_path / "tars": "shards", Path(pattern): "shards",
             tmp_path / "tars" / "00000.tar": "shards", tmp_path / "plain.tgz": "shards",
             Path(f"{tmp_path}/tars/*.tar"): "shards", tmp_path / "m": "manifest", tmp_path / "z": "manifest",
             tmp_path / "m" / "manifest.csv": "manifest", folder / "train" / "metadata.jsonl": "manifest",
             tmp_path / "job.toml": "spec"}
    assert {path: source_kind(path) for path in kinds} == kinds
    with pytest.raises(ValueError, match="not a manifest"):
        source_kind(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="does not exist"):
        source_kind(tmp_path / "gone")


def _stream(items):
    return sorted((type(x).__name__, x.id, x.source, getattr(x, "reason", "")) for x in items)


def test_the_baselines_read_what_mbms_beam_job_reads(tmp_path):
    """``iter_source`` gives the samples and rejects of mbm's ``ReadSource``: a folder's metadata rows, each
    tar of a pattern, a key repeated across tars kept only where it comes first."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.readers import ReadSource, SourceConfig

    for config in (SourceConfig(folder=str(imagefolder(tmp_path / "folder"))),
                   SourceConfig(shards=tar_set(tmp_path / "tars"))):
        ours = _stream(iter_source(config))
        with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as p:
            out = p | ReadSource(config)
            both = (out.samples, out.rejects) | beam.Flatten()
            assert_that(both | beam.combiners.ToList() | beam.Map(_stream), equal_to([ours]))
        assert len(ours) > 5
    reasons = [x[3] for x in ours if x[0] == "Reject"]
    assert reasons == ["read.duplicate_id", "read.no_modality"]
    kept = next(x for x in iter_source(config) if isinstance(x, RawSample) and x.id == "000000000")
    assert kept.source == "00000.tar:000000000"


def test_a_folder_or_tars_is_read_in_place_as_it_is(tmp_path):
    folder = imagefolder(tmp_path / "folder")
    spec = load_spec(str(dataset(tmp_path / "bench", 0, {"image": "float32"}, folder)))
    assert spec.input.folder == str(folder) and spec.extract["image"].options["precision"] == "float32"
    assert spec.output.dir == str(tmp_path / "bench" / "out") and not (tmp_path / "bench" / "data").exists()
    assert input_count(tmp_path / "bench" / "job.toml") == 8  # 6 rows in train/, 2 at the root
    pattern = tar_set(tmp_path / "tars")
    shards = load_spec(str(dataset(tmp_path / "tar-bench", 0, source=Path(pattern))))
    assert shards.input.shards == pattern
    assert input_count(tmp_path / "tar-bench" / "job.toml") == 13  # 10 + 3, the duplicate key a reject
    assert load_spec(str(dataset(tmp_path / "dir", 0, source=tmp_path / "tars"))).input.shards == str(tmp_path / "tars")


def test_a_job_spec_gives_its_input_and_settings_and_the_benchmark_its_output(tmp_path):
    folder = imagefolder(tmp_path / "jobs" / "data")
    job = tmp_path / "jobs" / "job.toml"
    job.write_text('[input]\nfolder = "data"\n[output]\ndir = "elsewhere"\nsamples_per_shard = 3\n'
                   '[image]\nfit = "pad"\n[text]\nlowercase = true\n[extract.image]\nbatch_size = 8\n'
                   '[extract.text]\nprecision = "float32"\n[runner]\nworkers = 1\ndevice = "cpu"\n')
    spec = load_spec(str(dataset(tmp_path / "bench", 0, {"text": "bfloat16"}, job)))
    assert spec.input.folder == str(folder) and spec.image.fit == "pad" and spec.text.lowercase
    assert spec.extract["image"].batch_size == 8 and spec.extract["text"].options["precision"] == "bfloat16"
    assert spec.output.dir == str(tmp_path / "bench" / "out") and spec.output.samples_per_shard == 1000
    assert spec.runner.workers == 0 and spec.runner.device == "auto"  # all three run here, mbm one worker per core
    (tmp_path / "broken.toml").write_text('[input]\nfolder = "nowhere"\n[output]\ndir = "o"\n')
    with pytest.raises(SystemExit, match="nowhere"):
        dataset(tmp_path / "b", 0, source=tmp_path / "broken.toml")


def _samples(*argv: str) -> int:
    """``--samples`` as the benchmark takes it from ``argv``; argparse's exit for what it refuses."""
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args.samples


def test_samples_defaults_to_2000_for_a_manifest_and_to_as_it_is_otherwise(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x"}\n')
    folder = str(imagefolder(tmp_path / "folder"))
    assert _samples() == 2000 and _samples("--source", str(tmp_path / "m.jsonl")) == 2000
    assert _samples("--source", str(tmp_path / "m.jsonl"), "--samples", "0") == 0
    assert _samples("--source", folder) == 0 and _samples("--source", folder, "--samples", "0") == 0
    assert _samples("--reps", "0", "--memory") == 2000  # the memory check alone


@pytest.mark.parametrize("argv, message", [
    (["--source", "FOLDER", "--samples", "5"], "an imagefolder/audiofolder, used as it is"),
    (["--source", "TARS", "--samples", "5"], "WebDataset tars, used as it is"),
    (["--source", "REMOTE", "--memory"], "not on this machine"),
    (["--source", "FOLDER", "--write"], "--write records"),
    (["--source", "GONE"], "does not exist"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--reps", "0"], "0 only with --memory"),
    (["--reps", "0", "--memory", "--write"], "--reps 0 runs the memory check alone"),
    (["--stock", "--write"], "--write records"),
    (["--stock", "--precision", "text=bfloat16"], "--stock runs the baselines' stock models in float32"),
    (["--captions", "5", "--write"], "--write records"),
    (["--captions", "5", "--source", "FOLDER"], "--captions builds its own caption dataset"),
    (["--captions", "1"], "2 or more"),
])
def test_what_cannot_work_is_an_argparse_error(tmp_path, capsys, argv, message):
    paths = {"FOLDER": str(imagefolder(tmp_path / "folder")), "TARS": str(tmp_path / "tars"), "GONE": str(tmp_path / "x"),
             "REMOTE": str(tmp_path / "job.toml")}
    tar_set(tmp_path / "tars")
    (tmp_path / "job.toml").write_text('[input]\nshards = "gs://bucket/data-{0000..0009}.tar"\n[output]\ndir = "o"\n')
    with pytest.raises(SystemExit) as e:
        _samples(*(paths.get(a, a) for a in argv))
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("metadata", ["jsonl", "csv", "parquet", "none"])
def test_a_folder_is_repeated_with_unique_names_for_the_memory_check(tmp_path, metadata):
    """Each file linked under new names and each metadata row repeated to name them: every sample and
    reject of the folder, as many times, with its text, label and media, under an id of its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.media import read_media
    from pipelines.readers import SourceConfig

    folder = imagefolder(tmp_path / "folder")
    (folder / "photos" / "cat" / "chelsea.txt").write_text("a cat on a sofa")  # its caption, without metadata
    meta = folder / "train" / "metadata.jsonl"
    if metadata == "none":  # class folders: labels from the folder names, captions from .txt partners
        folder = folder / "photos"
    elif metadata != "jsonl":
        rows = [json.loads(x) for x in meta.read_text().splitlines()]
        meta.unlink()
        columns = {k: [r.get(k) for r in rows] for r in rows for k in r}
        if metadata == "csv":
            import csv

            with open(folder / "train" / "metadata.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(columns))
                writer.writeheader()
                writer.writerows(rows)
        else:
            pq.write_table(pa.table(columns), folder / "train" / "metadata.parquet")

    def read(root):
        samples, rejects = [], []
        for x in iter_source(SourceConfig(folder=str(root))):
            (samples if isinstance(x, RawSample) else rejects).append(x)
        return samples, rejects

    samples, rejects = read(folder)
    copies, copy_rejects = read(repeat_folder(folder, tmp_path / "copies", 3))
    assert source_kind(tmp_path / "copies") == "folder"
    assert len(copies) == 3 * len(samples) and len({s.id for s in copies}) == len(copies)
    assert sorted(r.reason for r in copy_rejects) == sorted(r.reason for r in rejects for _ in range(3))

    def plain(sample_id):  # the original's id: each path part of the copy's file named c{i}-NAME
        return "/".join(part.split("-", 1)[1] if part[:1] == "c" and part[1:2].isdigit() else part
                        for part in sample_id.split("/"))

    by_id = {s.id: s for s in samples}
    assert sorted(plain(c.id) for c in copies) == sorted(s.id for s in samples for _ in range(3))
    for c in copies:
        s = by_id[plain(c.id)]
        assert (c.text, c.label) == (s.text, s.label)
        for m in ("image", "audio"):
            assert (getattr(c, m) is None) == (getattr(s, m) is None)
            if getattr(s, m) is not None:
                assert read_media(getattr(c, m)) == read_media(getattr(s, m))
    if metadata == "none":
        assert {(s.label, s.text) for s in copies} == {("cat", b"a cat on a sofa"), ("man", None)}  # raw bytes


@pytest.mark.parametrize("kind", ["manifest", "folder", "shards"])
def test_a_job_specs_input_is_repeated_with_its_settings_kept_for_the_memory_check(tmp_path, kind):
    if kind == "manifest":
        build(tmp_path / "jobs" / "data", 12)
        where = "data/manifest.jsonl"
    elif kind == "folder":
        imagefolder(tmp_path / "jobs" / "data")
        where = "data"
    else:
        tar_set(tmp_path / "jobs" / "data")
        where = "data"
    job = tmp_path / "jobs" / "job.toml"
    job.write_text(f'[input]\n{kind} = "{where}"\n[output]\ndir = "elsewhere"\n[image]\nfit = "pad"\n'
                   '[text]\nlowercase = true\n[extract.image]\nbatch_size = 8\n[runner]\nworkers = 1\n')
    once, four = repeat_spec(job, tmp_path / "x1", 1), repeat_spec(job, tmp_path / "x4", 4)
    n = input_count(once)
    assert n >= 8 and input_count(four) == 4 * n
    for path, folder in ((once, tmp_path / "x1"), (four, tmp_path / "x4")):
        spec = load_spec(str(path))
        assert getattr(spec.input, kind).startswith(str(folder))  # the copies, not the original
        assert spec.image.fit == "pad" and spec.text.lowercase and spec.extract["image"].batch_size == 8
        assert spec.output.dir == str(folder / "out") and spec.runner.workers == 0


@pytest.mark.parametrize("gzipped", [False, True])
def test_tars_are_repeated_with_unique_keys_for_the_memory_check(tmp_path, gzipped):
    import gzip

    from pipelines.media import read_media
    from pipelines.readers import iter_tar
    from pipelines.readers.source import expand_shards

    pattern = tar_set(tmp_path / "tars")
    if gzipped:  # the copies keep the originals' compression
        for path in expand_shards(pattern):
            Path(path + ".gz").write_bytes(gzip.compress(Path(path).read_bytes()))
        pattern = f"{tmp_path}/tars/*.tar.gz"

    def read(pattern):
        return [s for path in expand_shards(str(pattern)) for s in iter_tar(path) if isinstance(s, RawSample)]

    originals = read(pattern)
    copies = read(repeat_tars(Path(pattern), tmp_path / "copies", 3))
    assert source_kind(tmp_path / "copies" / "c*") == "shards"
    # tar_set repeats one key across tars (mbm keeps the first): so do the copies, within each copy
    assert len(copies) == 3 * len(originals) and len({s.id for s in copies}) == 3 * len({s.id for s in originals})
    assert all(p.name.endswith(".tar.gz" if gzipped else ".tar") for p in (tmp_path / "copies").iterdir())
    by_id = {}
    for s in copies:
        by_id.setdefault(s.id, s)
    originals = list({s.id: s for s in reversed(originals)}.values())  # the first of each id
    for s in originals:  # ids from the json key (img2dataset) or the tar key, prefixed per copy
        for i in range(3):
            c = by_id[f"c{i}-{s.id}"]
            assert (c.text, c.label) == (s.text, s.label)
            for m in ("image", "audio"):
                assert (getattr(c, m) is None) == (getattr(s, m) is None)
                if getattr(s, m) is not None:
                    assert read_media(getattr(c, m)) == read_media(getattr(s, m))


def _job_over_tars(tmp_path: Path) -> Path:
    """A job spec whose [input] is a folder of tars, with its own cleaning and extraction settings."""
    tar_set(tmp_path / "tars")
    (tmp_path / "job.toml").write_text('[input]\nshards = "tars"\n[output]\ndir = "out"\n[image]\nfit = "pad"\n'
                                       '[extract.image]\nbatch_size = 4\n[runner]\nworkers = 1\n')
    return tmp_path / "job.toml"


@pytest.mark.slow
@pytest.mark.parametrize("source, landed_line", [
    # metadata rows' relative paths resolve in every pipeline; the broken image, the text file and the
    # repeated file name land nowhere
    (lambda tmp: imagefolder(tmp / "folder"), "5 (3 / 4 / 1)"),
    (lambda tmp: imagefolder(tmp / "folder") / "photos", "2 (0 / 2 / 0)"),  # class folders, no metadata
    (lambda tmp: tar_set(tmp / "tars"), "11 (11 / 10 / 1)"),  # the json-only sample and the duplicate key: none
    (_job_over_tars, "11 (11 / 10 / 1)"),
], ids=["imagefolder", "class-folders", "tar-pattern", "job-spec"])
def test_all_three_pipelines_land_the_same_samples(tmp_path, capsys, source, landed_line):
    """One rep on a tiny folder, tar set or job spec: the run exits 0 only when the three pipelines land
    the same samples (counts per modality and sample keys)."""
    assert main(["--source", str(source(tmp_path)), "--reps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"landed samples (text / image / audio): {landed_line}, the same for all" in printed


@pytest.mark.slow
def test_the_baselines_with_stock_models_land_the_same_samples(tmp_path, capsys):
    assert main(["--source", str(imagefolder(tmp_path / "folder")), "--reps", "1", "--stock"]) == 0
    printed = capsys.readouterr().out
    assert "landed samples (text / image / audio): 5 (3 / 4 / 1), the same for all" in printed
    assert "| plain loop (stock models) |" in printed
    if importlib.util.find_spec("datasets") is not None:  # the bench extra; the test command installs dev only
        assert "| HF datasets.map (stock models) |" in printed


def test_stock_models_give_mbms_features_up_to_rounding():
    """The user's-script versions of the default models compute what mbm's extractor classes compute."""
    import numpy as np
    from stock_models import StockEfficientNetLite0, StockMiniLM, stock

    from mbm.extractors import create_extractor

    texts = ["a cat on a mat", "Gros plan d'un chat tigré aux yeux verts", "x", "word " * 300]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    for name, values in (("minilm", texts), ("efficientnet-lite0", images)):
        ours = create_extractor(name, {})
        theirs = stock(name, ours)
        assert isinstance(theirs, StockMiniLM if name == "minilm" else StockEfficientNetLite0)
        want = ours.featurize(ours.load("cpu"), values, "cpu")
        got = theirs.featurize(theirs.load("cpu"), values, "cpu")
        for a, b in zip(want, got, strict=True):
            assert a.shape == b.shape and b.dtype == np.float16
            a, b = a.astype(np.float32), b.astype(np.float32)
            assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a)
    assert stock("logmel", create_extractor("logmel", {})) is None  # mbm's class, as a user would call it


def test_landed_counts_features_and_lists_sample_keys(tmp_path):
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "a.tar")) as sink:
        sink.write({"__key__": "k2", "json": b"{}", "text.npy": b"x", "image.npy": b"x"})
        sink.write({"__key__": "k1", "json": b"{}", "audio.npy": b"x"})
    counts, keys = landed(tmp_path)
    assert counts == {"samples": 2, "text": 1, "image": 1, "audio": 1} and keys == ["k1", "k2"]


def test_tree_memory_names_each_process_at_the_peak():
    import subprocess
    import sys
    import time

    # a "driver" holding 20 MiB that starts a "fork server" (its command line names it) holding 60 MiB,
    # which forks a "worker" that adds 30 MiB of its own
    child = ("import os, time; x = b'x' * (60 << 20)\n"
             "if os.fork() == 0:\n    z = b'z' * (30 << 20); time.sleep(1.5); os._exit(0)\n"
             "time.sleep(1.5); os.wait()")
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}, "
            "'pipelines.forkserver']); y = b'y' * (20 << 20); p.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code])
    mem = TreeMemory(proc.pid, interval=0.05, pss_every=1)
    mem.start()
    proc.wait()
    time.sleep(0.1)
    mem.stop()
    parts = dict(mem.peak_parts)
    assert set(parts) == {"driver", "fork server", "worker"}
    assert 20 <= parts["driver"] < 60
    assert parts["fork server"] >= 30 and parts["worker"] >= 60  # the 60 MiB shared after the fork count half each
    assert parts["fork server"] + parts["worker"] >= 90
    assert abs(sum(parts.values()) - mem.peak_pss / 1024) < 1
    assert parts_text([("driver", 196.2), ("fork server", 347), ("worker", 330.4), ("worker", 290)]) == \
        "driver 196, fork server 347, worker 330 / 290"
    # a run shorter than pss_every samples: its PSS was read once, at its start, and came out at 1 MiB
    proc = subprocess.Popen([sys.executable, "-c", "import time; x = b'x' * (80 << 20); time.sleep(1.0)"])
    mem = TreeMemory(proc.pid, interval=0.05, pss_every=1000)
    mem.start()
    proc.wait()
    mem.stop()
    assert mem.peak_pss / 1024 >= 80


def test_a_parquet_manifest_with_image_bytes_is_repeated_in_arrow(tmp_path):
    """As ``datasets`` exports images (structs of bytes and a path), cells JSON cannot hold: the rows are
    repeated in Arrow with unique ids, their bytes as they are, and every copy reads as the original."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.media import read_media
    from pipelines.readers import SourceConfig

    photos = [(SAMPLE / "images" / name).read_bytes() for name in ("astronaut.jpg", "coffee.jpg", "chelsea.png")]
    table = pa.table({"id": [1, 2, 3], "text": ["an astronaut", "", None], "label": ["a", "b", "a"],
                      "image": [{"bytes": b, "path": None} for b in photos]})
    (tmp_path / "src").mkdir()
    pq.write_table(table, tmp_path / "src" / "manifest.parquet")
    spec = load_spec(str(dataset(tmp_path / "bench", 8, source=tmp_path / "src")))
    assert spec.input.manifest.endswith("manifest.parquet") and input_count(tmp_path / "bench" / "job.toml") == 8
    samples = [s for s in iter_source(SourceConfig(manifest=spec.input.manifest)) if isinstance(s, RawSample)]
    assert [s.id for s in samples] == ["1", "2", "3", "1-00003", "2-00004", "3-00005", "1-00006", "2-00007"]
    assert [s.text for s in samples][:5] == ["an astronaut", None, None, "an astronaut (copy 3)", None]
    assert [s.label for s in samples] == ["a", "b", "a"] * 2 + ["a", "b"]
    assert [read_media(s.image) for s in samples] == (photos * 3)[:8]


def test_data_the_benchmark_repeats_runs_with_dedupe_off_and_data_as_it_is_with_it_on(tmp_path):
    """Repeated media would be extracted once by mbm (pipelines.dedupe) and by the baselines every time."""
    assert load_spec(str(dataset(tmp_path / "a", 12))).runner.dedupe is False
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "c", "text": "z"}\n')
    assert load_spec(str(dataset(tmp_path / "b", 0, source=tmp_path / "m.jsonl"))).runner.dedupe is True
    assert load_spec(str(dataset(tmp_path / "b2", 2, source=tmp_path / "m.jsonl"))).runner.dedupe is True  # 2 of 3 rows
    assert load_spec(str(dataset(tmp_path / "b3", 4, source=tmp_path / "m.jsonl"))).runner.dedupe is False
    folder = imagefolder(tmp_path / "folder")
    assert load_spec(str(dataset(tmp_path / "c", 0, source=folder))).runner.dedupe is True
    assert load_spec(str(dataset(tmp_path / "d", 0, source=folder, repeated=True))).runner.dedupe is False
    assert load_spec(str(repeat_spec(dataset(tmp_path / "e", 0, source=folder), tmp_path / "e4", 4))).runner.dedupe is False
    assert "mbm preprocess, dedupe off" not in commands(tmp_path / "a" / "job.toml", tmp_path / "out")


def test_the_caption_dataset_has_unique_pictures_under_k_captions_each_in_no_order(tmp_path):
    import hashlib
    from collections import Counter

    spec = dataset(tmp_path, 23, captions=5)
    rows = [json.loads(x) for x in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 23 and len({r["id"] for r in rows}) == 23 and len({r["text"] for r in rows}) == 23
    per_picture = Counter(r["image"] for r in rows)
    assert sorted(per_picture.values()) == [3, 5, 5, 5, 5]  # the last picture has the rows left
    digests = {hashlib.sha256((tmp_path / "data" / p).read_bytes()).hexdigest() for p in per_picture}
    assert len(digests) == 5  # no two pictures the same bytes
    assert [r["image"] for r in rows] != sorted(r["image"] for r in rows)  # shuffled
    assert load_spec(str(spec)).runner.dedupe is True
    off = tmp_path / "job-no-dedupe.toml"
    assert load_spec(str(off)).runner.dedupe is False and load_spec(str(off)).input.manifest == load_spec(str(spec)).input.manifest
    cmds = commands(spec, tmp_path / "out")
    assert list(cmds) == ["mbm preprocess", "mbm preprocess, dedupe off", "plain loop", "HF datasets.map"]
    assert cmds["mbm preprocess, dedupe off"][-1] == str(off)


def test_new_captions_are_added_to_every_picture_under_new_ids(tmp_path):
    from captions import add_captions, build_captions

    build_captions(tmp_path / "data", 6, 3)
    assert add_captions(tmp_path / "data", 2) == 4
    rows = [json.loads(x) for x in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    assert sorted(r["image"] for r in rows[6:]) == ["images/000000.jpg"] * 2 + ["images/000001.jpg"] * 2


@pytest.mark.slow
def test_the_caption_rerun_extracts_the_new_captions_texts_and_no_picture(capsys, monkeypatch):
    import captions

    monkeypatch.setattr(sys, "argv", ["captions.py", "--pictures", "4", "--per", "2", "--new", "1"])
    assert captions.main() == 0
    table = capsys.readouterr().out
    assert "| new captions |" in table and " | 12 | 4 / 0 | " in table  # 12 samples, 4 texts, no picture
    assert " | 12 | 12 / 12 | 1.00x |" in table  # --full: every picture again
