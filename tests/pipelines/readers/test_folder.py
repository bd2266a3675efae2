import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipelines.cleaning import CleanConfig
from pipelines.readers import SourceConfig, iter_folder
from schemas import Media, RawSample, Reject


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_imagefolder_with_metadata_jsonl(tmp_path):
    _touch(tmp_path, "a.jpg", "sub/b.png", "c.PNG", "unlisted.jpg")
    rows = [
        {"file_name": "a.jpg", "text": "a cat", "caption": "kept in meta", "label": "cat", "extra": {"n": 1}},
        {"file_name": "sub/b.png", "label": 2},
        {"file_name": "a.jpg", "text": "again"},
        {"file_name": "../out.jpg"},
        {"file_name": "notes.txt"},
        {"text": "no file"},
        {"file_name": "c.PNG"},
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(iter_folder(str(tmp_path)))
    samples = [i for i in items if isinstance(i, RawSample)]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert [(s.id, s.text, s.label, s.meta, s.source) for s in samples] == [
        ("a.jpg", "a cat", "cat", {"caption": "kept in meta", "extra": {"n": 1}}, "metadata.jsonl:1"),
        ("sub/b.png", None, 2, {}, "metadata.jsonl:2"),
        ("c.PNG", None, None, {}, "metadata.jsonl:7"),
    ]
    assert samples[0].image == Media(uri=str(tmp_path / "a.jpg"), name="a.jpg")
    assert samples[0].audio is None
    assert [(r.id, r.reason) for r in rejects] == [
        ("a.jpg", "read.duplicate_id"),
        ("../out.jpg", "read.path_escape"),
        ("notes.txt", "read.unsupported_file"),
        ("metadata.jsonl:6", "read.missing_id"),
        ("unlisted.jpg", "read.not_in_metadata"),
    ]


def test_audiofolder_with_metadata_csv_uses_transcription(tmp_path):
    _touch(tmp_path, "clips/1.wav", "clips/2.flac")
    (tmp_path / "metadata.csv").write_bytes(
        b"\xef\xbb\xbffile_name,transcription,speaker\r\nclips/1.wav,hello there,s1\r\nclips/2.flac,,s2\r\n"
    )
    s1, s2 = iter_folder(str(tmp_path))
    assert (s1.id, s1.text, s1.meta, s1.source) == (
        "clips/1.wav",
        "hello there",
        {"speaker": "s1"},
        "metadata.csv:2",
    )
    assert s1.audio == Media(uri=str(tmp_path / "clips" / "1.wav"), name="clips/1.wav")
    assert s1.image is None
    assert (s2.id, s2.text, s2.audio.name) == ("clips/2.flac", None, "clips/2.flac")


def test_spaces_around_a_file_name_in_metadata_csv_are_dropped(tmp_path):
    """As around a manifest's media cells: a spreadsheet's export may keep them."""
    _touch(tmp_path, "r.png", "s.wav", " lead.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\n r.png ,spaces\ns.wav\t,tab\n lead.png,named so\n")
    items = list(iter_folder(str(tmp_path)))
    assert [(i.id, type(i).__name__) for i in items] == [("r.png", "RawSample"), ("s.wav", "RawSample"),
                                                         (" lead.png", "RawSample")]  # a file named with one
    assert items[0].image == Media(uri=str(tmp_path / "r.png"), name="r.png")
    assert items[2].image == Media(uri=str(tmp_path / " lead.png"), name=" lead.png")

def test_metadata_in_split_subfolders(tmp_path):
    _touch(tmp_path, "train/a.jpg", "test/a.jpg")
    (tmp_path / "train" / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "tr"}\n')
    pq.write_table(pa.table({"file_name": ["a.jpg"], "text": ["te"]}), tmp_path / "test" / "metadata.parquet")
    got = [(s.id, s.text, s.image.uri, s.source) for s in iter_folder(str(tmp_path))]
    assert got == [
        ("test/a.jpg", "te", str(tmp_path / "test" / "a.jpg"), "test/metadata.parquet:1"),
        ("train/a.jpg", "tr", str(tmp_path / "train" / "a.jpg"), "train/metadata.jsonl:1"),
    ]


def test_metadata_samples_under_split_folders_record_their_split(tmp_path):
    """As without metadata, so that ``mbm train --split-by split`` holds out a Hugging Face imagefolder's
    ``test/``; a row's own ``split`` is kept."""
    _touch(tmp_path, "train/a.jpg", "test/b.jpg", "validation/c.jpg", "validation/d.jpg", "extra/e.jpg")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\na.jpg,x\n")
    (tmp_path / "test" / "metadata.jsonl").write_text('{"file_name": "b.jpg"}\n')
    (tmp_path / "validation" / "metadata.jsonl").write_text('{"file_name": "c.jpg"}\n{"file_name": "d.jpg", "split": "train"}\n')
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "extra/e.jpg"}\n')
    got = sorted((s.id, s.meta) for s in iter_folder(str(tmp_path)))
    assert got == [("extra/e.jpg", {}), ("test/b.jpg", {"split": "test"}), ("train/a.jpg", {"split": "train"}),
                   ("validation/c.jpg", {"split": "validation"}), ("validation/d.jpg", {"split": "train"})]


