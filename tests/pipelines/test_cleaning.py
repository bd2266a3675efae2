from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipelines import cleaning
from pipelines.clean import AudioCleanConfig, ImageCleanConfig, TextCleanConfig
from pipelines.cleaning import CleanConfig, load_raw
from schemas import RawSample
from schemas.records import Media

CFG = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig())


def _hashes() -> dict[str, str]:
    raw = RawSample(id="a", text="a caption", image=Media(data=b"not decoded here", name="a.png"),
                    audio=Media(data=b"nor here", name="a.wav"))
    # a config of its own: a config makes its settings' bytes once, and the test changes a revision between calls
    return load_raw(raw, CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig()))[1]


def test_a_cleaner_revision_changes_only_its_modality_hash(monkeypatch):
    before = _hashes()
    monkeypatch.setitem(cleaning.REVISIONS, "image", cleaning.REVISIONS["image"] + 1)
    after = _hashes()
    assert after["image"] != before["image"]
    assert after["text"] == before["text"] and after["audio"] == before["audio"]


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_revision_one_leaves_the_hash_as_before_revisions(monkeypatch, modality):
    monkeypatch.setitem(cleaning.REVISIONS, modality, 1)
    settings = cleaning._config_bytes(modality, CFG.for_modality(modality))
    assert b"revision" not in settings and settings == json.dumps(
        CFG.for_modality(modality).to_dict(), sort_keys=True, default=str).encode()


def test_the_previous_index_gives_each_landed_row_as_the_parquet_holds_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cleaning import load_previous

    rows = [
        {"id": "a", "status": "ok", "shard": "shards/x.tar", "label": None, "version": 1, "modality_hashes": '{"text": "1"}'},
        {"id": "b", "status": "rejected", "shard": None, "label": None, "version": 1, "modality_hashes": "{}"},
        {"id": "c", "status": "ok", "shard": "shards/y.tar", "label": "cat", "version": 2, "modality_hashes": "{}"},
        {"id": "a", "status": "ok", "shard": "shards/z.tar", "label": "dog", "version": 3, "modality_hashes": "{}"},
    ]
    path = tmp_path / "index.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # two chunks
    previous = load_previous(str(path))
    assert len(previous) == 2
    assert previous.get("a") == rows[3]  # the last row of an id wins
    assert previous.get("c") == rows[2]
    assert previous.get("b") is None and previous.get("zzz") is None  # a reject is no landed sample
    assert load_previous(None) == {} and load_previous("") == {}


