import gzip
import json
import os
import tarfile

import apache_beam as beam
import pytest
import webdataset as wds
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipelines.build import offline_direct_runner
from pipelines.readers import ReadSource, SourceConfig, list_inputs
from pipelines.readers.source import expand_shards


def _tar(path, keys, caption="caption {}"):
    with wds.TarWriter(str(path)) as sink:
        for key in keys:
            sink.write(
                {
                    "__key__": key,
                    "jpg": b"\xff\xd8" + key.encode(),
                    "txt": caption.format(key),
                    "json": {"key": key},
                }
            )
    return path


@pytest.fixture
def shards(tmp_path):
    """Three tars: "a" and "c" both hold sample 002, and "c" is cut short inside its last member."""
    root = tmp_path / "shards"
    root.mkdir()
    _tar(root / "00000.tar", ["000", "001", "002"])
    _tar(root / "00001.tar", ["002", "003"], caption="late {}")
    full = _tar(root / "full.tar", ["004", "005", "006"])
    cut = next(m for m in tarfile.open(full) if m.name == "006.jpg").offset_data + 1
    (root / "00002.tar").write_bytes(full.read_bytes()[:cut])  # inside 006.jpg's data
    os.remove(full)
    return root


def _ids(pcoll, label):
    return pcoll | label >> beam.Map(lambda x: x.id)


def _run(config, check):
    with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as p:
        out = p | ReadSource(config)
        check(out)


# -- config ----------------------------------------------------------------------------------------


def test_config_needs_exactly_one_source(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"exactly one of manifest, folder, shards"):
        SourceConfig()
    with pytest.raises(ValueError, match=r"exactly one of manifest, folder, shards"):
        SourceConfig(manifest=str(tmp_path / "m.jsonl"), folder=str(tmp_path))


def test_config_names_a_missing_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl.*does not exist"):
        SourceConfig(manifest=missing)
    with pytest.raises(ValueError, match="nope.*does not exist"):
        SourceConfig(folder=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="x.tar.*does not exist"):
        SourceConfig(shards=str(tmp_path / "x.tar"))
    (tmp_path / "m.dat").write_text("")
    with pytest.raises(ValueError, match="set format"):
        SourceConfig(manifest=str(tmp_path / "m.dat"))
    with pytest.raises(ValueError, match="manifest only"):
        SourceConfig(folder=str(tmp_path), format="csv")


def test_config_round_trips(tmp_path):
    (tmp_path / "m.csv").write_text("id,text\na,b\n")
    config = SourceConfig(manifest=str(tmp_path / "m.csv"), allow_outside=True)
    d = config.to_dict()
    assert d == {
        "manifest": str(tmp_path / "m.csv"),
        "folder": None,
        "shards": None,
        "format": None,
        "allow_outside": True,
    }
    assert SourceConfig.from_dict(d) == config


def test_shard_patterns_expand_in_order(shards):
    root = str(shards)
    assert [os.path.basename(p) for p in expand_shards(f"{root}/{{00000..00002}}.tar")] == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    assert [os.path.basename(p) for p in expand_shards(f"{root}/*.tar")] == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    # a gap in a brace range stays listed, so that reading it rejects it instead of skipping it quietly
    assert [os.path.basename(p) for p in expand_shards(f"{root}/{{00001..00003}}.tar")][-1] == "00003.tar"
    with pytest.raises(ValueError, match="matches no files"):
        expand_shards(f"{root}/*.tgz")
    assert expand_shards(root) == expand_shards(f"{root}/*.tar")
    inputs = list_inputs(SourceConfig(shards=f"{root}/0000[01].tar"))
    assert [(i.index, i.kind, i.name) for i in inputs] == [(0, "tar", "00000.tar"), (1, "tar", "00001.tar")]


def test_a_folder_of_shards_is_read_as_its_tars_compressed_ones_too(tmp_path):
    import shutil

    _tar(tmp_path / "00000.tar", ["a"])
    for name in ("00001.tar.gz", "00002.tgz"):
        with open(tmp_path / "00000.tar", "rb") as f, gzip.open(tmp_path / name, "wb") as g:
            shutil.copyfileobj(f, g)
    (tmp_path / "notes.txt").write_text("not a tar")
    assert [os.path.basename(p) for p in expand_shards(str(tmp_path))] == ["00000.tar", "00001.tar.gz", "00002.tgz"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"shards '.*empty' is a folder holding no tar \(a file named \*.tar, "
                                         r"\*.tar.gz, \*.tgz, ...\); name its tars with a pattern$"):
        expand_shards(str(tmp_path / "empty"))
    (tmp_path / "empty" / "captions.jsonl").write_text("{}")
    with pytest.raises(ValueError, match=r"holding no tar .*; to read a table of samples, use \[input\] manifest = "
                                         r"'.*empty/captions.jsonl'$"):
        expand_shards(str(tmp_path / "empty"))
    (tmp_path / "files" / "00000").mkdir(parents=True)  # img2dataset's files output
    (tmp_path / "files" / "00000" / "000000000.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match=r"holding no tar .*; it holds image or audio files \(.*\): read it with "
                                         r"\[input\] folder = '.*files'$"):
        expand_shards(str(tmp_path / "files"))


