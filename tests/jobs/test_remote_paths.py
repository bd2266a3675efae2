"""Job specs, commands and checks with a dataset folder or inputs in an object store (``tests.support.objstore``)."""
import re

import pytest

from jobs.cli import main
from jobs.spec import SpecError, load_spec
from tests.support import objstore


@pytest.fixture(autouse=True)
def _store():
    objstore.clear()
    yield
    objstore.clear()


def _spec(tmp_path, inp, out, extra=""):
    path = tmp_path / "job.toml"
    path.write_text(f'[input]\n{inp}\n[output]\ndir = "{out}"\n{extra}')
    return path


def test_a_remote_output_folder_loses_its_trailing_slashes(tmp_path):
    objstore.put("mbmstore://bkt/data/a.png", b"x")
    spec = load_spec(_spec(tmp_path, 'folder = "mbmstore://bkt/data/"', "mbmstore://bkt/out/"))
    assert spec.output.dir == "mbmstore://bkt/out" and spec.input.folder == "mbmstore://bkt/data"
    spec = load_spec(_spec(tmp_path, 'folder = "mbmstore://bkt/data"', "x"), {"output": {"dir": "mbmstore://bkt/o//"}})
    assert spec.output.dir == "mbmstore://bkt/o"


def test_a_remote_output_inside_the_remote_input_folder_is_refused(tmp_path):
    objstore.put("mbmstore://bkt/data/a.png", b"x")
    with pytest.raises(SpecError, match=r"\[output\] dir = 'mbmstore://bkt/data/out' is inside \[input\] folder"):
        load_spec(_spec(tmp_path, 'folder = "mbmstore://bkt/data"', "mbmstore://bkt/data/out"))
    assert load_spec(_spec(tmp_path, 'folder = "mbmstore://bkt/data"', "mbmstore://bkt/database")).output.dir


def test_a_remote_input_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(SpecError, match=r"\[input\] folder = 'mbmstore://bkt/none' does not exist \(nothing is stored "
                                        r"under it\)"):
        load_spec(_spec(tmp_path, 'folder = "mbmstore://bkt/none"', "mbmstore://bkt/out"))
    with pytest.raises(SpecError, match=r"\[input\] manifest = 'mbmstore://bkt/m.jsonl' does not exist"):
        load_spec(_spec(tmp_path, 'manifest = "mbmstore://bkt/m.jsonl"', "mbmstore://bkt/out"))
    objstore.put("mbmstore://bkt/m.jsonl", b'{"id": "a", "text": "x"}\n')
    assert load_spec(_spec(tmp_path, 'manifest = "mbmstore://bkt/m.jsonl"', "mbmstore://bkt/out")).input.manifest


def test_dataflow_with_a_local_output_folder_is_refused(tmp_path):
    objstore.put("mbmstore://bkt/data/a.png", b"x")
    with pytest.raises(SpecError, match=r"is a local folder, which Dataflow's workers cannot write to"):
        load_spec(_spec(tmp_path, 'folder = "mbmstore://bkt/data"', str(tmp_path / "out"),
                        '[runner]\nname = "DataflowRunner"\n'))


@pytest.mark.parametrize("argv", [["versions", "mbmstore://bkt/out"], ["diff", "mbmstore://bkt/out", "1", "2"],
                                  ["gc", "mbmstore://bkt/out", "--keep", "1"]])
def test_dataset_commands_refuse_a_remote_folder_in_one_line(argv, capsys):
    objstore.put("mbmstore://bkt/out/dataset.json", b"{}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"mbm {argv[0]} reads a local dataset folder, not 'mbmstore://bkt/out'" in err and "Traceback" not in err


def test_train_data_in_an_object_store_says_to_copy_it_here():
    from mbm.data.source import resolve_data

    for data in ("gs://b/out", "gs://b/out/@2", "s3://b/out/shards/*.tar"):
        with pytest.raises(ValueError, match=re.escape(f"--data {data}: the loader reads local shards")):
            resolve_data(data)


def test_the_current_versions_objects_are_checked_before_a_remote_run(tmp_path):
    from jobs.preprocess import _check_current_files
    from schemas import DatasetManifest

    out = "mbmstore://bkt/out"
    previous = DatasetManifest(version=1, shards=["shards/v000001-000000.tar"], shard_sizes=[3], num_samples=3,
                               counts={}, index="index/000001.parquet", shard_bytes=[10240])
    objstore.put(f"{out}/index/000001.parquet", b"x")
    with pytest.raises(SpecError, match=r"1 of the files of its current version 1 are missing \(e.g. "
                                        r"shards/v000001-000000.tar\)"):
        _check_current_files(out, previous)
    objstore.put(f"{out}/shards/v000001-000000.tar", b"\0" * 1024)
    with pytest.raises(SpecError, match=r"the shard shards/v000001-000000.tar of its current version 1 has 1024 bytes, "
                                        r"not the 10240 recorded"):
        _check_current_files(out, previous)
    objstore.put(f"{out}/shards/v000001-000000.tar", b"\0" * 10240)
    _check_current_files(out, previous)
