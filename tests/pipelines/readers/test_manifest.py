import base64
import bz2
import gzip
import io
import json
import lzma
import os
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.readers import SourceConfig, iter_manifest
from schemas import Media, RawSample, Reject


def _split(items):
    samples = [i for i in items if isinstance(i, RawSample)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert len(samples) + len(rejects) == len(items)
    return samples, rejects


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.fixture
def jsonl(tmp_path):
    outside = tmp_path.parent / "elsewhere.jpg"
    lines = [
        _line({"id": "a", "text": "hello", "image": "img/a.jpg", "extra": {"nested": [1, 2]}, "score": 0.5}),
        b'{"id": "b", "text": "caf\xe9"}\n',  # a Latin-1 byte: invalid UTF-8
        b"\n",
        b"   \n",
        b"{not json\n",
        b"[1, 2]\n",
        _line({"id": 7, "audio": "a.wav", "label": 3}),
        _line({"id": "c", "text": 5}),
        _line({"id": "d", "image": ["x.jpg"]}),
        _line({"text": "no id"}),
        _line({"id": "a", "text": "second a"}),
        _line({"id": "e", "image": "../escape.jpg"}),
        _line({"id": "f", "image": str(outside)}),
        _line({"id": "g", "text": "", "image": None, "label": "x"}),
        _line({"id": True, "text": "bool id"}),
        _line({"id": "h", "image": str(tmp_path / "img" / "h.jpg"), "text": None}),
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def test_jsonl_samples_keep_types_meta_and_lone_surrogates(jsonl, tmp_path):
    samples, _ = _split(list(iter_manifest(str(jsonl))))
    by_id = {s.id: s for s in samples}
    assert [s.id for s in samples] == ["a", "b", "7", "h"]
    a = by_id["a"]
    assert a.text == "hello"
    assert a.image == Media(uri=str(tmp_path / "img" / "a.jpg"), name="img/a.jpg")
    assert a.audio is None and a.label is None
    assert a.meta == {"extra": {"nested": [1, 2]}, "score": 0.5}
    assert a.source == "manifest.jsonl:1"
    assert by_id["b"].text == "caf\udce9"
    seven = by_id["7"]
    assert seven.audio == Media(uri=str(tmp_path / "a.wav"), name="a.wav")
    assert seven.label == 3 and seven.source == "manifest.jsonl:7"
    assert by_id["h"].image.uri == str(tmp_path / "img" / "h.jpg")


def test_jsonl_rejects_name_reason_and_line(jsonl):
    _, rejects = _split(list(iter_manifest(str(jsonl))))
    got = [(r.id, r.reason, r.source) for r in rejects]
    assert got == [
        ("manifest.jsonl:5", "read.bad_json", "manifest.jsonl:5"),
        ("manifest.jsonl:6", "read.bad_json", "manifest.jsonl:6"),
        ("c", "read.bad_type", "manifest.jsonl:8"),
        ("d", "read.bad_type", "manifest.jsonl:9"),
        ("manifest.jsonl:10", "read.missing_id", "manifest.jsonl:10"),
        ("a", "read.duplicate_id", "manifest.jsonl:11"),
        ("e", "read.path_escape", "manifest.jsonl:12"),
        ("f", "read.path_escape", "manifest.jsonl:13"),
        ("g", "read.no_modality", "manifest.jsonl:14"),
        ("manifest.jsonl:15", "read.bad_type", "manifest.jsonl:15"),
    ]
    assert all(r.stage == "read" for r in rejects)
    dup = rejects[5]
    assert "manifest.jsonl:1" in dup.detail and "manifest.jsonl:11" in dup.detail
    assert "'text'" in rejects[2].detail and "../escape.jpg" in rejects[6].detail


def test_allow_outside_accepts_escaping_paths_and_uris(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(_line({"id": "e", "image": "../x.jpg"}) + _line({"id": "u", "audio": "gs://b/a.wav"}))
    strict = list(iter_manifest(str(path)))
    assert [r.reason for r in strict] == ["read.path_escape", "read.path_escape"]
    config = SourceConfig(manifest=str(path), allow_outside=True)
    loose = list(iter_manifest(str(path), config))
    assert [s.image.uri if s.image else s.audio.uri for s in loose] == [
        str(tmp_path.parent / "x.jpg"),
        "gs://b/a.wav",
    ]


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "text": "x"}\r\n\r\n{"id": "b", "text": "y"}\r\n')
    items = list(iter_manifest(str(path)))
    assert [(s.id, s.text, s.source) for s in items] == [("a", "x", "m.jsonl:1"), ("b", "y", "m.jsonl:3")]


def test_csv_manifest(tmp_path):
    (tmp_path / "m.csv").write_bytes(
        b"\xef\xbb\xbfid,text,image,label,lang\r\n"
        b"1,hello,a.jpg,cat,en\r\n"
        b"\r\n"
        b'2,"multi\r\nline caf\xe9",,,fr\r\n'
        b"3,,,dog,de\r\n"
        b"1,again,,,en\r\n"
        b",no id,,,en\r\n"
        b"4,,../up.jpg,,en\r\n"
        b"5,too,many,cells,x,y\r\n"
        b"6,short\r\n"
    )
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv"))))
    assert [(s.id, s.text, s.label, s.meta, s.source) for s in samples] == [
        ("1", "hello", "cat", {"lang": "en"}, "m.csv:2"),
        ("2", "multi\r\nline caf\udce9", None, {"lang": "fr"}, "m.csv:4"),
        ("6", "short", None, {"lang": ""}, "m.csv:11"),
    ]
    assert samples[0].image == Media(uri=str(tmp_path / "a.jpg"), name="a.jpg")
    assert [(r.id, r.reason, r.source) for r in rejects] == [
        ("3", "read.no_modality", "m.csv:6"),
        ("1", "read.duplicate_id", "m.csv:7"),
        ("m.csv:8", "read.missing_id", "m.csv:8"),
        ("4", "read.path_escape", "m.csv:9"),
        ("m.csv:10", "read.bad_csv", "m.csv:10"),
    ]


def test_tsv_by_extension_and_format_override(tmp_path):
    (tmp_path / "m.tsv").write_text("id\ttext\na\thello, world\n")
    assert [(s.id, s.text) for s in iter_manifest(str(tmp_path / "m.tsv"))] == [("a", "hello, world")]
    (tmp_path / "m.txt").write_text('{"id": "x", "text": "t"}\n')
    config = SourceConfig(manifest=str(tmp_path / "m.txt"), format="jsonl")
    assert [s.id for s in iter_manifest(str(tmp_path / "m.txt"), config)] == ["x"]


def test_parquet_manifest(tmp_path):
    table = pa.table(
        {
            "id": pa.array([10, 11, None, 10, 12], pa.int64()),
            "text": ["t0", None, "t2", "t3", None],
            "image": [None, "i/11.png", None, None, "/etc/passwd"],
            "label": [1, 2, 3, 4, 5],
            "info": [{"k": "v"}, {"k": "w"}, None, None, None],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=2)
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.parquet"))))
    assert [(s.id, s.text, s.label, s.meta, s.source) for s in samples] == [
        ("10", "t0", 1, {"info": {"k": "v"}}, "m.parquet:1"),
        ("11", None, 2, {"info": {"k": "w"}}, "m.parquet:2"),
    ]
    assert samples[1].image == Media(uri=str(tmp_path / "i" / "11.png"), name="i/11.png")
    assert [(r.id, r.reason, r.source) for r in rejects] == [
        ("m.parquet:3", "read.missing_id", "m.parquet:3"),
        ("10", "read.duplicate_id", "m.parquet:4"),
        ("12", "read.path_escape", "m.parquet:5"),
    ]


def test_parquet_hf_image_struct_keeps_bytes(tmp_path):
    images = pa.array([{"bytes": b"\x89PNG", "path": "a.png"}, {"bytes": None, "path": "b.png"}])
    pq.write_table(pa.table({"id": ["a", "b"], "image": images}), tmp_path / "m.parquet")
    a, b = iter_manifest(str(tmp_path / "m.parquet"))
    assert a.image == Media(data=b"\x89PNG", name="a.png")
    assert b.image == Media(uri=str(tmp_path / "b.png"), name="b.png")


def test_hf_class_label_columns_give_class_names(tmp_path):
    """``datasets``' to_parquet writes a ClassLabel column as class indexes and the names in the schema's
    "huggingface" metadata (as below, from datasets 5.2): the labels were the numbers, and training's
    classes 0, 1, ... instead of the dataset's names."""
    features = {"id": {"dtype": "string", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"},
                "label": {"names": ["cat", "dog"], "_type": "ClassLabel"},
                "tags": {"feature": {"names": ["red", "blue"], "_type": "ClassLabel"}, "_type": "List"}}
    table = pa.table({"id": ["a", "b", "c", "d"], "text": ["w", "x", "y", "z"], "label": [0, 1, -1, 7],
                      "tags": [[0, 1], [], [1], None]})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "m.parquet")
    samples = list(iter_manifest(str(tmp_path / "m.parquet")))
    assert [(s.id, s.label, s.meta) for s in samples] == [
        ("a", "cat", {"tags": ["red", "blue"]}), ("b", "dog", {"tags": []}),
        ("c", None, {"tags": ["blue"]}),  # -1: datasets' "no label"
        ("d", 7, {"tags": None}),  # an index the names do not cover stays as it is
    ]
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "plain.parquet")  # no metadata: the numbers
    assert [s.label for s in iter_manifest(str(tmp_path / "plain.parquet"))] == [0, 1, -1, 7]


def test_hf_class_labels_nested_in_lists_and_structs_give_class_names(tmp_path):
    # the metadata datasets 5.2 writes for these features (an object-detection list of objects, a struct,
    # a list of lists, and a Sequence of a struct, which it stores as a struct of lists)
    names = {"a": ["car", "bus"], "x": ["day", "night"], "p": ["on", "off"], "m": ["left", "right"]}
    features = {
        "id": {"dtype": "string", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"},
        "objects": {"feature": {"bbox": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"},
                                "category": {"names": names["a"], "_type": "ClassLabel"}}, "_type": "List"},
        "ann": {"kind": {"names": names["x"], "_type": "ClassLabel"}},
        "nested": {"feature": {"feature": {"names": names["p"], "_type": "ClassLabel"}, "_type": "List"},
                   "_type": "List"},
        "legacy": {"feature": {"cat": {"names": names["m"], "_type": "ClassLabel"}}, "_type": "Sequence"}}
    table = pa.table({"id": ["1"], "text": ["t"], "objects": [[{"bbox": [1.0], "category": 1}]], "ann": [{"kind": 0}],
                      "nested": [[[0, 1], [1]]], "legacy": [{"cat": [1, 0]}]})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "m.parquet")
    (sample,) = iter_manifest(str(tmp_path / "m.parquet"))
    assert sample.meta == {"objects": [{"bbox": [1.0], "category": "bus"}], "ann": {"kind": "day"},
                           "nested": [["on", "off"], ["off"]], "legacy": {"cat": ["right", "left"]}}


def test_a_struct_whose_bytes_are_not_binary_is_a_reject_not_a_lost_image(tmp_path):
    images = pa.array([{"bytes": "iVBORw0KGgo=", "path": None}, {"bytes": "", "path": "b.png"}])
    pq.write_table(pa.table({"id": ["a", "b"], "image": images}), tmp_path / "m.parquet")
    a, b = iter_manifest(str(tmp_path / "m.parquet"))
    assert (a.id, a.reason) == ("a", "read.bad_type")
    assert "'image' struct's 'bytes' is str 'iVBORw0KGgo='" in a.detail
    assert b.image == Media(uri=str(tmp_path / "b.png"), name="b.png")  # empty bytes: the path is read
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "c", "audio": {"bytes": [82, 73], "path": None}}) + "\n")
    (c,) = iter_manifest(str(tmp_path / "m.jsonl"))
    assert (c.id, c.reason) == ("c", "read.bad_type") and "'bytes' is list [82, 73]" in c.detail


