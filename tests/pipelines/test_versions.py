import json

import pytest

from pipelines.versions import diff_versions, gc, list_versions, load_version
from schemas import DatasetManifest


def _dataset(out, versions: int):
    (out / "versions").mkdir(parents=True)
    for v in range(1, versions + 1):
        m = DatasetManifest(version=v, shards=[f"shards/v{v:06d}-000000.tar"], shard_sizes=[10], num_samples=10,
                            counts={"input": 10}, index=f"index/{v:06d}.parquet")
        (out / "versions" / f"{v:06d}.json").write_text(m.to_json())
    (out / "dataset.json").write_text(m.to_json())


@pytest.mark.parametrize("damaged, detail", [
    (b'{"version": 1, "sha', "JSONDecodeError: Unterminated string"),
    (b"\xff\xfe{}", "UnicodeDecodeError"),
    (b'{"version": 1}', "TypeError: DatasetManifest.__init__() missing 5 required positional arguments"),
    (b"[]", "AttributeError"),
])
def test_a_damaged_old_manifest_is_named_with_what_to_do(tmp_path, damaged, detail):
    out = tmp_path / "ds"
    _dataset(out, 3)
    path = out / "versions" / "000002.json"
    path.write_bytes(damaged)
    for call in (lambda: list_versions(str(out)), lambda: gc(str(out), 1, dry_run=True),
                 lambda: diff_versions(str(out), 2, 3)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value).startswith(f"{path} cannot be read ({detail}")
        assert str(info.value).endswith("): put back a good copy of it, or delete it to give up version 2 (mbm gc "
                                        "then deletes the shards and index only that version used)")


def test_a_damaged_copy_of_the_current_manifest_says_to_copy_dataset_json(tmp_path):
    out = tmp_path / "ds"
    _dataset(out, 2)
    path = out / "versions" / "000002.json"
    path.write_text(path.read_text()[:40])
    assert [m.version for m in list_versions(str(out))] == [1, 2]  # the current version is dataset.json's
    with pytest.raises(ValueError, match=rf"; it is a copy of the current version's dataset.json: cp "
                                         rf"{out / 'dataset.json'} {path}$"):
        load_version(str(out), 2)
    assert json.loads((out / "dataset.json").read_text())["version"] == 2
