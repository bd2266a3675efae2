import gzip
import io
import os
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from mbm.data.errors import SkipLog
from mbm.data.shards import MemberRef, _OpenShards, iter_tar, read_member, read_shards


def reference(path):
    """Samples as ``tarfile`` reads them (the reader ``iter_tar`` must agree with), and the error that ended them."""
    out, error, current = [], None, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or ext is None or info.name.startswith("__"):
                    continue
                data = tar.extractfile(info).read()
                if current is not None and current["__key__"] != key:
                    out.append(current)
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": path}
                current[ext.lower()] = data
            if getattr(tar.fileobj, "comptype", "tar") == "tar":
                f.seek(tar.offset)
                tail = f.read(1024)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    raise tarfile.ReadError("truncated")
        if current is not None:
            out.append(current)
    except Exception as exn:  # noqa: BLE001
        error = exn
    return out, error


def ours(path, lazy=False):
    out = []
    try:
        for sample in iter_tar(path, lazy=lazy):
            out.append({k: read_member(v) for k, v in sample.items()})
    except Exception as exn:  # noqa: BLE001
        return out, exn
    return out, None


def assert_same(path, lazy=False):
    want, want_error = reference(path)
    got, got_error = ours(path, lazy)
    assert got == want
    assert (got_error is None) == (want_error is None), (got_error, want_error)
    return got


def add(tar, name, data=b"", kind=tarfile.REGTYPE, **kw):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def write_varied(path, fmt, compress=False):
    long_dir = "d" * 90 + "/" + "e" * 60
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        add(tar, "a.json", b'{"id": "a"}')
        add(tar, "a.text.npy", bytes(range(256)) * 4)  # exactly two blocks
        add(tar, "a.EMPTY", b"")
        add(tar, "dir", kind=tarfile.DIRTYPE)
        add(tar, "__meta__.json", b"{}")
        add(tar, "b.json", b"x" * 513)
        add(tar, "b.link", kind=tarfile.SYMTYPE, linkname="a.json")
        add(tar, "noext", b"zz")
        add(tar, f"{long_dir}/c.json", b"c" * 700)  # ustar prefix, GNU long name or pax path
        add(tar, f"{long_dir}/c.image.npy", b"i" * 1000)
        if fmt != tarfile.USTAR_FORMAT:
            add(tar, "ü" * 120 + ".json", b"u")  # longer than any prefix split allows
        add(tar, "d.json", b"d", mtime=1.5, uname="ü" * 40)
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_reads_what_tarfile_reads(tmp_path, fmt, compress, lazy):
    got = assert_same(write_varied(tmp_path / "t.tar", fmt, compress), lazy)
    keys = [s["__key__"] for s in got]
    assert keys[:2] == ["a", "b"] and keys[-1] == "d" and len(keys) == (4 if fmt == tarfile.USTAR_FORMAT else 5)
    assert got[0]["empty"] == b"" and got[0]["text.npy"] == bytes(range(256)) * 4
    assert got[2]["image.npy"] == b"i" * 1000


def test_webdataset_shard(tmp_path):
    path = str(tmp_path / "w.tar")
    with wds.TarWriter(path, encoder=False, mtime=0.0) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "json": b"{}", "text.npy": bytes([i]) * (100 + 600 * i)})
    got = assert_same(path)
    assert [s["text.npy"] for s in got] == [bytes([i]) * (100 + 600 * i) for i in range(5)]


@pytest.mark.parametrize("lazy", [False, True])
def test_truncation_and_damage_anywhere_are_refused_after_the_whole_samples(tmp_path, lazy):
    whole = write_varied(tmp_path / "t.tar", tarfile.PAX_FORMAT).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        tar.getmembers()
        needed = tar.offset + 1024  # up to the end-of-archive blocks; the rest is record padding
    cut = tmp_path / "cut.tar"
    for end in [*range(0, len(whole), 512), *range(100, len(whole), 1500)]:
        cut.write_bytes(whole[:end])
        got = assert_same(str(cut), lazy)
        assert (len(got) == 5) == (end >= needed), end
    errors = 0
    for at in range(0, needed, 512):  # a damaged header or data block
        cut.write_bytes(whole[:at] + b"\x07" * 512 + whole[at + 512:])
        errors += assert_same(str(cut), lazy) is not None and ours(str(cut), lazy)[1] is not None
    assert errors > 5


def test_corrupt_shards_are_counted_and_the_rest_read(tmp_path):
    good = str(tmp_path / "good.tar")
    with wds.TarWriter(good, encoder=False) as sink:
        sink.write({"__key__": "k", "json": b"{}"})
    (tmp_path / "garbage.tar").write_bytes(bytes(range(256)) * 12)
    (tmp_path / "empty.tar").write_bytes(b"")
    skips = SkipLog(quiet=True)
    paths = [str(tmp_path / "garbage.tar"), str(tmp_path / "empty.tar"), str(tmp_path / "missing.tar"), good]
    assert [s["__key__"] for s in read_shards(paths, skips)] == ["k"]
    assert skips.counts["shard.corrupt"] == 3


def test_lazy_scan_leaves_npy_in_the_shard_and_reads_it_on_demand(tmp_path):
    path = tmp_path / "w.tar"
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "json": b"{}", "text.npy": bytes([i]) * (100 + 600 * i)})
    got = list(iter_tar(str(path), lazy=True))
    assert [type(s["text.npy"]) for s in got] == [MemberRef] * 3 and got[0]["json"] == b"{}"
    assert [s["text.npy"].read() for s in reversed(got)] == [bytes([i]) * (100 + 600 * i) for i in (2, 1, 0)]
    path.write_bytes(path.read_bytes()[:2048])  # the shard is cut after the scan
    with pytest.raises(ValueError, match="changed since it was scanned|cut short"):
        got[2]["text.npy"].read()


def test_open_shard_descriptors_are_bounded(tmp_path):
    refs = []
    for n in range(5):
        path = str(tmp_path / f"s{n}.tar")
        with wds.TarWriter(path, encoder=False) as sink:
            sink.write({"__key__": "k", "json": b"{}", "text.npy": bytes([n]) * 10})
        refs.append(next(iter_tar(path, lazy=True))["text.npy"])
    cache = _OpenShards(limit=2)
    for n in (0, 1, 2, 0, 3, 4, 0):
        assert os.pread(cache.fd(refs[n].shard), 10, refs[n].offset) == bytes([n]) * 10
        assert len(cache.fds) <= 2
    assert list(cache.fds) == [refs[4].shard.path, refs[0].shard.path]


def test_byte_sum_is_exact_for_any_header_block():
    import random

    from mbm.data.shards import _byte_sum

    rng = random.Random(0)
    blocks = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), bytes(256) + b"\xff" * 256]
    blocks += [bytes(rng.randrange(256) for _ in range(512)) for _ in range(200)]
    assert all(_byte_sum(b) == sum(b) for b in blocks)


def test_member_names_split_into_key_and_extension_as_webdataset_splits_them():
    from mbm.data.shards import _key_ext

    names = ["a.json", "a.text.npy", "dir/a.b.c", "x/.a", ".hidden", "noext", "dir.d/file", "dir.d/x/file", "a.",
             "/abs/k.jpg", "x/y/", "é/ü.npy", "a..b", "./a.json", "s01.JSON", ""]
    for name in names:
        assert _key_ext(name) == base_plus_ext(name), name