def test_class_subfolders_without_metadata(tmp_path):
    _touch(
        tmp_path, "dog/2.jpg", "cat/1.png", "cat/readme.txt", "cat/.hidden.jpg", ".cache/x.jpg", "dog/3.wav"
    )
    items = list(iter_folder(str(tmp_path)))
    got = [(s.id, s.label, s.present(), s.source) for s in items if isinstance(s, RawSample)]
    assert got == [
        ("cat/1.png", "cat", ["image"], "cat/1.png"),
        ("dog/2.jpg", "dog", ["image"], "dog/2.jpg"),
        ("dog/3.wav", "dog", ["audio"], "dog/3.wav"),
    ]
    rejects = [(r.id, r.reason) for r in items if isinstance(r, Reject)]
    assert rejects == [("cat/readme.txt", "read.unsupported_file")]


def test_symlinked_class_folders_are_read_once_each(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _touch(root, "dog/2.jpg")
    _touch(elsewhere, "cats/1.png")
    (root / "cat").symlink_to(elsewhere / "cats")  # a class folder linked from elsewhere
    (root / "cat" / "loop").symlink_to(root)  # a link back up the tree
    (root / "kitten").symlink_to(elsewhere / "cats")  # a second link to a folder already listed
    got = [(s.id, s.label, s.present()) for s in iter_folder(str(root)) if isinstance(s, RawSample)]
    assert got == [("cat/1.png", "cat", ["image"]), ("dog/2.jpg", "dog", ["image"])]


def test_a_symlink_to_a_folder_inside_the_dataset_changes_nothing(tmp_path):
    """A link to a folder the walk reaches by its own name (``latest -> train``) sorts first: entered, it
    would take over that folder's samples, their ids, labels and split, and every one would be new."""
    _touch(tmp_path, "train/cat/1.png", "train/dog/2.png", "val/cat/3.png")
    expected = [
        ("train/cat/1.png", "cat", {"split": "train"}),
        ("train/dog/2.png", "dog", {"split": "train"}),
        ("val/cat/3.png", "cat", {"split": "val"}),
    ]
    assert [(s.id, s.label, s.meta) for s in iter_folder(str(tmp_path))] == expected
    (tmp_path / "latest").symlink_to("train")
    (tmp_path / "val" / "dog").symlink_to("../train/dog")
    (tmp_path / "val" / "all").symlink_to(tmp_path)
    assert [(s.id, s.label, s.meta) for s in iter_folder(str(tmp_path))] == expected


def test_a_symlink_to_a_hidden_folder_inside_the_dataset_is_read(tmp_path):
    """The walk skips hidden folders, so the link is the only way to their files."""
    _touch(tmp_path, ".snapshots/v3/a.png")
    (tmp_path / "current").symlink_to(".snapshots/v3")
    assert [s.id for s in iter_folder(str(tmp_path))] == ["current/a.png"]


def test_files_named_with_two_underscores_are_read_and_such_folders_are_skipped(tmp_path):
    _touch(tmp_path, "a/__cover.png", "a/ok.png", "a/.thumb.png", "__MACOSX/a/._ok.png", "a/__pycache__/x.png")
    assert [(s.id, s.label) for s in iter_folder(str(tmp_path))] == [("a/__cover.png", None), ("a/ok.png", None)]


def test_flat_folder_and_split_folders_get_no_label(tmp_path):
    _touch(tmp_path, "a.jpg", "b.mp3")
    assert [(s.id, s.label) for s in iter_folder(str(tmp_path))] == [("a.jpg", None), ("b.mp3", None)]
    split_root = tmp_path / "splits"
    _touch(split_root, "train/a.jpg", "test/b.jpg")
    got = [(s.id, s.label, s.meta) for s in iter_folder(str(split_root))]
    assert got == [("test/b.jpg", None, {"split": "test"}), ("train/a.jpg", None, {"split": "train"})]


def test_allow_outside_in_metadata(tmp_path):
    root = tmp_path / "root"
    _touch(root, "x.jpg")
    (root / "metadata.jsonl").write_text('{"file_name": "../y.jpg"}\n')
    sample, unnamed = iter_folder(str(root), SourceConfig(folder=str(root), allow_outside=True))
    assert sample.image.uri == str(tmp_path / "y.jpg")
    assert (unnamed.id, unnamed.reason) == ("x.jpg", "read.not_in_metadata")


def test_broken_symlinks_and_loops_are_listed_so_they_become_rejects(tmp_path):
    _touch(tmp_path, "cat/1.jpg", "dog/2.jpg")
    (tmp_path / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "dog" / "loop.jpg").symlink_to(tmp_path / "dog" / "loop.jpg")
    got = [(s.id, s.label) for s in iter_folder(str(tmp_path))]
    assert got == [("cat/1.jpg", "cat"), ("cat/gone.jpg", "cat"), ("dog/2.jpg", "dog"), ("dog/loop.jpg", "dog")]


def test_less_common_media_extensions_and_unknown_files_without_metadata(tmp_path):
    _touch(
        tmp_path,
        *("cats/a.jpg", "cats/b.jfif", "cats/c.avif", "cats/d.pjpeg", "dogs/e.tga", "dogs/f.jp2"),
        *("dogs/g.aiff", "dogs/h.au", "dogs/i.caf", "dogs/j.HEIC", "dogs/LICENSE", "cats/Thumbs.db"),
        *("dogs/desktop.ini", "cats/.DS_Store", "cats/._b.jfif"),
    )
    items = list(iter_folder(str(tmp_path)))
    samples = [(s.id, s.label, s.present()) for s in items if isinstance(s, RawSample)]
    assert samples == [
        ("cats/a.jpg", "cats", ["image"]),
        ("cats/b.jfif", "cats", ["image"]),
        ("cats/c.avif", "cats", ["image"]),
        ("cats/d.pjpeg", "cats", ["image"]),
        ("dogs/e.tga", "dogs", ["image"]),
        ("dogs/f.jp2", "dogs", ["image"]),
        ("dogs/g.aiff", "dogs", ["audio"]),
        ("dogs/h.au", "dogs", ["audio"]),
        ("dogs/i.caf", "dogs", ["audio"]),
    ]
    rejects = [(r.id, r.reason, r.source, r.detail) for r in items if isinstance(r, Reject)]
    assert rejects == [
        ("dogs/LICENSE", "read.unsupported_file", "dogs/LICENSE",
         "dogs/LICENSE: not read as a sample (it has no extension)"),
        ("dogs/j.HEIC", "read.unsupported_file", "dogs/j.HEIC",
         "dogs/j.HEIC: not read as a sample (it is an image format mbm does not decode ('.heic'): convert it to "
         "JPEG or PNG first)"),
    ]


def test_every_listed_extension_decodes(tmp_path):
    """The extension tables claim only what the cleaners decode in this environment."""
    import io

    import numpy as np
    import soundfile as sf
    from PIL import Image

    from pipelines.clean.audio import AudioCleanConfig, clean_audio
    from pipelines.clean.image import ImageCleanConfig, clean_image
    from pipelines.readers.common import AUDIO_EXTS, IMAGE_EXTS
    from tests.support.media_synth import HAND_WRITTEN, written_by_hand

    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    picture = Image.fromarray(rgb)
    formats = Image.registered_extensions()
    for ext in sorted(IMAGE_EXTS):
        if ext in HAND_WRITTEN:
            data = written_by_hand(ext, rgb)
        else:
            buf = io.BytesIO()
            mode = {"pbm": "L", "pgm": "L", "pfm": "L", "xbm": "1", "msp": "1", "blp": "P"}.get(ext, "RGB")
            picture.convert(mode).save(buf, formats.get(f".{ext}", "JPEG"))
            data = buf.getvalue()
        resized = {"icns": (1024, 1024), "ico": (32, 26)}  # the sizes those formats store
        assert Image.open(io.BytesIO(data)).size == resized.get(ext, (50, 40)), ext
        assert clean_image(data, ImageCleanConfig()).shape == (224, 224, 3), ext
    for ext in ("cur", "dcx", "psd", "ras", "gbr"):  # lossless: the pixels come back as written
        assert (np.asarray(Image.open(io.BytesIO(written_by_hand(ext, rgb))).convert("RGB")) == rgb).all(), ext
    tone = (0.3 * np.sin(np.arange(48000) / 5)).astype(np.float32)
    writers = {"wav": "WAV", "wavex": "WAVEX", "flac": "FLAC", "ogg": "OGG", "oga": "OGG", "opus": "OGG/OPUS",
               "mp3": "MP3", "aiff": "AIFF", "aif": "AIFF", "aifc": "AIFF", "au": "AU", "snd": "AU",
               "caf": "CAF", "w64": "W64", "rf64": "RF64", "voc": "VOC", "sph": "NIST", "nist": "NIST",
               "avr": "AVR/PCM_16", "htk": "HTK", "ircam": "IRCAM", "mat4": "MAT4", "mat5": "MAT5",
               "mpc2k": "MPC2K", "paf": "PAF", "pvf": "PVF", "sds": "SDS", "svx": "SVX", "wve": "WVE",
               "xi": "XI"}
    assert set(writers) == AUDIO_EXTS
    for ext, writer in writers.items():
        buf = io.BytesIO()
        fmt, _, subtype = writer.partition("/")
        sf.write(buf, tone, 48000, format=fmt, subtype=subtype or None)
        with sf.SoundFile(io.BytesIO(buf.getvalue())) as f:
            assert f.format == fmt, ext
        assert len(clean_audio(buf.getvalue(), AudioCleanConfig())) > 4000, ext


def test_unreadable_metadata_parquet_is_one_reject_and_the_rest_is_read(tmp_path):
    _touch(tmp_path, "a.png", "sub/b.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n')
    (tmp_path / "sub" / "metadata.parquet").write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1")
    sample, unreadable, unnamed = iter_folder(str(tmp_path))
    assert (sample.id, sample.text) == ("a.png", "ok")
    assert (unreadable.id, unreadable.reason, unreadable.source) == (
        "sub/metadata.parquet", "read.unreadable", "sub/metadata.parquet"
    )
    assert unreadable.detail.startswith("sub/metadata.parquet: cannot read the file (ArrowInvalid: ")
    assert " at 0x" not in unreadable.detail
    assert (unnamed.id, unnamed.reason, unnamed.detail) == (  # its row, if it had one, was lost
        "sub/b.png",
        "read.not_in_metadata",
        "sub/b.png: not read as a sample: no row of sub/metadata.parquet names it (some of its rows could "
        "not be read: see their rejects); add a row with file_name 'b.png' there, or move the file out "
        "of the dataset folder",
    )


def test_media_files_no_metadata_row_names_are_rejects(tmp_path):
    _touch(
        tmp_path,
        *("a.jpg", "train/t0.jpg", "train/t1.jpg", "train/deep/t2.wav", "train/unlisted.jpg"),
        *("train/deep/stray.flac", "test/u0.jpg", "README.md", "train/notes.txt", "train/Thumbs.db"),
        *("train/.hidden.jpg", "test/._u0.jpg", "test/photo.heic"),
    )
    rows = ["t0.jpg", "./t1.jpg", "deep/../deep/t2.wav", "gone.jpg"]  # named, however the path is spelled
    lines = "".join(json.dumps({"file_name": r}) + "\n" for r in rows)
    (tmp_path / "train" / "metadata.jsonl").write_text(lines)
    items = list(iter_folder(str(tmp_path)))
    samples = [s.id for s in items if isinstance(s, RawSample)]
    assert samples == ["train/t0.jpg", "train/./t1.jpg", "train/deep/../deep/t2.wav", "train/gone.jpg"]
    rejects = [(r.id, r.reason, r.source, r.detail) for r in items if isinstance(r, Reject)]
    uncovered = (
        "not read as a sample: no metadata file covers its folder ({}), and with metadata "
        "(train/metadata.jsonl) only the files their rows name are read; add a metadata file there with a "
        "row for it, or move the file out of the dataset folder"
    )
    covered = (
        "not read as a sample: no row of train/metadata.jsonl names it; add a row with file_name {!r} "
        "there, or move the file out of the dataset folder"
    )
    assert rejects == [  # README.md, notes.txt, .heic, hidden and clutter files are no samples: left alone
        ("a.jpg", "read.not_in_metadata", "a.jpg", "a.jpg: " + uncovered.format("the dataset root")),
        ("test/u0.jpg", "read.not_in_metadata", "test/u0.jpg", "test/u0.jpg: " + uncovered.format("test")),
        ("train/deep/stray.flac", "read.not_in_metadata", "train/deep/stray.flac",
         "train/deep/stray.flac: " + covered.format("deep/stray.flac")),
        ("train/unlisted.jpg", "read.not_in_metadata", "train/unlisted.jpg",
         "train/unlisted.jpg: " + covered.format("unlisted.jpg")),
    ]
    (tmp_path / "metadata.csv").write_text("file_name\na.jpg\n")  # covers test/ too, from the root
    rejects = [(r.id, r.detail) for r in iter_folder(str(tmp_path)) if isinstance(r, Reject)]
    assert rejects[0] == (
        "test/u0.jpg",
        "test/u0.jpg: not read as a sample: no row of metadata.csv names it; add a row with file_name "
        "'test/u0.jpg' there, or move the file out of the dataset folder",
    )
    assert [i for i, _ in rejects] == ["test/u0.jpg", "train/deep/stray.flac", "train/unlisted.jpg"]


def test_a_file_named_only_by_a_rejected_row_gets_no_second_reject(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    rows = [{"file_name": "a.jpg", "text": 3}, {"file_name": "b.jpg"}, {"file_name": "./b.jpg"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [(i.id, getattr(i, "reason", "ok")) for i in iter_folder(str(tmp_path))]
    assert got == [
        ("a.jpg", "read.bad_type"), ("b.jpg", "ok"), ("./b.jpg", "ok"), ("c.jpg", "read.not_in_metadata")
    ]


def test_a_text_file_beside_a_media_file_is_its_text(tmp_path):
    root = tmp_path / "kohya"
    _touch(root, "a.png", "a.heic", "b.jpg", "b.txt", "c.wav", "c.png", "sub/a.txt", "d.jpg", "d.TXT", "d.txt")
    _touch(root, "e.png")
    (root / "a.txt").write_bytes(b"caf\xe9 au lait")  # bytes as they are: the text cleaner decodes them
    (root / "c.txt").write_bytes(b"one text for both")
    (root / "e.txt").write_bytes(b"")
    items = list(iter_folder(str(root)))
    samples = [(s.id, s.text, s.present()) for s in items if isinstance(s, RawSample)]
    assert samples == [
        ("a.png", b"caf\xe9 au lait", ["text", "image"]),
        ("b.jpg", b"x", ["text", "image"]),
        ("c.png", b"one text for both", ["text", "image"]),
        ("c.wav", b"one text for both", ["text", "audio"]),
        ("d.jpg", b"x", ["text", "image"]),
        ("e.png", None, ["image"]),  # an empty text file: no text, as for an empty .txt member of a tar
    ]
    rejects = [(r.id, r.reason, r.detail) for r in items if isinstance(r, Reject)]
    assert rejects == [
        ("a.heic", "read.unsupported_file",
         "a.heic: not read as a sample (it is an image format mbm does not decode ('.heic'): convert it to JPEG "
         "or PNG first)"),
        ("d.txt", "read.unsupported_file",
         "d.txt: not read as a sample "
         "(d.TXT already holds the text of the image or audio files named 'd.*')"),
        ("sub/a.txt", "read.unsupported_file",
         "sub/a.txt: not read as a sample "
         "(no image or audio file named 'a.*' beside it, whose text it would be)"),
    ]


def test_a_text_file_that_cannot_be_read_is_its_own_reject_and_its_sample_is_kept(tmp_path):
    """As for a .json beside it: a broken link or a pipe in place of a caption does not cost the image."""
    _touch(tmp_path, "a.jpg", "b.jpg", "b.txt", "c.png", "c.wav")
    (tmp_path / "a.txt").symlink_to(tmp_path / "nowhere.txt")
    os.mkfifo(tmp_path / "c.txt")  # one reject for both files
    items = list(iter_folder(str(tmp_path)))
    samples = [(s.id, s.text, s.present()) for s in items if isinstance(s, RawSample)]
    assert samples == [
        ("a.jpg", None, ["image"]),
        ("b.jpg", b"x", ["text", "image"]),
        ("c.png", None, ["image"]),
        ("c.wav", None, ["audio"]),
    ]
    rejects = [(r.id, r.reason, r.source, r.detail) for r in items if isinstance(r, Reject)]
    kept = "; the image or audio files named '{}.*' beside it are read without this text: fix the file, or remove it"
    assert rejects == [
        ("a.txt", "file.missing", "a.txt", f"a.txt cannot be read ({tmp_path}/a.txt does not exist)" + kept.format("a")),
        ("c.txt", "file.unreadable", "c.txt",
         f"c.txt cannot be read ({tmp_path}/c.txt is a named pipe, not a regular file)" + kept.format("c")),
    ]


def test_a_changed_text_file_changes_the_text_hash_only(tmp_path):
    from pipelines.clean.audio import AudioCleanConfig
    from pipelines.clean.image import ImageCleanConfig
    from pipelines.clean.text import TextCleanConfig
    from pipelines.cleaning import load_raw

    config = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig())
    _touch(tmp_path, "a.jpg")
    (tmp_path / "a.txt").write_text("a cat")
    (before,) = iter_folder(str(tmp_path))
    (tmp_path / "a.txt").write_text("a black cat")
    (after,) = iter_folder(str(tmp_path))
    _, old = load_raw(before, config)
    _, new = load_raw(after, config)
    assert (old["image"] == new["image"], old["text"] == new["text"]) == (True, False)


def _img2dataset_files(root, shards, status="success"):
    """img2dataset --output_format files: shard folders of KEY.jpg, KEY.txt, KEY.json, and each shard's
    stats and parquet beside its folder; a failed download keeps its .txt and .json only."""
    for shard, keys in shards.items():
        for key in keys:
            if status == "success":
                _touch(root, f"{shard}/{key}.jpg")
            info = {"key": key, "status": status, "url": f"http://x/{key}.jpg", "caption": f"caption {key}",
                    "width": 8}
            (root / shard).mkdir(parents=True, exist_ok=True)
            (root / shard / f"{key}.json").write_text(json.dumps(info))
            (root / shard / f"{key}.txt").write_text(f"caption {key}")
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": len(keys)}))
        (root / f"{shard}.parquet").write_bytes(b"PAR1")


def test_img2dataset_files_output_reads_each_json_as_its_samples_metadata(tmp_path):
    root = tmp_path / "i2d"
    _img2dataset_files(root, {"00000": ["000000000", "000000001"], "00001": ["000010000"]})
    _img2dataset_files(root, {"00001": ["000010001"]}, status="failed_to_download")
    (root / "00000" / "000000001.txt").unlink()  # no .txt: the json's caption is the text, as in a tar
    items = list(iter_folder(str(root)))
    samples = [(s.id, s.text, s.label, s.meta, s.source) for s in items if isinstance(s, RawSample)]
    assert samples == [  # shard folders, not classes: no label
        (f"{shard}/{key}.jpg", text, None, {"status": "success", "url": f"http://x/{key}.jpg", "width": 8},
         f"{shard}/{key}.jpg")
        for shard, key, text in [
            ("00000", "000000000", b"caption 000000000"),
            ("00000", "000000001", "caption 000000001"),
            ("00001", "000010000", b"caption 000010000"),
        ]
    ]
    rejects = [(r.id, r.reason, r.detail) for r in items if isinstance(r, Reject)]
    parquet = "{}: not read as a sample ('.parquet' is not an image or audio extension mbm reads)"
    whose = "{}: not read as a sample (no image or audio file named '{}.*' beside it, whose {} it would be)"
    assert rejects == [  # one row per shard for its stats and parquet, and two for the failed download
        ("00000.parquet", "read.unsupported_file", parquet.format("00000.parquet")),
        ("00000_stats.json", "read.unsupported_file",
         whose.format("00000_stats.json", "00000_stats", "metadata")),
        ("00001.parquet", "read.unsupported_file", parquet.format("00001.parquet")),
        ("00001/000010001.json", "read.unsupported_file",
         whose.format("00001/000010001.json", "000010001", "metadata")),
        ("00001/000010001.txt", "read.unsupported_file",
         whose.format("00001/000010001.txt", "000010001", "text")),
        ("00001_stats.json", "read.unsupported_file",
         whose.format("00001_stats.json", "00001_stats", "metadata")),
    ]


def test_folders_are_img2dataset_shards_by_their_names(tmp_path, caplog):
    """img2dataset numbers its shard folders with five digits or more; its files beside the images do not
    make other folders shards: images downloaded by it and sorted into classes keep their labels, and a
    shard missing a .json does not turn the shard numbers into labels."""
    sorted_ = tmp_path / "sorted"
    _img2dataset_files(sorted_, {"cats": ["000000000"], "dogs": ["000000001"]})
    mnist = tmp_path / "mnist"
    _img2dataset_files(mnist, {"0": ["a"], "1": ["b"]})
    years = tmp_path / "years"
    _touch(years, "2019/a.png", "2020/b.png")
    shards = tmp_path / "shards"
    _img2dataset_files(shards, {"00000": ["000000000"], "00001": ["000010000"]})
    (shards / "00001" / "000010000.json").unlink()
    widths = tmp_path / "widths"
    _touch(widths, "00000/a.png", "000001/b.png")

    def labels(root):
        return [(s.id, s.label) for s in iter_folder(str(root)) if isinstance(s, RawSample)]

    with caplog.at_level(logging.INFO, logger="pipelines.readers.folder"):
        assert labels(sorted_) == [("cats/000000000.jpg", "cats"), ("dogs/000000001.jpg", "dogs")]
        assert labels(mnist) == [("0/a.jpg", "0"), ("1/b.jpg", "1")]
        assert labels(years) == [("2019/a.png", "2019"), ("2020/b.png", "2020")]
        assert labels(widths) == [("00000/a.png", "00000"), ("000001/b.png", "000001")]
        assert caplog.messages == []
        assert labels(shards) == [("00000/000000000.jpg", None), ("00001/000010000.jpg", None)]
    assert caplog.messages == [
        f"folder {str(shards)!r}: its folders (00000, 00001) are numbered as img2dataset numbers its shards, so "
        "they are read as shards, not classes, and give no label; to label by folder, name the folders by class"
    ]


def test_a_json_file_that_cannot_be_used_is_its_own_reject_and_its_sample_is_kept(tmp_path):
    _touch(tmp_path, "a.png", "b.png", "c.png", "c.wav", "d.png", "e.png", "f.png")
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text("[1, 2]")
    (tmp_path / "c.json").write_text(json.dumps({"caption": 3, "lang": "en"}))  # one reject for both files
    (tmp_path / "d.json").write_text(json.dumps({"caption": "from json", "label": "cat", "n": {"k": [1]}}))
    (tmp_path / "e.json").write_bytes(b"")
    (tmp_path / "f.json").symlink_to(tmp_path / "nowhere.json")
    items = list(iter_folder(str(tmp_path)))
    samples = [(s.id, s.text, s.label, s.meta) for s in items if isinstance(s, RawSample)]
    assert samples == [
        ("a.png", None, None, {}),
        ("b.png", None, None, {}),
        ("c.png", None, None, {}),
        ("c.wav", None, None, {}),
        ("d.png", "from json", "cat", {"n": {"k": [1]}}),
        ("e.png", None, None, {}),
        ("f.png", None, None, {}),
    ]
    rejects = [(r.id, r.reason, r.source, r.detail) for r in items if isinstance(r, Reject)]
    kept = "; the image or audio files named '{}.*' beside it are read without it: fix the file, or remove it"
    assert rejects == [
        ("a.json", "read.bad_json", "a.json",
         "a.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
         "(char 1))" + kept.format("a")),
        ("b.json", "read.bad_json", "b.json",
         "b.json holds a JSON list, expected an object" + kept.format("b")),
        ("c.json", "read.bad_type", "c.json",
         "c.json: json 'caption' is int 3, expected a string" + kept.format("c")),
        ("e.json", "read.bad_json", "e.json",
         "e.json is not valid JSON (Expecting value: line 1 column 1 (char 0))" + kept.format("e")),
        ("f.json", "file.missing", "f.json",
         f"f.json cannot be read ({tmp_path}/f.json does not exist)" + kept.format("f")),
    ]


def test_a_file_in_a_symlinked_folder_is_named_by_its_real_path(tmp_path):
    """The walk lists a file under its real folder's path; a row naming it through a link names it too:
    a read.not_in_metadata row for it would advise adding a second sample of the same file."""
    _touch(tmp_path, "real/r.png", "real/unnamed.png")
    (tmp_path / "link").symlink_to("real")  # sorts first, but is not walked
    (tmp_path / "z").symlink_to("real")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "real/r.png", "text": "a red square"}\n')
    items = list(iter_folder(str(tmp_path)))
    assert [(i.id, getattr(i, "reason", "ok")) for i in items] == [
        ("real/r.png", "ok"), ("real/unnamed.png", "read.not_in_metadata")
    ]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "z/r.png"}\n{"file_name": "link/unnamed.png"}\n')
    assert [(i.id, getattr(i, "reason", "ok")) for i in iter_folder(str(tmp_path))] == [
        ("z/r.png", "ok"), ("link/unnamed.png", "ok")
    ]


@pytest.mark.parametrize("name, write, message", [
    ("metadata.csv", lambda p: p.write_text("filename,text\nim0.png,a\n"),
     r"it has no 'file_name' column \(columns: 'filename', 'text'\); did you mean 'file_name' \(not 'filename'\)\?"),
    ("train/metadata.csv", lambda p: p.write_text("File_Name,file name,caption\n"),
     r"it has no 'file_name' column \(columns: 'File_Name', 'file name', 'caption'\); did you mean 'file_name' "
     r"\(not 'File_Name' or 'file name'\)\?"),
    ("metadata.jsonl", lambda p: p.write_text('{"image": "a.png"}\n{"path": "b.png", "text": "b"}\n'),
     r"none of its first 2 rows has 'file_name' \(keys found: 'image', 'path', 'text'\); did you mean "
     r"'file_name' \(not 'image' or 'path'\)\?"),
    ("metadata.parquet", lambda p: pq.write_table(pa.table({"label": ["cat"]}), p),
     r"it has no 'file_name' column \(columns: 'label'\); each row"),
])
def test_config_refuses_a_metadata_file_without_file_name(tmp_path, name, write, message):
    """Every row would be read.missing_id and every file read.not_in_metadata, in an empty version. A file
    that cannot be told (a cut Parquet file) is left to the readers' rejects."""
    _touch(tmp_path, "im0.png", "a/metadata.parquet")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "im0.png"}\n')
    (tmp_path / name).parent.mkdir(exist_ok=True)
    write(tmp_path / name)
    where = f"[input] folder metadata file {os.path.join(str(tmp_path), name)!r}: "
    with pytest.raises(ValueError, match=f"^{re.escape(where)}{message}"):
        SourceConfig(folder=str(tmp_path))


def test_a_metadata_file_without_file_name_exits_2_naming_it(tmp_path, capsys):
    _touch(tmp_path, "data/im0.png")
    (tmp_path / "data" / "metadata.csv").write_text("filename,text\nim0.png,a cat\n")
    (tmp_path / "job.toml").write_text('[input]\nfolder = "data"\n[output]\ndir = "out"\n')
    assert main(["preprocess", str(tmp_path / "job.toml")]) == 2
    err = capsys.readouterr().err
    assert f"metadata file '{tmp_path}/data/metadata.csv': it has no 'file_name' column (columns: 'filename', " \
        "'text'); did you mean 'file_name' (not 'filename')? column names are matched exactly; each row names " \
        "its image or audio file by 'file_name'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body", [b"", b"  \n\n", b"\xef\xbb\xbf\n"])
