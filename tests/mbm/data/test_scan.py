import gzip
import json
import logging
import os
import time
from pathlib import Path

import pytest
import webdataset as wds

import mbm.data.scan as scan
from mbm.data.decode import Undecoded
from mbm.data.errors import SkipLog
from mbm.data.scan import ScanCache
from mbm.data.shards import MemberRef, read_shards
from mbm.data.split import meta_split, sample_split, split_doc
from mbm.data.stages import parsed
from tests.support.scans import SETTLED, wait_settled

MODS = ("text",)


def scan_files(folder):
    """The scan files in ``folder`` (not its ``.pruned`` marker), sorted."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".scan"))


def write(path, ids, bad_doc_at=None):
    """A plain shard; the sample at ``bad_doc_at`` has a json doc that does not parse."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for n, i in enumerate(ids):
            doc = b"{not json" if n == bad_doc_at else f'{{"id": "{i}", "modalities": ["text"]}}'.encode()
            sink.write({"__key__": i, "json": doc, "text.npy": b"x" * 64})


def write_docs(path, docs, members=("text", "image")):
    """A plain shard of the given json docs, with a .npy member per modality in ``members``."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for n, doc in enumerate(docs):
            sample = {"__key__": f"k{n:03d}", "json": json.dumps(doc).encode()}
            sample.update({f"{m}.npy": bytes([n]) * (10 + n) for m in members})
            sink.write(sample)


@pytest.fixture(autouse=True)
def _short_settling(monkeypatch):
    monkeypatch.setattr(scan, "_SETTLED", SETTLED)


def settle(*paths):
    """Date the files' mtimes an hour back and wait until their status-change times (which cannot be set)
    are ``SETTLED`` old: a shard written just before its scan is not kept on disk."""
    wait_settled(*paths)


def fresh(*paths):
    """Date the files' mtimes an hour ahead: written just now, whatever time the test takes."""
    ahead = time.time_ns() + 3600 * 10**9
    for path in paths:
        os.utime(path, ns=(ahead, ahead))


def keep_all(_doc):
    return True


def view(s):
    """Everything a sample holds, its arrays as the bytes of the member (with a lazy scan's offset and size)."""
    npy = {m: v if v is None or isinstance(v, bytes) else (v.offset, v.size, v.read()) for m, v in s.npy.items()}
    return s.id, s.key, s.label, s.text, s.modalities, npy, s.shard, s.content


def direct(paths, keep=keep_all, mods=MODS):
    skips = SkipLog(quiet=True)
    return [view(s) for s in parsed(read_shards(paths, skips, lazy=True), skips, keep, mods)], dict(skips.counts)


def cached(cache, paths, keep=keep_all, mods=MODS, split="all"):
    skips = SkipLog(quiet=True)
    samples = list(cache.samples(paths, skips, keep, mods, split))
    assert all(isinstance(v, MemberRef) for s in samples for v in s.npy.values() if v is not None
               and not s.shard.endswith(".gz"))
    return [view(s) for s in samples], dict(skips.counts)


