import bz2
import gzip
import io
import lzma
import pickle
import tarfile
import zlib

import pytest
import webdataset as wds

from pipelines.errors import CleanError
from pipelines.media import read_media
from pipelines.readers import iter_tar as read_tar
from schemas import Media, RawSample, Reject

JPG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8


def _held(media):
    """``media`` with its bytes in hand: the tests below compare what a sample's media hold."""
    if media is None or media.offset is None:
        return media
    return Media(data=read_media(media), name=media.name)


def iter_tar(path):
    """``read_tar``, each sample's media read (an uncompressed local tar's media stay in it: see the
    tests of ``_Range`` at the end)."""
    for item in read_tar(path):
        if isinstance(item, RawSample):
            item.image, item.audio = _held(item.image), _held(item.audio)
        yield item


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
        ("Reject", "a.json"),  # the broken json alone: its image lands
        ("RawSample", "a"),
        ("Reject", "b"),
        ("RawSample", "c"),
        ("Reject", "a"),
    ]
    assert [i.reason for i in items if isinstance(i, Reject)] == [
        "read.bad_json", "read.no_modality", "read.duplicate_id"
    ]


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


def _tar_of(path, members, mode="w"):
    """A tar of ``(name, bytes)`` in the order given."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("order", ["directory", "by kind"])
def test_a_sample_whose_members_are_apart_is_read_whole(tmp_path, order):
    """``tar cf x.tar -C dir .`` lists files in the folder's order (a hash on ext4); ``tar cf x.tar *.jpg
    *.txt`` one kind after another. webdataset reads each such sample as two, each with part of it."""
    if order == "directory":
        names = ["./0.jpg", "./1.txt", "./2.txt", "./1.jpg", "./0.txt", "./2.jpg", "./3.txt", "./3.jpg"]
    else:
        names = [f"./{k}.jpg" for k in range(4)] + [f"./{k}.txt" for k in range(4)]
    data = {name: (JPG + name.encode() if name.endswith(".jpg") else f"caption of {name}".encode()) for name in names}
    path = _tar_of(tmp_path / "t.tar", [(name, data[name]) for name in names])
    items = list(iter_tar(str(path)))
    assert all(isinstance(i, RawSample) for i in items)
    assert [i.id for i in items] == ["./0", "./1", "./2", "./3"]  # in the order their first members came
    for i in items:
        assert i.text == data[f"{i.id}.txt"] and i.image == Media(data=data[f"{i.id}.jpg"], name=f"{i.id}.jpg")
    # compressed: the same, its members' bytes held to join them
    gz = _tar_of(tmp_path / "t.tar.gz", [(name, data[name]) for name in names], "w:gz")
    assert [(i.id, i.text) for i in iter_tar(str(gz))] == [(i.id, i.text) for i in items]


def test_members_further_apart_than_the_bytes_held_are_a_reject_naming_the_fix(tmp_path):
    from pipelines.readers import wds as wds_reader

    names = [f"{k}.txt" for k in range(6)] + [f"{k}.jpg" for k in range(6)]
    path = _tar_of(tmp_path / "t.tar.gz", [(n, JPG if n.endswith("jpg") else b"x" * 100) for n in names], "w:gz")
    groups = list(wds_reader._joined(wds_reader._groups(str(path), "t.tar.gz"), "t.tar.gz", budget=350))
    kept = [(key, sorted(group)) for key, group in groups if not isinstance(group, Reject)]
    rejects = [group for _, group in groups if isinstance(group, Reject)]
    # three captions held at a time: 0-2 went on alone, 3-5 were still held when their images came
    assert kept == [("0", ["txt"]), ("1", ["txt"]), ("2", ["txt"]), ("3", ["jpg", "txt"]), ("4", ["jpg", "txt"]),
                    ("5", ["jpg", "txt"])]
    assert [(r.id, r.reason, r.source) for r in rejects] == [
        ("0", "read.split_sample", "t.tar.gz:0.jpg"), ("1", "read.split_sample", "t.tar.gz:1.jpg"),
        ("2", "read.split_sample", "t.tar.gz:2.jpg")]
    assert rejects[0].detail == (
        "t.tar.gz: '0.jpg' of sample '0' comes after more than 350 bytes (or 100,000 samples) of other samples' members, so "
        "the sample "
        "was read without it: write the tar with each sample's files together (GNU tar: tar --sort=name -cf "
        "x.tar -C folder .), or uncompressed (a local .tar's media count nothing here)")


def test_a_key_that_comes_back_with_a_member_kind_it_had_is_a_duplicate(tmp_path):
    path = _tar_of(tmp_path / "t.tar", [("a.jpg", JPG), ("b.txt", b"b"), ("a.txt", b"a"), ("c.txt", b"c"),
                                        ("a.jpg", JPG + b"2")])
    a, b, c, dup = iter_tar(str(path))
    assert (a.id, a.text, a.image.data, b.id, c.id) == ("a", b"a", JPG, "b", "c")  # a.txt joined a.jpg
    assert (dup.id, dup.reason) == ("a", "read.duplicate_id")  # a second a.jpg: not joined


def test_a_second_member_of_a_kind_the_sample_has_is_listed_as_unread(tmp_path):
    # a.JPG beside a.jpg, b.TXT beside b.txt, and c.txt added again (tar -r) while c is the last sample:
    # the first of each is read, the other kept in meta, not dropped unseen
    path = _tar_of(tmp_path / "t.tar", [("a.jpg", JPG), ("a.JPG", JPG + b"2"), ("a.txt", b"a"),
                                        ("b.jpg", JPG), ("b.txt", b"b"), ("b.TXT", b"other b"),
                                        ("c.jpg", JPG), ("c.txt", b"old c"), ("c.txt", b"new c")])
    a, b, c = iter_tar(str(path))
    assert (a.image.data, a.text, a.meta) == (JPG, b"a", {"unread_members": ["a.JPG"]})
    assert (b.text, b.meta) == (b"b", {"unread_members": ["b.TXT"]})
    assert (c.text, c.meta) == (b"old c", {"unread_members": ["c.txt"]})
    only, = iter_tar(str(_tar_of(tmp_path / "d.tar", [("d.en.txt", b"en"), ("d.EN.txt", b"EN")])))
    assert (only.text, only.meta) == (b"en", {"unread_members": ["d.EN.txt"]})  # one dotted text, the other kept


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


def test_a_sample_with_fewer_members_before_the_cut_one_is_whole(tmp_path):
    samples = img2dataset(["s0", "s1", "s2"])
    del samples[1]["json"]  # s1 has jpg and txt only
    full = write_tar(tmp_path / "full.tar", samples).read_bytes()
    third_jpg = next(m for m in tarfile.open(fileobj=io.BytesIO(full)).getmembers() if m.name == "s2.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: third_jpg.offset_data + 100])  # s2.jpg's header was read: s1 had ended
    items = list(iter_tar(str(cut)))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("RawSample", "s0"), ("RawSample", "s1"), ("Reject", "cut.tar:s2.jpg")]
    assert "incomplete sample" not in items[-1].detail


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


def _add(tar, name, data=None, *, link=None, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    if link is not None:
        info.linkname = link
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def test_hard_links_and_symlinks_read_as_their_targets(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "d/a.jpg", JPG + b"a")
        _add(tar, "d/a.txt", b"caption a")
        _add(tar, "d/b.jpg", link="d/a.jpg", kind=tarfile.LNKTYPE)  # tar's hard link: the archive path
        _add(tar, "d/c.jpg", link="a.jpg", kind=tarfile.SYMTYPE)  # relative to the link's folder
        _add(tar, "d/e.jpg", link="c.jpg", kind=tarfile.SYMTYPE)  # a link to a link
        _add(tar, "d/f.jpg", link="g.jpg", kind=tarfile.SYMTYPE)  # a target further on
        _add(tar, "d/g.jpg", JPG + b"g")
    items = list(iter_tar(str(path)))
    assert [(type(i).__name__, i.id) for i in items] == [("RawSample", f"d/{k}") for k in "abcefg"]
    by_id = {i.id: i for i in items}
    assert by_id["d/a"].text == b"caption a"
    for k in "bce":
        assert by_id[f"d/{k}"].image == Media(data=JPG + b"a", name=f"d/{k}.jpg")
    assert by_id["d/f"].image == Media(data=JPG + b"g", name="d/f.jpg")


def test_links_to_nothing_are_rejects_naming_the_link(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", JPG)
        _add(tar, "out.jpg", link="../secret.jpg", kind=tarfile.SYMTYPE)
        _add(tar, "abs.jpg", link="/etc/hostname", kind=tarfile.SYMTYPE)
        _add(tar, "early.jpg", link="late.jpg", kind=tarfile.LNKTYPE)  # a hard link only looks back
        _add(tar, "late.jpg", JPG)
        _add(tar, "x.jpg", link="y.jpg", kind=tarfile.SYMTYPE)
        _add(tar, "y.jpg", link="x.jpg", kind=tarfile.SYMTYPE)
        _add(tar, "sub", kind=tarfile.DIRTYPE)
        _add(tar, "dir.jpg", link="sub", kind=tarfile.SYMTYPE)
        _add(tar, "z.jpg", JPG)
    items = list(iter_tar(str(path)))
    assert [(type(i).__name__, i.id) for i in items] == [
        ("RawSample", "a"),
        ("Reject", "out"),
        ("Reject", "abs"),
        ("Reject", "early"),
        ("RawSample", "late"),
        ("Reject", "x"),
        ("Reject", "y"),
        ("Reject", "dir"),
        ("RawSample", "z"),
    ]
    rejects = [i for i in items if isinstance(i, Reject)]
    assert {r.reason for r in rejects} == {"read.unreadable"}
    assert [r.detail for r in rejects] == [
        "t.tar:out: member 'out.jpg' is a symlink to '../secret.jpg', which is not in the tar",
        "t.tar:abs: member 'abs.jpg' is a symlink to '/etc/hostname', which is not in the tar",
        "t.tar:early: member 'early.jpg' is a hard link to 'late.jpg', which is not in the tar",
        "t.tar:x: member 'x.jpg' is a symlink to 'y.jpg', which leads back to itself",
        "t.tar:y: member 'y.jpg' is a symlink to 'x.jpg', which leads back to itself",
        "t.tar:dir: member 'dir.jpg' is a symlink to 'sub', which is not a file",
    ]


def test_a_link_in_a_gzipped_tar(tmp_path):
    import gzip

    plain = tmp_path / "p.tar"
    with tarfile.open(plain, "w") as tar:
        _add(tar, "a.jpg", JPG)
        _add(tar, "b.jpg", link="a.jpg", kind=tarfile.LNKTYPE)
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    a, b = iter_tar(str(tmp_path / "z.tar.gz"))
    assert (b.id, b.image) == ("b", Media(data=JPG, name="b.jpg"))


def test_concatenated_tars_are_read_to_the_end(tmp_path):
    import gzip

    first = write_tar(tmp_path / "a.tar", img2dataset(["a0", "a1"])).read_bytes()
    second = write_tar(tmp_path / "b.tar", img2dataset(["b0", "b1"])).read_bytes()
    (tmp_path / "ab.tar").write_bytes(first + second)
    (tmp_path / "ab.tar.gz").write_bytes(gzip.compress(first + second))
    for name in ("ab.tar", "ab.tar.gz"):
        items = list(iter_tar(str(tmp_path / name)))
        assert [(type(i).__name__, i.id) for i in items] == [("RawSample", k) for k in ("a0", "a1", "b0", "b1")]


def test_damage_after_an_end_of_archive_marker_is_still_damage(tmp_path):
    first = write_tar(tmp_path / "a.tar", img2dataset(["a0"])).read_bytes()
    second = write_tar(tmp_path / "b.tar", img2dataset(["b0", "b1"])).read_bytes()
    b1 = next(m for m in tarfile.open(fileobj=io.BytesIO(second)) if m.name == "b1.jpg")
    (tmp_path / "cut.tar").write_bytes(first + second[: b1.offset_data + 10])
    (tmp_path / "junk.tar").write_bytes(first + b"not a tar header at all " * 100)
    (tmp_path / "padding.tar").write_bytes(first[:-100])  # cut inside the zero blocks at its end
    cut = list(iter_tar(str(tmp_path / "cut.tar")))
    assert [(type(i).__name__, i.id) for i in cut] == [
        ("RawSample", "a0"), ("RawSample", "b0"), ("Reject", "cut.tar:b1.jpg")
    ]
    junk = list(iter_tar(str(tmp_path / "junk.tar")))
    assert [(type(i).__name__, i.id) for i in junk] == [
        ("RawSample", "a0"), ("Reject", f"junk.tar:{len(first)}")
    ]
    assert junk[-1].reason == "read.corrupt_tar" and "InvalidHeaderError" in junk[-1].detail
    assert [i.id for i in iter_tar(str(tmp_path / "padding.tar"))] == ["a0"]


def test_a_non_empty_member_is_preferred_for_a_modality(tmp_path):
    samples = [
        {"__key__": "s1", "flac": b"", "wav": b"RIFFwav", "jpg": b"", "png": b"png"},
        {"__key__": "s2", "flac": b"", "wav": b""},
        {"__key__": "s3", "wav": b"RIFF1", "flac": b"fLaC"},
    ]
    s1, s2, s3 = iter_tar(str(write_tar(tmp_path / "t.tar", samples)))
    assert (s1.audio, s1.image) == (Media(data=b"RIFFwav", name="s1.wav"), Media(data=b"png", name="s1.png"))
    assert s2.audio == Media(data=b"", name="s2.flac")  # all empty: the first, which cleaning rejects
    assert s3.audio == Media(data=b"fLaC", name="s3.flac")  # both hold bytes: the first member, as before


def test_less_common_media_extensions(tmp_path):
    samples = [{"__key__": "a", "jfif": JPG, "aiff": b"FORM"},
               {"__key__": "b", "jp2": b"jp2", "caf": b"caff"}]
    a, b = iter_tar(str(write_tar(tmp_path / "t.tar", samples)))
    assert (a.image.name, a.audio.name, b.image.name, b.audio.name) == ("a.jfif", "a.aiff", "b.jp2", "b.caf")


def test_a_json_member_nested_too_deep_is_bad_json(tmp_path):
    deep = b'{"key": "k", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    nested = b'{"x": ' + b"[" * 101 + b"]" * 101 + b"}"
    samples = [{"__key__": "k", "jpg": JPG, "json": deep}, {"__key__": "n", "jpg": JPG, "json": nested},
               {"__key__": "ok", "jpg": JPG, "json": b'{"x": ' + b"[" * 99 + b"]" * 99 + b"}"}]
    k_json, k, n_json, n, ok = iter_tar(str(write_tar(tmp_path / "t.tar", samples)))
    assert [(r.id, r.reason) for r in (k_json, n_json)] == [("k.json", "read.bad_json"), ("n.json", "read.bad_json")]
    assert "nested more than 100 levels deep" in k_json.detail and "nested more than 100 levels deep" in n_json.detail
    assert (k.id, k.meta, n.id) == ("k", {}, "n")  # read without their json
    assert ok.id == "ok" and len(repr(ok.meta["x"])) == 198


# by suffix: how to compress a tar, and a decompressor of one stream to tell what a cut file still holds
_COMPRESSIONS = {
    "gz": (gzip.compress, lambda: zlib.decompressobj(zlib.MAX_WBITS | 16)),
    "bz2": (lambda data: bz2.compress(data, 1), bz2.BZ2Decompressor),  # 100 kB blocks: a cut keeps some
    "xz": (lzma.compress, lzma.LZMADecompressor),
}


@pytest.mark.parametrize("suffix", sorted(_COMPRESSIONS))
def test_concatenated_compressed_tars_are_read_whole(tmp_path, suffix):
    compress, _ = _COMPRESSIONS[suffix]
    first = write_tar(tmp_path / "a.tar", img2dataset(["a0", "a1"])).read_bytes()
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _add(tar, "b0.jpg", JPG + b"b0")
        _add(tar, "b1.jpg", link="a0.jpg", kind=tarfile.LNKTYPE)  # into the first part
    second = (tmp_path / "b.tar").read_bytes()
    (tmp_path / f"ab.tar.{suffix}").write_bytes(compress(first) + compress(second))  # cat a.tar.gz b.tar.gz
    items = list(iter_tar(str(tmp_path / f"ab.tar.{suffix}")))
    assert [(type(i).__name__, i.id) for i in items] == [("RawSample", k) for k in ("a0", "a1", "b0", "b1")]
    assert items[2].image == Media(data=JPG + b"b0", name="b0.jpg")
    assert items[3].image == Media(data=JPG + b"a0", name="b1.jpg")


@pytest.mark.parametrize("suffix", sorted(_COMPRESSIONS))
def test_a_cut_compressed_tar_keeps_every_sample_before_the_cut(tmp_path, suffix):
    compress, decompressor = _COMPRESSIONS[suffix]
    keys = [f"{i:04d}" for i in range(1000)]  # 2 MB, several bzip2 blocks
    # small samples: several of them lie in the last 10 kB before the cut, which tarfile reads at once
    plain = write_tar(tmp_path / "t.tar", [{"__key__": k, "txt": f"caption {k}"} for k in keys]).read_bytes()
    data = compress(plain)
    cut = data[: len(data) // 2]
    held = len(decompressor().decompress(cut))  # the tar bytes the cut file still holds
    members = tarfile.open(fileobj=io.BytesIO(plain)).getmembers()
    whole = [k for k in keys if all(m.offset_data + m.size <= held for m in members if m.name.startswith(f"{k}."))]
    assert 0 < len(whole) < len(keys)
    (tmp_path / f"cut.tar.{suffix}").write_bytes(cut)
    *samples, damage = iter_tar(str(tmp_path / f"cut.tar.{suffix}"))
    assert [s.id for s in samples] == whole
    assert damage.reason == "read.corrupt_tar"
    assert damage.detail.startswith(f"cut.tar.{suffix} is damaged at ")
    assert (
        " (EOFError: Compressed file ended before the end-of-stream marker was reached); "
        "the samples before it are kept, the rest is lost"
    ) in damage.detail


def test_a_zstd_compressed_tar(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    plain = write_tar(tmp_path / "p.tar", img2dataset(["a", "b"])).read_bytes()
    (tmp_path / "z.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    assert [s.id for s in iter_tar(str(tmp_path / "z.tar.zst"))] == ["a", "b"]


def test_dots_in_a_key_are_named_in_the_reject(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("photo.2019.01", "photo.2019.02"):  # scraped names: one key, "photo", for webdataset
            _add(tar, f"{key}.jpg", JPG)
            _add(tar, f"{key}.txt", b"a caption")
        _add(tar, "d/plain.jpg", JPG)
    photo, plain = iter_tar(str(path))
    assert (photo.id, photo.reason, photo.source) == ("photo", "read.no_modality", "t.tar:photo")
    assert photo.detail == (
        "t.tar:photo: a WebDataset key ends at the first dot of a file name, so 'photo.2019.01.jpg', "
        "'photo.2019.01.txt', 'photo.2019.02.jpg', 'photo.2019.02.txt' were read as one sample, key 'photo', "
        "with extensions '2019.01.jpg', '2019.01.txt', '2019.02.jpg', '2019.02.txt': most likely several "
        "files under one key, so none was used as its text, image or audio; rename the files without dots in "
        "the key (photo_2019_01.jpg, not photo.2019.01.jpg)"
    )
    assert (plain.id, plain.image) == ("d/plain", Media(data=JPG, name="d/plain.jpg"))
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tar:
        for i in range(6):
            _add(tar, f"img.{i}.png", JPG)
    (item,) = iter_tar(str(many))
    assert "'img.0.png', 'img.1.png', 'img.2.png', 'img.3.png', ... (6 in all) were read as one sample, key 'img'" in (
        item.detail
    )


def test_files_beside_the_tars_that_are_no_tars_say_so(tmp_path):
    import json

    from pipelines.readers.source import expand_shards

    write_tar(tmp_path / "00000.tar", img2dataset(["000000000"]))  # img2dataset's webdataset output
    (tmp_path / "00000.parquet").write_bytes(b"PAR1" + bytes(300) + b"PAR1")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 1}))
    (tmp_path / "empty.txt").write_bytes(b"")
    write_tar(tmp_path / "renamed.dat", img2dataset(["r"]))  # a tar by its content: read
    (tmp_path / "stats.json.gz").write_bytes(gzip.compress(b'{"n": 1}'))  # compressed, but no tar
    items = [item for path in expand_shards(f"{tmp_path}/*") for item in iter_tar(path)]
    assert [(i.id, getattr(i, "reason", "ok")) for i in items] == [
        ("00000.parquet", "read.not_a_tar"),
        ("000000000", "ok"),
        ("00000_stats.json", "read.not_a_tar"),
        ("empty.txt", "read.not_a_tar"),
        ("r", "ok"),
        ("stats.json.gz", "read.not_a_tar"),
    ]
    assert items[0].source == "00000.parquet"
    assert items[0].detail == (
        "00000.parquet is not a WebDataset tar (its name does not end in .tar, .tar.gz, ... and it does not "
        "start like a tar or a compressed tar), yet `shards` matched it; give `shards` a pattern that "
        'matches the tars only ("dir/*.tar"), or the folder itself (shards = "dir" reads its *.tar files)'
    )
    (tmp_path / "named.tar").write_text(json.dumps({"successes": 1}))
    (junk,) = iter_tar(str(tmp_path / "named.tar"))  # named a tar: damaged, as before
    assert (junk.id, junk.reason) == ("named.tar:0", "read.corrupt_tar")
    full = (tmp_path / "renamed.dat").read_bytes()
    (tmp_path / "cut.bin").write_bytes(full[:1000])  # a tar by its first header, cut short: damaged
    assert [i.reason for i in iter_tar(str(tmp_path / "cut.bin"))] == ["read.corrupt_tar"]


def test_a_member_with_a_dotted_extension_stands_in_for_a_missing_one(tmp_path):
    """A key ends at the first dot, so p.en.txt is key p with extension en.txt; beside p.jpg it is p's
    text, not silently dropped."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("p.jpg", JPG), ("p.en.txt", b"a red square"),  # the one candidate: used
            ("m.jpg", JPG), ("m.en.txt", b"english"), ("m.de.txt", b"deutsch"),  # several: first by name
            ("q.jpg", JPG), ("q.txt", b"plain"), ("q.en.txt", b"unread"),  # a plain txt wins
            ("a.en.txt", b"only dotted"), ("a.v2.wav", b"RIFF"),  # one candidate each: used
            ("j.json", b'{"width": 8}'), ("j.left.png", b"left"), ("j.right.png", b"right"),
            ("x.a.txt", b"one"), ("x.b.txt", b"two"), ("x.c.jpg", JPG),  # all dotted: the texts are ambiguous
        ]:
            _add(tar, name, data)
    p, m, q, a, j, x = iter_tar(str(path))
    assert (p.id, p.text, p.image.name, p.meta) == ("p", b"a red square", "p.jpg", {})
    assert (m.text, m.meta) == (b"deutsch", {"unread_members": ["m.en.txt"]})
    assert (q.text, q.meta) == (b"plain", {"unread_members": ["q.en.txt"]})
    assert (a.id, a.text, a.audio) == ("a", b"only dotted", Media(data=b"RIFF", name="a.v2.wav"))
    assert j.image == Media(data=b"left", name="j.left.png")
    assert j.meta == {"width": 8, "unread_members": ["j.right.png"]}
    assert (x.text, x.image.name, x.meta) == (None, "x.c.jpg", {"unread_members": ["x.a.txt", "x.b.txt"]})