def test_json_array_file(tmp_path):
    (tmp_path / "ann.json").write_text(
        '[\n  {"id": "a", "image": "a.jpg",\n   "conversations": [{"from": "human"}]},\n  "oops",\n  {"id": "b", "text": "t"}\n]\n'
    )
    items = list(iter_manifest(str(tmp_path / "ann.json")))
    assert [(type(i).__name__, i.id, i.source) for i in items] == [
        ("RawSample", "a", "ann.json:2"),
        ("Reject", "ann.json:4", "ann.json:4"),
        ("RawSample", "b", "ann.json:5"),
    ]
    assert items[0].meta == {"conversations": [{"from": "human"}]}


def test_integral_float_id_and_nan_cells(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": 3.0, "text": "x", "label": NaN}\n{"id": 3.5, "text": "y"}\n')
    items = list(iter_manifest(str(path)))
    assert (items[0].id, items[0].label) == ("3", None)
    assert (items[1].id, items[1].reason) == ("m.jsonl:2", "read.bad_type")


def test_unknown_extension_needs_format(tmp_path):
    (tmp_path / "m.dat").write_text("")
    with pytest.raises(ValueError, match="format"):
        list(iter_manifest(str(tmp_path / "m.dat")))


def test_relative_manifest_path_gives_absolute_media(tmp_path, monkeypatch):
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "a", "image": "a.jpg"}))
    monkeypatch.chdir(tmp_path)
    (sample,) = iter_manifest("m.jsonl")
    assert sample.image.uri == os.path.join(str(tmp_path), "a.jpg")


def test_gzipped_jsonl(tmp_path):
    (tmp_path / "m.jsonl.gz").write_bytes(
        gzip.compress(b'{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n')
    )
    assert [(s.id, s.source) for s in iter_manifest(str(tmp_path / "m.jsonl.gz"))] == [
        ("a", "m.jsonl.gz:1"),
        ("b", "m.jsonl.gz:3"),
    ]


