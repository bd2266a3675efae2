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
    # the same size and special ids, other words for the ids: refused too
    from transformers import AutoTokenizer, BertTokenizer

    vocab = AutoTokenizer.from_pretrained(tok).get_vocab()
    words = sorted(vocab, key=vocab.get)
    shuffled = str(tmp_path / "shuffled")
    BertTokenizer(vocab={w: i for i, w in enumerate(words[:5] + words[5:][::-1])}).save_pretrained(shuffled)
    for command in ("evaluate", "generate"):
        assert main([command, "--run", run, "--tokenizer", shuffled]) == 2
        assert "the same size, but other tokens for some ids" in capsys.readouterr().err
    assert main(["generate", "--run", run, "--limit", "1"]) == 0  # the run's own tokenizer
    assert main(["evaluate", "--run", run, "--tokenizer", tok]) == 0  # the same tokenizer named again


def test_generate_on_a_split_without_usable_samples_says_why(no_audio, tmp_path, capsys):
    run = str(tmp_path / "gen")
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    assert main(["train", *TINY, "--data", no_audio, "--out", run, "--task", "generate", "--tokenizer", tok,
                 "--max-target-len", "6"]) == 0
    only_text = str(tmp_path / "only-text")  # nothing to decode from: generate reads the other modalities
    write_synthetic_dataset(only_text, SyntheticConfig(num_samples=24, samples_per_shard=24, feature_dims={"text": 8},
                                                       lengths={"text": (2, 5)}, missing={"text": 0.0}))
    only_image = str(tmp_path / "only-image")  # no text: captioned, with empty references
    write_synthetic_dataset(only_image, SyntheticConfig(num_samples=24, samples_per_shard=24, feature_dims={"image": 6},
                                                        lengths={"image": (3, 3)}, missing={"image": 0.0}))
    capsys.readouterr()
    assert main(["generate", "--run", run, "--data", only_image, "--split", "all", "--limit", "100"]) == 0
    references = [x.strip() for x in capsys.readouterr().out.splitlines() if "reference:" in x]
    assert references == ["reference:"] * 24
    assert main(["generate", "--run", run, "--data", only_text, "--split", "train"]) == 2
    assert "the train split has no sample the generate task can use" in capsys.readouterr().err


def test_a_relative_tokenizer_is_recorded_absolute(no_audio, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_tokenizer("tok")
    assert main(["train", *TINY, "--data", no_audio, "--out", "gen", "--task", "generate", "--tokenizer", "tok",
                 "--max-target-len", "6"]) == 0
    assert json.load(open("gen/config.json"))["tokenizer"] == str(tmp_path / "tok")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["evaluate", "--run", "../gen", "--json"]) == 0, capsys.readouterr().err