def test_shards_naming_a_hub_split_or_a_save_to_disk_folder_say_what_reads_it(tmp_path):
    """A pattern of Parquet files made every file a read.not_a_tar reject and a version of nothing; a folder of
    several tables was told to read the first of them alone (half a split, or another split)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"):
        (data / name).write_bytes(b"PAR1")
    joined = (r"it holds 3 tables \('test-00000-of-00001.parquet', 'train-00000-of-00002.parquet', "
              r"'train-00001-of-00002.parquet'\) and a manifest is one file: join those of the split you want into "
              r"one \(.*\) and read it with \[input\] manifest$")
    with pytest.raises(ValueError, match=r"shards '.*/data' is a folder holding no tar \(.*\); " + joined):
        expand_shards(str(data))
    with pytest.raises(ValueError, match=r"shards '.*/data/train-\*.parquet' matches no WebDataset tar \(2 other files: "
                                         r"'train-00000-of-00002.parquet', 'train-00001-of-00002.parquet'\); it holds 2"):
        expand_shards(str(data / "train-*.parquet"))
    with pytest.raises(ValueError, match=r"matches no WebDataset tar \(1 other file: 'a.jpg'\); image or audio files "
                                         r"are read with \[input\] folder = '.*/data'$"):
        (data / "a.jpg").write_bytes(b"\xff\xd8")
        expand_shards(str(data / "*.jpg"))
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
        (saved / name).write_text("{}")
    with pytest.raises(ValueError, match=r"holding no tar .*; this is a Hugging Face datasets folder written by "
                                         r"save_to_disk: export it"):
        expand_shards(str(saved))


def test_tars_laid_out_by_split_give_their_samples_that_split(tmp_path):
    """Hugging Face's WebDataset layouts, data/train/0000.tar and cc3m-validation-0000.tar: the split a tar's
    folder or name gives goes to its samples' meta (what --split-by split reads), unless a sample's json names
    its own; folders above the tars' common folder (a home folder named dev) do not count."""
    from pipelines.readers.source import read_input, tar_split

    data = tmp_path / "dev" / "data"
    for folder, keys in (("train", ["a0", "a1"]), ("Validation", ["b0"]), ("test", ["c0"])):
        (data / folder).mkdir(parents=True)
        _tar(data / folder / "0000.tar", keys)
    with wds.TarWriter(str(data / "test" / "0001.tar")) as sink:  # a json naming its own split wins
        sink.write({"__key__": "c1", "txt": "x", "json": {"key": "c1", "split": "extra"}})
    inputs = list_inputs(SourceConfig(shards=str(data / "*" / "*.tar")))
    assert [(os.path.relpath(i.path, data), i.split) for i in inputs] == [
        ("Validation/0000.tar", "validation"), ("test/0000.tar", "test"), ("test/0001.tar", "test"),
        ("train/0000.tar", "train")]
    config = SourceConfig(shards=str(data / "*" / "*.tar"))
    splits = {s.id: s.meta.get("split") for i in inputs for s in read_input(i, config)}
    assert splits == {"a0": "train", "a1": "train", "b0": "validation", "c0": "test", "c1": "extra"}
    # one folder of tars named by split; the folders above them say nothing
    flat = tmp_path / "dev" / "flat"
    flat.mkdir()
    for name in ("cc3m-train-0000.tar", "cc3m-validation-0000.tar.gz", "shard_dev_01.tgz", "00000.tar"):
        _tar(flat / name, [name[:4]])
    assert [tar_split(str(flat / n), str(flat)) for n in ("cc3m-train-0000.tar", "cc3m-validation-0000.tar.gz",
                                                          "shard_dev_01.tgz", "00000.tar")] == [
        "train", "validation", "dev", None]
    assert [i.split for i in list_inputs(SourceConfig(shards=str(flat / "00000.tar")))] == [None]  # under dev/
    assert tar_split("/x/dev/data/train/0.tar", "/x/dev/data") == "train"
    assert tar_split("/x/trainer/0.tar", "/x") is None  # words, not parts of them