def test_csv_quote_never_closed_does_not_swallow_the_rows_after_it(tmp_path):
    (tmp_path / "m.csv").write_bytes(
        b'id,text\nr1,first\nr2,"12 inch record\nr3,third\nr4,"fourth"\nr5,"multi\nline"\nr6,"7" single\nr7,last\n'
    )
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv"))))
    assert [(s.id, s.text, s.source) for s in samples] == [
        ("r1", "first", "m.csv:2"),
        ("r2", "12 inch record", "m.csv:3"),  # its first line alone, read leniently
        ("r3", "third", "m.csv:4"),
        ("r4", "fourth", "m.csv:5"),
        ("r5", "multi\nline", "m.csv:6"),
        ("r6", "7 single", "m.csv:8"),
        ("r7", "last", "m.csv:9"),
    ]
    assert rejects == []


def test_csv_unclosed_quote_whose_line_would_shift_columns_is_rejected(tmp_path):
    (tmp_path / "m.csv").write_bytes(b'id,text,image,label\r\nr1,"open caption,a.png,x\r\nr2,ok,,x\r\n'
                                     b'r3,a"b"c,,y\r\n')
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv"))))
    assert [(s.id, s.text) for s in samples] == [("r2", "ok"), ("r3", 'a"b"c')]
    assert [(r.id, r.reason) for r in rejects] == [("m.csv:2", "read.bad_csv")]  # not a caption holding the path


def test_undecodable_bytes_in_ids_labels_and_meta_are_escaped(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"id,text,label,note\ncaf\xe9,fine,caf\xe8,\xff\nok,fine,x,y\n")
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "s\udce9", "text": "x", "label": "\ud83d",
                                              "extra": {"k\udc80": ["v\udce9"]}}).replace(b"\\\\", b"\\"))
    first, second = iter_manifest(str(tmp_path / "m.csv"))
    assert (first.id, first.text, first.label, first.meta) == ("caf\\xe9", "fine", "caf\\xe8", {"note": "\\xff"})
    assert second.id == "ok"
    (sample,) = iter_manifest(str(tmp_path / "m.jsonl"))
    assert (sample.id, sample.label, sample.meta) == ("s\\xe9", "\\ud83d", {"extra": {"k\\x80": ["v\\xe9"]}})
    for value in (sample.id, sample.label, json.dumps(sample.meta, ensure_ascii=False)):
        value.encode("utf-8")  # JSON, Parquet and tar names take these now


def test_nan_and_infinite_meta_become_null(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x", "label": Infinity, "score": NaN, "w": [1.5, -Infinity]}\n')
    (sample,) = iter_manifest(str(tmp_path / "m.jsonl"))
    assert sample.label is None and sample.meta == {"score": None, "w": [1.5, None]}


@pytest.mark.parametrize("cut", ["half", "random"])
def test_unreadable_parquet_manifest_is_one_reject(tmp_path, cut):
    table = pa.table({"id": [f"r{i}" for i in range(200)], "text": ["caption " * 20] * 200})
    pq.write_table(table, tmp_path / "f.pq")
    full = (tmp_path / "f.pq").read_bytes()
    (tmp_path / "m.parquet").write_bytes(full[: len(full) // 2] if cut == "half" else os.urandom(3000))
    (item,) = iter_manifest(str(tmp_path / "m.parquet"))
    assert (item.id, item.reason, item.source) == ("m.parquet", "read.unreadable", "m.parquet")
    assert item.detail == (
        "m.parquet: cannot read the file (ArrowInvalid: Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.)"
    )


def test_plain_file_named_gz_is_one_reject(tmp_path):
    (tmp_path / "m.jsonl.gz").write_bytes(_line({"id": "a", "text": "plain text named .gz"}))
    (item,) = iter_manifest(str(tmp_path / "m.jsonl.gz"))
    assert (item.id, item.reason) == ("m.jsonl.gz", "read.unreadable")
    assert item.detail == "m.jsonl.gz: cannot read the file (BadGzipFile: Not a gzipped file (b'{\"'))"


def test_parquet_damaged_after_some_rows_keeps_them(tmp_path):
    ids = [f"r{i}" for i in range(10000)]
    table = pa.table({"id": ids, "text": ["caption"] * 10000})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=5000, use_dictionary=False)
    second = pq.ParquetFile(tmp_path / "m.parquet").metadata.row_group(1).column(0).data_page_offset
    data = bytearray((tmp_path / "m.parquet").read_bytes())
    data[second : second + 50] = b"\xff" * 50  # the second row group's first page header
    (tmp_path / "m.parquet").write_bytes(bytes(data))
    *samples, broken = iter_manifest(str(tmp_path / "m.parquet"))
    assert [s.id for s in samples] == ids[:4096]  # the first batch read
    assert (broken.id, broken.reason) == ("m.parquet", "read.unreadable")
    assert broken.detail.startswith("m.parquet: cannot read the file (OSError: ")
    assert broken.detail.endswith("; the rows up to line 4096 are kept")


def test_out_of_range_timestamps_in_parquet_keep_their_integer(tmp_path):
    never = 2**63 - 1
    table = pa.table({
        "id": ["a", "b", "c"],
        "text": ["first", "second", "third"],
        "expires_at": pa.array([0, never, 1_700_000_000_000], pa.timestamp("ms")),
        "day": pa.array([0, 1, 2**31 - 1], pa.date32()),
        "history": pa.array([[0], [0, never], None], pa.list_(pa.timestamp("ms"))),
        "info": pa.array([{"t": 0, "n": 1}, {"t": never, "n": 2}, None],
                         pa.struct([("t", pa.timestamp("ms")), ("n", pa.int64())])),
    })
    pq.write_table(table, tmp_path / "m.parquet")
    a, b, c = iter_manifest(str(tmp_path / "m.parquet"))
    assert [s.id for s in (a, b, c)] == ["a", "b", "c"]
    assert a.meta == {"expires_at": "1970-01-01T00:00:00", "day": "1970-01-01",
                      "history": ["1970-01-01T00:00:00"], "info": {"t": "1970-01-01T00:00:00", "n": 1}}
    assert b.meta == {"expires_at": never, "day": "1970-01-02",
                      "history": ["1970-01-01T00:00:00", never], "info": {"t": never, "n": 2}}
    assert c.meta == {"expires_at": "2023-11-14T22:13:20", "day": 2**31 - 1, "history": None, "info": None}


def test_csv_broken_multiline_record_is_one_reject(tmp_path):
    (tmp_path / "m.csv").write_bytes(
        b'id,text,label\nr1,"first line of the caption\n'
        b'second line with "bad" quote, more",cat\nr2,fine caption,dog\n'
    )
    (tmp_path / "two.csv").write_bytes(
        b'id,text\r\nr1,"first line\r\nsecond "bad" line, more"\r\nr2,fine\r\nr3,"multi\r\nline"\r\n'
    )
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv"))))
    assert [(s.id, s.text, s.source) for s in samples] == [("r2", "fine caption", "m.csv:4")]
    assert [(r.id, r.reason, r.source) for r in rejects] == [("m.csv:2", "read.bad_csv", "m.csv:2")]
    assert rejects[0].detail.startswith("m.csv:2: cannot parse the record on lines 2-3 (")
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "two.csv"))))
    assert [(s.id, s.text, s.source) for s in samples] == [
        ("r2", "fine", "two.csv:4"), ("r3", "multi\r\nline", "two.csv:5")
    ]
    assert [(r.id, r.reason) for r in rejects] == [("two.csv:2", "read.bad_csv")]


