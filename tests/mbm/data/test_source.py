import pytest

from mbm.data.source import pinned, resolve_data, unpinned_root
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
from schemas import DatasetManifest
from tests.support.scans import settle_shards


@pytest.fixture(scope="module")
def at_folder(tmp_path_factory):
    """A dataset written to a folder whose own name ends in @digits."""
    out = str(tmp_path_factory.mktemp("ds") / "coco@2017")
    write_synthetic_dataset(out, SyntheticConfig(num_samples=12, samples_per_shard=5, feature_dims={"text": 4}))
    return out


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_folder_named_like_a_pin_is_the_folder(at_folder, suffix):
    source = resolve_data(at_folder + suffix)
    assert len(source.shards) == 3 and all(s.startswith(at_folder) for s in source.shards)
    assert unpinned_root(at_folder + suffix) is None
    assert pinned(at_folder, source.version) == f"{at_folder}/@{source.version}"
    assert unpinned_root(pinned(at_folder, source.version)) == at_folder


def test_a_pin_below_a_folder_named_like_a_pin(at_folder):
    spec = f"{at_folder}/@{resolve_data(at_folder).version}"
    assert resolve_data(spec).shards == resolve_data(at_folder).shards
    with pytest.raises(ValueError, match=r"no dataset manifest at .*coco@2017/versions/000007.json \(no such version"):
        resolve_data(f"{at_folder}/@7")


def test_a_version_manifest_given_directly(at_folder):
    version = resolve_data(at_folder).version
    source = resolve_data(f"{at_folder}/versions/{version:06d}.json")
    assert source.shards == resolve_data(at_folder).shards and source.version == version


def test_a_data_path_that_does_not_exist_is_named_as_missing(tmp_path):
    with pytest.raises(ValueError, match=r"nope: no such folder or file; give the output folder of `mbm preprocess`"):
        resolve_data(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"matches no file"):  # a pattern is still a pattern
        resolve_data(str(tmp_path / "nope" / "*.tar"))


def test_a_pin_to_a_version_never_committed_is_refused(tmp_path):
    # what a run stopped before its commit leaves: shards, index and job spec of the next version, no manifest
    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=6, samples_per_shard=5, feature_dims={"text": 4}))
    current = resolve_data(str(out)).version
    (out / "versions" / f"{current + 1:06d}.toml").write_text("# spec\n")
    (out / "shards" / f"v{current + 1:06d}-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"no dataset manifest at .*versions/{current + 1:06d}.json \(no such version: "
                                         r"never committed"):
        resolve_data(f"{out}/@{current + 1}")
    assert resolve_data(f"{out}/@{current}").version == current


def test_a_committed_version_above_a_put_back_dataset_json_still_reads(tmp_path):
    # dataset.json rolled back by hand: the newer version stays committed and whole (mbm preprocess refuses to
    # run until one is made current, and deletes nothing)
    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=6, samples_per_shard=5, feature_dims={"text": 4}))
    current = resolve_data(str(out))
    newer = DatasetManifest.from_json((out / "dataset.json").read_text())
    newer.version = current.version + 1
    (out / "versions" / f"{newer.version:06d}.json").write_text(newer.to_json())
    assert resolve_data(f"{out}/@{newer.version}").shards == current.shards


def test_the_current_version_pinned_reads_dataset_json_where_its_versions_file_is_missing(tmp_path):
    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=6, samples_per_shard=5, feature_dims={"text": 4}))
    current = resolve_data(str(out))
    (out / "versions" / f"{current.version:06d}.json").unlink()  # killed right after the commit
    pinned = resolve_data(f"{out}/@{current.version}")
    assert pinned.version == current.version and pinned.shards == current.shards


def test_a_version_whose_shards_are_missing_is_refused_before_training(tmp_path):
    import os

    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=12, samples_per_shard=5, feature_dims={"text": 4}))
    shards = resolve_data(str(out)).shards
    os.remove(shards[1])
    with pytest.raises(ValueError, match=r"1 of the 3 shards of dataset version \d+ are missing from .*ds \(e.g. "
                                         r"shards/.*\.tar\): deleted or moved by hand"):
        resolve_data(str(out))