def test_compressed_data_that_holds_no_tar_is_not_a_tar(tmp_path):
    """Decompressed, a first block that is neither a tar header nor zeros is no tar, unless the name
    says tar; only that block is decompressed, so a cut or huge file says the same."""
    lines = b"".join(b'{"key": "%d", "caption": "x"}\n' % i for i in range(50000))
    cut = gzip.compress(lines)
    (tmp_path / "captions.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    (tmp_path / "captions.jsonl.bz2").write_bytes(bz2.compress(lines[:100]))
    (tmp_path / "captions.tar.gz").write_bytes(gzip.compress(lines[:100]))  # named a tar: damaged
    plain = write_tar(tmp_path / "p.tar", img2dataset(["r"])).read_bytes()
    (tmp_path / "renamed.bin").write_bytes(gzip.compress(plain))  # a tar by its content: read
    (tmp_path / "empty.bin").write_bytes(gzip.compress(bytes(10240)))  # an empty tar
    names = ("captions.jsonl.gz", "captions.jsonl.bz2", "captions.tar.gz", "renamed.bin", "empty.bin")
    got = [(i.id, getattr(i, "reason", "ok")) for n in names for i in iter_tar(str(tmp_path / n))]
    assert got == [
        ("captions.jsonl.gz", "read.not_a_tar"),
        ("captions.jsonl.bz2", "read.not_a_tar"),
        ("captions.tar.gz:0", "read.corrupt_tar"),
        ("r", "ok"),
    ]
    (item,) = iter_tar(str(tmp_path / "captions.jsonl.gz"))
    assert (item.source, item.detail) == (
        "captions.jsonl.gz",
        "captions.jsonl.gz is not a WebDataset tar (its name does not end in .tar, .tar.gz, ... and it is "
        "gzip-compressed data, but what it holds does not start like a tar), yet `shards` matched it; give "
        '`shards` a pattern that matches the tars only ("dir/*.tar"), or the folder itself (shards = "dir" '
        "reads its *.tar files)",
    )


def test_a_json_member_that_cannot_be_used_is_its_own_reject_and_its_sample_lands(tmp_path):
    """As beside a folder's image: a bad json costs its own row, not the good image with it."""
    samples = [
        {"__key__": "a", "jpg": JPG, "json": {"key": "custom", "caption": 5, "url": "http://x/a.jpg"}},
        {"__key__": "b", "jpg": JPG, "json": b"[1]"},
        {"__key__": "c", "jpg": JPG, "txt": b"a caption", "json": b"{oops"},
        {"__key__": "d", "json": b"{oops"},  # nothing but the json: one row, as before
        {"__key__": "e", "json": {"key": "e", "status": "failed_to_download", "error_message": "HTTP 404"}},
    ]
    items = list(iter_tar(str(write_tar(tmp_path / "t.tar", samples))))
    assert [(type(i).__name__, i.id, getattr(i, "reason", None), i.source) for i in items] == [
        ("Reject", "a.json", "read.bad_type", "t.tar:a.json"),
        ("RawSample", "a", None, "t.tar:a"),  # the json's key is not used: the tar key
        ("Reject", "b.json", "read.bad_json", "t.tar:b.json"),
        ("RawSample", "b", None, "t.tar:b"),
        ("Reject", "c.json", "read.bad_json", "t.tar:c.json"),
        ("RawSample", "c", None, "t.tar:c"),
        ("Reject", "d", "read.bad_json", "t.tar:d"),
        ("Reject", "e", "read.no_modality", "t.tar:e"),
    ]
    a_json, a = items[:2]
    assert a_json.detail == (
        "t.tar:a.json: json 'caption' is int 5, expected a string; the other members of sample 'a' are read "
        "without it: fix the json, or remove it"
    )
    assert (a.image, a.text, a.meta) == (Media(data=JPG, name="a.jpg"), None, {})
    assert items[2].detail.startswith("t.tar:b.json holds a JSON list, expected an object; the other members")
    assert (items[5].text, items[5].meta) == (b"a caption", {})
    assert items[-1].detail.endswith("the json says status 'failed_to_download': HTTP 404")


def test_members_not_read_are_listed_and_an_empty_plain_member_hides_no_stand_in(tmp_path):
    """Nothing in a tar goes unread without a trace: a second image, a dotted text beside a plain one,
    a member of an extension mbm does not read; an empty r.txt gives way to r.en.txt."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("q.jpg", JPG), ("q.thumb.jpg", b"thumb"), ("q.txt", b"plain"), ("q.en.txt", b"en"),
            ("r.jpg", JPG), ("r.txt", b""), ("r.en.txt", b"the only real caption"),
            ("s.jpg", JPG), ("s.png", b"png"), ("s.npy", b"\x93NUMPY"), ("s.cls", b"3"), ("s.label", b"x"),
            ("t.jpg", b""), ("t.v2.jpg", b"v2"),
        ]:
            _add(tar, name, data)
    q, r, s, t = iter_tar(str(path))
    assert (q.text, q.image.name, q.meta) == (b"plain", "q.jpg", {"unread_members": ["q.en.txt", "q.thumb.jpg"]})
    assert (r.text, r.meta) == (b"the only real caption", {})
    assert (s.image.name, s.label, s.meta) == ("s.jpg", 3, {"unread_members": ["s.label", "s.npy", "s.png"]})
    assert (t.image, t.meta) == (Media(data=b"v2", name="t.v2.jpg"), {})


def test_a_json_caption_or_label_not_used_is_kept_in_meta(tmp_path):
    """As a manifest keeps an unused caption: a .txt or .cls wins, the json's differing values stay."""
    samples = [
        {"__key__": "k", "jpg": JPG, "txt": b"from txt", "cls": b"7",
         "json": {"caption": "from json", "src": "flickr", "label": "tabby"}},
        {"__key__": "m", "jpg": JPG, "txt": b"same", "cls": b"7", "json": {"caption": "same", "label": 7}},
    ]
    k, m = iter_tar(str(write_tar(tmp_path / "t.tar", samples)))
    assert (k.text, k.label) == (b"from txt", 7)
    assert list(k.meta.items()) == [("caption", "from json"), ("src", "flickr"), ("label", "tabby")]
    assert (m.text, m.label, m.meta) == (b"same", 7, {})  # saying it twice adds nothing


# --- media left in the tar ------------------------------------------------------------------------


def test_media_of_an_uncompressed_local_tar_stay_in_it_and_read_back(tmp_path):
    samples = [{"__key__": "a", "jpg": JPG + b"a", "txt": "x", "wav": b"RIFFwav"},
               {"__key__": "b", "png": b"", "flac": b"fLaC" * 1000}]
    path = write_tar(tmp_path / "t.tar", samples)
    a, b = read_tar(str(path))
    for media, data in ((a.image, JPG + b"a"), (a.audio, b"RIFFwav"), (b.audio, b"fLaC" * 1000)):
        assert media.data is None and media.uri == str(path) and media.size == len(data)
        assert read_media(media) == data
        assert path.read_bytes()[media.offset:media.offset + media.size] == data
    assert (a.image.name, a.text) == ("a.jpg", b"x")
    assert b.image == Media(data=b"", name="b.png")  # empty: nothing to point at
    # the samples travel small: a reference, not the bytes
    assert len(pickle.dumps(b)) < 600


def test_media_of_a_compressed_tar_are_read(tmp_path):
    path = write_tar(tmp_path / "t.tar", [{"__key__": "a", "jpg": JPG}])
    (tmp_path / "t.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    (a,) = read_tar(str(tmp_path / "t.tar.gz"))
    assert a.image == Media(data=JPG, name="a.jpg")


def test_a_tar_cut_short_after_it_was_read_makes_the_media_unreadable(tmp_path):
    path = write_tar(tmp_path / "t.tar", [{"__key__": "a", "jpg": JPG}, {"__key__": "b", "jpg": JPG + b"b"}])
    a, b = read_tar(str(path))
    with open(path, "r+b") as f:
        f.truncate(b.image.offset + 10)
    assert read_media(a.image) == JPG
    with pytest.raises(CleanError) as info:
        read_media(b.image)
    assert info.value.reason == "file.unreadable" and "cut short or replaced" in info.value.detail
    with pytest.raises(CleanError) as info:
        read_media(a.image, max_bytes=100)  # over the limit: known from the header, not read
    assert info.value.reason == "file.too_large" and f"{len(JPG)} bytes" in info.value.detail


def test_a_member_cut_short_is_still_damage(tmp_path):
    path = write_tar(tmp_path / "t.tar", [{"__key__": "a", "jpg": JPG}, {"__key__": "b", "jpg": JPG * 4}])
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: data.index(JPG * 4) + 100])
    a, damage = read_tar(str(tmp_path / "cut.tar"))
    assert a.id == "a" and read_media(a.image) == JPG
    assert isinstance(damage, Reject) and damage.reason == "read.corrupt_tar" and "member 'b.jpg'" in damage.detail