def test_cr_only_line_endings(tmp_path):
    (tmp_path / "m.csv").write_bytes(b'id,text\rr0,first\r\rr1,"two\rlines"\rr2,third\r')
    (tmp_path / "m.tsv").write_bytes(b"id\ttext\rr0\tfirst\rr1\tsecond")
    (tmp_path / "m.jsonl").write_bytes(b'{"id": "a", "text": "x"}\r{broken\r{"id": "b", "text": "y"}\r\n')
    assert [(s.id, s.text, s.source) for s in iter_manifest(str(tmp_path / "m.csv"))] == [
        ("r0", "first", "m.csv:2"), ("r1", "two\rlines", "m.csv:4"), ("r2", "third", "m.csv:6")
    ]
    assert [(s.id, s.text, s.source) for s in iter_manifest(str(tmp_path / "m.tsv"))] == [
        ("r0", "first", "m.tsv:2"), ("r1", "second", "m.tsv:3")
    ]
    assert [(type(i).__name__, i.id) for i in iter_manifest(str(tmp_path / "m.jsonl"))] == [
        ("RawSample", "a"), ("Reject", "m.jsonl:2"), ("RawSample", "b")
    ]


def test_a_lone_cr_inside_a_line_of_an_lf_file_stays_in_it(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b'{"id": "a", "text": "one\rtwo"}\n{"id": "b", "text": "x"}\n')
    (tmp_path / "m.csv").write_bytes(b'id,text\nr0,"one\rtwo"\nr1,x\n')
    for name, ids in (("m.jsonl", ("a", "b")), ("m.csv", ("r0", "r1"))):
        assert [(s.id, s.text) for s in iter_manifest(str(tmp_path / name))] == [(ids[0], "one\rtwo"), (ids[1], "x")]


def test_json_nested_too_deep_is_bad_json(tmp_path):
    deep = "[" * 1500 + "]" * 1500
    (tmp_path / "m.jsonl").write_text(
        '{"id": "ok1", "text": "fine"}\n'
        f'{{"id": "deep", "text": "t", "extra": {deep}}}\n'
        f'{{"id": "d101", "text": "t", "extra": {"[" * 100 + "]" * 100}}}\n'
        f'{{"id": "d100", "text": "t", "extra": {"[" * 99 + "]" * 99}, "wide": [{"[1]," * 200}[2]]}}\n'
    )
    (tmp_path / "a.json").write_text(f'[{{"id": "x", "text": "t"}}, {{"id": "y", "e": {deep}}}, {{"id": "z"}}]')
    deep101 = "[" * 100 + "]" * 100
    (tmp_path / "b.json").write_text(f'[{{"id": "x", "text": "t"}},\n {{"e": {deep101}}},\n {{"id": "z", "text": "t"}}]')
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.jsonl"))))
    assert [s.id for s in samples] == ["ok1", "d100"]
    assert [(r.id, r.reason) for r in rejects] == [("m.jsonl:2", "read.bad_json"), ("m.jsonl:3", "read.bad_json")]
    assert all("nested more than 100 levels deep" in r.detail for r in rejects)
    assert [(type(i).__name__, i.id) for i in iter_manifest(str(tmp_path / "a.json"))] == [
        ("RawSample", "x"), ("Reject", "a.json:1[1]")  # the end of a value too deep to decode is not known
    ]
    assert [(type(i).__name__, i.id) for i in iter_manifest(str(tmp_path / "b.json"))] == [
        ("RawSample", "x"), ("Reject", "b.json:2"), ("RawSample", "z")
    ]


def _zstd():
    return pytest.importorskip("zstandard")


# by suffix: how to compress a file, and a decompressor of one stream to tell what a cut file still holds
_COMPRESSIONS = {
    "gz": (gzip.compress, lambda: zlib.decompressobj(zlib.MAX_WBITS | 16)),
    "bz2": (lambda data: bz2.compress(data, 1), bz2.BZ2Decompressor),  # 100 kB blocks: a cut keeps some
    "xz": (lzma.compress, lzma.LZMADecompressor),
    "lzma": (lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE), lzma.LZMADecompressor),
    "deflate": (zlib.compress, zlib.decompressobj),
    "zst": (lambda data: _zstd().ZstdCompressor().compress(data), lambda: _zstd().ZstdDecompressor().decompressobj()),
}
_COMPRESSIONS["zstd"] = _COMPRESSIONS["zst"]


def _rows(count):
    return [_line({"id": f"r{i}", "text": f"caption {i} " * 8}) for i in range(count)]


@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz", "lzma", "deflate", "zst"])
def test_a_cut_compressed_manifest_keeps_its_rows_and_says_it_was_cut(tmp_path, suffix):
    compress, decompressor = _COMPRESSIONS[suffix]
    data = compress(b"".join(_rows(5000)))  # 650 kB
    cut = data[: len(data) * 2 // 3]
    held = decompressor().decompress(cut).count(b"\n")  # the whole rows the cut file still holds
    assert 0 < held < 5000
    (tmp_path / f"m.jsonl.{suffix}").write_bytes(cut)
    samples, rejects = _split(list(iter_manifest(str(tmp_path / f"m.jsonl.{suffix}"))))
    assert [s.id for s in samples] == [f"r{i}" for i in range(held)]
    assert [(r.id, r.reason, r.detail) for r in rejects] == [(
        f"m.jsonl.{suffix}",
        "read.unreadable",
        f"m.jsonl.{suffix}: cannot read the file (it ends before its compressed stream does: the file was "
        f"cut short); the rows up to line {held} are kept",
    )]


def _gzip_cut_after(data: bytes, part: bytes) -> bytes:
    """``data`` gzipped as stored blocks (no compression), so that it can be cut right after ``part``."""
    return gzip.compress(data, compresslevel=0)[: 10 + 5 + data.index(part) + len(part)]  # gzip, block headers


def test_a_cut_gzipped_csv_or_json_manifest_keeps_its_rows_but_not_the_cut_one(tmp_path):
    table = b"id,text\n" + b"".join(b"r%d,caption %d\n" % (i, i) for i in range(5))
    (tmp_path / "m.csv.gz").write_bytes(_gzip_cut_after(table, b"r3,cap"))  # r3 must not land as "cap"
    (tmp_path / "m.json.gz").write_bytes(_gzip_cut_after(b"".join(_rows(5)), b'{"id": "r3"'))
    array = b"[\n" + b",\n".join(row.rstrip() for row in _rows(5)) + b"\n]\n"
    (tmp_path / "a.json.gz").write_bytes(_gzip_cut_after(array, b'{"id": "r3"'))
    cut = "cannot read the file (it ends before its compressed stream does: the file was cut short)"
    for name, last in (("m.csv.gz", 4), ("m.json.gz", 3)):
        samples, rejects = _split(list(iter_manifest(str(tmp_path / name))))
        assert [s.id for s in samples] == ["r0", "r1", "r2"]
        assert [(r.id, r.reason, r.detail) for r in rejects] == [
            (name, "read.unreadable", f"{name}: {cut}; the rows up to line {last} are kept")
        ]
    samples, (array_end, unreadable) = _split(list(iter_manifest(str(tmp_path / "a.json.gz"))))
    assert [s.id for s in samples] == ["r0", "r1", "r2"]
    # the array read ends after a comma, which is a reject of its own where it ends
    assert (array_end.id, array_end.reason) == ("a.json.gz:5", "read.bad_json")
    assert array_end.detail.startswith("a.json.gz:5: not valid JSON (Expecting value")
    assert (unreadable.id, unreadable.reason, unreadable.detail) == (
        "a.json.gz", "read.unreadable", f"a.json.gz: {cut}; the rows up to line 4 are kept"
    )


@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz", "deflate", "zst", "zstd"])
def test_a_concatenated_compressed_manifest_is_read_whole(tmp_path, suffix):
    compress, _ = _COMPRESSIONS[suffix]
    rows = _rows(300)
    (tmp_path / f"m.jsonl.{suffix}").write_bytes(compress(b"".join(rows[:100])) + compress(b"".join(rows[100:])))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / f"m.jsonl.{suffix}"))))
    assert [s.id for s in samples] == [f"r{i}" for i in range(300)]
    assert rejects == []