def test_a_second_scan_replays_the_first_skips_included(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write(a, ["a0", "a1", "a2"], bad_doc_at=1)
    write(b, ["b0", "b1"])
    paths = [str(a), str(tmp_path / "missing.tar"), str(b)]
    expected = direct(paths)
    assert expected[1] == {"json.bad": 1, "shard.corrupt": 1}
    cache = ScanCache(limit=100, folder=None)
    assert cached(cache, paths) == expected
    assert cache.size == 4 and sorted(k[0] for k in cache.entries) == [str(a), str(b)]  # not the missing shard
    first = dict(cache.entries)
    assert cached(cache, paths) == expected  # from memory: the same samples and the same counts
    assert cache.entries == first
    odd = lambda doc: doc["id"] in ("a2", "b1")  # noqa: E731
    assert cached(cache, paths, odd, split="odd") == direct(paths, odd)  # another split: its own scan
    assert len(cache.entries) == 4 and cache.size == 6


def test_a_changed_shard_is_scanned_again(tmp_path):
    a = tmp_path / "a.tar"
    write(a, ["a0", "a1"])
    settle(a)
    folder = tmp_path / "scans"
    cache = ScanCache(limit=100, folder=str(folder))
    assert [s[0] for s in cached(cache, [str(a)])[0]] == ["a0", "a1"]
    write(a, ["c0", "c1", "c2"])
    os.utime(a, ns=(1, 1))  # a new mtime even within the same clock tick
    assert [s[0] for s in cached(cache, [str(a)])[0]] == ["c0", "c1", "c2"]
    assert cache.size == 3 and len(cache.entries) == 1
    # the file on disk was rewritten too: a new process replays the new scan
    assert [s[0] for s in cached(ScanCache(limit=0, folder=str(folder)), [str(a)])[0]] == ["c0", "c1", "c2"]
    assert len(scan_files(folder)) == 1


def test_a_shard_rewritten_in_place_with_its_size_and_mtime_kept_is_scanned_again(tmp_path):
    """``cp -p`` over a shard keeps its inode and sets its size and mtime back to what they were: only its
    status-change time tells. A new process must not replay the old shard's samples."""
    a, other = tmp_path / "a.tar", tmp_path / "other.tar"
    write(a, ["a0", "a1"])
    write(other, ["b0", "b1"])  # the same sizes, other ids
    assert a.stat().st_size == other.stat().st_size
    settle(a)
    folder = tmp_path / "scans"
    assert [s[0] for s in cached(ScanCache(limit=0, folder=str(folder)), [str(a)])[0]] == ["a0", "a1"]
    assert len(scan_files(folder)) == 1
    st = a.stat()
    a.write_bytes(other.read_bytes())
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_ino, a.stat().st_size, a.stat().st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert [s[0] for s in cached(ScanCache(limit=0, folder=str(folder)), [str(a)])[0]] == ["b0", "b1"]


def messy_docs():
    """Docs a scan must replay exactly: odd labels and texts, split names, hashes of every kind, a sample
    listing a modality without its member, and samples with no modality (a skip in their split only)."""
    return [
        {"id": "s0", "modalities": ["text", "image"], "label": "cat", "text": "a cat",
         "modality_hashes": {"text": "t0", "image": "i0"}, "meta": {"split": "Train "}},
        {"id": "s1", "modalities": ["image", "text"], "label": 3, "text": "naïve \ud800 ✓",
         "modality_hashes": {"image": "i0", "text": 7}, "meta": {"split": "test"}},
        {"id": "s2", "modalities": ["text"], "label": [1, {"a": None}], "text": None, "modality_hashes": "x"},
        {"id": "s3", "modalities": [], "label": "dog", "meta": {"split": "validation"}},
        {"id": "s4", "modalities": ["audio"], "label": 1.5, "meta": "nope"},  # audio listed, no member
        {"id": "s5", "modalities": ["image"], "modality_hashes": {"image": "i5"}, "meta": {"split": 4}},
        {"id": "s6"},
    ]


SPLITS = [(0.5, "id", False, "train"), (0.5, "id", False, "val"), (0.3, "image", False, "val"),
          (0.2, "split", True, "test"), (0.2, "split", False, "val"), (0.9, "split", True, "train")]


@pytest.mark.parametrize("fraction,split_by,apart,split", SPLITS)
def test_replays_from_disk_equal_a_fresh_scan_in_every_split(tmp_path, monkeypatch, fraction, split_by, apart, split):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_docs(a, messy_docs())
    write(b, ["b0", "b1", "b2"], bad_doc_at=2)
    gz, cut = tmp_path / "c.tar.gz", tmp_path / "cut.tar"
    gz.write_bytes(gzip.compress(b.read_bytes()))
    cut.write_bytes(a.read_bytes()[:5000])  # a truncated shard: the samples before the damage, then a skip
    settle(a, b, gz, cut)
    paths = [str(a), str(b), str(gz), str(cut), str(tmp_path / "missing.tar")]
    folder = str(tmp_path / "scans")

    def keep(doc):
        return sample_split(doc, fraction, split_by, apart) == split

    for mods in (("text", "image", "audio"), ("image",)):
        expected = direct(paths, keep, mods)
        name = (fraction, split_by, apart, split)
        assert cached(ScanCache(limit=0, folder=folder), paths, keep, mods, name) == expected  # scanned, written
        assert scan_files(folder) == sorted(os.path.basename(ScanCache(folder=folder).file(p))
                                                    for p in paths if "c.tar" not in p and "missing" not in p)
        assert expected[1]["shard.corrupt"] == 2  # the truncated and the missing shard
        replayed = ScanCache(limit=0, folder=folder)
        with monkeypatch.context() as m:  # a plain shard is not read again: its records are replayed
            m.setattr(scan, "read_shards", lambda ps, skips, lazy: read_shards([p for p in ps if p.endswith("gz")],
                                                                                skips, lazy=lazy))
            assert cached(replayed, paths[:4], keep, mods, name) == direct(paths[:4], keep, mods)
        assert cached(replayed, paths, keep, mods, name) == expected


def test_the_split_doc_splits_as_the_doc_does():
    docs = messy_docs() + [{"id": f"x{i}", "modality_hashes": {"image": f"h{i % 3}", "text": None},
                            "meta": {"split": ["train", "dev", "Test", None, ""][i % 5]}} for i in range(40)]
    from mbm.data.decode import content_hashes

    for doc in docs:
        small = split_doc(doc["id"], content_hashes(doc), meta_split(doc))
        for fraction, split_by, apart, _ in SPLITS:
            assert sample_split(small, fraction, split_by, apart) == sample_split(doc, fraction, split_by, apart)


def test_damaged_or_foreign_scan_files_are_scanned_over(tmp_path):
    a = tmp_path / "a.tar"
    write(a, ["a0", "a1", "a2"], bad_doc_at=0)
    settle(a)
    folder = str(tmp_path / "scans")
    expected = direct([str(a)])
    assert cached(ScanCache(limit=0, folder=folder), [str(a)]) == expected
    file = ScanCache(folder=folder).file(str(a))
    good = open(file, "rb").read()
    head, _, blob = good.partition(b"\n")
    header = json.loads(head)
    damaged = [good[: len(good) // 2], b"", b"junk", head + b"\n" + blob[:-3] + b"xyz",
               json.dumps({**header, "format": 99}).encode() + b"\n" + blob,
               json.dumps({**header, "path": "other.tar"}).encode() + b"\n" + blob,
               json.dumps({**header, "identity": [1, 2, 3]}).encode() + b"\n" + blob]
    for data in damaged:
        with open(file, "wb") as f:
            f.write(data)
        assert cached(ScanCache(limit=0, folder=folder), [str(a)]) == expected
        assert open(file, "rb").read() == good  # scanned and written again


def test_an_unwritable_folder_warns_once_and_scans(tmp_path, caplog, monkeypatch):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write(a, ["a0"])
    write(b, ["b0"])
    settle(a, b)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    folder = str(blocked / "scans")
    monkeypatch.setattr(scan, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="mbm.data.scan"):
        for cache in (ScanCache(limit=0, folder=folder), ScanCache(limit=0, folder=folder)):
            for _ in range(2):
                assert cached(cache, [str(a), str(b)]) == direct([str(a), str(b)])
        monkeypatch.setattr(scan, "_CACHE", ScanCache(limit=0, folder=folder))
        monkeypatch.setattr(scan, "POOL_SAMPLES", 0)
        assert scan.index_shards([str(a), str(b)], 2) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "set MBM_SCAN_DIR to a writable folder" in warnings[0]  # once per process
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar", "file"]
    monkeypatch.setattr(scan, "_WARNED", set())  # the parallel scan says it before any process is started
    with caplog.at_level(logging.WARNING, logger="mbm.data.scan"):
        assert scan.index_shards([str(a), str(b)], 2) == 0
    assert len(caplog.records) == 2 and caplog.records[1].getMessage().startswith(f"cannot keep shard scans in {folder}")


def test_partial_scans_over_limit_shards_and_compressed_tars_are_not_kept(tmp_path):
    a, big, gz = tmp_path / "a.tar", tmp_path / "big.tar", tmp_path / "c.tar.gz"
    write(a, ["a0", "a1", "a2"])
    write(big, [f"b{i}" for i in range(5)])
    gz.write_bytes(gzip.compress(a.read_bytes()))
    settle(a, big, gz)
    folder = tmp_path / "scans"
    cache = ScanCache(limit=4, folder=str(folder))
    skips = SkipLog(quiet=True)
    it = cache.samples([str(a)], skips, keep_all, MODS, "all")
    assert isinstance(next(it), Undecoded)
    it.close()  # the consumer stopped after one sample: nothing is remembered
    assert cache.entries == {} and cache.size == 0 and not folder.exists()
    assert len(cached_any(cache, [str(big)])) == 5 and cache.entries == {}  # 5 samples > limit 4: on disk only
    assert scan_files(folder) == [os.path.basename(cache.file(str(big)))]
    assert len(cached_any(cache, [str(gz)])) == 3 and cache.entries == {}  # arrays read eagerly: not kept
    assert len(scan_files(folder)) == 1
    assert len(cached_any(cache, [str(a)])) == 3 and cache.size == 3
    off = ScanCache(limit=0, folder=None)
    assert len(cached_any(off, [str(a)])) == 3 and off.entries == {}


def test_a_scan_read_from_disk_is_then_replayed_from_memory(tmp_path, monkeypatch):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write(a, ["a0", "a1", "a2"], bad_doc_at=1)
    write(b, ["b0", "b1"])
    settle(a, b)
    paths = [str(a), str(b)]
    folder = str(tmp_path / "scans")
    expected = direct(paths)
    assert cached(ScanCache(limit=0, folder=folder), paths) == expected  # scanned: the files written
    cache = ScanCache(limit=100, folder=folder)
    with monkeypatch.context() as m:
        m.setattr(scan, "read_shards", lambda *_a, **_k: iter(()))
        assert cached(cache, paths) == expected  # from the files
        assert cache.size == 4
        m.setattr(ScanCache, "_on_disk", lambda *_a: None)
        assert cached(cache, paths) == expected  # from memory
    a2 = lambda doc: doc["id"] == "a2"  # noqa: E731 - another split: from the files again
    assert cached(cache, paths, a2, split="a2") == direct(paths, a2) == ([expected[0][1]], {"json.bad": 1})


def test_a_shard_written_just_before_its_scan_is_kept_in_memory_only(tmp_path):
    a = tmp_path / "a.tar"
    write(a, ["a0", "a1"])
    fresh(a)
    folder = tmp_path / "scans"
    cache = ScanCache(limit=100, folder=str(folder))
    assert len(cached_any(cache, [str(a)])) == 2
    assert cache.size == 2 and not folder.exists()  # rewritten within its mtime's tick, it would look the same
    assert len(cached_any(ScanCache(limit=100, folder=str(folder)), [str(a)])) == 2 and not folder.exists()
    settle(a)  # a new mtime: scanned again, and now written
    assert len(cached_any(cache, [str(a)])) == 2 and len(scan_files(folder)) == 1


def cached_any(cache, paths):
    return list(cache.samples(paths, SkipLog(quiet=True), keep_all, MODS, "all"))


def test_limit_and_folder_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MBM_SCAN_CACHE", "7")
    assert ScanCache().limit == 7
    monkeypatch.setenv("MBM_SCAN_CACHE", "lots")
    assert ScanCache().limit == 100_000
    monkeypatch.setenv("MBM_SCAN_DIR", str(tmp_path))
    assert ScanCache().folder == str(tmp_path)
    monkeypatch.setenv("MBM_SCAN_DIR", " Off ")
    assert ScanCache().folder is None
    monkeypatch.setenv("MBM_SCAN_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ScanCache().folder == str(tmp_path / "xdg" / "mbm" / "scan")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ScanCache().folder == str(tmp_path / "home" / ".cache" / "mbm" / "scan")


def test_index_shards_scans_the_missing_ones_in_parallel(tmp_path, monkeypatch):
    paths = []
    for name in "abc":
        path = tmp_path / f"{name}.tar"
        write(path, [f"{name}{i}" for i in range(4)], bad_doc_at=1 if name == "b" else None)
        paths.append(str(path))
    new, gz = tmp_path / "fresh.tar", tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    settle(*paths, gz)
    write(new, ["f0"])  # written just now: left to the loader
    fresh(new)
    everything = [*paths, str(new), str(gz), str(tmp_path / "missing.tar")]
    folder = tmp_path / "scans"
    monkeypatch.setattr(scan, "_CACHE", ScanCache(limit=0, folder=str(folder)))
    assert scan.index_shards(everything, 1) == 0 and not folder.exists()  # one process: the loader's scan is as fast
    # a small dataset: the first shard (c, at start 2) scanned here, the rest left to the loader's workers
    assert scan.index_shards(everything, 4, start=2) == 1
    assert scan_files(folder) == [os.path.basename(scan.cache().file(paths[2]))]
    monkeypatch.setattr(scan, "POOL_SAMPLES", 0)  # as a large one: the rest in parallel
    assert scan.index_shards(everything, 4) == 2
    assert scan_files(folder) == sorted(os.path.basename(scan.cache().file(p)) for p in paths)
    assert scan.index_shards(everything, 4) == 0  # all kept: nothing to do
    with monkeypatch.context() as m:  # the plain shards are replayed, skips included, without reading them
        m.setattr(scan, "read_shards", lambda ps, skips, lazy: iter(()))
        assert cached(ScanCache(limit=0, folder=str(folder)), paths) == direct(paths)
    monkeypatch.setattr(scan, "_CACHE", ScanCache(limit=0, folder=None))
    assert scan.index_shards(everything, 4) == 0


def test_the_parallel_scan_processes_are_not_stopped_by_signal_nor_run_the_parents_handler(tmp_path, monkeypatch):
    """``mbm train``'s SIGTERM handler raises: the pool's processes, forked under it, must neither be sent SIGTERM
    at the end (they leave once the work is done) nor run it when they are (they printed tracebacks)."""
    import signal

    paths = []
    for name in "abcd":
        write(tmp_path / f"{name}.tar", [f"{name}0", f"{name}1"])
        paths.append(str(tmp_path / f"{name}.tar"))
    settle(*paths)
    monkeypatch.setattr(scan, "_CACHE", ScanCache(limit=0, folder=str(tmp_path / "scans")))
    monkeypatch.setattr(scan, "POOL_SAMPLES", 0)
    marker = tmp_path / "handled"

    def handler(*_):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        assert scan.index_shards(paths, 3) == 4
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not marker.exists()
    assert signal.getsignal(signal.SIGTERM) is old


def test_scan_files_unused_for_30_days_are_pruned_once_a_day(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    day = 86400 * 10**9
    now = time.time_ns()

    def aged(name, days):
        path = folder / name
        path.write_bytes(b"x")
        os.utime(path, ns=(now - days * day, now - days * day))
        return path

    old, recent, old_tmp, new_tmp, other = (aged("o.scan", 31), aged("r.scan", 29), aged(".a.tmp", 2),
                                            aged(".b.tmp", 0), aged("notes.txt", 400))
    # a scan file read now is in use, however old it was
    a = tmp_path / "a.tar"
    write(a, ["a0", "a1"])
    settle(a)
    cache = ScanCache(limit=0, folder=str(folder))
    assert cached(cache, [str(a)]) == direct([str(a)])  # scanned and written: the folder pruned first
    used = Path(cache.file(str(a)))
    assert sorted(p.name for p in folder.iterdir()) == sorted([".pruned", ".b.tmp", "notes.txt", "r.scan", used.name])
    os.utime(used, ns=(now - 40 * day, now - 40 * day))
    assert cached(ScanCache(limit=0, folder=str(folder)), [str(a)]) == direct([str(a)])  # read: marked as used
    assert time.time() - used.stat().st_mtime < 60
    assert scan.prune(str(folder)) == 0  # pruned today already
    aged("o2.scan", 31)
    os.utime(folder / ".pruned", ns=(now - 2 * day, now - 2 * day))
    assert scan.prune(str(folder)) == 1 and used.exists() and recent.exists() and other.exists()
    assert not old.exists() and not old_tmp.exists() and new_tmp.exists()
