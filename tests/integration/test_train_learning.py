"""Every fusion strategy and task learns on a small synthetic corpus (a stand-in for a real one)."""

import os

import pytest

from jobs.train_cli import main
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset, write_tiny_tokenizer
from mbm.train.run import read_jsonl

DIMS = {"text": 24, "image": 32, "audio": 8}
SMALL = ["--d-model", "32", "--heads", "4", "--layers", "1", "--decoder-layers", "1", "--batch-size", "16",
         "--no-progress", "--warmup-steps", "10", "--lr", "2e-3", "--log-every", "10", "--dropout", "0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=400, samples_per_shard=400, feature_dims=DIMS,
                                                 lengths={"text": (3, 8), "image": (4, 4), "audio": (4, 12)},
                                                 missing={"text": 0.1, "image": 0.1, "audio": 0.3}, noise=2.0))
    return out


def records(out):
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["concat", "weighted_sum", "gated", "cross_attention"])
def test_classify_loss_halves_and_beats_the_majority_class(data, tmp_path, fusion):
    out = str(tmp_path / fusion)
    assert main(["train", *SMALL, "--data", data, "--out", out, "--fusion", fusion, "--steps", "120",
                 "--eval-every", "120", "--val-fraction", "0.25"]) == 0
    train, val = records(out)
    assert train[-1]["loss_avg"] < train[0]["loss"] / 2
    assert val[-1]["accuracy"] > val[-1]["majority_rate"] + 0.1


@pytest.mark.slow
def test_retrieve_beats_chance(data, tmp_path):
    out = str(tmp_path / "ret")
    assert main(["train", *SMALL, "--data", data, "--out", out, "--task", "retrieve", "--steps", "120",
                 "--eval-every", "120", "--val-fraction", "0.25"]) == 0
    _, val = records(out)
    assert val[-1]["recall@5"] > 2 * val[-1]["chance@5"]


@pytest.mark.slow
def test_generate_lowers_held_out_token_loss_and_decodes(data, tmp_path, capsys):
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "gen")
    assert main(["train", *SMALL, "--data", data, "--out", out, "--task", "generate", "--tokenizer", tok,
                 "--steps", "120", "--eval-every", "20", "--max-target-len", "8", "--val-fraction", "0.25"]) == 0
    _, val = records(out)
    assert val[-1]["loss"] < val[0]["loss"] * 0.7
    capsys.readouterr()
    assert main(["generate", "--run", out, "--limit", "4"]) == 0
    generated = [x.split("generated:")[1].strip() for x in capsys.readouterr().out.splitlines() if "generated:" in x]
    assert len(generated) == 4 and all(g.startswith("a ") for g in generated)
