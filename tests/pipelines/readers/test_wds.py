import io
import tarfile

import webdataset as wds

from pipelines.readers import iter_tar
from schemas import Media, Reject

JPG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8


def write_tar(path, samples):
    """img2dataset layout: {key}.jpg, {key}.txt, {key}.json."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def img2dataset(keys, caption="caption {}"):
    return [
        {
            "__key__": key,
            "jpg": JPG + key.encode(),
            "txt": caption.format(key),
            "json": {"key": key, "caption": caption.format(key), "url": f"http://x/{key}.jpg", "width": 8},
        }
        for key in keys
    ]


def test_img2dataset_layout(tmp_path):
    path = write_tar(tmp_path / "00000.tar", img2dataset(["000000000", "000000001"]))
    first, second = iter_tar(str(path))
    assert (first.id, first.text, first.source) == ("000000000", b"caption 000000000", "00000.tar:000000000")
    assert first.image == Media(data=JPG + b"000000000", name="000000000.jpg")
    assert first.meta == {"url": "http://x/000000000.jpg", "width": 8}
    assert first.label is None and first.audio is None
    assert second.id == "000000001"


def test_json_key_caption_label_and_cls(tmp_path):
    samples = [
        {"__key__": "k1", "png": b"png", "json": {"key": "custom-id", "caption": "from json", "label": "x"}},
        {"__key__": "k2", "flac": b"fLaC", "cls": b"7\n", "json": {"label": "ignored"}},
        {"__key__": "k3", "txt": b"caf\xe9", "cls": b"tabby"},
    ]
    a, b, c = iter_tar(str(write_tar(tmp_path / "t.tar", samples)))
    assert (a.id, a.text, a.label, a.meta, a.image.name) == ("custom-id", "from json", "x", {}, "k1.png")
    assert (b.id, b.label, b.audio) == ("k2", 7, Media(data=b"fLaC", name="k2.flac"))
    assert (c.id, c.text, c.label) == ("k3", b"caf\xe9", "tabby")


def test_bad_members_become_rejects(tmp_path):
    samples = [
        {"__key__": "a", "jpg": JPG, "json": b"{broken"},
        {"__key__": "b", "json": {"key": "b"}},
        {"__key__": "c", "jpg": JPG},
        {"__key__": "a", "jpg": JPG},
    ]
    items = list(iter_tar(str(write_tar(tmp_path / "t.tar", samples))))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("Reject", "a"),
        ("Reject", "b"),
        ("RawSample", "c"),
        ("RawSample", "a"),  # the broken first "a" claimed no id
    ]
    assert [i.reason for i in items if isinstance(i, Reject)] == ["read.bad_json", "read.no_modality"]


def test_duplicate_key_in_one_tar_keeps_first(tmp_path):
    samples = img2dataset(["x", "y"]) + img2dataset(["x"], caption="late {}")
    items = list(iter_tar(str(write_tar(tmp_path / "t.tar", samples))))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("RawSample", "x"),
        ("RawSample", "y"),
        ("Reject", "x"),
    ]
    assert items[0].text == b"caption x"
    assert items[2].reason == "read.duplicate_id" and "t.tar:x" in items[2].detail


def test_truncated_tar_keeps_samples_before_the_cut(tmp_path):
    full = write_tar(tmp_path / "full.tar", img2dataset([f"{i:03d}" for i in range(4)])).read_bytes()
    members = tarfile.open(fileobj=io.BytesIO(full)).getmembers()
    third_jpg = next(m for m in members if m.name == "002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: third_jpg.offset_data + 100])  # inside 002.jpg's data
    items = list(iter_tar(str(cut)))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("RawSample", "000"),
        ("RawSample", "001"),
        ("Reject", "cut.tar:002.jpg"),
    ]
    assert items[-1].reason == "read.corrupt_tar" and items[-1].stage == "read"


def test_cut_inside_a_header_is_damage_too(tmp_path):
    full = write_tar(tmp_path / "full.tar", img2dataset(["a", "b"])).read_bytes()
    second = next(m for m in tarfile.open(fileobj=io.BytesIO(full)).getmembers() if m.name == "b.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: second.offset + 200])  # tarfile alone would end here without a word
    items = list(iter_tar(str(cut)))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("RawSample", "a"),
        ("Reject", f"cut.tar:{second.offset}"),
    ]


def test_unopenable_tar_is_one_reject(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    (junk,) = iter_tar(str(tmp_path / "junk.tar"))
    assert (junk.id, junk.reason) == ("junk.tar:0", "read.corrupt_tar")
    (missing,) = iter_tar(str(tmp_path / "missing.tar"))
    assert (missing.id, missing.reason) == ("missing.tar:0", "read.corrupt_tar")
    assert "cannot be opened" in missing.detail


def test_gzipped_tar(tmp_path):
    plain = write_tar(tmp_path / "p.tar", img2dataset(["a"])).read_bytes()
    import gzip

    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(plain))
    (sample,) = iter_tar(str(tmp_path / "z.tar.gz"))
    assert (sample.id, sample.source) == ("a", "z.tar.gz:a")


def test_a_failed_download_says_so(tmp_path):
    samples = [{"__key__": "k", "json": {"key": "k", "status": "failed_to_download",
                                         "error_message": "HTTP Error 404: Not Found"}}]
    (item,) = iter_tar(str(write_tar(tmp_path / "t.tar", samples)))
    assert item.reason == "read.no_modality"
    assert "status 'failed_to_download': HTTP Error 404: Not Found" in item.detail


def test_undecodable_member_names_and_labels_are_escaped(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:  # raw name bytes
        for name, data in ((b"caf\xe9.jpg", JPG), (b"caf\xe9.cls", b"caf\xe8")):
            info = tarfile.TarInfo(name.decode("latin-1"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = iter_tar(str(path))
    assert (sample.id, sample.label) == ("caf\\xe9", "caf\\xe8")