@pytest.mark.parametrize("name, advice", [
    ("00000.tar", r"from its extension: a WebDataset tar is read with \[input\] shards = '.*00000.tar'$"),
    ("data-00000-of-00001.arrow", r"save_to_disk writes: export the dataset, datasets.load_from_disk\(folder\)"),
    ("photo.jpg", r"an image or audio file alone is not one \(a folder of them is read with \[input\] folder\)$"),
    ("rows.dat", r"set format = jsonl \| json \| csv \| tsv \| parquet if it is one of those$"),
])
def test_a_manifest_of_no_table_format_says_what_reads_it(tmp_path, name, advice):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ValueError, match=r"cannot tell the format of manifest .*" + advice):
        SourceConfig(manifest=str(tmp_path / name))


def test_a_manifest_that_is_a_folder_says_what_reads_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"manifest '.*' is a folder; name the manifest file in it, or read the "
                                         r"folder with folder = \(an imagefolder or audiofolder\) or shards = "):
        SourceConfig(manifest=str(tmp_path))


# -- Beam ------------------------------------------------------------------------------------------


def test_read_source_tars_dedupes_across_tars(shards):
    config = SourceConfig(shards=f"{shards}/{{00000..00003}}.tar")

    def check(out):
        assert_that(
            _ids(out.samples, "SampleIds"),
            equal_to(["000", "001", "002", "003", "004", "005"]),
            label="Samples",
        )
        texts = out.samples | beam.Filter(lambda s: s.id == "002") | beam.Map(lambda s: (s.text, s.source))
        assert_that(texts, equal_to([(b"caption 002", "00000.tar:002")]), label="FirstKept")
        rejects = out["rejects"] | beam.Map(lambda r: (r.id, r.reason, r.source))
        assert_that(
            rejects,
            equal_to(
                [
                    ("002", "read.duplicate_id", "00001.tar:002"),
                    ("00002.tar:006.jpg", "read.corrupt_tar", "00002.tar:006.jpg"),
                    ("00003.tar:0", "read.corrupt_tar", "00003.tar:0"),
                ]
            ),
            label="Rejects",
        )
        details = (
            out.rejects
            | beam.Filter(lambda r: r.reason == "read.duplicate_id")
            | beam.Map(lambda r: r.detail)
        )
        assert_that(
            details,
            equal_to(["id '002' at 00001.tar:002 duplicates the one at 00000.tar:002 (the first is kept)"]),
            label="DupDetail",
        )

    _run(config, check)


def test_read_source_manifest(tmp_path):
    lines = [
        {"id": "a", "text": "x"},
        {"id": "b", "image": "b.jpg"},
        {"id": "a", "text": "dup"},
        {"id": "c"},
        {"id": "d", "audio": "../d.wav"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in lines) + "{bad\n")

    def check(out):
        assert_that(_ids(out.samples, "SampleIds"), equal_to(["a", "b"]), label="Samples")
        rejects = out.rejects | beam.Map(lambda r: (r.id, r.reason))
        expected = [
            ("a", "read.duplicate_id"),
            ("c", "read.no_modality"),
            ("d", "read.path_escape"),
            ("m.jsonl:6", "read.bad_json"),
        ]
        assert_that(rejects, equal_to(expected), label="Rejects")

    _run(SourceConfig(manifest=str(path)), check)


