"""A folder in an object store: its listing's metadata stands for its objects' bytes on a re-run."""

import json
import time

import pytest

import pipelines.media as media
from pipelines import cleaning
from pipelines.clean import AudioCleanConfig, ImageCleanConfig, TextCleanConfig
from pipelines.cleaning import CleanConfig
from pipelines.readers import iter_folder
from pipelines.sink import ok_row
from schemas import CleanSample, Media, RawSample
from tests.support import objstore


@pytest.fixture
def store(monkeypatch):
    objstore.clear()
    monkeypatch.setattr(media, "KEYED_SCHEMES", media.KEYED_SCHEMES | {"mbmstore"})
    yield "mbmstore://bucket"
    objstore.clear()


def _png(rgb):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), rgb).save(buf, "PNG")
    return buf.getvalue()


def test_remote_stamp_only_for_object_stores_and_settled_objects():
    old = time.time() - 3600
    assert media.remote_stamp("gs://b/a.jpg", 10, old) == f"10\0{old!r}"
    assert media.remote_stamp("S3://b/a.jpg", 10, old) is not None and media.remote_stamp("azfs://a/b/c", 1, old)
    assert media.remote_stamp("gs://b/a.jpg", 10, time.time() - 5) is None  # updated within REMOTE_SETTLED
    assert media.remote_stamp("gs://b/a.jpg", 10, 0.0) is None  # a listing without update times
    assert media.remote_stamp("hdfs://n/a.jpg", 10, old) is None  # a client can set HDFS's times
    assert media.remote_stamp("/data/a.jpg", 10, old) is None
    a, b = Media(uri="gs://b/a.jpg", stamp="10\x001.0"), Media(uri="gs://b/a.jpg", stamp="10\x002.0")
    assert media.media_identity(a) == "gs://b/a.jpg\x0010\x001.0" != media.media_identity(b)
    assert media.media_identity(Media(uri="gs://b/a.jpg")) is None  # no listing said anything of it


@pytest.mark.parametrize("with_metadata", [False, True])
def test_a_remote_folders_objects_get_their_listings_stamps(store, with_metadata):
    objstore.put(f"{store}/cats/a.png", _png((200, 0, 0)), 3600)
    objstore.put(f"{store}/dogs/b.png", _png((0, 0, 200)), 3600)
    objstore.put(f"{store}/dogs/new.png", _png((0, 200, 0)), 1)  # just written: no stamp yet
    if with_metadata:
        rows = [{"file_name": n, "text": n} for n in ("cats/a.png", "dogs/b.png", "dogs/new.png")]
        objstore.put(f"{store}/metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), 3600)
    samples = {s.id: s for s in iter_folder(store) if isinstance(s, RawSample)}
    assert set(samples) == {"cats/a.png", "dogs/b.png", "dogs/new.png"}
    data, updated = objstore.OBJECTS[f"{store}/cats/a.png"]
    assert samples["cats/a.png"].image.stamp == f"{len(data)}\0{updated!r}"
    assert samples["dogs/b.png"].image.stamp and samples["dogs/new.png"].image.stamp is None


def test_a_re_run_does_not_read_a_remote_object_its_listing_says_is_unchanged(store, monkeypatch):
    objstore.put(f"{store}/cats/a.png", _png((200, 0, 0)), 3600)
    objstore.put(f"{store}/dogs/b.png", _png((0, 0, 200)), 3600)
    cfg = CleanConfig(text=TextCleanConfig(), image=ImageCleanConfig(), audio=AudioCleanConfig(),
                      fingerprints={"image": "fi"})

    def listed():
        return [s for s in iter_folder(store) if isinstance(s, RawSample)]

    rows = {}
    for raw in listed():
        first = cleaning.clean_sample(raw, cfg)
        assert isinstance(first, CleanSample) and set(first.media_keys) == {"image"}
        rows[raw.id] = ok_row(first.with_(features={"image": 0}, fingerprints=cfg.fingerprints), "shards/a.tar").to_dict()
    reads = []
    real_read = cleaning.read_media
    monkeypatch.setattr(cleaning, "read_media", lambda m, limit: reads.append(m.uri) or real_read(m, limit))
    for raw in listed():
        again = cleaning.clean_sample(raw, cfg, rows[raw.id])
        assert isinstance(again, dict) and again["media_stats"] == rows[raw.id]["media_stats"]
    assert reads == []  # the listing alone said both were unchanged
    # one rewritten (the same size: another colour of the same picture) gets a new update time: it is read
    objstore.put(f"{store}/cats/a.png", _png((0, 200, 0)), 1800)
    assert len(_png((0, 200, 0))) == len(_png((200, 0, 0)))
    changed = {raw.id: cleaning.clean_sample(raw, cfg, rows[raw.id]) for raw in listed()}
    assert reads == [f"{store}/cats/a.png"]
    assert isinstance(changed["cats/a.png"], CleanSample) and changed["cats/a.png"].plan == "changed"
    assert isinstance(changed["dogs/b.png"], dict)
