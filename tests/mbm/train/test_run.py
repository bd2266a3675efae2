import json
import logging
import math
import os

import pytest

from jobs.train_cli import main
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
from mbm.train.config import merge
from mbm.train.plot import plot_metrics
from mbm.train.run import RunDir, append_jsonl, read_jsonl

TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--batch-size", "8", "--no-progress", "--eval-every", "2"]


def test_non_finite_metrics_are_written_as_null_and_plotted_around(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    append_jsonl(path, {"step": 0, "split": "val", "loss": 1.5, "accuracy": 0.5})
    append_jsonl(path, {"step": 2, "split": "val", "loss": math.nan, "accuracy": math.inf, "skipped": {"a": 1}})
    lines = open(path).read().splitlines()
    assert json.loads(lines[1], parse_constant=pytest.fail) == {"step": 2, "split": "val", "loss": None,
                                                                  "accuracy": None, "skipped": {"a": 1}}
    plot_metrics(read_jsonl(path) + [{"step": 3, "split": "val", "loss": math.nan}], str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_ids_with_lone_surrogates_are_written_as_strict_json_that_reads_back_the_same(tmp_path):
    """An id from a JSON "\\ud800" escape made --log-samples stop the run (the file's surrogateescape encodes
    only U+DC80..U+DCFF) and ``mbm evaluate --json`` print a bare NaN."""
    from mbm.train.run import json_line

    path = str(tmp_path / "samples.jsonl")
    records = [{"step": 1, "ids": ["\ud800x", "caf\udce9", "plain é"]}, {"step": 2, "ids": ["b"], "loss": math.nan}]
    for record in records:
        append_jsonl(path, record)
    raw = open(path, "rb").read()
    raw.decode("utf-8")  # strict UTF-8
    assert [json.loads(line, parse_constant=pytest.fail) for line in raw.decode().splitlines()] == [
        records[0], {"step": 2, "ids": ["b"], "loss": None}]
    assert read_jsonl(path)[0] == records[0]
    assert json_line({"loss": math.inf, "ids": ["é"]}) == '{"loss": null, "ids": ["é"]}'  # UTF-8 kept where it can be


def test_a_resume_cuts_a_sample_log_holding_lone_surrogates_back_to_its_checkpoint(tmp_path):
    """--resume --log-samples on a dataset with such an id stopped with a UnicodeEncodeError traceback:
    cutting the log back to the checkpoint's step rewrote its records without ``json_line``'s escapes."""
    from mbm.train.run import truncate_jsonl

    path = str(tmp_path / "samples-rank0.jsonl")
    records = [{"step": 1, "ids": ["\ud800x", "caf\udce9"]}, {"step": 2, "ids": ["b"], "loss": math.nan}]
    for record in records:
        append_jsonl(path, record)
    truncate_jsonl(path, 1)
    assert read_jsonl(path) == records[:1]
    open(path, "rb").read().decode("utf-8")  # still strict UTF-8


def test_a_last_line_cut_short_is_dropped_and_a_bad_line_elsewhere_is_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}]
    assert "cut short" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        read_jsonl(str(path))


def test_resume_after_a_kill_inside_a_write(tmp_path, caplog):
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=40, samples_per_shard=20, feature_dims={"text": 6}))
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--data", data, "--out", out, "--steps", "4", "--stop-at", "2"]) == 0
    run = RunDir(out)
    leftovers = [os.path.join(run.checkpoints, "step-000004.pt.tmp-99999"), os.path.join(out, "config.json.tmp-99999")]
    for path in leftovers:
        open(path, "wb").write(b"half a checkpoint")
    with open(run.metrics, "a") as f:
        f.write('{"step": 3, "split": "tr')  # a line cut short
    with caplog.at_level(logging.WARNING):
        assert main(["train", *TINY, "--data", data, "--out", out, "--steps", "4", "--resume"]) == 0
    assert not any(os.path.exists(p) for p in leftovers)
    assert "left half-written" in caplog.text
    assert [r["step"] for r in read_jsonl(run.metrics) if r["split"] == "val"] == [0, 2, 4]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a finished run says so
        assert main(["train", *TINY, "--data", data, "--out", out, "--steps", "4", "--resume"]) == 0
    assert "already at step 4 (--steps 4): nothing to train" in caplog.text


def test_out_of_gpu_memory_mid_run_says_what_to_do_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    import torch

    from mbm.train.trainer import Trainer

    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=40, samples_per_shard=20, feature_dims={"text": 6}))
    out = str(tmp_path / "run")
    step = Trainer.train_step
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", failing)
    assert main(["train", *TINY, "--data", data, "--out", out, "--steps", "6"]) == 1
    err = capsys.readouterr().err
    assert "mbm train: error: ran out of GPU memory (OutOfMemoryError: CUDA out of memory" in err
    assert "--resume" in err and "--batch-size (now 8)" in err and "Traceback" not in err
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(["train", *TINY, "--data", data, "--out", out, "--steps", "6", "--resume"]) == 0
    steps = [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("split") == "train"]
    assert steps and steps[-1] == 6 and min(steps) >= 1


@pytest.mark.parametrize("name, text, said", [
    ("config.json", '{"steps": 3,', r"config.json is not valid JSON \(.*\); it holds the run's settings: put back"),
    ("config.json", "[1, 2]", r"config.json holds a JSON list, not the run's settings"),
    ("labels.json", "{'a'", r"labels.json is not valid JSON \(.*\); it holds the run's label vocabulary"),
    ("labels.json", '{"a": 1}', r"labels.json holds a JSON dict, not the run's list of labels"),
])
def test_a_run_file_that_is_not_what_the_run_wrote_is_named(tmp_path, name, text, said):
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.root)
    run.write_config(merge({"data": "d"}))
    run.write_labels(["a", "b"])
    with open(os.path.join(run.root, name), "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=said):
        run.read_labels() if name == "labels.json" else run.read_config()