def test_evaluate_and_generate_out_of_memory_is_one_line(no_audio, tmp_path, monkeypatch, capsys):
    import torch

    import mbm.train.inference as inference

    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--data", no_audio, "--out", run]) == 0

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(inference, "evaluate_run", oom)
    monkeypatch.setattr(inference, "generate_run", oom)
    capsys.readouterr()
    assert main(["evaluate", "--run", run, "--batch-size", "64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mbm evaluate: error: ran out of GPU memory (OutOfMemoryError: CUDA out of memory")
    assert "--batch-size (now 64)" in err and "Traceback" not in err
    assert main(["generate", "--run", run, "--limit", "4"]) == 1
    assert "mbm generate: error: ran out of GPU memory" in capsys.readouterr().err
    monkeypatch.setattr(inference, "evaluate_run", lambda *a, **k: 1 / 0)  # a bug is not the machine's
    with pytest.raises(ZeroDivisionError):
        main(["evaluate", "--run", run])


def test_the_runs_eval_samples_does_not_cap_evaluate(no_audio, tmp_path, capsys):
    # --eval-samples capped each evaluation during training; `mbm evaluate --split all` reads every sample
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--data", no_audio, "--out", run, "--eval-samples", "3"]) == 0
    uncapped = str(tmp_path / "uncapped")
    assert main(["train", *TINY, "--data", no_audio, "--out", uncapped]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", uncapped, "--split", "all", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["samples"]
    assert main(["evaluate", "--run", run, "--split", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == every > 40  # the labelled ones of 48
    assert main(["evaluate", "--run", run, "--split", "all", "--json", "--eval-samples", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 5


def test_evaluate_says_what_it_left_out_of_a_split(no_audio, tmp_path, capsys, caplog):
    """Samples whose label the run does not know were left out of the accuracy with nothing said (an INFO
    line only), a third of the data in a real case."""
    import logging

    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--data", no_audio, "--out", run]) == 0
    other = str(tmp_path / "other")
    write_synthetic_dataset(other, SyntheticConfig(num_samples=30, samples_per_shard=30,
                                                   feature_dims={"text": 8, "image": 6, "audio": 4},
                                                   labels=("cat", "dog", "never-seen")))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", "--run", run, "--data", other, "--split", "all", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    unknown = metrics["skipped"]["task.unknown_label"]
    assert unknown > 0 and metrics["samples"] + sum(metrics["skipped"].values()) == 30
    assert "evaluation left out " in caplog.text
    assert f"{unknown} labels the run's vocabulary does not hold (task.unknown_label)" in caplog.text


def test_a_checkpoint_of_another_run_is_refused(no_audio, tmp_path, capsys):
    """The model came from the checkpoint and the samples from --run's settings: a retrieve checkpoint given
    to a classify run was scored on samples chosen for classify (with labels, without its pair)."""
    import shutil

    cls, ret = str(tmp_path / "cls"), str(tmp_path / "ret")
    assert main(["train", *TINY, "--data", no_audio, "--out", cls]) == 0
    assert main(["train", *TINY, "--data", no_audio, "--out", ret, "--task", "retrieve", "--pair", "text,image"]) == 0
    theirs = os.path.join(ret, "checkpoints", "step-000002.pt")
    capsys.readouterr()
    assert main(["evaluate", "--run", cls, "--checkpoint", theirs]) == 2
    assert f"--checkpoint {theirs} was saved by the run {ret}, not --run {cls}: " in capsys.readouterr().err
    loose = str(tmp_path / "loose.pt")
    shutil.copy(theirs, loose)
    assert main(["evaluate", "--run", cls, "--checkpoint", loose]) == 2
    assert f"--checkpoint {loose} holds a retrieve model, but --run {cls} trains classify" in capsys.readouterr().err
    assert main(["evaluate", "--run", cls, "--checkpoint", os.path.join(cls, "checkpoints", "step-000002.pt")]) == 0
    assert main(["evaluate", "--run", cls, "--checkpoint", "2"]) == 0


def test_generate_says_what_it_left_out_of_a_split_it_read_to_the_end(tmp_path, capsys, caplog):
    """Samples with none of the modalities the decoder reads were left out of generate's output without a
    word, while evaluate warned about them."""
    import logging

    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=40, samples_per_shard=40,
                                                  feature_dims={"text": 8, "image": 6, "audio": 4},
                                                  missing={"text": 0.0, "image": 0.5, "audio": 1.0}))
    run = str(tmp_path / "gen")
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    assert main(["train", *TINY, "--data", data, "--out", run, "--task", "generate", "--tokenizer", tok,
                 "--max-target-len", "6"]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--run", run, "--split", "all", "--limit", "1000"]) == 0
    shown = capsys.readouterr().out.count("  generated: ")
    assert 0 < shown < 40
    assert (f"generate left out {40 - shown} samples with none of the modalities this model reads (image, audio)"
            in caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--run", run, "--split", "all", "--limit", "1"]) == 0  # stopped early: not known
    assert "left out" not in caplog.text