# -- TSV without quoting -----------------------------------------------------------------------------


def test_tsv_quotes_are_ordinary_characters_and_text_lands_as_written(tmp_path):
    sentences = ['"Good-bye," said the boy.', "Plain one.", '"Unbalanced opening quote.', 'He said "hi.',
                 'x, "y"\tz', "Plain two.", '""', "Plain three."]
    lines = ["id\taudio\ttext\tup_votes"] + [f"c{i}\tclips/c{i}.mp3\t{s}\t2" for i, s in enumerate(sentences)]
    (tmp_path / "m.tsv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.tsv"))))
    expected = [(f"c{i}", s) for i, s in enumerate(sentences) if "\tz" not in s]
    assert [(s.id, s.text) for s in samples] == expected
    assert samples[0].meta == {"up_votes": "2"} and samples[0].source == "m.tsv:2"
    # the line with a tab inside its sentence has five cells: it alone is rejected, naming its line
    assert [(r.id, r.reason, r.source) for r in rejects] == [("m.tsv:6", "read.bad_tsv", "m.tsv:6")]
    assert "5 tab-separated cells but the header has 4 columns" in rejects[0].detail


def test_tsv_lines_with_too_few_cells_are_padded_and_too_many_rejected_alone(tmp_path):
    data = b'id\ttext\tlabel\na\t"open\tx\nb\tshort\nc\tlast"\ty\nd\tone\ttwo\tthree\n\n'
    (tmp_path / "m.tsv.gz").write_bytes(gzip.compress(data))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.tsv.gz"))))
    assert [(s.id, s.text, s.label) for s in samples] == [("a", '"open', "x"), ("b", "short", None),
                                                          ("c", 'last"', "y")]
    assert [(r.id, r.reason) for r in rejects] == [("m.tsv.gz:5", "read.bad_tsv")]


def test_format_tsv_reads_without_quoting_and_csv_keeps_quoting(tmp_path):
    (tmp_path / "m.txt").write_bytes(b'id\ttext\na\t"quoted, kept"\n')
    config = SourceConfig(manifest=str(tmp_path / "m.txt"), format="tsv")
    assert [s.text for s in iter_manifest(str(tmp_path / "m.txt"), config)] == ['"quoted, kept"']
    (tmp_path / "m.csv").write_bytes(b'id,text\na,"quoted, ""unquoted"""\n')
    assert [s.text for s in iter_manifest(str(tmp_path / "m.csv"))] == ['quoted, "unquoted"']


# -- text columns ------------------------------------------------------------------------------------


def test_caption_or_transcription_is_the_text_when_there_is_no_text_column(tmp_path):
    (tmp_path / "m.csv").write_text("id,image,caption,lang\ns0,0.jpg,a dog,en\n")
    (sample,) = iter_manifest(str(tmp_path / "m.csv"))
    assert (sample.text, sample.meta) == ("a dog", {"lang": "en"})
    (tmp_path / "m.jsonl").write_bytes(
        _line({"id": "a", "audio": "a.wav", "transcription": "hello there"})
        + _line({"id": "b", "text": "the text", "caption": "a caption", "transcription": "spoken"})
    )
    a, b = iter_manifest(str(tmp_path / "m.jsonl"))
    assert (a.text, a.meta) == ("hello there", {})
    assert (b.text, b.meta) == ("the text", {"caption": "a caption", "transcription": "spoken"})


def test_the_text_is_the_first_non_empty_of_text_caption_and_transcription(tmp_path):
    """A CSV row has every column: an empty text cell must not hide the caption beside it."""
    (tmp_path / "m.csv").write_text("id,text,caption,transcription,image\n"
                                    "1,,a caption,said,a.png\n2,,,spoken,\n3,the text,c,,\n4,  ,cap 4,,\n")
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv"))))
    assert [(s.id, s.text, s.meta) for s in samples] == [
        ("1", "a caption", {"transcription": "said"}),
        ("2", "spoken", {"caption": ""}),
        ("3", "the text", {"caption": "c", "transcription": ""}),
        ("4", "cap 4", {"transcription": ""}),
    ]
    assert rejects == []


# -- repeated columns --------------------------------------------------------------------------------


def test_a_repeated_column_is_read_as_pandas_reads_it_and_the_first_wins(tmp_path):
    """Where the spec check is not run (a remote manifest), a later column of the same name must not
    overwrite the first: it is kept in meta as pandas names it."""
    (tmp_path / "m.csv").write_text("id,text,image,text,lang,lang,lang.1\n1,a red square,a.png,,en,fr,x\n")
    (tmp_path / "m.tsv").write_text("id\ttext\tid\n7\ta caption\t\n")
    columns = [pa.array([1]), pa.array(["hello"]), pa.array([None], pa.string())]
    pq.write_table(pa.Table.from_arrays(columns, names=["id", "text", "text"]), tmp_path / "m.parquet")
    (csv,), (tsv,), (parquet,) = (list(iter_manifest(str(tmp_path / n))) for n in ("m.csv", "m.tsv", "m.parquet"))
    assert (csv.id, csv.text, csv.image.name) == ("1", "a red square", "a.png")
    assert csv.meta == {"text.1": "", "lang": "en", "lang.2": "fr", "lang.1": "x"}
    assert (tsv.id, tsv.text, tsv.meta) == ("7", "a caption", {"id.1": ""})
    assert (parquet.id, parquet.text, parquet.meta) == ("1", "hello", {"text.1": None})


def test_a_caption_of_the_wrong_type_is_rejected_naming_the_column(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "a", "caption": 5}))
    (item,) = iter_manifest(str(tmp_path / "m.jsonl"))
    assert (item.id, item.reason) == ("a", "read.bad_type") and "'caption' is int 5" in item.detail


