import json
import logging
import os

import pytest
import torch

from jobs.train_cli import main
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset, write_tiny_tokenizer
from mbm.train.run import read_jsonl

DIMS = {"text": 12, "image": 10, "audio": 6}
TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--decoder-layers", "1", "--embed-dim", "8",
        "--batch-size", "8", "--no-progress", "--warmup-steps", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=160, samples_per_shard=60, feature_dims=DIMS,
                                                 lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)},
                                                 missing={"text": 0.1, "image": 0.1, "audio": 0.3}))
    return out


def train(*argv):
    return main(["train", *TINY, *argv])


def test_classify_run_writes_metrics_plot_config_and_checkpoints(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train("--data", data, "--out", out, "--steps", "12", "--eval-every", "6", "--log-every", "5",
                 "--fusion", "gated") == 0
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert train_steps == [1, 5, 10, 12] and [r["step"] for r in val] == [0, 6, 12]
    assert all({"loss", "lr", "samples_per_s"} <= set(r) for r in records if r["split"] == "train")
    assert all({"loss", "accuracy", "majority_rate"} <= set(r) for r in val)
    assert open(os.path.join(out, "metrics.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(out, "config.json")))["fusion"] == "gated"
    assert os.path.isfile(os.path.join(out, "config.toml"))
    assert json.load(open(os.path.join(out, "labels.json"))) == [0, 1, "bird", "cat", "dog"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step-000006.pt", "step-000012.pt"]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[-1]["split"] == "val" and printed[-1]["step"] == 12

    assert main(["evaluate", "--run", out, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 12 and metrics["accuracy"] == pytest.approx(val[-1]["accuracy"])


def test_resumed_run_matches_an_uninterrupted_one(data, tmp_path):
    common = ["--data", data, "--steps", "24", "--eval-every", "8", "--log-every", "4", "--log-samples",
              "--fusion", "cross_attention", "--shuffle-buffer", "32"]
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    assert train(*common, "--out", once) == 0
    assert train(*common, "--out", twice, "--stop-at", "12") == 0
    assert train(*common, "--out", twice, "--resume") == 0
    a, b = read_jsonl(os.path.join(once, "metrics.jsonl")), read_jsonl(os.path.join(twice, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]
    ids_a = read_jsonl(os.path.join(once, "samples-rank0.jsonl"))
    ids_b = read_jsonl(os.path.join(twice, "samples-rank0.jsonl"))
    assert [r["step"] for r in ids_b] == list(range(1, 25))
    assert ids_a == ids_b  # every step saw the same samples: nothing repeated or skipped at the resume


def test_out_with_a_run_needs_resume_and_bad_flags_exit_2(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train("--data", data, "--out", out, "--steps", "2", "--eval-every", "2") == 0
    capsys.readouterr()
    assert train("--data", data, "--out", out, "--steps", "4") == 2
    assert "--resume" in capsys.readouterr().err
    assert train("--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")) == 2
    assert "--data" in capsys.readouterr().err
    assert train("--out", str(tmp_path / "x")) == 2
    assert "--data is required" in capsys.readouterr().err
    assert train("--data", data, "--out", str(tmp_path / "y"), "--task", "retrieve", "--pair", "text,smell") == 2
    assert "--pair" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train("--data", data, "--fusion", "average")
    assert exit_info.value.code == 2 and "--fusion" in capsys.readouterr().err
    assert main(["generate", "--run", out, "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "none")]) == 2
    assert "--run" in capsys.readouterr().err


def test_retrieve_picks_the_common_pair_and_reports_recall(data, tmp_path, capsys):
    out = str(tmp_path / "ret")
    assert train("--data", data, "--out", out, "--task", "retrieve", "--steps", "4", "--eval-every", "4",
                 "--fusion", "weighted_sum") == 0
    assert json.load(open(os.path.join(out, "config.json")))["pair"] == ["text", "image"]
    val = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val"][-1]
    assert {"recall@1", "recall@5", "recall@10", "chance@5"} <= set(val)


def test_generate_trains_and_decodes_text(data, tmp_path, capsys):
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "gen")
    assert train("--data", data, "--out", out, "--task", "generate", "--tokenizer", tok, "--steps", "4",
                 "--eval-every", "4", "--max-target-len", "8") == 0
    capsys.readouterr()
    assert main(["generate", "--run", out, "--limit", "3", "--beam", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([x for x in lines if x.strip().startswith("generated:")]) == 3
    assert all(x.strip().startswith("reference: a ") for x in lines if "reference:" in x)


def test_accumulation_and_loader_workers_see_the_same_samples(data, tmp_path, caplog):
    common = ["--data", data, "--steps", "3", "--eval-every", "3", "--log-samples", "--accum-steps", "2"]
    with caplog.at_level(logging.INFO, logger="mbm.train.trainer"):
        assert train(*common, "--out", str(tmp_path / "w0")) == 0
        assert "loader workers take cores" not in caplog.text
        assert train(*common, "--out", str(tmp_path / "w2"), "--workers", "2") == 0
    if torch.get_num_threads() + 2 > len(os.sched_getaffinity(0)):
        assert "--workers 2: training on the CPU" in caplog.text
    a = read_jsonl(str(tmp_path / "w0" / "samples-rank0.jsonl"))
    b = read_jsonl(str(tmp_path / "w2" / "samples-rank0.jsonl"))
    assert [len(r["ids"]) for r in a] == [16, 16, 16]  # two batches of 8 per optimizer step
    assert a == b
    la = read_jsonl(str(tmp_path / "w0" / "metrics.jsonl"))
    lb = read_jsonl(str(tmp_path / "w2" / "metrics.jsonl"))
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)
