from __future__ import annotations

import json

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
    return load_raw(raw, CFG)[1]


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