# -- .json documents ---------------------------------------------------------------------------------


def _coco():
    return {"info": {"description": "COCO 2017"}, "licenses": [],
            "images": [{"file_name": "000000000009.jpg", "id": 9}],
            "annotations": [{"image_id": 9, "id": 100 + k, "caption": f"photo {k}"} for k in range(5)]}


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_file_that_is_one_object_is_one_reject_saying_what_a_manifest_is(tmp_path, indent):
    (tmp_path / "captions.json").write_text(json.dumps(_coco(), indent=indent))
    (item,) = iter_manifest(str(tmp_path / "captions.json"))
    assert (item.id, item.reason, item.source) == ("captions.json", "read.json_object", "captions.json")
    assert "is one JSON object (keys: info, licenses, images, annotations)" in item.detail
    assert "must be JSON Lines (one row object per line) or a JSON array of row objects" in item.detail
    assert "COCO annotation file: convert it to rows of id, image, text" in item.detail


def test_a_json_file_of_columns_is_one_reject_saying_how_to_write_rows(tmp_path):
    """pandas' DataFrame.to_json() writes one object of columns by default: no row of it is a sample."""
    # what pd.DataFrame({"id": [1, 2], "text": ["a cat", "a dog"]}).to_json(path) writes
    (tmp_path / "m.json").write_text('{"id":{"0":1,"1":2},"text":{"0":"a cat","1":"a dog"}}')
    (item,) = iter_manifest(str(tmp_path / "m.json"))
    assert (item.id, item.reason) == ("m.json", "read.json_object")
    assert item.detail == (
        "m.json is one JSON object of columns, not rows ('id' holds an object of 2 values keyed by row: the layout "
        "pandas' DataFrame.to_json() writes by default): a JSON manifest must be JSON Lines (one row object per "
        'line) or a JSON array of row objects; from pandas, write the rows: df.to_json(path, orient="records", '
        "lines=True)"
    )
    # one row whose cells are an image struct and a list of labels is still a row
    (tmp_path / "row.json").write_text(json.dumps({"id": "a", "image": {"bytes": None, "path": "a.jpg"},
                                                   "label": [1, 2]}))
    (sample,) = iter_manifest(str(tmp_path / "row.json"))
    assert (sample.id, sample.image.name, sample.label) == ("a", "a.jpg", [1, 2])


def test_pretty_printed_json_documents_are_read_whole(tmp_path):
    (tmp_path / "row.json").write_text('\n{\n  "id": "a",\n  "text": "one row"\n}\n')
    (sample,) = iter_manifest(str(tmp_path / "row.json"))
    assert (sample.id, sample.text, sample.source) == ("a", "one row", "row.json:2")
    (tmp_path / "other.json").write_text(json.dumps({"version": 1, "data": [1, 2]}, indent=2))
    (item,) = iter_manifest(str(tmp_path / "other.json"))
    assert item.reason == "read.json_object" and "COCO" not in item.detail


def test_a_broken_pretty_printed_json_document_is_one_reject_not_one_per_line(tmp_path):
    text = json.dumps(_coco(), indent=2)
    (tmp_path / "captions.json").write_text(text.replace('"id": 101', '"id": 101,,'))
    (item,) = iter_manifest(str(tmp_path / "captions.json"))
    assert (item.id, item.reason) == ("captions.json", "read.bad_json")
    assert item.detail.startswith("captions.json: not valid JSON (Expecting")
    assert "read as one JSON document" in item.detail


def test_a_json_lines_file_whose_first_line_is_broken_keeps_its_other_rows(tmp_path):
    (tmp_path / "m.json").write_bytes(b'{"id": "x", "text": "the line stops in the mid\n'
                                      + _line({"id": "a", "text": "fine"}) + b"[1]\n" + _line({"id": "b", "text": "ok"}))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.json"))))
    assert [(s.id, s.source) for s in samples] == [("a", "m.json:2"), ("b", "m.json:4")]
    assert [(r.id, r.reason) for r in rejects] == [("m.json:1", "read.bad_json"), ("m.json:3", "read.bad_json")]


# -- web URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_outside", [False, True])
def test_http_media_cells_are_one_reject_each_saying_mbm_does_not_download(tmp_path, allow_outside):
    pq.write_table(pa.table({"id": ["l0", "l1"], "text": ["cap 0", "cap 1"],
                             "image": ["https://ex.com/0.jpg", "0.jpg"]}), tmp_path / "laion.parquet")
    config = SourceConfig(manifest=str(tmp_path / "laion.parquet"), allow_outside=allow_outside)
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "laion.parquet"), config)))
    assert [s.id for s in samples] == ["l1"]
    assert [(r.id, r.reason, r.source) for r in rejects] == [("l0", "read.url", "laion.parquet:1")]
    assert rejects[0].detail == (
        "laion.parquet:1: 'image' is a web URL ('https://ex.com/0.jpg'); mbm reads local files only and does not "
        "download: fetch the media first (e.g. img2dataset, which writes WebDataset tars) and read those tars "
        "with [input] shards = ..."
    )
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "a", "audio": {"bytes": None, "path": "HTTP://ex.com/a.wav"}})
                                       + _line({"id": "g", "audio": "gs://b/a.wav"}))
    items = list(iter_manifest(str(tmp_path / "m.jsonl"), config))
    assert (items[0].id, items[0].reason) == ("a", "read.url") and "'audio' is a web URL" in items[0].detail
    # other schemes are left as they were: outside the manifest's folder, read where allowed
    if allow_outside:
        assert items[1].audio.uri == "gs://b/a.wav"
    else:
        assert items[1].reason == "read.path_escape"


def test_rows_of_a_json_array_on_one_line_are_told_apart_by_their_index(tmp_path):
    """Each row that cannot be read is a reject of its own: several sharing one id would hide all but one."""
    (tmp_path / "v.json").write_text('[[1, "a"], [2, "b"]]')
    (tmp_path / "r.json").write_text('[{"text": "no id"}, {"text": "none either"}, {"id": 3, "text": "ok"},\n'
                                     ' {"id": 4, "text": "alone on its line"}]')
    assert [(r.id, r.reason, r.detail) for r in iter_manifest(str(tmp_path / "v.json"))] == [
        ("v.json:1[0]", "read.bad_json", "v.json:1[0]: a JSON list, expected an object"),
        ("v.json:1[1]", "read.bad_json", "v.json:1[1]: a JSON list, expected an object"),
    ]
    assert [(i.id, i.source) for i in iter_manifest(str(tmp_path / "r.json"))] == [
        ("r.json:1[0]", "r.json:1[0]"), ("r.json:1[1]", "r.json:1[1]"), ("3", "r.json:1[2]"), ("4", "r.json:2"),
    ]


def test_blank_header_cells_are_named_as_pandas_names_them(tmp_path):
    (tmp_path / "m.csv").write_text("id,text,,\n1,a,x,y\n")
    (tmp_path / "m.tsv").write_text("id\t \ttext\n1\tx\ta\n")
    (csv_sample,) = iter_manifest(str(tmp_path / "m.csv"))
    (tsv_sample,) = iter_manifest(str(tmp_path / "m.tsv"))
    assert (csv_sample.text, csv_sample.meta) == ("a", {"Unnamed: 2": "x", "Unnamed: 3": "y"})
    assert (tsv_sample.text, tsv_sample.meta) == ("a", {"Unnamed: 1": "x"})