def test_config_refuses_an_empty_metadata_file(tmp_path, body):
    """A metadata file cut to nothing (a failed export): a version read from it would remove every sample."""
    _touch(tmp_path, "im0.png")
    (tmp_path / "metadata.jsonl").write_bytes(body)
    with pytest.raises(ValueError, match=r"metadata file .*metadata.jsonl' is empty \(no header, no rows\)"):
        SourceConfig(folder=str(tmp_path))


def test_a_metadata_row_naming_a_file_in_the_other_unicode_form_is_its_sample(tmp_path):
    import unicodedata

    from pipelines.media import read_media

    stored = unicodedata.normalize("NFD", "café.png")  # as files made on macOS keep their names
    (tmp_path / stored).write_bytes(b"png")
    if os.listdir(tmp_path) != [stored]:
        pytest.skip("this file system normalizes file names")
    (tmp_path / "b.png").write_bytes(b"png")
    (tmp_path / "metadata.csv").write_text(f"file_name,text\n{unicodedata.normalize('NFC', 'café.png')},x\nb.png,y\n")
    items = list(iter_folder(str(tmp_path)))
    assert [type(i).__name__ for i in items] == ["RawSample", "RawSample"]  # no read.not_in_metadata for it
    assert read_media(items[0].image) == b"png"


