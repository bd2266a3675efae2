import gzip
import os

import webdataset as wds

from mbm.data.decode import Undecoded
from mbm.data.errors import SkipLog
from mbm.data.scan import ScanCache
from mbm.data.shards import MemberRef, read_shards
from mbm.data.stages import parsed

MODS = ("text",)


def write(path, ids, bad_doc_at=None):
    """A plain shard; the sample at ``bad_doc_at`` has a json doc that does not parse."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for n, i in enumerate(ids):
            doc = b"{not json" if n == bad_doc_at else f'{{"id": "{i}", "modalities": ["text"]}}'.encode()
            sink.write({"__key__": i, "json": doc, "text.npy": b"x" * 64})


def keep_all(_id):
    return True


def direct(paths):
    skips = SkipLog(quiet=True)
    return [(s.id, s.key) for s in parsed(read_shards(paths, skips, lazy=True), skips, keep_all, MODS)], skips.counts


def cached(cache, paths, split="train"):
    skips = SkipLog(quiet=True)
    samples = list(cache.samples(paths, skips, keep_all, MODS, split))
    assert all(isinstance(v, MemberRef) for s in samples for v in s.npy.values())
    return [(s.id, s.key) for s in samples], skips.counts


def test_a_second_scan_replays_the_first_skips_included(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write(a, ["a0", "a1", "a2"], bad_doc_at=1)
    write(b, ["b0", "b1"])
    paths = [str(a), str(tmp_path / "missing.tar"), str(b)]
    expected = direct(paths)
    assert expected[1] == {"json.bad": 1, "shard.corrupt": 1}
    cache = ScanCache(limit=100)
    assert cached(cache, paths) == expected
    assert cache.size == 4 and len(cache.entries) == 2  # the missing shard is not remembered
    first = [e for e in cache.entries.values()]
    assert cached(cache, paths) == expected  # from memory: the same samples and the same counts
    assert [e for e in cache.entries.values()] == first
    assert cached(cache, paths, split="val") == expected and len(cache.entries) == 4  # another split, its own scan


def test_a_changed_shard_is_scanned_again(tmp_path):
    a = tmp_path / "a.tar"
    write(a, ["a0", "a1"])
    cache = ScanCache(limit=100)
    assert cached(cache, [str(a)])[0] == [("a0", "a0"), ("a1", "a1")]
    write(a, ["c0", "c1", "c2"])
    os.utime(a, ns=(1, 1))  # a new mtime even within the same clock tick
    assert cached(cache, [str(a)])[0] == [("c0", "c0"), ("c1", "c1"), ("c2", "c2")]
    assert cache.size == 3 and len(cache.entries) == 1


def test_partial_scans_over_limit_shards_and_compressed_tars_are_not_kept(tmp_path):
    a, big, gz = tmp_path / "a.tar", tmp_path / "big.tar", tmp_path / "c.tar.gz"
    write(a, ["a0", "a1", "a2"])
    write(big, [f"b{i}" for i in range(5)])
    gz.write_bytes(gzip.compress(a.read_bytes()))
    cache = ScanCache(limit=4)
    skips = SkipLog(quiet=True)
    it = cache.samples([str(a)], skips, keep_all, MODS, "train")
    assert isinstance(next(it), Undecoded)
    it.close()  # the consumer stopped after one sample: nothing is remembered
    assert cache.entries == {} and cache.size == 0
    assert len(cached_any(cache, [str(big)])) == 5 and cache.entries == {}  # 5 samples > limit 4
    assert len(cached_any(cache, [str(gz)])) == 3 and cache.entries == {}  # arrays read eagerly: not kept
    assert len(cached_any(cache, [str(a)])) == 3 and cache.size == 3
    off = ScanCache(limit=0)
    assert len(cached_any(off, [str(a)])) == 3 and off.entries == {}


def cached_any(cache, paths):
    return list(cache.samples(paths, SkipLog(quiet=True), keep_all, MODS, "train"))


def test_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MBM_SCAN_CACHE", "7")
    assert ScanCache().limit == 7
    monkeypatch.setenv("MBM_SCAN_CACHE", "lots")
    assert ScanCache().limit == 100_000