WORKER_THREADS = r"""
import io, json, os, sys, threading, time, wave
import numpy as np
os.environ["MBM_WORKERS"] = str(os.cpu_count())  # one worker per core: one torch thread each
if sys.argv[1] == "torch-first":
    import torch  # a worker forked from the fork server: torch is there before the first sample
from pipelines.clean import AudioCleanConfig, ImageCleanConfig, TextCleanConfig
from pipelines.cleaning import CleanConfig, CleanSampleFn
from schemas import RawSample
from schemas.records import Media

buf = io.BytesIO()
with wave.open(buf, "wb") as w:  # 1 s of a 440 Hz tone at 44.1 kHz: resampled to 16 kHz with torch
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(44100)
    w.writeframes((np.sin(np.arange(44100) * 2 * np.pi * 440 / 44100) * 20000).astype("<i2").tobytes())
fn = CleanSampleFn(CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig()))
fn.setup()
tasks = lambda: len(os.listdir("/proc/self/task"))
before, out, seen = tasks(), [], {}

def bundle():  # a bundle runs in a thread of Beam's, not the one that imported torch
    fn.start_bundle()
    seen["torch_after_start"] = "torch" in sys.modules
    out.extend(fn.process(RawSample(id="a", audio=Media(data=buf.getvalue(), name="a.wav"))))
    fn.finish_bundle()

t = threading.Thread(target=bundle)
t.start(); t.join()
for _ in range(500):  # join returns before the kernel has removed the thread's task
    if str(t.native_id) not in os.listdir("/proc/self/task"):
        break
    time.sleep(0.01)
import torch
print(json.dumps({"new_threads": tasks() - before, "torch_threads": torch.get_num_threads(),
                  "torch_after_start": seen["torch_after_start"], "kind": type(out[0]).__name__,
                  "frames": len(out[0].audio)}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc; needs 2 cores for torch's default pool to have helpers")
@pytest.mark.parametrize("start", ["torch-first", "no-torch"])
def test_cleaning_sizes_torchs_thread_pool_before_it_resamples(start):
    """A worker's audio cleaning runs torch before any model loads: with the pool at torch's default
    (every core) each worker would start OpenMP helper threads of its own and oversubscribe the CPU.
    A worker that has not imported torch (no fork server) is not made to by the bundle's start."""
    proc = subprocess.run([sys.executable, "-c", WORKER_THREADS, start], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kind"] == "CleanSample" and got["frames"] == 16000
    assert got["torch_after_start"] == (start == "torch-first")
    assert got["torch_threads"] == 1
    assert got["new_threads"] == 0  # no OpenMP team: resampling ran on the bundle's thread alone


def test_a_file_over_max_bytes_names_the_setting_to_raise(tmp_path):
    """An image over the limit, and audio held in memory (a manifest's bytes cell): a local audio file or tar
    member stays in its file instead (the next test)."""
    (tmp_path / "big.png").write_bytes(b"\x02" * 5000)
    config = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(max_bytes=1000),
                         audio=AudioCleanConfig(max_bytes=1000))
    raw = RawSample(id="a", image=Media(uri=str(tmp_path / "big.png")), audio=Media(data=b"\x01" * 5000, name="a.wav"))
    data, _ = load_raw(raw, config)
    audio, image = data["audio"], data["image"]
    assert audio.reason == image.reason == "file.too_large"
    assert audio.detail.startswith("a.wav has 5000 bytes, limit is 1000 ([audio] max_bytes: ")
    assert "only max_seconds of it are kept" in audio.detail and "ffmpeg -i IN -t 60" in audio.detail
    assert image.detail.startswith(f"{tmp_path / 'big.png'} has 5000 bytes, limit is 1000 ([image] max_bytes: ")


def test_a_local_audio_file_over_max_bytes_is_hashed_whole_and_decoded_from_its_file(tmp_path, monkeypatch):
    """Not read into memory: its hash is the one its bytes in memory give, read a MiB at a time, and its
    clip is cleaned from the file."""
    import io
    import wave

    from pipelines.media import LocalFile
    from schemas import CleanSample

    t = np.arange(3 * 16000) / 16000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 10000).astype("<i2").tobytes())
    wav = buf.getvalue()
    (tmp_path / "long.wav").write_bytes(wav)
    small = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig(max_bytes=1000))
    raw = RawSample(id="a", audio=Media(uri=str(tmp_path / "long.wav")))
    data, hashes = load_raw(raw, small)
    assert isinstance(data["audio"], LocalFile) and data["audio"].size == len(wav)
    monkeypatch.setattr(cleaning, "read_media", lambda *a: pytest.fail("the file was read into memory"))
    assert hashes["audio"] == cleaning._digest(b"audio", wav, small.config_bytes["audio"])
    out = cleaning.clean_sample(raw, small)
    assert isinstance(out, CleanSample) and 47_900 < len(out.audio) <= 3 * 16000  # trimming takes a sample or two
    monkeypatch.undo()
    whole = cleaning.clean_sample(raw, CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(),
                                                   audio=AudioCleanConfig()))
    assert np.array_equal(out.audio, whole.audio)

    # the same clip as a member of an uncompressed tar, between two others: decoded from its window of the tar
    import tarfile

    (tmp_path / "before.txt").write_bytes(b"x" * 3000)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for name in ("before.txt", "long.wav", "before.txt"):
            tar.add(tmp_path / name, arcname=f"k{len(tar.getmembers())}.{name}")
    with tarfile.open(tmp_path / "a.tar") as tar:
        member = tar.getmember("k1.long.wav")
    assert member.offset_data > 0 and member.size == len(wav)
    in_tar = RawSample(id="a", audio=Media(uri=str(tmp_path / "a.tar"), offset=member.offset_data, size=member.size,
                                           name="k1.long.wav"))
    monkeypatch.setattr(cleaning, "read_media", lambda *a: pytest.fail("the member was read into memory"))
    data, hashes = load_raw(in_tar, small)
    assert isinstance(data["audio"], LocalFile) and data["audio"].offset == member.offset_data
    assert data["audio"].head() == wav[:LocalFile.SNIFF] and data["audio"].tail() == wav[-LocalFile.SNIFF:]
    assert hashes["audio"] == cleaning._digest(b"audio", wav, small.config_bytes["audio"])
    assert np.array_equal(cleaning.clean_sample(in_tar, small).audio, whole.audio)


