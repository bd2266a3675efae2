import pytest

from mbm.data.source import pinned, resolve_data, unpinned_root
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset


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


def test_a_pin_above_the_current_version_is_refused(tmp_path):
    # versions/000002.json of a run stopped before its commit: the next run removes it, maybe for another version 2
    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=6, samples_per_shard=5, feature_dims={"text": 4}))
    current = resolve_data(str(out)).version
    (out / "versions" / f"{current + 1:06d}.json").write_text((out / "dataset.json").read_text())
    with pytest.raises(ValueError, match=rf"version {current + 1} was never committed \(the current version of .* is "
                                         rf"{current}\)"):
        resolve_data(f"{out}/@{current + 1}")
    assert resolve_data(f"{out}/@{current}").version == current


def test_a_version_whose_shards_are_missing_is_refused_before_training(tmp_path):
    import os

    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=12, samples_per_shard=5, feature_dims={"text": 4}))
    shards = resolve_data(str(out)).shards
    os.remove(shards[1])
    with pytest.raises(ValueError, match=r"1 of the 3 shards of dataset version \d+ are missing from .*ds \(e.g. "
                                         r"shards/.*\.tar\): deleted or moved by hand"):
        resolve_data(str(out))
