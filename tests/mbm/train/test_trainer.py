import json
import logging
import os
import sys
from dataclasses import replace

import pytest
import torch

from jobs.train_cli import main
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset, write_tiny_tokenizer
from mbm.train.run import read_jsonl
from tests.support.tiny_run import DIMS, TINY


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
    best = max((r for r in val if r["step"]), key=lambda r: (r["accuracy"], -r["loss"]))  # --best-by auto: accuracy
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["best", "latest", "step-000006.pt", "step-000012.pt"]
    assert open(os.path.join(out, "checkpoints", "best")).read() == f"step-{best['step']:06d}.pt\n"
    said = capsys.readouterr()
    printed = [json.loads(line) for line in said.out.splitlines()]
    assert [r["split"] for r in printed] == ["train", "val"] and printed[-1]["step"] == 12
    path = os.path.join(out, "checkpoints", f"step-{best['step']:06d}.pt")
    assert (f"mbm train: best held-out accuracy {best['accuracy']:.4g} at step {best['step']}: {path} "
            "(mbm evaluate --checkpoint best)") in said.err

    assert main(["evaluate", "--run", out, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 12 and metrics["accuracy"] == pytest.approx(val[-1]["accuracy"])

    assert main(["evaluate", "--run", out, "--json", "--per-class"]) == 0
    classes = json.loads(capsys.readouterr().out)["per_class"]
    assert [c["label"] for c in classes] == [lbl for lbl in [0, 1, "bird", "cat", "dog"]
                                             if lbl in {c["label"] for c in classes}]
    assert sum(c["support"] for c in classes) == metrics["samples"]
    assert sum(c["recall"] * c["support"] for c in classes) / metrics["samples"] == pytest.approx(metrics["accuracy"])
    assert sum(c["f1"] for c in classes) / len(classes) == pytest.approx(metrics["macro_f1"])
    assert main(["evaluate", "--run", out, "--per-class"]) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["label", "support"])
    assert len(table) - header - 1 == len(classes)


def test_the_best_held_out_evaluation_keeps_its_checkpoint_and_evaluate_reads_it(data, tmp_path, capsys, caplog):
    """--keep-checkpoints 1 keeps the newest and the best by --best-by; a resumed run compares with the best
    before it; evaluate and generate take --checkpoint best."""
    out = str(tmp_path / "run")
    common = ["--data", data, "--out", out, "--eval-every", "2", "--keep-checkpoints", "1", "--best-by", "loss",
              "--lr", "2e-2", "--checkpoint-every", "5"]
    caplog.set_level(logging.INFO)
    assert train(*common, "--steps", "12", "--stop-at", "6") == 0
    assert train(*common, "--steps", "12", "--resume") == 0

    def best_of(records):
        return min((r for r in records if r["split"] == "val" and r["step"]), key=lambda r: (r["loss"], r["step"]))

    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    best = best_of(records)
    kept = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert kept == sorted({"best", "latest", "step-000012.pt", f"step-{best['step']:06d}.pt"})
    assert f"best held-out loss: {best['loss']:.4g} at step {best['step']}" in caplog.text
    capsys.readouterr()
    assert main(["evaluate", "--run", out, "--checkpoint", "best", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == best["step"] and metrics["loss"] == pytest.approx(best["loss"], rel=1e-5)

    # resumed with another --best-by: the best so far is chosen again among the checkpoints still there
    assert train(*common, "--steps", "14", "--resume", "--best-by", "accuracy") == 0
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    by_accuracy = max((r for r in records if r["split"] == "val" and r["step"] and
                       os.path.isfile(os.path.join(out, "checkpoints", f"step-{r['step']:06d}.pt"))),
                      key=lambda r: (r["accuracy"], -r["loss"]))
    assert open(os.path.join(out, "checkpoints", "best")).read() == f"step-{by_accuracy['step']:06d}.pt\n"

    assert train("--data", data, "--out", str(tmp_path / "bad"), "--best-by", "recall@1") == 2
    assert ("--best-by must be one of auto, accuracy, balanced_accuracy, macro_f1, top5_accuracy, loss for --task "
            "classify, got 'recall@1'") in capsys.readouterr().err
    assert train("--data", data, "--out", str(tmp_path / "bad"), "--best-by", "top5_accuracy") == 2
    assert "--best-by top5_accuracy: the dataset has 5 labels" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    fresh = str(tmp_path / "fresh")
    assert train("--data", data, "--out", fresh, "--steps", "10", "--eval-every", "5", "--stop-at", "2") == 0
    assert sorted(os.listdir(os.path.join(fresh, "checkpoints"))) == ["latest", "step-000002.pt"]  # no evaluation yet
    capsys.readouterr()
    assert main(["evaluate", "--run", fresh, "--checkpoint", "best"]) == 2
    assert "--checkpoint best: " in capsys.readouterr().err


def test_patience_stops_a_run_whose_held_out_loss_stopped_improving(data, tmp_path, caplog, capsys):
    out = str(tmp_path / "run")
    common = ["--data", data, "--out", out, "--eval-every", "1", "--best-by", "loss", "--lr", "5e-2",
              "--checkpoint-every", "100"]
    caplog.set_level(logging.INFO)
    assert train(*common, "--steps", "60", "--patience", "2") == 0
    val = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val" and r["step"]]
    best, stale, stop = None, 0, None
    for r in val:  # the rule, replayed on the records
        if best is None or r["loss"] < best["loss"]:
            best, stale = r, 0
        else:
            stale += 1
        if stale == 2:
            stop = r["step"]
            break
    assert stop is not None and stop < 60 and val[-1]["step"] == stop
    assert f"stopping early at step {stop} of 60: no held-out loss better than step {best['step']}'s" in caplog.text
    said = capsys.readouterr()
    assert [json.loads(line)["split"] for line in said.out.splitlines()] == ["train", "val"]
    assert f"mbm train: stopped early at step {stop} of 60: no held-out loss better than step" in said.err
    assert f"mbm train: best held-out loss {best['loss']:.4g} at step {best['step']}:" in said.err
    kept = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert kept == sorted({"best", "latest", f"step-{stop:06d}.pt", f"step-{best['step']:06d}.pt"})
    caplog.clear()
    assert train(*common, "--steps", "60", "--patience", "2", "--resume") == 0  # nothing more to do
    assert f"the run stopped early at step {stop}" in caplog.text and "raise --patience" in caplog.text
    assert read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]["step"] == stop
    assert train(*common, "--steps", str(stop + 2), "--patience", "9", "--resume") == 0  # more patience: goes on
    assert read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]["step"] == stop + 2
    assert train("--data", data, "--out", str(tmp_path / "bad"), "--patience", "0") == 2


def test_resumed_run_matches_an_uninterrupted_one(data, tmp_path):
    common = ["--data", data, "--steps", "24", "--eval-every", "8", "--log-every", "4", "--log-samples",
              "--fusion", "cross_attention", "--shuffle-buffer", "32"]
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    assert train(*common, "--out", once) == 0
    # stopped between two train records: the losses of steps 13-14 still count in step 16's loss_avg
    assert train(*common, "--out", twice, "--stop-at", "14") == 0
    assert train(*common, "--out", twice, "--resume") == 0
    a, b = read_jsonl(os.path.join(once, "metrics.jsonl")), read_jsonl(os.path.join(twice, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]
        assert x.get("loss_avg") == pytest.approx(y.get("loss_avg"), abs=1e-6), x["step"]
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


def test_a_refused_start_leaves_nothing_that_binds_the_fixed_command(data, tmp_path, capsys):
    """A batch bigger than the held-out split refused the run after its config and labels were written:
    the same command with the fixed --batch-size and --resume (as a preemptible job's script always
    passes) was refused for changing the batch size of a run that had trained nothing."""
    small = str(tmp_path / "small")
    write_synthetic_dataset(small, SyntheticConfig(num_samples=12, samples_per_shard=12, feature_dims=DIMS))
    out = str(tmp_path / "run")
    common = ["--data", small, "--out", out, "--steps", "2", "--eval-every", "2", "--val-fraction", "0.5"]
    assert main(["train", *TINY, *common, "--batch-size", "32"]) == 2
    assert "--batch-size" in capsys.readouterr().err and not os.path.exists(out)
    # a folder of the run's files but no checkpoint (a run stopped before its first one) binds nothing either
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"data": small, "batch_size": 32, "out": out}, f)
    assert main(["train", *TINY, *common, "--batch-size", "2", "--resume"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["batch_size"] == 2

def test_more_settings_that_cannot_work_are_one_line_naming_them(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    for flags, said in (
            (["--seed", str(2**64)], "--seed must be in [0, 2**63), got 18446744073709551616"),
            (["--max-tokens", "text=0"], "--max-tokens: each modality's tokens must be >= 1, got text=0"),
            (["--task", "generate", "--tokenizer", str(tmp_path / "none")], "none: no such folder; give the folder"),
            (["--task", "generate", "--tokenizer", str(tmp_path / "empty")], "empty: holds no tokenizer (none of "
                                                                             "tokenizer.json, vocab.txt"),
            (["--out", os.path.join(data, "runs", "a")], f"is inside the dataset folder {os.path.abspath(data)}; give")):
        args = ["--data", data, "--out", out, "--steps", "2", *flags]
        assert train(*args) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(os.path.join(data, "runs"))
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    gen = str(tmp_path / "gen")
    assert train("--data", data, "--out", gen, "--task", "generate", "--tokenizer", tok, "--steps", "2",
                 "--eval-every", "2", "--max-target-len", "8") == 0
    capsys.readouterr()
    assert main(["generate", "--run", gen, "--max-new-tokens", "50"]) == 2
    assert "--max-new-tokens 50: the run's decoder writes at most 7 tokens" in capsys.readouterr().err

def test_retrieve_picks_the_common_pair_and_reports_recall(data, tmp_path, capsys):
    out = str(tmp_path / "ret")
    assert train("--data", data, "--out", out, "--task", "retrieve", "--steps", "4", "--eval-every", "4",
                 "--fusion", "weighted_sum") == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["pair"] == ["text", "image"] and saved["split_by"] == "image"  # one image's captions: one side
    val = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val"][-1]
    assert {"recall@1", "recall@5", "recall@10", "chance@5"} <= set(val)
    capsys.readouterr()
    assert train("--data", data, "--out", out, "--task", "retrieve", "--steps", "8", "--resume",
                 "--split-by", "id") == 2
    assert "--split-by" in capsys.readouterr().err
    assert main(["evaluate", "--run", out, "--per-class"]) == 2
    assert "--per-class: this run was trained for retrieve" in capsys.readouterr().err


def test_resume_with_split_by_auto_continues_the_run_auto_started(data, tmp_path, capsys):
    """The command that started a retrieve run with --split-by auto, given again with --resume, was refused:
    "--split-by 'auto' (the run has 'image')", though auto chooses image for that run."""
    out = str(tmp_path / "auto")
    args = ["--data", data, "--out", out, "--task", "retrieve", "--pair", "text,image", "--split-by", "auto",
            "--eval-every", "2"]
    assert train(*args, "--steps", "2") == 0
    capsys.readouterr()
    assert train(*args, "--steps", "4", "--resume") == 0, capsys.readouterr().err
    assert json.load(open(os.path.join(out, "config.json")))["split_by"] == "image"
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val"] == [0, 2, 4]
    classify = str(tmp_path / "classify")  # auto is id for the other tasks; a run by image is another split
    assert train("--data", data, "--out", classify, "--steps", "2", "--eval-every", "2") == 0
    assert train("--data", data, "--out", classify, "--steps", "4", "--resume", "--split-by", "auto") == 0
    assert train("--data", data, "--out", classify, "--steps", "4", "--resume", "--split-by", "image") == 2
    assert "--split-by 'image' (the run has 'id')" in capsys.readouterr().err


def test_a_run_saved_before_split_by_keeps_its_split_by_id(data, tmp_path, capsys):
    out = str(tmp_path / "old")
    assert train("--data", data, "--out", out, "--task", "retrieve", "--steps", "4", "--eval-every", "4",
                 "--split-by", "id") == 0
    config = os.path.join(out, "config.json")
    saved = json.load(open(config))
    assert saved.pop("split_by") == "id"
    with open(config, "w") as f:
        json.dump(saved, f)
    capsys.readouterr()
    assert main(["evaluate", "--run", out, "--json"]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert train("--data", data, "--out", out, "--task", "retrieve", "--steps", "8", "--eval-every", "4",
                 "--resume") == 0  # no --split-by: the run's own (id), not auto's image
    assert json.load(open(config))["split_by"] == "id"
    at_4 = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val" and r["step"] == 4][0]
    assert by_id["samples"] == at_4["samples"] and by_id["loss"] == pytest.approx(at_4["loss"])
    assert train("--data", data, "--out", str(tmp_path / "bad"), "--split-by", "picture") == 2
    assert "--split-by must be one of auto, id, text, image, audio, split, got 'picture'" in capsys.readouterr().err


@pytest.mark.parametrize("named, empty, says", [
    ("train", "the held-out split", "no sample names a held-out split (test, testing, validation, valid, val, dev, "
                                    "eval) in its metadata"),
    ("test", "the train split", "every sample names a held-out split (test, testing, validation, valid, val, dev, "
                                "eval) in its metadata"),
])
def test_split_by_split_with_one_side_empty_says_what_to_change(tmp_path, capsys, named, empty, says):
    """Every sample in train/ (or test/): --split-by split told to raise --val-fraction, which moves no sample
    that names its split, or said the train split had no sample classify can use, 'skipped nothing'."""
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=40, samples_per_shard=40, feature_dims=DIMS,
                                                  meta={"split": named}))
    assert train("--data", data, "--out", str(tmp_path / "run"), "--steps", "2", "--split-by", "split") == 2
    err = capsys.readouterr().err
    assert f"{empty} is empty: {says}" in err and "give --split-by id" in err, err
    assert "larger --val-fraction" not in err and "skipped nothing" not in err
    assert not os.path.exists(tmp_path / "run")


def test_generate_trains_and_decodes_text(data, tmp_path, capsys):
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "gen")
    assert train("--data", data, "--out", out, "--task", "generate", "--tokenizer", tok, "--steps", "4",
                 "--eval-every", "4", "--max-target-len", "8") == 0
    capsys.readouterr()
    assert main(["generate", "--run", out, "--limit", "3", "--beam", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([x for x in lines if x.strip().startswith("generated:")]) == 3
    assert all(x.strip() == "reference:" or x.strip().startswith("reference: a ") for x in lines if "reference:" in x)
    # every sample, those without text too: they are what a captioning run is for (they were skipped)
    counts = {}
    for split in ("train", "val", "all"):
        assert main(["generate", "--run", out, "--split", split, "--limit", "1000"]) == 0
        references = [x.strip() for x in capsys.readouterr().out.splitlines() if x.strip().startswith("reference:")]
        counts[split] = len(references)
        if split == "all":
            assert "reference:" in references  # a sample without text, captioned
    assert counts["all"] == counts["train"] + counts["val"] and counts["val"] > 0
    assert main(["generate", "--run", out, "--limit", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(set(r) == {"id", "generated", "reference"} for r in rows)


def test_generate_shows_each_text_on_one_line_and_cut():
    from jobs.train_cli import SHOWN_CHARS, _one_line

    assert _one_line("two\nlines\tand\r\n") == "two\\nlines\\tand\\r\\n"
    assert _one_line("s\ud800") == "s\\ud800"
    long = "x" * (SHOWN_CHARS + 20)
    assert _one_line(long) == "x" * SHOWN_CHARS + "... (+20 characters; --json prints it whole)"


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
    # the held-out passes, read by the evaluation's own two workers, score the same samples the same way
    val = [[{k: v for k, v in r.items() if k != "loss"} for r in runs if r["split"] == "val"] for runs in (la, lb)]
    assert [r["step"] for r in val[0]] == [0, 3] and val[0] == val[1]


def test_resume_refuses_a_changed_model_or_data_and_leaves_the_run_untouched(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train("--data", data, "--out", out, "--steps", "4", "--eval-every", "4") == 0
    config = open(os.path.join(out, "config.json")).read()
    assert json.loads(config)["data"] == os.path.abspath(data) + "/@1"  # absolute, and the version it trains on
    capsys.readouterr()
    other = str(tmp_path / "other-data")
    write_synthetic_dataset(other, SyntheticConfig(num_samples=40, samples_per_shard=40, feature_dims=DIMS))
    for flags, named in ((["--heads", "4"], "--heads 4"), (["--positional", "none"], "--positional 'none'"),
                         (["--val-fraction", "0.5"], "--val-fraction 0.5"), (["--data", other], "--data"),
                         (["--max-tokens", "text=8"], "--max-tokens")):
        assert train("--data", data, "--out", out, "--steps", "8", "--resume", *flags) == 2
        err = capsys.readouterr().err
        assert named in err and "the run has" in err and "another --out" in err, err
        assert open(os.path.join(out, "config.json")).read() == config
    # The schedule and logging may change; the run continues from its checkpoint.
    assert train("--out", out, "--steps", "8", "--eval-every", "4", "--resume", "--lr", "1e-3") == 0
    steps = [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val"]
    assert steps == [0, 4, 8]


def test_evaluate_finds_the_data_from_another_folder(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(data))
    out = str(tmp_path / "run")
    assert train("--data", os.path.basename(data), "--out", out, "--steps", "2", "--eval-every", "2") == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--run", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2


def test_out_that_is_a_file_and_a_run_folder_in_use(data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert train("--data", data, "--out", str(afile)) == 2
    assert "--out" in capsys.readouterr().err
    assert train("--data", data, "--out", str(afile / "sub")) == 2
    assert "afile is a file" in capsys.readouterr().err
    from mbm.lock import FolderLock

    out = tmp_path / "busy"
    with FolderLock(str(out)):  # another training holds the run folder
        assert train("--data", data, "--out", str(out), "--steps", "2") == 2
    assert "another mbm job" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--weight-decay", "nan"], ["--grad-clip", "nan"]])
def test_non_finite_settings_exit_2(data, tmp_path, capsys, flags):
    assert train("--data", data, "--out", str(tmp_path / "r"), *flags) == 2
    assert f"{flags[0]} must be a finite number" in capsys.readouterr().err


def test_a_diverging_run_stops_with_a_message(data, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "6", "--lr", "1e12", "--warmup-steps", "0",
                 "--grad-clip", "0") == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "--lr" in err
    # a failure after the first step is no refused start: the run folder and its metrics stay
    assert any(r["split"] == "val" for r in read_jsonl(os.path.join(out, "metrics.jsonl")))


def test_a_steps_loss_is_read_after_the_next_step_is_queued_or_before_a_log_eval_or_save(data, tmp_path,
                                                                                          monkeypatch):
    from mbm.train.trainer import Trainer

    reads = []  # (the step of the loss, the trainer's step when it was read)
    checked = Trainer._checked_loss

    def recording(self, step, loss):
        reads.append((step, self.step))
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        return checked(self, step, loss)

    monkeypatch.setattr(Trainer, "_checked_loss", recording)
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "9", "--log-every", "4", "--eval-every", "6",
                 "--checkpoint-every", "3") == 0
    assert [s for s, _ in reads] == list(range(1, 10))  # every loss read once, in order
    # steps 1 (logged), 3, 6, 9 (saved), 4, 8 (logged): at once; the others once the next step is queued
    assert reads == [(1, 1), (2, 3), (3, 3), (4, 4), (5, 6), (6, 6), (7, 8), (8, 8), (9, 9)]
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 4, 8, 9]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records if r["split"] == "train")


def test_a_diverged_step_is_never_saved(data, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "6", "--lr", "1e12", "--warmup-steps", "0",
                 "--grad-clip", "0", "--checkpoint-every", "1", "--eval-every", "100") == 2
    err = capsys.readouterr().err
    diverged_at = int(err.split("at step ")[1].split(":")[0])
    saved = sorted(os.listdir(os.path.join(out, "checkpoints"))) if os.path.isdir(os.path.join(out, "checkpoints")) else []
    assert all(int(name.split("-")[1].split(".")[0]) < diverged_at for name in saved if name.startswith("step-"))
    assert diverged_at == 1 or "step-000001.pt" in saved  # the steps before it were saved


def test_a_last_step_that_diverges_is_caught_by_its_held_out_loss(data, tmp_path, capsys):
    """The last step's training loss is computed before its update; the update made the weights blow up, the
    held-out loss was NaN, and the run exited 0 having saved them."""
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "1", "--lr", "1e30", "--warmup-steps", "0",
                 "--grad-clip", "0") == 2
    assert "the held-out loss is nan at step 1: training diverged" in capsys.readouterr().err
    assert not os.path.isdir(os.path.join(out, "checkpoints")) or not os.listdir(os.path.join(out, "checkpoints"))


def test_weights_made_non_finite_by_a_step_are_never_saved(data, tmp_path, capsys, monkeypatch):
    from mbm.train.trainer import Trainer

    step = Trainer.train_step

    def poisoning(self, batches):
        result = step(self, batches)
        with torch.no_grad():
            next(self.model.parameters()).view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(Trainer, "train_step", poisoning)
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "3", "--eval-every", "100", "--checkpoint-every", "1") == 2
    assert "the weights are NaN or infinite at step 1: training diverged" in capsys.readouterr().err
    assert not os.path.isdir(os.path.join(out, "checkpoints")) or not os.listdir(os.path.join(out, "checkpoints"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_adamw_is_fused_on_a_gpu(device):
    from mbm.train.config import TrainConfig
    from mbm.train.trainer import adamw

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(device)
    opt = adamw(model, TrainConfig(data="unused", out="unused"))
    assert bool(opt.defaults["fused"]) == (device == "cuda")
    assert [g["weight_decay"] > 0 for g in opt.param_groups] == [True, False]
    model(torch.ones(2, 4, device=device)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_skips_a_cut_checkpoint_and_reports_an_unreadable_one(data, tmp_path, capsys, caplog):
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "8", "--eval-every", "4", "--stop-at", "8") == 0
    newest = os.path.join(out, "checkpoints", "step-000008.pt")
    with open(newest, "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert train("--data", data, "--out", out, "--steps", "12", "--eval-every", "4", "--resume") == 0
    assert "step-000008.pt (1000 bytes) cannot be read" in caplog.text
    assert main(["evaluate", "--run", out, "--checkpoint", str(tmp_path / "r" / "metrics.jsonl")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_glob_patterns_in_data(data, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train("--data", os.path.join(data, "shards", "*.tar"), "--out", out, "--steps", "2",
                 "--eval-every", "2") == 0
    assert train("--data", os.path.join(data, "nope-*.tar"), "--out", str(tmp_path / "r2")) == 2
    assert "matches no file" in capsys.readouterr().err


def test_an_empty_held_out_split_says_why(data, tmp_path, capsys):
    out = str(tmp_path / "r")
    assert train("--data", data, "--out", out, "--steps", "2", "--eval-every", "2") == 0
    other = str(tmp_path / "other-labels")
    write_synthetic_dataset(other, SyntheticConfig(num_samples=60, samples_per_shard=60, feature_dims=DIMS,
                                                   labels=("x", "y")))
    capsys.readouterr()
    assert main(["evaluate", "--run", out, "--data", other, "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "no sample the classify task can use" in err and "task.unknown_label" in err, err
    assert "--val-fraction" not in err


def test_small_flag_checks(data, tmp_path, capsys):
    assert train("--data", data, "--out", str(tmp_path / "r"), "--task", "retrieve", "--batch-size", "1") == 2
    assert "--batch-size must be >= 2 for retrieve" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path / "r"), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert train("--data", data, "--out", str(tmp_path / "g"), "--task", "generate", "--max-target-len", "2") == 2
    assert "--max-target-len must be >= 3 for generate (it counts [BOS] and [EOS]" in capsys.readouterr().err


def test_a_run_killed_before_its_first_checkpoint_starts_its_metrics_afresh(data, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "split": "val", "loss": 9.0}\n')  # all a killed run left
    assert train("--data", data, "--out", str(out), "--steps", "2", "--eval-every", "2", "--resume") == 0
    val = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 2] and val[0]["loss"] != 9.0


def test_a_resume_redraws_the_plot_of_records_it_cut_back(data, tmp_path, monkeypatch):
    """A run killed after writing records past its last checkpoint (and drawing them): the resume cut the
    records back, and metrics.png showed the lost steps until the next evaluation."""
    from mbm.train import trainer as trainer_mod

    out = tmp_path / "r"
    assert train("--data", data, "--out", str(out), "--steps", "4", "--eval-every", "2", "--stop-at", "2") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "train", "loss": 99.0, "lr": 0.001}\n')  # after the checkpoint at 2
    drawn = []
    monkeypatch.setattr(trainer_mod, "plot_metrics", lambda records, path: drawn.append([r["step"] for r in records]))
    assert train("--data", data, "--out", str(out), "--steps", "4", "--eval-every", "2", "--resume") == 0
    assert drawn and 3 not in drawn[0] and max(drawn[0]) == 2  # redrawn at once, without step 3's record


def test_resume_stays_on_the_version_the_run_started_on(data, tmp_path, caplog):
    import shutil

    ds = str(tmp_path / "ds")
    shutil.copytree(data, ds)
    out = str(tmp_path / "r")
    assert train("--data", ds, "--out", out, "--steps", "8", "--eval-every", "4", "--stop-at", "4") == 0
    v1 = json.load(open(os.path.join(ds, "dataset.json")))
    v2 = {**v1, "version": 2, "shards": v1["shards"][:1], "shard_sizes": v1["shard_sizes"][:1]}
    for path in ("versions/000002.json", "dataset.json"):  # `mbm preprocess` made a version 2 meanwhile
        with open(os.path.join(ds, path), "w") as f:
            json.dump(v2, f)
    with caplog.at_level(logging.WARNING):
        assert train("--data", ds, "--out", out, "--steps", "8", "--eval-every", "4", "--resume") == 0
    assert "continues on" in caplog.text and ds + "/@1" in caplog.text
    assert json.load(open(os.path.join(out, "config.json")))["data"] == ds + "/@1"


def test_a_run_whose_dataset_was_moved_resumes_on_the_same_version_where_it_is_now(data, tmp_path, capsys, caplog):
    import shutil

    ds, moved, out = str(tmp_path / "ds"), str(tmp_path / "moved"), str(tmp_path / "r")
    shutil.copytree(data, ds)
    assert train("--data", ds, "--out", out, "--steps", "8", "--eval-every", "4", "--stop-at", "4") == 0
    shutil.move(ds, moved)
    capsys.readouterr()
    assert main(["evaluate", "--run", out]) == 2
    assert f"({ds} is gone: if the dataset was moved, give --data where it is now" in capsys.readouterr().err
    assert train("--data", os.path.join(moved, "@2"), "--out", out, "--steps", "8", "--resume") == 2  # another version
    with caplog.at_level(logging.WARNING):
        assert train("--data", moved, "--out", out, "--steps", "8", "--eval-every", "4", "--resume") == 0
    assert f"the run's dataset {ds}/@1 is gone from there; going on with version 1 at {moved}" in caplog.text
    assert json.load(open(os.path.join(out, "config.json")))["data"] == moved + "/@1"
    assert main(["evaluate", "--run", out]) == 0  # the run's config names the new place now


def test_a_run_on_a_symlinked_dataset_does_not_follow_the_link_elsewhere_on_resume(data, tmp_path, capsys):
    """The run recorded ``latest/@1``: with the link pointed at another dataset folder (which also has a
    version 1), a resume trained on that one without a word."""
    import shutil

    a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "r")
    shutil.copytree(data, a)
    write_synthetic_dataset(b, SyntheticConfig(num_samples=60, samples_per_shard=60, feature_dims=DIMS))
    latest = tmp_path / "latest"
    latest.symlink_to(a)
    assert train("--data", str(latest), "--out", out, "--steps", "8", "--eval-every", "4", "--stop-at", "4") == 0
    assert json.load(open(os.path.join(out, "config.json")))["data"] == a + "/@1"
    assert train("--data", str(latest), "--out", out, "--steps", "6", "--eval-every", "4", "--resume",
                 "--stop-at", "6") == 0  # the link still points at the run's dataset
    latest.unlink()
    latest.symlink_to(b)
    capsys.readouterr()
    assert train("--data", str(latest), "--out", out, "--steps", "8", "--resume") == 2
    assert f"--data '{b}' (the run has '{a}/@1')" in capsys.readouterr().err


def test_a_run_that_lost_its_config_json_resumes_with_the_settings_its_checkpoint_holds(data, tmp_path, capsys,
                                                                                         caplog):
    """Without config.json a resume took the flags given as the run's: another --data, --val-fraction or
    --max-tokens went on from the checkpoint without a word."""
    other, out = str(tmp_path / "other"), str(tmp_path / "r")
    write_synthetic_dataset(other, SyntheticConfig(num_samples=120, samples_per_shard=60, feature_dims=DIMS))
    assert train("--data", data, "--out", out, "--steps", "8", "--eval-every", "4", "--stop-at", "4",
                 "--val-fraction", "0.2") == 0
    os.remove(os.path.join(out, "config.json"))
    with caplog.at_level(logging.WARNING):  # evaluate reads the settings from the checkpoint too
        assert main(["evaluate", "--run", out, "--json"]) == 0
    assert "has no config.json; its settings come from the checkpoint" in caplog.text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    caplog.clear()
    assert train("--data", other, "--out", out, "--steps", "8", "--resume") == 2
    assert f"--data '{other}' (the run has '{data}/@1')" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        assert train("--data", data, "--out", out, "--steps", "8", "--eval-every", "4", "--resume") == 0
    assert "has no config.json; the run's settings come from its checkpoint" in caplog.text
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["val_fraction"] == 0.2 and config["data"] == data + "/@1"


def test_a_run_refused_at_the_start_leaves_no_folder(data, tmp_path, capsys):
    out = tmp_path / "r"
    assert train("--data", os.path.join(data, "@9"), "--out", str(out)) == 2
    assert "no such version: never committed, or `mbm gc` deleted it" in capsys.readouterr().err
    assert not out.exists()
    nested = tmp_path / "nest" / "x" / "r"  # the folders above it that the run made go too
    assert train("--data", os.path.join(data, "@9"), "--out", str(nested)) == 2
    assert sorted(os.listdir(tmp_path)) == []


def test_what_a_run_records_for_data_and_resumes_on(data, tmp_path, capsys):
    import glob as globlib

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'data = "{data}"\nsteps = 2\neval_every = 2\nbatch_size = 8\nd_model = 16\nheads = 2\nlayers = 1\n')
    out = str(tmp_path / "cfgrun")
    assert main(["train", "--config", str(cfg), "--out", out, "--no-progress"]) == 0
    assert main(["train", "--config", str(cfg), "--out", out, "--steps", "4", "--resume", "--no-progress"]) == 0
    for given, recorded in ((os.path.join(data, "dataset.json"), os.path.abspath(data) + "/@1"),
                            (os.path.join(data, "@01"), os.path.abspath(data) + "/@1")):
        run = str(tmp_path / f"r{len(given)}")
        assert train("--data", given, "--out", run, "--steps", "2", "--eval-every", "2") == 0
        assert json.load(open(os.path.join(run, "config.json")))["data"] == recorded
        assert train("--data", given, "--out", run, "--steps", "4", "--eval-every", "2", "--resume") == 0
    pattern = os.path.join(data, "shards", "*.tar")
    run = str(tmp_path / "glob")
    assert train("--data", pattern, "--out", run, "--steps", "2", "--eval-every", "2") == 0
    recorded = json.load(open(os.path.join(run, "config.json")))["data"]
    import braceexpand

    assert sorted(braceexpand.braceexpand(recorded)) == sorted(globlib.glob(os.path.abspath(pattern)))
    assert train("--data", pattern, "--out", run, "--steps", "4", "--eval-every", "2", "--resume") == 0
    # a glob inside braces: the resumed run was refused as if given other data
    for name in ("a", "b"):
        write_synthetic_dataset(str(tmp_path / name), SyntheticConfig(num_samples=40, samples_per_shard=20,
                                                                      feature_dims=DIMS))
    both = str(tmp_path / "{a,b}" / "shards" / "*.tar")
    run = str(tmp_path / "braced")
    assert train("--data", both, "--out", run, "--steps", "2", "--eval-every", "2") == 0
    assert train("--data", both, "--out", run, "--steps", "4", "--eval-every", "2", "--resume") == 0, \
        capsys.readouterr().err
    absolute = "{" + str(tmp_path / "a") + "," + str(tmp_path / "b") + "}/shards/*.tar"  # not made relative
    assert train("--data", absolute, "--out", str(tmp_path / "abs"), "--steps", "2", "--eval-every", "2") == 0


def test_resume_with_a_new_lr_and_weight_decay_trains_on_them(data, tmp_path):
    common = ["--data", data, "--steps", "8", "--eval-every", "8", "--log-every", "1"]
    resumed, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    assert train(*common, "--out", resumed, "--stop-at", "4") == 0
    assert train(*common, "--out", resumed, "--resume", "--lr", "1e-2", "--weight-decay", "0.5") == 0
    assert train(*common, "--out", fresh, "--lr", "1e-2") == 0

    def lrs(out):
        return {r["step"]: r["lr"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"}

    a, b = lrs(resumed), lrs(fresh)
    assert a[4] == pytest.approx(3e-3)  # the end of warmup at the old --lr
    assert [a[k] for k in range(5, 9)] == pytest.approx([b[k] for k in range(5, 9)])  # then the new one's schedule
    assert a[5] > 5e-3
    state = torch.load(os.path.join(resumed, "checkpoints", "step-000008.pt"), weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(1e-2, 0.5), (1e-2, 0.0)]


def test_a_checkpoint_with_a_single_loader_state_still_resumes(data, tmp_path):
    common = ["--data", data, "--steps", "8", "--eval-every", "4", "--log-samples"]
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    assert train(*common, "--out", once) == 0
    assert train(*common, "--out", twice, "--stop-at", "4") == 0
    path = os.path.join(twice, "checkpoints", "step-000004.pt")
    state = torch.load(path, weights_only=True)
    assert [s["batch"] for s in state["data"]] == [4]  # one loader state per rank
    state["data"] = {k: v for k, v in state["data"][0].items() if k != "decode_skipped"}  # as older runs saved it
    torch.save(state, path)
    assert train(*common, "--out", twice, "--resume") == 0
    samples = [read_jsonl(os.path.join(run, "samples-rank0.jsonl")) for run in (once, twice)]
    assert samples[0] == samples[1]


def test_an_unknown_loader_feed_exits_2_before_the_run_starts(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MBM_LOADER_FEED", "gpu")
    assert train("--data", data, "--out", str(tmp_path / "r"), "--steps", "1") == 2
    assert "MBM_LOADER_FEED='gpu': use one of pinned, registered" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("MBM_LOADER_FEED", "registered")  # accepted; on the CPU the batches move as before
    assert train("--data", data, "--out", str(tmp_path / "r2"), "--steps", "2", "--batch-size", "8") == 0


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_partial_file(data, tmp_path, capsys, monkeypatch):
    import errno

    def full(state, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8 vs 0") from None

    out = tmp_path / "run"
    assert train("--data", data, "--out", str(out), "--steps", "4", "--checkpoint-every", "2") == 0
    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert train("--data", data, "--out", str(out), "--steps", "8", "--checkpoint-every", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert err.startswith("mbm train: error: ran out of disk space (OSError: [Errno 28] No space left on device")
    assert "step-000006.pt" in err and "No partial checkpoint is left" in err and "--resume" in err
    assert "Traceback" not in err and "--batch-size" not in err
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "latest", "step-000002.pt", "step-000004.pt"]


def test_an_out_folder_that_cannot_be_written_is_one_line(data, tmp_path, capsys, monkeypatch):
    import errno

    from mbm import lock

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(lock.FolderLock, "__enter__", read_only)
    assert train("--data", data, "--out", str(tmp_path / "ro" / "run"), "--steps", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mbm train: error: --out {tmp_path / 'ro' / 'run'} cannot be created or locked (")
    assert "Read-only file system" in err and "Traceback" not in err


def test_a_stop_request_checkpoints_its_step_and_the_resumed_run_matches_an_uninterrupted_one(
        data, tmp_path, monkeypatch, capsys):
    """SIGTERM in `mbm train` asks the loop to stop (``request_stop``): it finishes the step it is in,
    checkpoints it whatever --checkpoint-every says, and exits 143; --resume goes on from that step."""
    from mbm.train import trainer as trainer_module

    assert trainer_module.request_stop() is False  # no loop runs: the signal's sender stops the process
    common = ["--data", data, "--steps", "16", "--eval-every", "8", "--log-every", "4", "--log-samples",
              "--shuffle-buffer", "32"]
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    assert train(*common, "--out", once) == 0
    original = trainer_module.Trainer.train_step

    def step_then_asked_to_stop(self, batches):
        out = original(self, batches)
        if self.step == 7:
            assert trainer_module.request_stop() is True
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_then_asked_to_stop)
    capsys.readouterr()
    assert train(*common, "--out", twice) == 143
    assert "mbm: terminated (SIGTERM) after step 7, which is checkpointed" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(twice, "checkpoints"))) == ["latest", "step-000007.pt"]
    assert trainer_module.request_stop() is False  # the loop is over
    monkeypatch.undo()
    assert train(*common, "--out", twice, "--resume") == 0
    a, b = read_jsonl(os.path.join(once, "metrics.jsonl")), read_jsonl(os.path.join(twice, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    ids_a = read_jsonl(os.path.join(once, "samples-rank0.jsonl"))
    assert read_jsonl(os.path.join(twice, "samples-rank0.jsonl")) == ids_a


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader's workers are found in /proc")
@pytest.mark.parametrize("group", [False, True], ids=["process", "process group"])
def test_sigterm_stops_mbm_train_at_a_checkpointed_step_with_no_worker_left(data, tmp_path, group):
    """Before, SIGTERM (a preemption, a scheduler's time limit) ended the process at once: the steps
    since the last checkpoint were lost, with no word said. Sent to the process group, as torchrun,
    Slurm and ``timeout`` send it, it reached the loader's worker too, which torch ended, and the
    training process failed ("DataLoader worker is killed by signal: Terminated") without a checkpoint."""
    import signal
    import subprocess
    import time

    from pipelines.forkclient import running
    from pipelines.proctree import descendants

    out = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    job = subprocess.Popen([sys.executable, "-m", "jobs.train_cli", "train", *TINY, "--data", data, "--out", str(out),
                            "--steps", "100000", "--log-every", "5", "--eval-every", "100000", "--workers", "1"],
                           cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=group)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while '"step": 5, "split": "train"' not in (metrics.read_text() if metrics.exists() else ""):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.1)
    workers = descendants(job.pid)
    assert workers  # the loader's worker
    if group:
        os.killpg(job.pid, signal.SIGTERM)
    else:
        job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mbm: terminated (SIGTERM) after step ") and "Traceback" not in err, err
    assert "killed by signal" not in err and "Exception ignored" not in err, err
    step = int(last.split("after step ")[1].split(",")[0])
    assert step >= 5 and (out / "checkpoints" / f"step-{step:06d}.pt").is_file()
    deadline = time.monotonic() + 10
    while (left := [pid for pid in workers if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left


def test_generate_on_a_dataset_of_text_features_only_says_what_is_missing(tmp_path, capsys):
    """It said generate needs a tokenizer and image or audio features, with a tokenizer given."""
    text_only = str(tmp_path / "t")
    write_synthetic_dataset(text_only, SyntheticConfig(num_samples=40, samples_per_shard=20, feature_dims={"text": 8},
                                                       lengths={"text": (2, 4)}, missing={}))
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    assert train("--data", text_only, "--out", str(tmp_path / "g"), "--task", "generate", "--tokenizer", tok) == 2
    err = capsys.readouterr().err
    assert "generate writes a sample's text from its image or audio features, and this dataset has text features " \
           "only: preprocess it with [extract.image] or [extract.audio], or train --task classify or retrieve" in err


def test_a_tie_in_the_best_by_metric_goes_to_the_lower_held_out_loss():
    import types

    from mbm.train.trainer import Trainer

    by = {m: types.SimpleNamespace(cfg=types.SimpleNamespace(best_metric=m)) for m in ("accuracy", "loss")}
    early, late = {"accuracy": 1.0, "loss": 0.44}, {"accuracy": 1.0, "loss": 0.0006}
    assert Trainer._score(by["accuracy"], late) > Trainer._score(by["accuracy"], early)
    assert Trainer._score(by["accuracy"], {"accuracy": 0.9, "loss": 0.0}) < Trainer._score(by["accuracy"], early)
    assert Trainer._score(by["loss"], late) > Trainer._score(by["loss"], early)
    assert Trainer._score(by["accuracy"], {"loss": 0.1}) is None
    assert Trainer._score(by["loss"], {"loss": float("nan")}) is None


def test_balanced_class_weights_weigh_each_label_by_the_inverse_of_its_share(data, tmp_path, capsys, caplog):
    import webdataset as wds

    from mbm.data.source import resolve_data
    from mbm.data.split import sample_split
    from mbm.train.build import balanced_weights, label_counts
    from mbm.train.checkpoint import load_checkpoint
    from mbm.train.config import merge

    assert balanced_weights([90, 10, 0]) == (round(100 / 180, 6), 5.0, 1.0)
    assert balanced_weights([5, 5]) == (1.0, 1.0)
    source = resolve_data(data)
    labels = list(source.labels)
    counts = label_counts(merge({"data": data}), source, labels)
    docs = {}
    for shard in source.shards:
        for s in wds.WebDataset(shard, shardshuffle=False):
            doc = json.loads(s["json"])
            docs[doc["id"]] = doc
    want = [sum(d["label"] == lbl and type(d["label"]) is type(lbl) and sample_split(d, 0.1) == "train"
                for d in docs.values()) for lbl in labels]
    assert counts == want and len(set(counts)) > 1  # uneven classes

    out = str(tmp_path / "run")
    caplog.set_level(logging.INFO)
    assert train("--data", data, "--out", out, "--steps", "4", "--eval-every", "4", "--class-weights", "balanced") == 0
    assert "--class-weights balanced: training samples per label" in caplog.text
    saved = load_checkpoint(os.path.join(out, "checkpoints", "step-000004.pt"))["model_config"]["class_weights"]
    assert saved == pytest.approx(list(balanced_weights(counts)))
    assert main(["evaluate", "--run", out, "--json"]) == 0  # the weights come back with the model
    capsys.readouterr()
    assert train("--data", data, "--out", out, "--steps", "8", "--resume") == 0  # the run's weights go on
    capsys.readouterr()
    assert train("--data", data, "--out", out, "--steps", "12", "--resume", "--class-weights", "none") == 2
    assert "--class-weights 'none' (the run has 'balanced')" in capsys.readouterr().err
    assert train("--data", data, "--out", str(tmp_path / "r2"), "--task", "retrieve", "--class-weights",
                 "balanced") == 2
    assert "--class-weights balanced weighs classify's labels; --task retrieve has none" in capsys.readouterr().err


def test_the_weighted_loss_is_scikit_learn_s_weighted_mean():
    from mbm.model.heads import ClassifyHead

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 2, -100])
    head = ClassifyHead(4, 3, 0.0, class_weights=(0.5, 2.0, 1.5))
    per = torch.nn.functional.cross_entropy(logits[:5], labels[:5], reduction="none")
    w = torch.tensor([0.5, 0.5, 0.5, 2.0, 1.5])
    assert float(head.loss(logits, labels)) == pytest.approx(float((per * w).sum() / w.sum()), rel=1e-6)
    assert float(ClassifyHead(4, 3, 0.0).loss(logits, labels)) == pytest.approx(float(per.mean()), rel=1e-6)
    assert "class_weight" not in ClassifyHead(4, 3, 0.0, class_weights=(1.0, 1.0, 1.0)).state_dict()


def test_validate_on_its_own_and_fit_leave_no_loader_worker(data, tmp_path):
    """Held-out workers stay between evaluations only while fit runs; fit stops them as it returns, and a
    Trainer used as a context manager stops them at its end."""
    import multiprocessing

    from mbm.train.config import TrainConfig
    from mbm.train.distributed import init_distributed
    from mbm.train.evaluate import evaluate
    from mbm.train.trainer import Trainer

    def workers():
        return {p.pid for p in multiprocessing.active_children()} - before

    before = {p.pid for p in multiprocessing.active_children()}  # those other tests left
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), d_model=16, heads=2, layers=1, batch_size=8, steps=4,
                      eval_every=2, workers=2, warmup_steps=1)
    env = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, env, progress=False)
        first = trainer.validate()
        assert not workers()  # its pass's workers stopped with it
        assert trainer.validate() == first  # and the next one starts new ones
        batches = iter(trainer.loader)
        trainer.train_step(batches)
        assert workers()  # the training loader's, living across epochs while its batches are read
        batches.close()
        assert not workers()
        last = trainer.fit()
        assert last["val"]["step"] == 4 and not workers()
        with Trainer(replace(cfg, out=str(tmp_path / "other")), env, progress=False) as other:
            evaluate(other.model, other.val_loader, other.env.device)  # as fit does: its workers stay
            assert workers()
        assert not workers()
    finally:
        env.close()


def test_a_resume_runs_this_runs_adamw_whatever_the_checkpoint_ran():
    """A checkpoint written on the CPU (foreach AdamW) and resumed on a GPU kept the saved groups' fused=None
    and stepped with the unfused optimizer; here a fused CPU AdamW stands for the GPU's."""
    from mbm.train.trainer import load_optimizer_state

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    saved = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=0.1)
    sum(p.sum() for p in params).backward()
    saved.step()
    state = saved.state_dict()
    assert [g["fused"] for g in state["param_groups"]] == [None, None]
    resumed = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=0.05,
                                fused=True)
    load_optimizer_state(resumed, state)
    assert [g["fused"] for g in resumed.param_groups] == [True, True]
    assert [g["lr"] for g in resumed.param_groups] == [0.05, 0.05]  # this run's settings
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 1.0 for s in resumed.state.values())
    assert torch.equal(resumed.state[params[0]]["exp_avg"], saved.state[params[0]]["exp_avg"])
    resumed.step()  # the fused kernel takes the moved state
    back = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=0.1)
    load_optimizer_state(back, resumed.state_dict())  # and a fused run's checkpoint resumed unfused
    assert [g["fused"] for g in back.param_groups] == [None, None]
    back.step()