def test_read_source_folder(tmp_path):
    for name in ("cat/1.jpg", "dog/2.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    def check(out):
        labels = out.samples | beam.Map(lambda s: (s.id, s.label))
        assert_that(labels, equal_to([("cat/1.jpg", "cat"), ("dog/2.jpg", "dog")]), label="Samples")
        assert_that(out.rejects, equal_to([]), label="Rejects")

    _run(SourceConfig(folder=str(tmp_path)), check)


def test_read_source_multi_processing(shards):
    options = PipelineOptions([], direct_num_workers=2, direct_running_mode="multi_processing")
    config = SourceConfig(shards=f"{shards}/*.tar")

    def check(out):
        assert_that(
            _ids(out.samples, "SampleIds"),
            equal_to(["000", "001", "002", "003", "004", "005"]),
            label="Samples",
        )
        rejects = out.rejects | beam.Map(lambda r: (r.id, r.reason, r.source))
        assert_that(
            rejects,
            equal_to(
                [
                    ("002", "read.duplicate_id", "00001.tar:002"),
                    ("00002.tar:006.jpg", "read.corrupt_tar", "00002.tar:006.jpg"),
                ]
            ),
            label="Rejects",
        )

    with beam.Pipeline(runner=offline_direct_runner(), options=options) as p:
        check(p | ReadSource(config))


# -- manifests that cannot give a sample fail before the job starts ------------------------------------


def _table(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("name, body, message", [
    ("captions.csv", "image,caption\nImages/0.jpg,a dog\n",
     r"captions.csv': it has no 'id' column \(columns: 'image', 'caption'\); every row needs an 'id'"),
    ("m.tsv", "id\tlabel\nc0\tx\n",
     r"m.tsv': it has no text, image or audio column \(columns: 'id', 'label'\); name the text column one of "
     r"text, caption, transcription, and the columns of media paths image and audio"),
    ("m.csv.gz", b"url,caption\nhttps://x/0.jpg,a\n", r"m.csv.gz': it has no 'id' column \(columns: 'url', 'caption'\)"),
    ("nemo.jsonl", '{"audio_filepath": "a.wav", "duration": 1.5, "text": "hello"}\n',
     r"its first row has no 'id' \(keys found: 'audio_filepath', 'duration', 'text'\); did you mean 'audio' "
     r"\(not 'audio_filepath'\)\? column names are matched exactly"),
    ("cv.tsv", "client_id\tpath\tsentence\n77\tx.mp3\thi\n",
     r"did you mean 'image' or 'audio' \(not 'path'\), 'text' \(not 'sentence'\)\?"),
    ("keyed.csv", "key,caption\nk0,a\n", r"did you mean 'id' \(not 'key'\)\?"),
    ("glue.csv", "idx,sentence,label\n0,a,1\n", r"did you mean 'id' \(not 'idx'\), 'text' \(not 'sentence'\)\?"),
    ("metadata_like.csv", "file_name,text\na.jpg,x\n",
     r"'file_name' is how the metadata file of an imagefolder/audiofolder names its files: as metadata.csv "
     r"\(or .jsonl, .parquet\) beside them, read the folder with \[input\] folder"),
    ("de.csv", "id;text;image\n1;Hallo;a.jpg\n",
     r"de.csv': it has no 'id' column \(columns: 'id;text;image'\); its header is one column holding ';': a file "
     r"separated by semicolons\? save it with commas .* pd.read_csv\(path, sep=\";\"\)"),
    ("tabs.csv", "id\ttext\n1\tHallo\n",
     r"its header is one column holding '\\t': a file separated by tabs\? name it .tsv or set \[input\] format = \"tsv\""),
    ("commas.tsv", "id,text\n1,Hallo\n",
     r"its header is one column holding ',': a file separated by commas\? name it .csv or set \[input\] format = \"csv\""),
    ("m.jsonl", '{"image": "a.jpg"}\n{"text": "b"}\n',
     r"none of its first 2 rows has 'id' \(keys found: 'image', 'text'\)"),
    ("m.jsonl", '{"id": "a", "url": "x"}\n',
     r"its first row has no text, image or audio \(keys found: 'id', 'url'\)"),
    ("coco.jsonl", '{"info": {}, "images": [], "annotations": []}\n',
     r"its first row has no 'id' .*; this is a COCO annotation file: convert it to rows of id, image, text"),
    ("coco.json", '{\n "info": {},\n "images": [],\n "annotations": []\n}\n',
     r"coco.json': coco.json is one JSON object \(keys: info, images, annotations\), not rows: a JSON manifest "
     r"must be JSON Lines .* or a JSON array of row objects; this is a COCO annotation file"),
])
def test_config_refuses_a_manifest_whose_columns_give_no_sample(tmp_path, name, body, message):
    import gzip

    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body.encode())
    with pytest.raises(ValueError, match=message):
        SourceConfig(manifest=str(path))


def test_config_reads_a_parquet_schema_for_its_columns(tmp_path):
    with pytest.raises(ValueError, match=r"it has no 'id' column \(columns: 'image', 'caption'\)"):
        SourceConfig(manifest=str(_table(tmp_path / "hf.parquet", {"image": ["a.jpg"], "caption": ["c"]})))
    with pytest.raises(ValueError, match=r"it has no text, image or audio column \(columns: 'id', 'url'\)"):
        SourceConfig(manifest=str(_table(tmp_path / "laion.parquet", {"id": ["a"], "url": ["https://x"]})))
    SourceConfig(manifest=str(_table(tmp_path / "ok.parquet", {"id": ["a"], "transcription": ["t"]})))


@pytest.mark.parametrize("name, body", [
    # rows that are merely broken come first: they stay per-row rejects, the job runs
    ("m.jsonl", '{"id": "x", "text": "the line stops\n["a"]\n{"text": "no id"}\n{"id": "a", "caption": "fine"}\n'),
    ("m.json", '{"id": "x", "text": "the line stops\n{"id": "a", "image": "a.jpg"}\n'),
    ("m.csv", 'id,text\nr1,"never closed\nr2,fine\n'),
])
def test_config_accepts_manifests_with_bad_first_rows(tmp_path, name, body):
    (tmp_path / name).write_text(body)
    SourceConfig(manifest=str(tmp_path / name))


def test_config_refuses_a_manifest_that_cannot_be_read_from_its_start(tmp_path):
    """Its version would hold no sample, as an empty file's would: on a rerun, removing every one."""
    (tmp_path / "cut.parquet").write_text("PAR1 cut")
    with pytest.raises(ValueError, match=r"cut.parquet': cannot read the file \(ArrowInvalid: .*no samples"):
        SourceConfig(manifest=str(tmp_path / "cut.parquet"))


def test_config_reads_a_repeated_column_that_is_not_mbm_s_and_logs_how(tmp_path, caplog):
    """Only a repeat of one of mbm's columns loses data that matters; others are kept in meta."""
    (tmp_path / "m.csv").write_text("id,text,lang,lang\n1,hi,en,fr\n")
    SourceConfig(manifest=str(tmp_path / "m.csv"))
    assert "its header repeats 'lang' (columns: 'id', 'text', 'lang', 'lang'); the first of each keeps its " \
           "name, the others are kept in meta as 'lang.1'" in caplog.text


def test_config_refuses_a_manifest_pattern_and_says_what_to_do(tmp_path):
    (tmp_path / "data").mkdir()
    for k in range(2):
        _table(tmp_path / "data" / f"train-{k:05d}-of-00002.parquet", {"id": [f"p{k}"], "text": ["t"]})
    for pattern in ("data/train-*.parquet", "data/train-{00000,00001}-of-00002.parquet"):
        with pytest.raises(ValueError) as exc:
            SourceConfig(manifest=str(tmp_path / pattern))
        message = str(exc.value)
        assert "is a pattern (it matches 2 files): manifest names one file and patterns are not expanded" in message
        assert "Join the files into one manifest" in message and "pyarrow.parquet.read_table" in message
    literal = _table(tmp_path / "data" / "odd[1].parquet", {"id": ["a"], "text": ["t"]})
    assert SourceConfig(manifest=str(literal)).manifest == str(literal)  # a file of that name is read
    with pytest.raises(ValueError) as exc:  # a missing file whose name would match one as a pattern
        SourceConfig(manifest=str(tmp_path / "data" / "train-0000[0]-of-00002.parquet"))
    assert str(exc.value) == (
        f"[input] manifest '{tmp_path}/data/train-0000[0]-of-00002.parquet' does not exist; as a pattern it "
        f"would match '{tmp_path}/data/train-00000-of-00002.parquet', but manifest names one file and patterns "
        "are not expanded: name that file"
    )
    with pytest.raises(ValueError, match=r"test-\*.parquet' does not exist \(manifest names one file and patterns "):
        SourceConfig(manifest=str(tmp_path / "data" / "test-*.parquet"))


def test_a_shards_path_with_brackets_that_exists_is_taken_as_it_is(tmp_path):
    """``run [2024]`` is a folder's name, not a character class: it matched nothing."""
    folder = tmp_path / "run [2024]"
    folder.mkdir()
    _tar(folder / "00000.tar", ["a", "b"])
    _tar(folder / "00001.tar", ["c"])
    tars = [os.path.basename(p) for p in expand_shards(str(folder))]
    assert tars == ["00000.tar", "00001.tar"]
    assert expand_shards(str(folder / "00001.tar")) == [str(folder / "00001.tar")]
    assert [i.name for i in list_inputs(SourceConfig(shards=str(folder)))] == tars
    with pytest.raises(ValueError, match="matches no files"):
        SourceConfig(shards=str(tmp_path / "run [2025]"))


@pytest.mark.parametrize("name, body", [
    ("m.csv", "id,image\n"),
    ("m.tsv", "id\ttext\n\n"),
    ("m.json", "[]"),
    ("m.json", "  [\n ]\n"),
])
def test_config_refuses_a_manifest_without_rows(tmp_path, name, body):
    """A header alone (a failed export) would commit a version with no sample, removing every one."""
    (tmp_path / name).write_text(body)
    with pytest.raises(ValueError, match=r"has no rows: a job reading it would commit a version with no samples"):
        SourceConfig(manifest=str(tmp_path / name))


def test_config_refuses_a_parquet_manifest_of_no_rows(tmp_path):
    path = _table(tmp_path / "m.parquet", {"id": [], "text": []})
    with pytest.raises(ValueError, match="has no rows"):
        SourceConfig(manifest=str(path))


# -- media spooled out of the shuffles ---------------------------------------------------------------


def _media_read(sample):
    """(id, image bytes, where they are: "bytes" in the sample, or "range" of a file)"""
    from pipelines.media import read_media

    where = "bytes" if sample.image.data is not None else "range"
    return sample.id, read_media(sample.image), where


@pytest.mark.parametrize("spool", [True, False])
def test_media_bytes_a_reader_holds_are_spooled_when_asked(tmp_path, spool):
    import gzip
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = _tar(tmp_path / "plain.tar", ["p0", "p1"])
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(_tar(tmp_path / "z.tar", ["z0", "z1"]).read_bytes()))
    os.remove(tmp_path / "z.tar")
    folder = tmp_path / "spool"

    def check(out):
        where = "range" if spool else "bytes"
        expected = [("p0", b"\xff\xd8p0", "range"), ("p1", b"\xff\xd8p1", "range"),  # left in the plain tar
                    ("z0", b"\xff\xd8z0", where), ("z1", b"\xff\xd8z1", where)]
        assert_that(out.samples | beam.Map(_media_read), equal_to(expected))

    _run_spooled(SourceConfig(shards=f"{tmp_path}/*.tar*"), str(folder) if spool else None, check)
    spooled = sorted(os.listdir(folder)) if folder.exists() else []
    assert len(spooled) == (1 if spool else 0)  # one file per bundle: its samples, the gzipped tar's media
    assert os.path.exists(plain)

    # a Parquet manifest with the image bytes in a column (as Hugging Face datasets exports them)
    table = pa.table({"id": ["q0", "q1"], "image": [{"bytes": b"\xff\xd8q0", "path": None},
                                                    {"bytes": b"\xff\xd8q1", "path": None}]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (tmp_path / "m.parquet").write_bytes(buf.getvalue())

    def check_rows(out):
        where = "range" if spool else "bytes"
        assert_that(out.samples | beam.Map(_media_read),
                    equal_to([("q0", b"\xff\xd8q0", where), ("q1", b"\xff\xd8q1", where)]))

    _run_spooled(SourceConfig(manifest=str(tmp_path / "m.parquet")), str(folder) if spool else None, check_rows)


def _run_spooled(config, spool, check):
    with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as p:
        check(p | ReadSource(config, spool=spool))


def test_with_a_spool_only_where_each_sample_lies_goes_through_the_de_duplication(tmp_path):
    """The shuffle carries (path, offset, size) of the pickled sample, ~100 bytes; the first of an id is
    read back from there, and a repeated id is the same reject as without a spool."""
    import pickle

    from pipelines.readers.source import _FirstWinsFn, _ReadFn

    _tar(tmp_path / "a.tar", ["k0", "k1"], caption="a long caption {} " + "x" * 2000)
    _tar(tmp_path / "b.tar", ["k1", "k2"])
    config = SourceConfig(shards=f"{tmp_path}/*.tar")
    spool = tmp_path / "spool"
    spool.mkdir()
    read = _ReadFn(config, str(spool))
    read.start_bundle()
    keyed = [out for item in list_inputs(config) for out in read.process(item)]
    read.finish_bundle()
    assert [k for k, _ in keyed] == ["k0", "k1", "k1", "k2"]
    for _, (_, value) in keyed:
        path, offset, size = value
        assert os.path.dirname(os.fsdecode(path)) == str(spool) and len(pickle.dumps(value)) < 200 < size

    grouped = {}
    for k, v in keyed:
        grouped.setdefault(k, []).append(v)
    first_wins = _FirstWinsFn()
    out = [x for k in sorted(grouped) for x in first_wins.process((k, list(reversed(grouped[k]))))]
    first_wins.finish_bundle()
    assert [(x.id, x.text) for x in out if hasattr(x, "text")] == [
        ("k0", b"a long caption k0 " + b"x" * 2000), ("k1", b"a long caption k1 " + b"x" * 2000), ("k2", b"caption k2")]
    (reject,) = [x for x in out if not hasattr(x, "text")]
    assert reject.reason == "read.duplicate_id" and "b.tar" in reject.source and "a.tar" in reject.detail

    def run(spool_dir):
        with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as p:
            out = p | ReadSource(config, spool=spool_dir)
            both = (out.samples, out.rejects) | beam.Flatten()
            assert_that(both | beam.Map(lambda x: (type(x).__name__, x.id, getattr(x, "text", None),
                                                   x.source, getattr(x, "reason", None)))
                        | beam.combiners.ToList() | beam.Map(sorted), equal_to([expected]))

    expected = sorted([("RawSample", x.id, x.text, x.source, None) if hasattr(x, "text") else
                       ("Reject", x.id, None, x.source, x.reason) for x in out])
    run(None)
    run(str(tmp_path / "spool2"))


@pytest.mark.parametrize(("files", "message"), [
    ({}, r"holds no image or audio file and no metadata file \(no files \(hidden ones are left out\)\)"),
    ({"readme.md": b"x", "notes.pdf": b"%PDF"}, r"\(2 other files: 'notes.pdf', 'readme.md'\); an imagefolder"),
    ({"data-00000-of-00001.arrow": b"x", "state.json": b"{}", "dataset_info.json": b"{}"},
     r"this is a Hugging Face datasets folder written by save_to_disk: export it, "
     r"datasets.load_from_disk\(path\).to_parquet\(\"data.parquet\"\)"),
    ({"shard-0.tar": b"x"}, r"\(1 other file: 'shard-0.tar'\); for WebDataset tars, use \[input\] shards = the folder"),
    ({"sub/captions.csv": b"id,text\n1,a\n"}, r"to read a table of samples, use \[input\] manifest = '.*/sub/captions.csv'"),
])
def test_config_refuses_a_folder_that_holds_no_media_file(tmp_path, files, message):
    """A version read from it would hold no sample, and remove every sample an earlier version holds."""
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / ".hidden.jpg").write_bytes(b"x")  # hidden files are not read, so they do not count
    with pytest.raises(ValueError, match=message):
        SourceConfig(folder=str(tmp_path))
    (tmp_path / "deep" / "one.flac").parent.mkdir(exist_ok=True)
    (tmp_path / "deep" / "one.flac").write_bytes(b"fLaC")  # one media file anywhere: read as a folder
    SourceConfig(folder=str(tmp_path))


def test_a_text_or_label_column_under_another_tools_name_warns_that_it_is_metadata(tmp_path, caplog):
    """Common Voice's 'sentence', LAION's 'TEXT' and datasets' 'labels' landed as metadata without a word: an
    audio-only or image-only dataset, or one with no labels for classify."""
    (tmp_path / "cv.tsv").write_text("id\taudio\tsentence\n1\ta.wav\thello\n")
    (tmp_path / "laion.csv").write_text("id,image,TEXT\n1,a.jpg,a cat\n")
    (tmp_path / "beans.csv").write_text("id,image,labels\n1,a.jpg,2\n")
    (tmp_path / "fine.csv").write_text("id,text,label,labels\n1,t,1,2\n")  # a label column is there: plain metadata
    expected = {"cv.tsv": "'text' (not 'sentence')", "laion.csv": "'text' (not 'TEXT')",
                "beans.csv": "'label' (not 'labels')", "fine.csv": None}
    for name, hint in expected.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipelines.readers.manifest"):
            SourceConfig(manifest=str(tmp_path / name))
        assert [r.getMessage() for r in caplog.records] == ([] if hint is None else [
            f"[input] manifest {tmp_path / name}: some columns look like mbm's but are read as metadata; did you "
            f"mean {hint}? column names are matched exactly"]), name


def test_a_parquet_manifest_of_caption_lists_stops_before_the_run(tmp_path):
    """A Flickr30k/COCO export from datasets (captions: list<string>) rejected every row as read.bad_type and
    committed a version of nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "caption": [["c0", "c1"], ["c2"]], "image": ["a.jpg", "b.jpg"]})
    pq.write_table(table, tmp_path / "flickr.parquet")
    with pytest.raises(ValueError, match=r"'caption' holds lists \(list<element: string>\), several texts a row as "
                                         r"Flickr30k and COCO caption exports have them, .* write one row per text, "
                                         r"each with its own id \(pandas: df = df.explode\('caption'\); "):
        SourceConfig(manifest=str(tmp_path / "flickr.parquet"))
    pq.write_table(table.append_column("text", pa.array(["t0", "t1"])), tmp_path / "both.parquet")
    SourceConfig(manifest=str(tmp_path / "both.parquet"))  # a string text column: the lists are plain metadata


def test_a_manifest_whose_media_column_has_another_tools_name_warns_that_its_files_are_not_read(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("id,image_path,caption\n1,a.jpg,hello\n")
    with caplog.at_level("WARNING", logger="pipelines.readers.manifest"):
        SourceConfig(manifest=str(tmp_path / "m.csv"))  # text alone makes samples: a warning, not an error
    assert [r.getMessage() for r in caplog.records] == [
        f"[input] manifest {tmp_path / 'm.csv'} has no 'image' or 'audio' column: 'image_path' is read as "
        "metadata, and the media it names or holds are not read; did you mean 'image' (not 'image_path')? column "
        "names are matched exactly"]
    caplog.clear()
    (tmp_path / "n.csv").write_text("id,image,path,sentence,caption\n1,a.jpg,b.jpg,s,c\n")
    with caplog.at_level("WARNING", logger="pipelines.readers.manifest"):
        SourceConfig(manifest=str(tmp_path / "n.csv"))  # an image column is there: 'path' is plain metadata
    assert caplog.records == []
    # img2dataset's parquet output: the images' bytes in a column 'jpg', ids in 'key'
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": ["000000000"], "caption": ["a cat"], "jpg": [b"\xff\xd8\xff"], "url": ["http://x/a"]})
    pq.write_table(table, tmp_path / "00000.parquet")
    with pytest.raises(ValueError, match=r"did you mean 'id' \(not 'key'\), 'image' \(not 'jpg'\)\?"):
        SourceConfig(manifest=str(tmp_path / "00000.parquet"))
    pq.write_table(table.rename_columns(["id", "caption", "jpg", "url"]), tmp_path / "renamed.parquet")
    with caplog.at_level("WARNING", logger="pipelines.readers.manifest"):
        SourceConfig(manifest=str(tmp_path / "renamed.parquet"))
    assert [r.getMessage() for r in caplog.records] == [
        f"[input] manifest {tmp_path / 'renamed.parquet'} has no 'image' or 'audio' column: 'jpg' is read as "
        "metadata, and the media it names or holds are not read; did you mean 'image' (not 'jpg')? column names are "
        "matched exactly"]


@pytest.mark.parametrize("dedupe", [True, False])
def test_with_dedupe_the_same_bytes_are_spooled_once_and_their_samples_come_together(tmp_path, dedupe):
    """A Parquet manifest holding one picture's bytes under each of its captions (as an export of a caption
    dataset does): with dedupe the copies point at one place in the spool and leave the read grouped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.dedupe import media_key

    pictures = {"a": b"\xff\xd8picture a" * 1000, "b": b"\xff\xd8picture b" * 1000}  # 11 kB each
    ids = [f"{p}{c}" for c in range(3) for p in "ab"]
    pq.write_table(pa.table({"id": ids, "text": [f"caption of {i}" for i in ids],
                             "image": [{"bytes": pictures[i[0]], "path": None} for i in ids]}), tmp_path / "m.parquet")
    spool = tmp_path / "spool"
    with beam.Pipeline(runner="FnApiRunner", options=PipelineOptions([])) as p:
        out = p | ReadSource(SourceConfig(manifest=str(tmp_path / "m.parquet")), spool=str(spool), dedupe=dedupe)
        keys = out.samples | beam.Map(lambda s: (s.id, media_key(s), _media_read(s)[1]))
        assert_that(keys | beam.Map(lambda k: (k[0], k[2])), equal_to([(i, pictures[i[0]]) for i in ids]))
        assert_that(keys | beam.Map(lambda k: (k[0][0], k[1])) | beam.Distinct() | beam.combiners.Count.Globally(),
                    equal_to([2 if dedupe else 6]), label="places")
    spooled = sum(os.path.getsize(spool / f) for f in os.listdir(spool))
    assert (spooled < 3 * 11000) == dedupe  # each picture once (and the samples, ~300 bytes each), or 6 times