def test_media_of_formats_mbm_does_not_decode_say_how_to_convert_them(tmp_path):
    _touch(tmp_path, "memo.m4a", "clip.webm", "raw.aac", "a.wav", "listed/b.wav", "listed/talk.M4A")
    (tmp_path / "listed" / "metadata.csv").write_text("file_name\nb.wav\ntalk.M4A\n")
    rejects = [(r.id, r.detail) for r in iter_folder(str(tmp_path / "listed")) if isinstance(r, Reject)]
    assert rejects == [("talk.M4A", "metadata.csv:3: 'talk.M4A' is an audio format mbm does not decode "
                                    "('.m4a'): convert it to FLAC or WAV first (ffmpeg -i IN -vn OUT.flac)")]
    (tmp_path / "listed" / "metadata.csv").unlink()
    (tmp_path / "listed" / "talk.M4A").unlink()
    rejects = [(r.id, r.detail) for r in iter_folder(str(tmp_path)) if isinstance(r, Reject)]
    to_flac = "convert it to FLAC or WAV first (ffmpeg -i IN -vn OUT.flac)"
    assert rejects == [
        ("clip.webm", f"clip.webm: not read as a sample (it is a video format mbm does not decode ('.webm'): "
                      f"{to_flac}, for its sound)"),
        ("memo.m4a", f"memo.m4a: not read as a sample (it is an audio format mbm does not decode ('.m4a'): {to_flac})"),
        ("raw.aac", f"raw.aac: not read as a sample (it is an audio format mbm does not decode ('.aac'): {to_flac})"),
    ]