def test_the_one_row_of_a_json_array_holding_a_list_is_a_row(tmp_path):
    """Only a top-level object can be pandas' columns; a row of an array is judged as a row."""
    (tmp_path / "one.json").write_text('[{"id": 1, "text": ["first caption", "second caption"]}]')
    SourceConfig(manifest=str(tmp_path / "one.json"))
    (item,) = iter_manifest(str(tmp_path / "one.json"))
    assert (item.id, item.reason) == ("1", "read.bad_type")


def test_a_gzipped_parquet_manifest_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.readers.manifest import check_columns

    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), buffer)
    (tmp_path / "m.parquet.gz").write_bytes(gzip.compress(buffer.getvalue()))
    check_columns(str(tmp_path / "m.parquet.gz"), "parquet")
    assert [(s.id, s.text) for s in iter_manifest(str(tmp_path / "m.parquet.gz"))] == [("a", "x"), ("b", "y")]
    (tmp_path / "cut.parquet.gz").write_bytes(gzip.compress(buffer.getvalue())[:60])
    (cut,) = iter_manifest(str(tmp_path / "cut.parquet.gz"))
    assert cut.reason == "read.unreadable" and "compressed stream" in cut.detail


@pytest.mark.parametrize("row", ['{"id": 1, "text": ["a", "b"]}',
                                 '{"id": 1, "image": {"path": "i.png", "bytes": null, "width": 8}}'])
def test_the_one_row_of_a_json_lines_file_holding_a_list_or_a_struct_is_a_row(tmp_path, row):
    """Not pandas' columns (objects keyed by row): the row is read, and a bad cell is its reject."""
    from pipelines.readers.manifest import check_columns

    (tmp_path / "one.jsonl").write_text(row + "\n")
    check_columns(str(tmp_path / "one.jsonl"), "jsonl")
    (item,) = iter_manifest(str(tmp_path / "one.jsonl"), SourceConfig(manifest=str(tmp_path / "one.jsonl"),
                                                                     allow_outside=True))
    assert item.id == "1"
    assert getattr(item, "reason", None) in ("read.bad_type", None)


def test_a_decoded_audio_array_is_a_reject_saying_how_to_store_audio(tmp_path):
    """Hugging Face datasets decodes an Audio column to {array, sampling_rate, path} in Python; such a cell
    is no file or bytes mbm can read, and the reject says how to store it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a1", "text": "hello", "audio": {"array": [0.0, 0.5], "sampling_rate": 16000, "path": "a1.wav"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    (item,) = iter_manifest(str(tmp_path / "m.parquet"))
    assert (item.id, item.reason) == ("a1", "read.bad_type")
    assert "'audio' is a decoded array ('array', 'sampling_rate', 'path')" in item.detail
    assert "ds.cast_column('audio', Audio(decode=False))" in item.detail


def test_parquet_rows_are_read_in_batches_sized_by_their_bytes(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.readers import rows

    big = tmp_path / "big.parquet"  # images as bytes cells: 1 MB rows
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(40)], "image": [bytes([i]) * (1 << 20) for i in range(40)]}),
                   big, row_group_size=10)
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(40)], "text": ["x"] * 40}), small)
    assert rows.parquet_batch_rows(pq.ParquetFile(small).metadata) == rows._PARQUET_BATCH
    assert rows.parquet_batch_rows(pq.ParquetFile(big).metadata) in (63, 64)  # 64 MB of 1 MB rows (and ids)
    monkeypatch.setattr(rows, "_PARQUET_BATCH_BYTES", 8 << 20)
    sizes = []
    real = rows._pylist
    monkeypatch.setattr(rows, "_pylist", lambda batch: sizes.append(batch.num_rows) or real(batch))
    read = list(rows._parquet_rows(str(big)))
    assert [r["id"] for _, r in read] == [f"r{i}" for i in range(40)]
    assert read[7][1]["image"] == bytes([7]) * (1 << 20)
    assert max(sizes) <= 8 and sum(sizes) == 40


def _excel_unicode_text(rows: list[list[str]], encoding: str = "utf-16") -> bytes:
    """What Excel's "Unicode Text" export writes: tab-separated, CRLF, UTF-16 LE with its byte order mark."""
    return "".join("\t".join(r) + "\r\n" for r in rows).encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be-bom", "utf-32", "utf-32-be-bom"])
def test_a_manifest_with_a_utf16_or_utf32_byte_order_mark_is_read_in_that_encoding(tmp_path, encoding):
    rows = [["id", "text", "label"], ["a", "Größe 👍", "x"], ["b", "שלום", "y"]]
    if encoding.endswith("-be-bom"):  # big-endian with its mark (Python's plain codec writes little-endian)
        codec = encoding.removesuffix("-bom")
        data = "\ufeff".encode(codec) + "".join("\t".join(r) + "\r\n" for r in rows).encode(codec)
    else:
        data = _excel_unicode_text(rows, encoding)
    (tmp_path / "m.tsv").write_bytes(data)
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.tsv"))))
    assert rejects == []
    assert [(s.id, s.text, s.label, s.source) for s in samples] == [
        ("a", "Größe 👍", "x", "m.tsv:2"), ("b", "שלום", "y", "m.tsv:3")]


def test_utf16_csv_and_jsonl_manifests_compressed_or_not(tmp_path):
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress('id,text\r\n1,"a, quoted\r\ncell"\r\n2,plain\r\n'.encode("utf-16")))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv.gz"))))
    assert rejects == [] and [(s.id, s.text) for s in samples] == [("1", "a, quoted\r\ncell"), ("2", "plain")]
    (tmp_path / "m.jsonl").write_bytes("".join(json.dumps({"id": f"j{i}", "text": f"naïve {i}"}, ensure_ascii=False)
                                               + "\n" for i in range(3)).encode("utf-16"))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.jsonl"))))
    assert rejects == [] and [(s.id, s.text, s.source) for s in samples] == [
        ("j0", "naïve 0", "m.jsonl:1"), ("j1", "naïve 1", "m.jsonl:2"), ("j2", "naïve 2", "m.jsonl:3")]


def test_a_lone_surrogate_in_a_utf16_manifest_reaches_the_text_cleaner_as_invalid_text(tmp_path):
    data = "id\ttext\r\na\tfine\r\nb\tcut ".encode("utf-16") + b"\x3d\xd8" + "pair\r\nc\tafter\r\n".encode("utf-16-le")
    (tmp_path / "m.tsv").write_bytes(data)
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.tsv"))))
    assert rejects == [] and [s.id for s in samples] == ["a", "b", "c"]
    assert samples[2].text == "after"
    from pipelines.clean import TextCleanConfig, clean_text
    from pipelines.errors import CleanError

    with pytest.raises(CleanError) as e:
        clean_text(samples[1].text, TextCleanConfig())
    assert e.value.reason == "text.invalid_utf8"  # the half pair, as in a UTF-8 file holding one


