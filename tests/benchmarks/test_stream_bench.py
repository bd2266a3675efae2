import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from stream import times_four  # noqa: E402

from mbm.data.source import resolve_data  # noqa: E402
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset  # noqa: E402


def test_four_times_view_lists_every_shard_four_times_and_reads_as_a_dataset(tmp_path):
    write_synthetic_dataset(str(tmp_path / "x1"), SyntheticConfig(num_samples=30, samples_per_shard=8, seed=1))
    source = resolve_data(str(tmp_path / "x1"))
    view = resolve_data(times_four(source, str(tmp_path / "x4")))
    assert len(view.shards) == 4 * len(source.shards) and view.shard_sizes == 4 * source.shard_sizes
    assert [Path(p).resolve() for p in view.shards] == 4 * [Path(p).resolve() for p in source.shards]
    assert view.labels == source.labels and view.feature_dims == source.feature_dims
    assert sum(view.shard_sizes) == 120


def _ids_each_reader_keeps(data, task, pair=()):
    """The train split's ids the mbm stream uses for ``task``, and those the plain webdataset reader keeps."""
    from dataclasses import replace

    import webdataset as wds
    from stream_read import _Keep, train_stream

    from mbm.data.errors import SkipLog
    from mbm.data.stream import ShardStream
    from mbm.train.config import TrainConfig

    source = resolve_data(data)
    cfg = TrainConfig(data=data, task=task, pair=list(pair), batch_size=2, workers=0)
    scfg = replace(train_stream(source, cfg), shuffle=False, drop_last=False)
    used = {s.id for batch in ShardStream(scfg).raw_batches(SkipLog(quiet=True)) for s in batch}
    keep = _Keep(scfg)
    kept = {raw["doc"]["id"] for raw in wds.WebDataset(list(source.shards), shardshuffle=False, empty_check=False)
            if keep(raw)}
    return used, kept


def test_the_plain_webdataset_reader_keeps_the_samples_each_task_trains_on(tmp_path):
    data = str(tmp_path / "d")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=120, samples_per_shard=25, seed=3))
    sizes = {}
    for task, pair in (("classify", ()), ("retrieve", ("image", "text")), ("retrieve", ("audio", "text")),
                       ("generate", ())):
        used, kept = _ids_each_reader_keeps(data, task, pair)
        assert used == kept and used, (task, pair)
        sizes[task, pair] = len(used)
    # each task leaves out different samples: unlabelled ones, those lacking one of the pair, those without text
    assert len(set(sizes.values())) == len(sizes), sizes


def test_the_task_follows_the_dataset_and_a_dataset_with_nothing_to_train_on_is_refused(tmp_path):
    import argparse

    import pytest
    from stream import pick_task

    def picked(config, task=None):
        path = str(tmp_path / f"d{len(list(tmp_path.iterdir()))}")
        write_synthetic_dataset(path, config)
        args = argparse.Namespace(task=task, pair=None)
        pick_task(resolve_data(path), args)
        return args.task, args.pair

    dims = {"text": 8, "image": 6, "audio": 4}
    assert picked(SyntheticConfig(num_samples=20, samples_per_shard=10, feature_dims=dims, seed=1))[0] == "classify"
    unlabelled = SyntheticConfig(num_samples=20, samples_per_shard=10, feature_dims=dims, null_label=1.0, seed=1)
    task, pair = picked(unlabelled)
    assert task == "retrieve" and len(pair.split(",")) == 2
    assert picked(unlabelled, "generate") == ("generate", None)
    audio_only = SyntheticConfig(num_samples=20, samples_per_shard=10, feature_dims={"audio": 4}, null_label=1.0,
                                 missing={}, seed=1)
    with pytest.raises(SystemExit, match="nothing to train on: no labels .* no sample with a text"):
        picked(audio_only)
    with pytest.raises(SystemExit, match="--task classify: .* no labelled samples"):
        picked(audio_only, "classify")


@pytest.mark.parametrize("argv, said", [
    (["--reps", "0"], "--reps must be >= 1, got 0"),  # was KeyError: ('mbm', 0)
    (["--steps", "0"], "--steps must be >= 1, got 0"),  # was ZeroDivisionError
    (["--workers", ""], "--workers and --train-workers need at least one count"),  # was IndexError
    (["--data", "/nonexistent/out"], "--data /nonexistent/out: no such folder or file"),  # was a traceback
])
def test_arguments_that_cannot_work_are_an_argparse_error(monkeypatch, capsys, argv, said):
    from stream import parse_args

    monkeypatch.setattr(sys, "argv", ["stream.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        parse_args()
    assert exit_info.value.code == 2 and said in capsys.readouterr().err