def test_with_dedupe_a_first_sample_with_media_goes_on_unread_to_be_grouped(tmp_path):
    """Like the de-duplication by id, the grouping by media carries where each sample lies (~100 bytes),
    not the sample: Beam's local runner holds a shuffle in the driver."""
    import pickle

    from pipelines.readers.source import BY_MEDIA, _FirstWinsFn, _LoadFn, _ReadFn

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8a")
    rows = [{"id": "a", "text": "one", "image": "a.jpg"}, {"id": "t", "text": "text only"},
            {"id": "b", "text": "two", "image": "a.jpg"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SourceConfig(manifest=str(tmp_path / "m.jsonl"))
    (tmp_path / "spool").mkdir()
    read = _ReadFn(config, str(tmp_path / "spool"), dedupe=True)
    read.start_bundle()
    keyed = [out for item in list_inputs(config) for out in read.process(item)]
    read.finish_bundle()
    assert not [x.value for x in keyed if isinstance(x, beam.pvalue.TaggedOutput)]
    assert [(k, v[2]) for k, v in keyed] == [("a", f"image:{tmp_path}/a.jpg"), ("t", None), ("b", f"image:{tmp_path}/a.jpg")]
    first = _FirstWinsFn(dedupe=True)
    out = {k: list(first.process((k, [v]))) for k, v in keyed}
    (by_media,) = out["a"]
    assert by_media.tag == BY_MEDIA and by_media.value[0] == f"image:{tmp_path}/a.jpg"
    path, _, size = by_media.value[1]  # where it lies in the spool, not the sample
    assert os.path.dirname(os.fsdecode(path)) == str(tmp_path / "spool") and b"one" not in pickle.dumps(by_media.value)
    assert [s.text for s in out["t"]] == ["text only"]  # no media: read here, not grouped
    (rank, where, key) = keyed[2][1]  # the same id from a later input: a reject, as without dedupe
    by_media, reject = first.process(("a", [((1, 0), where, key), keyed[0][1]]))
    assert by_media.value[1] == keyed[0][1][1] and reject.reason == "read.duplicate_id"
    (loaded,) = _LoadFn().process(by_media.value[1])
    assert (loaded.id, loaded.text) == ("a", "one")
