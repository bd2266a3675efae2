"""A dataset's own train, validation and test splits, from ``mbm preprocess`` to ``mbm evaluate --split test``."""

import json
from pathlib import Path

import tests.support.failing_extractor  # noqa: F401  registers failing-text
from jobs.cli import main
from jobs.train_cli import main as train_main
from mbm.train.run import read_jsonl

WORDS = ("red", "green", "blue", "yellow")


def _rows(n: int, names: tuple[str, ...]) -> list[dict]:
    """Captions whose label is their first word; sample i names the split names[i % len(names)]."""
    return [{"id": f"s{i:03d}", "text": f"{WORDS[i % 4]} thing number {i}", "label": WORDS[i % 4],
             "split": names[i % len(names)]} for i in range(n)]


def _write(folder: Path, rows: list[dict]) -> None:
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _preprocess(folder: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["preprocess", str(folder / "job.toml"), "--no-progress"]) == 0
    return json.loads((folder / "out" / "report.json").read_text())


def _setup(tmp_path: Path, rows: list[dict]) -> Path:
    _write(tmp_path, rows)
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n[runner]\nworkers = 1\n'
                                       '[extract.text]\nname = "failing-text"\n')
    return tmp_path / "out"


def test_preprocess_counts_the_named_splits_in_each_version(tmp_path, capsys):
    names = ("train", "train", "Validation", "test ", "train", "dev", "unlabeled")
    rows = _rows(42, names) + [{"id": "nosplit", "text": "blue one"}, {"id": "empty", "text": ""}]
    out = _setup(tmp_path, rows)
    report = _preprocess(tmp_path, capsys)
    want = {"train": 18, "validation": 6, "test": 6, "dev": 6, "unlabeled": 6}  # stripped, lower-case
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["splits"] == report["splits"] == want and manifest["num_samples"] == 43  # "empty" rejected
    assert "splits       dev 6, test 6, train 18, unlabeled 6, validation 6" in capsys.readouterr().out

    assert not _preprocess(tmp_path, capsys)["new_version"]  # unchanged samples are counted as they are carried

    # a version written before the counts were recorded: the next run writes one that has them, same samples
    for rel in ("dataset.json", "versions/000001.json"):
        old = json.loads((out / rel).read_text())
        del old["splits"]
        (out / rel).write_text(json.dumps(old))
    report = _preprocess(tmp_path, capsys)
    assert report["new_version"] and report["version"] == 2 and report["planned"]["changed"] == 0
    assert json.loads((out / "dataset.json").read_text())["splits"] == want

    rows[2]["split"] = "train"  # one validation sample moves to train, another sample goes
    del rows[3]
    _write(tmp_path, rows)
    report = _preprocess(tmp_path, capsys)
    assert report["version"] == 3 and report["splits"] == {**want, "train": 19, "validation": 5, "test": 5}
    capsys.readouterr()
    assert main(["versions", str(out)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert "splits" not in listing[1]  # version 1's manifest lost its counts above: written before them
    assert listing[2].endswith("splits: dev 6, test 6, train 18, unlabeled 6, validation 6")
    assert listing[3].endswith("(current)  splits: dev 6, test 5, train 19, unlabeled 6, validation 5")
    assert main(["versions", str(out), "--json"]) == 0
    assert [v["splits"] for v in json.loads(capsys.readouterr().out)][-1] == report["splits"]


def test_split_by_split_keeps_the_test_split_apart_when_the_dataset_names_validation_too(tmp_path, capsys, caplog):
    out = _setup(tmp_path, _rows(120, ("train", "train", "train", "validation", "test", "train")))
    _preprocess(tmp_path, capsys)
    run = str(tmp_path / "run")
    caplog.set_level("INFO")
    assert train_main(["train", "--data", str(out), "--out", run, "--steps", "6", "--eval-every", "3",
                       "--batch-size", "8", "--split-by", "split", "--log-samples", "--max-tokens", "text=8"]) == 0
    assert "the test split kept apart (mbm evaluate --split test)" in caplog.text
    trained = {sid for r in read_jsonl(str(Path(run) / "samples-rank0.jsonl")) for sid in r["ids"]}
    assert trained and all(int(sid[1:]) % 6 in (0, 1, 2, 5) for sid in trained)  # train only
    val = [r for r in read_jsonl(str(Path(run) / "metrics.jsonl")) if r["split"] == "val"]
    assert val and all(r["samples"] == 20 for r in val)  # the validation split alone, not the test one

    counts = {}
    for split in ("val", "test", "train", "all"):
        capsys.readouterr()
        assert train_main(["evaluate", "--run", run, "--split", split, "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["split"] == split
        counts[split] = metrics["samples"]
    assert counts == {"val": 20, "test": 20, "train": 80, "all": 120}
    # model selection on validation, the last word on test
    best = max((r for r in val if r["step"]), key=lambda r: (r["accuracy"], -r["loss"]))
    assert train_main(["evaluate", "--run", run, "--checkpoint", "best", "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == best["step"] and metrics["samples"] == 20


def test_split_test_says_when_there_is_no_test_split_apart(tmp_path, capsys):
    out = _setup(tmp_path, _rows(60, ("train", "train", "test")))  # train/ and test/ alone: test is held out
    _preprocess(tmp_path, capsys)
    for split_by, said in (("split", "the dataset does not name both a validation (validation, valid, val, dev, eval) and a "
                                     "test (test, testing) split (samples per named split: test 20, train 40), so its test "
                                     "samples, if any, are part of the held-out split: give --split val"),
                           ("id", "the run split its samples by id, so its held-out split is all it holds out")):
        run = str(tmp_path / f"run-{split_by}")
        assert train_main(["train", "--data", str(out), "--out", run, "--steps", "2", "--eval-every", "2",
                           "--batch-size", "8", "--split-by", split_by, "--max-tokens", "text=8"]) == 0
        if split_by == "split":
            val = [r for r in read_jsonl(str(Path(run) / "metrics.jsonl")) if r["split"] == "val"]
            assert val[-1]["samples"] == 20  # the test samples are the held-out split
        capsys.readouterr()
        assert train_main(["evaluate", "--run", run, "--split", "test"]) == 2
        err = capsys.readouterr().err
        assert f"--split test: {said}" in err, err