def test_media_reference_checks():
    with pytest.raises(ValueError, match="offset and size go together"):
        Media(uri="x.tar", offset=5)
    with pytest.raises(ValueError, match="offset and size go together"):
        Media(data=b"x", offset=0, size=1)
    with pytest.raises(ValueError, match=">= 0"):
        Media(uri="x.tar", offset=-1, size=3)
    assert Media(uri="/d/x.tar", offset=512, size=3, name="k.jpg").describe() == "k.jpg"


def test_the_data_of_members_left_in_an_uncompressed_tar_is_not_read(tmp_path, monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    big = bytes(range(256)) * 4096  # 1 MiB per image
    path = write_tar(tmp_path / "t.tar", [{"__key__": f"k{i}", "jpg": JPG + big, "txt": f"t{i}"} for i in range(8)])
    counted = []
    real_open = FileSystems.open

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, *args):
            data = self._f.read(*args)
            counted.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(FileSystems, "open", staticmethod(lambda *a, **k: Counting(real_open(*a, **k))))
    samples = list(read_tar(str(path)))
    assert [s.text for s in samples] == [f"t{i}".encode() for i in range(8)]
    assert path.stat().st_size > 8 << 20 and sum(counted) < 64 << 10  # headers and texts only
    monkeypatch.undo()
    assert all(read_media(s.image) == JPG + big for s in samples)
