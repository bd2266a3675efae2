"""The two halves together: `mbm demo` writes shards that `mbm train` and `mbm evaluate` consume."""

import json

import pytest

from jobs.cli import main

pytestmark = pytest.mark.slow


def test_demo_shards_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "34" in printed and f"--data {out}" in printed
    run = tmp_path / "run"
    assert main(["train", "--data", str(out), "--task", "classify", "--fusion", "gated", "--steps", "40",
                 "--batch-size", "8", "--eval-every", "20", "--out", str(run), "--no-progress"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] / 2
    assert (run / "metrics.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", f"{out}@1", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 40 and metrics["split"] == "val" and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["samples"] >= 1 and metrics["loss"] < train[0]["loss"]