def test_a_pattern_over_a_dataset_folders_shards_of_several_versions_warns_of_repeated_ids(tmp_path, caplog):
    """OUT/shards/*.tar after two versions read every version's samples together: each id twice, and stale
    samples beside their replacements, without a word."""
    import logging

    out = tmp_path / "ds"
    cfg = SyntheticConfig(num_samples=6, samples_per_shard=5, feature_dims={"text": 4})
    write_synthetic_dataset(str(out), cfg, version=1)
    write_synthetic_dataset(str(out), cfg, version=2)
    with caplog.at_level(logging.WARNING):
        source = resolve_data(str(out / "shards" / "*.tar"))
    assert len(source.shards) == 4
    assert ("6 of the 12 samples of these 4 shards have an id another of them has too, and each is read as often as "
            "it appears: they are shards of 2 versions of an mbm dataset folder, which keeps every version's shards; "
            "give the folder (OUT, or OUT/@N for version N) to read one version") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_data(str(out / "shards" / "v000002-*.tar"))
    assert "have an id another of them has too" not in caplog.text


def _npy(arr):
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def _shard(path, samples):
    import json

    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for key, doc, members in samples:
            sink.write({"__key__": key, "json": doc if isinstance(doc, bytes) else json.dumps(doc).encode(), **members})


def test_a_shard_pattern_is_described_from_the_scans_and_replayed_by_the_next_command(tmp_path, monkeypatch):

    import numpy as np

    import mbm.data.scan as scan

    good_text, good_image = _npy(np.ones((3, 4))), _npy(np.ones((2, 6)))
    _shard(tmp_path / "a.tar", [
        # the first sample's image is 5 wide and not finite: the dims come from the next sample that decodes
        ("a0", {"id": "a0", "modalities": ["text", "image"], "label": "cat", "meta": {"split": "Train"}},
         {"text.npy": good_text, "image.npy": _npy(np.full((2, 5), np.inf))}),
        ("a1", {"id": "a1", "modalities": ["text", "image"], "label": "dog", "meta": {"split": "test"}},
         {"text.npy": good_text, "image.npy": good_image}),
        ("a2", b"{broken", {"text.npy": good_text}),
        ("a3", {"id": "a3", "modalities": []}, {}),
    ])
    _shard(tmp_path / "b.tar", [
        ("b0", {"id": "b0", "modalities": ["audio"], "label": 1}, {"audio.npy": _npy(np.ones((7, 3)))}),
        ("b1", {"id": "b1", "modalities": ["text"], "label": "cat", "meta": {"split": "test"}},
         {"text.npy": b"not an array"}),
    ])
    settle_shards(monkeypatch, tmp_path / "a.tar", tmp_path / "b.tar")
    monkeypatch.setattr(scan, "_CACHE", scan.ScanCache(limit=0, folder=str(tmp_path / "scans")))
    source = resolve_data(str(tmp_path / "*.tar"))
    # samples with a usable doc count, corrupt arrays or not (the loader skips those as it reads them)
    assert source.shard_sizes == [2, 2]
    assert source.feature_dims == {"text": 4, "image": 6, "audio": 3}
    assert source.labels == [1, "cat", "dog"]
    assert source.splits == {"test": 2, "train": 1}
    with monkeypatch.context() as m:  # the next command replays the scans kept on disk
        m.setattr(scan, "read_shards", lambda *_a, **_k: iter(()))
        again = resolve_data(str(tmp_path / "*.tar"))
    assert (again.shard_sizes, again.feature_dims, again.labels, again.splits) == (
        source.shard_sizes, source.feature_dims, source.labels, source.splits)


@pytest.mark.parametrize("env, share", [({}, (8, 0)), ({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "2"}, (2, 5)),
                                        ({"LOCAL_WORLD_SIZE": "16", "LOCAL_RANK": "15"}, (1, 9)),
                                        ({"LOCAL_WORLD_SIZE": "x"}, (8, 0))])
def test_each_rank_on_a_machine_scans_with_its_share_of_the_cores(monkeypatch, env, share):
    import os

    from mbm.data import source

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert source._machine_share(10) == share