def test_a_librispeech_transcript_is_named_with_what_to_do(tmp_path):
    _touch(tmp_path, "19/198/19-198-0000.flac", "19/198/19-198-0001.flac")
    (tmp_path / "19/198/19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0001 WORLD\n")
    items = list(iter_folder(str(tmp_path)))
    assert [(s.id, s.text) for s in items if isinstance(s, RawSample)] == [
        ("19/198/19-198-0000.flac", None), ("19/198/19-198-0001.flac", None)]
    assert [(r.id, r.reason, r.detail) for r in items if isinstance(r, Reject)] == [(
        "19/198/19-198.trans.txt", "read.unsupported_file",
        "19/198/19-198.trans.txt: not read as a sample (a LibriSpeech transcript: mbm takes a file's text from a "
        ".txt of the same name beside it, not from one file of '<id> <text>' lines; write a manifest from these "
        "lines (README: LibriSpeech))")]


def test_numbered_class_folders_without_img2dataset_files_are_classes(tmp_path, caplog):
    """GTSRB's training images lie in class folders 00000/ .. 00042/ (with a GT-00000.csv each): named as
    img2dataset names its shards, but with none of the .json files img2dataset writes beside every image or
    the NNNNN_stats.json beside every shard folder, so they are classes; they were read without labels."""
    gtsrb = tmp_path / "gtsrb"
    _touch(gtsrb, "00000/00000_00000.ppm", "00000/00000_00001.ppm", "00001/00000_00000.ppm", "00001/GT-00001.csv")
    stats_only = tmp_path / "stats_only"  # img2dataset shards whose .json files were removed
    _img2dataset_files(stats_only, {"00000": ["000000000"], "00001": ["000010000"]})
    for info in stats_only.glob("0*/*.json"):
        info.unlink()

    def labels(root):
        return [(s.id, s.label) for s in iter_folder(str(root)) if isinstance(s, RawSample)]

    with caplog.at_level(logging.INFO, logger="pipelines.readers.folder"):
        assert labels(gtsrb) == [("00000/00000_00000.ppm", "00000"), ("00000/00000_00001.ppm", "00000"),
                                 ("00001/00000_00000.ppm", "00001")]
        assert caplog.messages == []
        assert labels(stats_only) == [("00000/000000000.jpg", None), ("00001/000010000.jpg", None)]