def _png(color) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def test_a_copy_of_media_cleaned_just_before_is_not_decoded_again(monkeypatch):
    from pipelines.dedupe import cleaned_cache
    from schemas import CleanSample, Reject

    decoded = []
    real = cleaning.clean_value
    monkeypatch.setattr(cleaning, "clean_value", lambda m, data, cfg: decoded.append(m) or real(m, data, cfg))
    red, blue = _png((200, 0, 0)), _png((0, 0, 200))
    rows = [RawSample(id="r1", text="one", image=Media(data=red, name="r.png")),
            RawSample(id="b1", text="two", image=Media(data=blue, name="b.png")),
            RawSample(id="r2", text="three", image=Media(data=red, name="copy.png")),
            RawSample(id="x1", text="four", image=Media(data=b"\x89PNG\r\n\x1a\n cut", name="x.png")),
            RawSample(id="x2", image=Media(data=b"\x89PNG\r\n\x1a\n cut", name="x.png"))]
    cache = cleaned_cache()
    out = {r.id: cleaning.clean_sample(r, CFG, None, cache) for r in rows}
    assert decoded.count("image") == 3  # red, blue, the broken one: once each
    assert isinstance(out["r2"], CleanSample) and np.array_equal(out["r2"].image, out["r1"].image)
    assert out["r2"].modality_hashes["image"] == out["r1"].modality_hashes["image"] != out["b1"].modality_hashes["image"]
    assert out["r2"].text == "three"  # only the media are shared
    assert out["x1"].dropped["image"].startswith("clean.image: image.") and isinstance(out["x2"], Reject)
    reason = out["x2"].reason  # the same error for both: one decode
    assert out["x1"].dropped["image"] == f"clean.image: {reason}: {out['x2'].detail.removeprefix('image: ')}"
    without = [cleaning.clean_sample(r, CFG) for r in rows[:3]]  # no cache: decoded every time
    assert decoded.count("image") == 6 and np.array_equal(without[2].image, out["r2"].image)
    # two missing files share a content hash (the reason's), not their messages
    gone = [cleaning.clean_sample(RawSample(id=f"g{i}", image=Media(uri=f"/nowhere/{i}.png")), CFG, None, cache)
            for i in range(2)]
    assert gone[0].reason == gone[1].reason and "/nowhere/0.png" in gone[0].detail and "/nowhere/1.png" in gone[1].detail


