"""``mbm predict``: a run's labels, generated texts or embeddings for every sample of a dataset."""

import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from jobs.train_cli import main
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset, write_tiny_tokenizer
from mbm.train.inference import load_run, predict_run
from tests.support.tiny_run import DIMS, TINY


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    write_synthetic_dataset(out, SyntheticConfig(num_samples=90, samples_per_shard=40, feature_dims=DIMS,
                                                 lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)},
                                                 missing={"text": 0.2, "image": 0.2, "audio": 0.3}, null_label=0.1))
    return out


def _docs(data):
    """id -> json doc of every sample of the dataset, read with plain webdataset."""
    manifest = json.load(open(os.path.join(data, "dataset.json")))
    docs = {}
    for rel in manifest["shards"]:
        for s in wds.WebDataset(os.path.join(data, rel), shardshuffle=False):
            doc = json.loads(s["json"])
            docs[doc["id"]] = doc
    return docs


def _train(data, out, *argv):
    assert main(["train", *TINY, "--data", data, "--out", out, "--steps", "6", "--eval-every", "3", *argv]) == 0


def test_classify_predicts_every_sample_unlabelled_ones_too(data, tmp_path, capsys):
    run = str(tmp_path / "cls")
    _train(data, run)
    capsys.readouterr()
    assert main(["predict", "--run", run, "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    docs = _docs(data)
    assert sorted(r["id"] for r in rows) == sorted(docs)  # every sample, in the stream's order
    labels = json.load(open(os.path.join(run, "labels.json")))
    for r in rows:
        assert r["label"] == docs[r["id"]]["label"]  # None for the unlabelled ones
        assert [t["label"] for t in r["top"]][0] == r["predicted"] and len(r["top"]) == 2
        assert r["probability"] == r["top"][0]["probability"] >= r["top"][1]["probability"]
        assert {t["label"] for t in r["top"]} <= set(labels)
    assert any(r["label"] is None for r in rows)
    # the same model as evaluate: on the held-out split, the share predicted right is its accuracy
    assert main(["evaluate", "--run", run, "--json"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    out = str(tmp_path / "val.jsonl")
    assert main(["predict", "--run", run, "--split", "val", "--output", out]) == 0
    val = [json.loads(line) for line in open(out)]
    assert capsys.readouterr().out == f"{len(val)} predictions of step 6 in {out}\n"
    labelled = [r for r in val if r["label"] is not None]
    assert sum(r["predicted"] == r["label"] for r in labelled) / len(labelled) == pytest.approx(accuracy)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

    assert main(["predict", "--run", run, "--output", str(tmp_path)]) == 2
    assert "is a folder; a classify run's predictions go to a file" in capsys.readouterr().err
    assert main(["predict", "--run", run, "--top-k", "0"]) == 2
    assert "--top-k must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("pair", ["text,image", "audio,text"])  # a pair that is not the dataset's first modalities
def test_retrieve_writes_each_modality_s_embeddings_with_their_ids(data, tmp_path, capsys, pair):
    run = str(tmp_path / "ret")
    _train(data, run, "--task", "retrieve", "--pair", pair)
    capsys.readouterr()
    assert main(["predict", "--run", run]) == 2
    assert "a retrieve run predicts embeddings: give --output DIR" in capsys.readouterr().err
    out = tmp_path / "emb"
    assert main(["predict", "--run", run, "--output", str(out)]) == 0
    docs = _docs(data)
    info = json.loads((out / "embeddings.json").read_text())
    assert info["pair"] == pair.split(",") and info["dim"] == 8 and info["step"] == 6
    for m in pair.split(","):
        z = np.load(out / f"{m}.npy", allow_pickle=False)
        ids = [json.loads(line) for line in (out / f"{m}.ids.jsonl").read_text().splitlines()]
        assert sorted(ids) == sorted(i for i, d in docs.items() if m in d["modalities"])  # one side is enough
        assert z.shape == (len(ids), 8) and z.dtype == np.float32 and info["counts"][m] == len(ids)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    assert f"embeddings of step 6 (8-d, unit length) in {out}: {pair.split(',')[0]} " in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(["embeddings.json", *(f"{m}.{x}" for m in pair.split(",")
                                                                   for x in ("ids.jsonl", "npy"))])


def test_unit_embeddings_are_what_the_retrieve_loss_sees():
    from mbm.data.collate import CollateConfig, collate
    from mbm.data.decode import Sample
    from mbm.model.model import ModelConfig, MultimodalModel
    from mbm.model.transformer import TransformerConfig

    torch.manual_seed(0)
    cfg = ModelConfig(task="retrieve", feature_dims={"text": 12, "image": 10}, pair=("text", "image"), embed_dim=8,
                      transformer=TransformerConfig(d_model=16, n_layers=1, n_heads=2), max_len=9)
    model = MultimodalModel(cfg).eval()
    rng = np.random.default_rng(0)
    samples = [Sample(id=f"s{i}", key=f"s{i}", features={"text": rng.normal(size=(3 + i, 12)).astype(np.float16),
                                                         "image": rng.normal(size=(4, 10)).astype(np.float16)})
               for i in range(4)]
    batch = collate(samples, CollateConfig(feature_dims=cfg.feature_dims))
    with torch.no_grad():
        out = model(batch)
    torch.testing.assert_close(model.unit_embeddings(batch, "text"), out["za"])
    torch.testing.assert_close(model.unit_embeddings(batch, "image"), out["zb"])
    with pytest.raises(ValueError, match="embeddings are a retrieve run's"):
        model.unit_embeddings(batch, "audio")


def test_generate_predicts_a_text_for_every_sample_with_media(data, tmp_path, capsys):
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    run = str(tmp_path / "gen")
    _train(data, run, "--task", "generate", "--tokenizer", tok, "--max-target-len", "8")
    capsys.readouterr()
    assert main(["predict", "--run", run, "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    docs = _docs(data)
    with_media = {i for i, d in docs.items() if {"image", "audio"} & set(d["modalities"])}
    assert {r["id"] for r in rows} == with_media and len(rows) == len(with_media)
    assert all(set(r) == {"id", "generated", "reference"} for r in rows)
    assert any(r["reference"] == "" for r in rows)  # uncaptioned media get a caption too
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}  # those other tests left
    # three of them, read by two workers that stop at the limit
    assert main(["generate", "--run", run, "--split", "all", "--limit", "3", "--json", "--max-new-tokens", "4",
                 "--workers", "2"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows[:3]
    assert not {p.pid for p in multiprocessing.active_children()} - before


def test_evaluate_and_predict_read_with_workers_as_without(data, tmp_path, capsys):
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}  # those other tests left
    run = str(tmp_path / "cls")
    _train(data, run)
    capsys.readouterr()
    outs = []
    for workers in ("0", "2"):
        assert main(["evaluate", "--run", run, "--json", "--per-class", "--workers", workers]) == 0
        assert main(["predict", "--run", run, "--workers", workers]) == 0
        outs.append(capsys.readouterr().out)
        assert not {p.pid for p in multiprocessing.active_children()} - before  # stopped with the command
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 91  # evaluate's object, then 90 predictions
    assert main(["predict", "--run", run, "--workers", "-1"]) == 2
    assert "--workers must be >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["classify", "generate"])
def test_predict_rows_leave_the_callers_grad_mode_alone(data, tmp_path, task):
    """A caller holding predict_run's rows trains, or checks grad mode, with autograd as it left it."""
    tok = write_tiny_tokenizer(str(tmp_path / "tok"))
    run = str(tmp_path / task)
    _train(data, run, "--task", task, *(["--tokenizer", tok] if task == "generate" else []))
    loaded = load_run(run)
    w = torch.ones(2, requires_grad=True)
    rows = 0
    for row in predict_run(loaded, split="val", top_k=1):
        assert torch.is_grad_enabled()
        assert (w * 2).sum().requires_grad  # the caller's own product still records its graph
        rows += 1
        assert row["id"]
    assert rows > 0 and torch.is_grad_enabled()