def test_dotted_text_files_beside_a_clip_give_its_text_as_in_a_tar(tmp_path):
    """LibriTTS: utt.wav, utt.normalized.txt, utt.original.txt. The first in name order is the text, the
    others are listed in meta; a plain utt.txt with a text wins; none of them is a reject."""
    files = {"19/198/u1.wav": b"RIFF", "19/198/u1.normalized.txt": b"Hello, normalized.",
             "19/198/u1.original.txt": b"HELLO; original", "19/198/u2.wav": b"RIFF", "19/198/u2.txt": b"plain",
             "19/198/u2.en.txt": b"english", "19/198/u3.wav": b"RIFF", "19/198/u3.txt": b"",
             "19/198/u3.de.txt": b"deutsch", "19/198/v.x.txt": b"alone", "dir.v2/a.jpg": b"\xff\xd8",
             "dir.v2/a.txt": b"a caption"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    items = list(iter_folder(str(tmp_path)))
    samples = {s.id: s for s in items if isinstance(s, RawSample)}
    assert (samples["19/198/u1.wav"].text, samples["19/198/u1.wav"].meta) == (
        b"Hello, normalized.", {"unread_files": ["19/198/u1.original.txt"]})
    assert (samples["19/198/u2.wav"].text, samples["19/198/u2.wav"].meta) == (b"plain", {"unread_files": ["19/198/u2.en.txt"]})
    assert samples["19/198/u3.wav"].text == b"deutsch"  # an empty u3.txt does not hide it
    assert samples["dir.v2/a.jpg"].text == b"a caption"
    rejects = [r for r in items if isinstance(r, Reject)]
    assert [(r.id, r.reason) for r in rejects] == [("19/198/v.x.txt", "read.unsupported_file")]  # no v.* media