def test_a_known_picture_under_a_new_caption_reuses_the_features_another_sample_holds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cleaning import load_previous
    from schemas import CleanSample, sample_key
    from schemas.records import OTHER_KEY

    red, blue = _png((200, 0, 0)), _png((0, 0, 200))
    (tmp_path / "red.png").write_bytes(red)
    (tmp_path / "blue.png").write_bytes(blue)
    cfg = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig(),
                      fingerprints={"text": "ft", "image": "fi"})
    known = RawSample(id="old/1", text="a red square", image=Media(uri=str(tmp_path / "red.png")))
    hashes = load_raw(known, cfg)[1]
    rows = [{"id": "old/1", "status": "ok", "shard": "shards/a.tar", "modalities": "text,image",
             "modality_hashes": json.dumps(hashes), "fingerprint": json.dumps({"text": "ft", "image": "fi"}),
             "content_hash": "c1"},
            {"id": "old-2", "status": "ok", "shard": "shards/b.tar", "modalities": "text",  # its image failed
             "modality_hashes": json.dumps({"image": load_raw(RawSample(id="x", image=Media(data=blue)), cfg)[1]["image"]}),
             "fingerprint": json.dumps({"text": "ft", "image": "fi"}), "content_hash": "c2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "index.parquet")
    previous = load_previous(str(tmp_path / "index.parquet"))
    assert previous.holding("image", hashes["image"])["id"] == "old/1"
    assert previous.holding("text", hashes["text"]) is None  # texts are featurized again: cheap
    assert previous.holding("audio", hashes["image"]) is None

    def clean(raw, fingerprints=cfg.fingerprints):
        c = CleanConfig(text=cfg.text, image=cfg.image, audio=cfg.audio, fingerprints=fingerprints)
        return cleaning.clean_sample(raw, c, previous.get(raw.id), None, previous.holding)

    new = clean(RawSample(id="new", text="another caption", image=Media(uri=str(tmp_path / "red.png"))))
    assert isinstance(new, CleanSample) and new.plan == "new" and new.image is None  # not even decoded
    assert new.reused == {"image": f"shards/a.tar{OTHER_KEY}{sample_key('old/1')}"} and new.text == "another caption"
    # features of another extractor, or media that did not land, are not reused
    assert clean(RawSample(id="n2", text="x", image=Media(uri=str(tmp_path / "red.png"))),
                 {"text": "ft", "image": "other"}).reused == {}
    assert clean(RawSample(id="n3", text="x", image=Media(data=blue))).reused == {}
    for dedupe, reused in ((True, {"image"}), (False, set())):  # the job's step, with [runner] dedupe on and off
        fn = cleaning.CleanSampleFn(CleanConfig(text=cfg.text, image=cfg.image, audio=cfg.audio, dedupe=dedupe,
                                                fingerprints=cfg.fingerprints,
                                                previous_index=str(tmp_path / "index.parquet")))
        fn.setup()
        fn.start_bundle()
        (out,) = fn.process(RawSample(id="n4", text="y", image=Media(uri=str(tmp_path / "red.png"))))
        assert set(out.reused) == reused


def test_media_files_unchanged_on_disk_are_not_read_again(tmp_path, monkeypatch):
    """A re-run takes an image's hash from the previous version's row when the file's identity and the
    settings are those the row recorded; a rewrite (same size and mtime, as ``cp -p`` leaves it) is read."""
    import pipelines.media as media
    from pipelines.sink import ok_row
    from schemas import CleanSample

    monkeypatch.setattr(media, "SETTLED", 0.0)
    red = tmp_path / "red.png"
    red.write_bytes(_png((200, 0, 0)))
    cfg = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig(),
                      fingerprints={"text": "ft", "image": "fi"})
    raw = RawSample(id="a", text="a red square", image=Media(uri=str(red)), label="red")
    first = cleaning.clean_sample(raw, cfg)
    assert isinstance(first, CleanSample) and set(first.media_keys) == {"image"}
    row = ok_row(first.with_(features={"text": 0, "image": 0}, fingerprints=cfg.fingerprints), "shards/a.tar").to_dict()
    assert json.loads(row["media_stats"]) == first.media_keys

    reads = []
    real_read = cleaning.read_media
    monkeypatch.setattr(cleaning, "read_media", lambda m, limit: reads.append(m.uri) or real_read(m, limit))
    again = cleaning.clean_sample(raw, cfg, row)
    assert isinstance(again, dict) and again["id"] == "a" and again["media_stats"] == row["media_stats"]
    assert reads == []  # unchanged, and the picture was not read
    # a new caption: the picture's features are reused, still without reading it
    changed = cleaning.clean_sample(RawSample(id="a", text="a new caption", image=Media(uri=str(red)), label="red"),
                                    cfg, row)
    assert isinstance(changed, CleanSample) and changed.reused == {"image": "shards/a.tar"} and reads == []
    assert changed.modality_hashes["image"] == first.modality_hashes["image"] and changed.media_keys == first.media_keys
    # another image extractor: the picture is read, cleaned and extracted again
    other = CleanConfig(text=cfg.text, image=cfg.image, audio=cfg.audio, fingerprints={"text": "ft", "image": "new"})
    redo = cleaning.clean_sample(raw, other, row)
    assert isinstance(redo, CleanSample) and "image" not in redo.reused and redo.image is not None
    assert reads == [str(red)]
    # other image settings: the key differs, so the file is read for its new hash
    wider = CleanConfig(text=cfg.text, image=ImageCleanConfig(size=cfg.image.size + 32), audio=cfg.audio,
                        fingerprints=cfg.fingerprints)
    assert cleaning.clean_sample(raw, wider, row).media_keys["image"] != first.media_keys["image"]
    assert reads == [str(red)] * 2
    # rewritten in place with the same size and modification time
    st = os.stat(red)
    blue = _png((0, 0, 200))
    assert len(blue) == st.st_size
    red.write_bytes(blue)
    os.utime(red, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen = cleaning.clean_sample(raw, cfg, row)
    assert isinstance(seen, CleanSample) and seen.plan == "changed" and "image" not in seen.reused
    assert seen.modality_hashes["image"] != first.modality_hashes["image"] and reads == [str(red)] * 3
    # a row of an index written before media keys (no column), or without a key: the file is read
    for old in ({k: v for k, v in row.items() if k != "media_stats"}, {**row, "media_stats": None}):
        cleaning.clean_sample(raw, cfg, old)
    assert reads == [str(red)] * 5


def test_media_in_hand_beside_a_keyed_file_are_hashed_every_time(tmp_path, monkeypatch):
    """Only a modality with a key of its own takes its hash from the row: bytes in hand (a Parquet cell) have none."""
    import pipelines.media as media
    from pipelines.sink import ok_row
    from schemas import CleanSample

    monkeypatch.setattr(media, "SETTLED", 0.0)
    red = tmp_path / "red.png"
    red.write_bytes(_png((200, 0, 0)))
    cfg = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig(),
                      fingerprints={"image": "fi", "audio": "fa"})
    first = cleaning.clean_sample(RawSample(id="a", image=Media(uri=str(red)), audio=Media(data=b"RIFF-one")), cfg)
    assert isinstance(first, CleanSample) and set(first.media_keys) == {"image"}  # the audio is no WAV: dropped
    row = ok_row(first.with_(features={"image": 0, "audio": 0}, fingerprints=cfg.fingerprints), "shards/a.tar").to_dict()
    again = cleaning.clean_sample(RawSample(id="a", image=Media(uri=str(red)), audio=Media(data=b"RIFF-two")), cfg, row)
    assert isinstance(again, CleanSample) and again.modality_hashes["audio"] != first.modality_hashes["audio"]
    assert again.modality_hashes["image"] == first.modality_hashes["image"]


def test_media_keys_a_later_run_recorded_beside_the_index_spare_reading_a_copied_file(tmp_path, monkeypatch):
    """A dataset folder copied elsewhere keeps its bytes and mtimes, not its inodes: the run after the copy
    reads every file and, changing nothing, records the new keys in the version's keys file. The run after
    it takes them from there (``load_previous``) and reads nothing."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipelines.media as media
    from pipelines.cleaning import load_previous
    from pipelines.commit import keys_path
    from pipelines.sink import ok_row
    from schemas import CleanSample

    monkeypatch.setattr(media, "SETTLED", 0.0)
    (tmp_path / "a").mkdir()
    red = tmp_path / "a" / "red.png"
    red.write_bytes(_png((200, 0, 0)))
    cfg = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig(),
                      fingerprints={"image": "fi"})
    raw = RawSample(id="s", image=Media(uri=str(red)))
    first = cleaning.clean_sample(raw, cfg)
    assert isinstance(first, CleanSample)
    row = ok_row(first.with_(features={"image": 0}, fingerprints=cfg.fingerprints), "shards/a.tar").to_dict()
    index = tmp_path / "index" / "000001.parquet"
    index.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([row]), index)

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: the same bytes and mtime, another inode
    shutil.rmtree(tmp_path / "a")
    (tmp_path / "b").rename(tmp_path / "a")
    reads = []
    real_read = cleaning.read_media
    monkeypatch.setattr(cleaning, "read_media", lambda m, limit: reads.append(m.uri) or real_read(m, limit))
    again = cleaning.clean_sample(raw, cfg, load_previous(str(index)).get("s"))
    assert isinstance(again, dict) and reads == [str(red)]  # unchanged, but read to know it
    assert again["media_stats"] != row["media_stats"]
    pq.write_table(pa.table({"id": ["s"], "source": [row["source"]], "media_stats": [again["media_stats"]]}),
                   tmp_path / keys_path("index/000001.parquet"))
    previous = load_previous(str(index))
    assert previous.get("s") == again  # the index's row, with the keys file's media_stats
    assert cleaning.clean_sample(raw, cfg, previous.get("s")) == again and reads == [str(red)]  # not read