def test_a_utf16_manifest_cut_inside_a_character_keeps_the_rows_before(tmp_path):
    data = _excel_unicode_text([["id", "text"], ["a", "x"], ["b", "y"]])
    (tmp_path / "m.tsv").write_bytes(data + b"\x41")  # one byte of a character more
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.tsv"))))
    assert [s.id for s in samples] == ["a", "b"]
    assert [(r.reason, r.detail) for r in rejects] == [(
        "read.unreadable",
        "m.tsv: cannot read the file (it ends inside a UTF-16 character: the file was cut short); "
        "the rows up to line 3 are kept")]


@pytest.mark.skipif(os.sep != "/", reason="on Windows a backslash is the separator already")
def test_windows_separators_in_media_paths_name_the_files_they_mean(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"a")
    (tmp_path / "odd\\name.jpg").write_bytes(b"b")  # a POSIX file whose name holds a backslash
    (tmp_path / "m.csv").write_text(
        "id,image\r\n1,img\\a.jpg\r\n2,.\\img\\a.jpg\r\n3,odd\\name.jpg\r\n4,img\\missing.jpg\r\n5,..\\out.jpg\r\n")
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.csv"))))
    assert [(s.id, s.image.uri, s.image.name) for s in samples] == [
        ("1", str(tmp_path / "img" / "a.jpg"), "img\\a.jpg"),
        ("2", str(tmp_path / "img" / "a.jpg"), ".\\img\\a.jpg"),
        ("3", str(tmp_path / "odd\\name.jpg"), "odd\\name.jpg"),  # the file as written exists: read as it is
        ("4", str(tmp_path / "img" / "missing.jpg"), "img\\missing.jpg"),  # the cleaner says it is missing
    ]
    assert [(r.id, r.reason) for r in rejects] == [("5", "read.path_escape")]  # converted, then checked


def test_file_uris_are_read_as_rfc_8089_writes_them(tmp_path):
    """``Path.as_uri()`` escapes spaces and non-ASCII letters and may name the host localhost."""
    media = tmp_path / "my media" / "ü x.png"
    uri = media.as_uri()
    assert "%20" in uri and "%C3%BC" in uri
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "a", "image": uri})
                                       + _line({"id": "b", "image": "file://localhost" + uri[len("file://"):]})
                                       + _line({"id": "c", "image": f"file://{media}"}))
    samples = list(iter_manifest(str(tmp_path / "m.jsonl")))
    assert [(s.id, s.image.uri) for s in samples] == [("a", str(media)), ("b", str(media)), ("c", str(media))]


def test_excels_sep_line_names_the_delimiter(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfsep=;\r\nid;text;label\r\na;x, with a comma;1\r\nb;\"y;z\";2\r\n")
    items = list(iter_manifest(str(tmp_path / "m.csv")))
    assert [(s.id, s.text, s.label, s.source) for s in items] == [("a", "x, with a comma", "1", "m.csv:3"),
                                                                  ("b", "y;z", "2", "m.csv:4")]
    (tmp_path / "n.csv").write_text("sep=,\nid,text\nc,plain\n")
    assert [(s.id, s.text, s.source) for s in iter_manifest(str(tmp_path / "n.csv"))] == [("c", "plain", "n.csv:3")]


def test_file_uris_without_an_authority_are_local_paths(tmp_path):
    """Java's ``File.toURI()`` and Hadoop/Spark paths write ``file:/abs`` (RFC 8089's minimal form): the file
    at /abs, not a relative path ``file:/abs`` under the manifest's folder (a file.missing reject)."""
    media = tmp_path / "my media" / "a.png"
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "a", "image": f"file:{media}"})
                                       + _line({"id": "b", "image": "file:" + str(media).replace(" ", "%20")})
                                       + _line({"id": "c", "image": "file:/elsewhere/x.png"}))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.jsonl"))))
    assert [(s.id, s.image.uri) for s in samples] == [("a", str(media)), ("b", str(media))]
    assert [(r.id, r.reason) for r in rejects] == [("c", "read.path_escape")]
    assert "resolves to '/elsewhere/x.png'" in rejects[0].detail


def test_data_uris_are_the_media_bytes(tmp_path):
    """A ``data:`` URI (base64, as web pages, scrapes and chat-format vision datasets embed images; or
    percent-escaped) holds the file's bytes: it is read as they are, not opened as a path named by
    the whole payload (a file.unreadable reject whose detail held all of it)."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 200
    b64 = base64.b64encode(png).decode()
    rows = [
        {"id": "a", "image": "data:image/png;base64," + b64},
        {"id": "b", "image": "DATA:image/png;BASE64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))},
        {"id": "c", "image": "data:image/svg+xml,%3Csvg%3E%3C/svg%3E"},
        {"id": "d", "image": "data:image/png;base64," + b64[:-3] + "*=="},
        {"id": "e", "image": "data:image/png;base64"},
    ]
    (tmp_path / "m.jsonl").write_bytes(b"".join(_line(r) for r in rows))
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.jsonl"))))
    assert [(s.id, s.image.data, s.image.uri, s.image.name) for s in samples] == [
        ("a", png, None, "data:image/png;base64,..."),
        ("b", png, None, "data:image/png;BASE64,..."),
        ("c", b"<svg></svg>", None, "data:image/svg+xml,..."),
    ]
    assert [(r.id, r.reason, r.detail) for r in rejects] == [
        ("d", "read.bad_data_uri", "m.jsonl:4: 'image' is a data: URI (image/png;base64) whose base64 does not "
                                   "decode: Only base64 data is allowed"),
        ("e", "read.bad_data_uri", "m.jsonl:5: 'image' is a data: URI with no ',' before its data"),
    ]


@pytest.mark.parametrize("allow_outside", [False, True])
def test_a_windows_absolute_path_is_a_reject_saying_so(tmp_path, allow_outside):
    """A manifest written on Windows with absolute paths: C:\\Users\\me\\a.png was read as the relative file
    'C:/Users/me/a.png' under the manifest's folder, a file.missing naming a path nobody wrote."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(b"png")
    (tmp_path / "m.jsonl").write_bytes(_line({"id": "a", "image": "C:\\Users\\me\\a.png"})
                                       + _line({"id": "d", "image": "d:/data/a.png"})
                                       + _line({"id": "b", "image": "img\\b.png"}))
    config = SourceConfig(manifest=str(tmp_path / "m.jsonl"), allow_outside=allow_outside)
    samples, rejects = _split(list(iter_manifest(str(tmp_path / "m.jsonl"), config)))
    assert [s.id for s in samples] == ["b"]
    assert [(r.id, r.reason) for r in rejects] == [("a", "read.windows_path"), ("d", "read.windows_path")]
    assert rejects[0].detail == (
        "m.jsonl:1: 'image' is a Windows absolute path ('C:\\\\Users\\\\me\\\\a.png'), which names no file on this "
        "machine: write the manifest's paths relative to its folder (images\\a.jpg is read as images/a.jpg), or "
        "replace the drive prefix with the folder the files are in here")
