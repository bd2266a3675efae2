import json
import os

import pytest

from jobs.train_cli import main
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset, write_tiny_tokenizer
from mbm.data.tokenizer import default_tokenizer_path

TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--decoder-layers", "1", "--batch-size", "8",
        "--no-progress", "--steps", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def no_audio(tmp_path_factory):
    """A dataset whose index declares audio features although no sample carries any."""
    out = str(tmp_path_factory.mktemp("ds"))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=48, samples_per_shard=16,
                                                 feature_dims={"text": 8, "image": 6, "audio": 4},
                                                 lengths={"text": (2, 5), "image": (3, 3), "audio": (2, 4)},
                                                 missing={"text": 0.0, "image": 0.0, "audio": 1.0}))
    return out


def test_evaluate_on_shards_named_by_a_pattern_masks_a_modality_they_lack(no_audio, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--data", no_audio, "--out", run]) == 0
    capsys.readouterr()
    for data in (no_audio, os.path.join(no_audio, "shards", "*.tar")):
        assert main(["evaluate", "--run", run, "--data", data, "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["step"] == 2


def test_a_tokenizer_other_than_the_decoders_is_refused(no_audio, tmp_path, capsys):
    run = str(tmp_path / "gen")
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    assert main(["train", *TINY, "--data", no_audio, "--out", run, "--task", "generate", "--tokenizer", tok,
                 "--max-target-len", "6"]) == 0
    capsys.readouterr()
    for command in ("evaluate", "generate"):
        assert main([command, "--run", run, "--tokenizer", default_tokenizer_path()]) == 2
        err = capsys.readouterr().err
        assert "does not match the run's decoder: vocabulary size 30522" in err, err
    assert main(["generate", "--run", run, "--limit", "1"]) == 0  # the run's own tokenizer
