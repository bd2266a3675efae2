"""Two processes under torchrun on the CPU (gloo): equal steps, disjoint samples, exact resumption."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
from mbm.train.run import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIMS = {"text": 12, "image": 10, "audio": 6}


@pytest.fixture(autouse=True)
def _own_temp_dir(tmp_path, monkeypatch):
    """torchrun leaves a torchelastic_* folder in the temp dir after each run: keep those under the test's."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))


def torchrun(*argv, timeout=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "jobs.train_cli", "train", "--d-model", "16", "--heads", "2", "--layers", "1",
           "--batch-size", "8", "--no-progress", "--log-samples", "--eval-every", "10", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def evaluate_alone(run, *argv):
    """``mbm evaluate --json`` of a run's latest checkpoint, in one process."""
    proc = subprocess.run([sys.executable, "-m", "jobs.train_cli", "evaluate", "--run", run, "--json", *argv], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_two_ranks_evaluate_their_shares_of_a_retrieve_split_as_one_process_evaluates_it(tmp_path):
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=150, samples_per_shard=150, feature_dims=DIMS,
                                                  lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)},
                                                  media_repeats=3))
    out = str(tmp_path / "ret")
    torchrun("--data", data, "--out", out, "--steps", "10", "--task", "retrieve", "--pair", "text,image",
             "--val-fraction", "0.3")
    val = read_jsonl(os.path.join(out, "metrics.jsonl"))[-1]
    whole = evaluate_alone(out)
    assert val["step"] == whole["step"] == 10 and val["samples"] == whole["samples"] > 16
    for key in ("recall@1", "recall@5", "recall@10", "chance@5"):  # over the whole split, samples sharing a picture
        assert val[key] == pytest.approx(whole[key], abs=1e-9), key


@pytest.mark.slow
def test_two_ranks_take_equal_steps_on_disjoint_samples_and_resume_exactly(tmp_path):
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=150, samples_per_shard=150, feature_dims=DIMS,
                                                  lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)}))
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    torchrun("--data", data, "--out", once, "--steps", "20")
    logs = [read_jsonl(os.path.join(once, f"samples-rank{r}.jsonl")) for r in (0, 1)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 21))
    by_epoch = defaultdict(list)
    for log in logs:
        for rec in log:
            by_epoch[rec["epoch"]].extend(rec["ids"])
    assert len(by_epoch) >= 2  # crossed an epoch boundary without hanging
    for epoch, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), f"a sample was seen twice in epoch {epoch}"
    metrics = read_jsonl(os.path.join(once, "metrics.jsonl"))
    assert [r["step"] for r in metrics if r["split"] == "val"] == [0, 10, 20]  # rank 0 alone writes
    # each rank evaluated its share of the held-out split; together, the whole split as one process reads it
    whole = evaluate_alone(once)
    val = metrics[-1]
    assert val["split"] == "val" and val["step"] == whole["step"] == 20
    for key in ("samples", "accuracy", "balanced_accuracy", "macro_f1", "majority_rate"):
        assert val[key] == whole[key], key
    assert val["loss"] == pytest.approx(whole["loss"], rel=1e-5)

    torchrun("--data", data, "--out", twice, "--steps", "20", "--stop-at", "10")
    torchrun("--data", data, "--out", twice, "--steps", "20", "--resume")
    for r in (0, 1):
        assert read_jsonl(os.path.join(twice, f"samples-rank{r}.jsonl")) == logs[r]
    resumed = read_jsonl(os.path.join(twice, "metrics.jsonl"))
    assert [x["loss"] for x in resumed] == pytest.approx([x["loss"] for x in metrics], abs=1e-6)


def _write_shards(folder, corrupt):
    """Four shards of ten labelled text+image samples; the image arrays of the ``corrupt`` ones hold an inf."""
    import io
    import json

    import numpy as np
    import webdataset as wds

    def npy(arr):
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for s in range(4):
        with wds.TarWriter(os.path.join(folder, f"{s:02d}.tar"), encoder=False) as sink:
            for i in range(s * 10, (s + 1) * 10):
                image = rng.standard_normal((4, DIMS["image"])).astype(np.float16)
                image[0, 0] = np.inf if i in corrupt else image[0, 0]
                doc = {"id": f"s{i:03d}", "label": "ab"[i % 2], "text": "t", "modalities": ["text", "image"]}
                sink.write({"__key__": f"s{i:03d}", "json": json.dumps(doc).encode(), "image.npy": npy(image),
                            "text.npy": npy(rng.standard_normal((3, DIMS["text"])).astype(np.float16))})
    return os.path.join(folder, "{00..03}.tar")


@pytest.mark.slow
def test_ranks_that_dropped_different_batches_resume_exactly(tmp_path):
    """A batch whose samples are all corrupt is dropped but consumed: each rank resumes at its own position,
    and the skip counters continue where they were."""
    import torch

    data = _write_shards(str(tmp_path / "ds"), {3, 8, 17, 21, 30, 34})
    common = ["--data", data, "--steps", "24", "--batch-size", "1", "--log-every", "1", "--eval-every", "100",
              "--checkpoint-every", "12", "--seed", "3"]
    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    torchrun(*common, "--out", once)
    torchrun(*common, "--out", twice, "--stop-at", "12")
    positions = [s["batch"] for s in torch.load(os.path.join(twice, "checkpoints", "step-000012.pt"),
                                                weights_only=True)["data"]]
    assert positions[0] != positions[1]  # the ranks had dropped different numbers of batches by the checkpoint
    torchrun(*common, "--out", twice, "--resume")
    for r in (0, 1):
        assert read_jsonl(os.path.join(twice, f"samples-rank{r}.jsonl")) == read_jsonl(
            os.path.join(once, f"samples-rank{r}.jsonl"))
    a, b = (read_jsonl(os.path.join(run, "metrics.jsonl")) for run in (once, twice))
    assert [x["skipped"] for x in a if x["split"] == "train"] == [x["skipped"] for x in b if x["split"] == "train"]
    assert any(x.get("skipped") for x in a)
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], abs=1e-6)


# Runs `mbm train` in a rank, then records the native threads that outlived it (Linux: /proc/self/task).
_THREADS_DRIVER = """
import json, os, sys, threading

def native_threads():
    return {int(t): open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}

from jobs.train_cli import main

before = native_threads()
code = main(sys.argv[2:])
python_threads = {t.native_id for t in threading.enumerate()}
left = sorted(name for tid, name in native_threads().items() if tid not in before and tid not in python_threads)
with open(os.path.join(sys.argv[1], f"threads-rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"code": code, "left": left}, f)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the process's threads through /proc")
def test_training_joins_the_process_group_threads_before_returning(tmp_path):
    """When training returns, no thread of the process group is left: a gloo worker still running may be
    freeing a finished collective's tensors, which takes the GIL, as the interpreter shuts down; CPython then
    ends that thread inside a C++ destructor and the rank aborts ("terminate called without an active
    exception"), now and then, after a run that went well."""
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=60, samples_per_shard=60, feature_dims=DIMS,
                                                  lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)}))
    driver = tmp_path / "driver.py"
    driver.write_text(_THREADS_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
           str(tmp_path), "train", "--data", data, "--out", str(tmp_path / "run"), "--steps", "4", "--d-model", "16",
           "--heads", "2", "--layers", "1", "--batch-size", "4", "--no-progress", "--eval-every", "2",
           "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        record = json.loads((tmp_path / f"threads-rank{r}.json").read_text())
        assert record == {"code": 0, "left": []}, f"rank {r}: threads left running after training: {record}"


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_both_ranks_at_the_same_step_and_resume_goes_on(tmp_path):
    """torchrun passes SIGTERM on to its ranks, each at its own moment: they agree on a step (a flag
    all-reduced at every step end), checkpoint it together and exit; --resume continues from it."""
    import signal
    import time

    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=150, samples_per_shard=150, feature_dims=DIMS,
                                                  lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "jobs.train_cli", "train", "--d-model", "16", "--heads", "2", "--layers", "1",
           "--batch-size", "8", "--no-progress", "--log-samples", "--eval-every", "100000", "--data", data,
           "--out", str(out), "--steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / f"samples-rank{r}.jsonl" for r in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(log.exists() and log.stat().st_size > 2000 for log in logs):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=90)
    assert job.returncode != 0  # torchrun's own status on SIGTERM
    said = [line for line in err.splitlines() if line.startswith("mbm: terminated")]
    assert len(said) == 1, err[-3000:]  # rank 0 says it
    step = int(said[0].split("after step ")[1].split(",")[0])
    steps = [[r["step"] for r in read_jsonl(str(log))] for log in logs]
    assert steps[0] == steps[1] == list(range(1, step + 1))  # both ranks stopped after the same step
    assert (out / "checkpoints" / f"step-{step:06d}.pt").is_file()
    torchrun("--data", data, "--out", str(out), "--steps", str(step + 5), "--resume")
    for log in logs:
        assert [r["step"] for r in read_jsonl(str(log))] == list(range(1, step + 6))


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["gated", "cross_attention"])
def test_classify_runs_without_the_unused_parameter_search_also_when_a_batch_lacks_a_modality(tmp_path, fusion):
    """Classify reads every modality's embedding at every step, so DDP does not walk the autograd graph
    for unused parameters (which it did, warning on every rank that it found none). A batch where no
    sample has audio still uses every parameter: its audio is one masked padding step, not left out."""
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=120, samples_per_shard=60, feature_dims=DIMS,
                                                  lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)},
                                                  missing={"text": 0.2, "image": 0.5, "audio": 0.9}))
    out = str(tmp_path / "run")
    proc = torchrun("--data", data, "--out", out, "--steps", "30", "--batch-size", "4", "--fusion", fusion)
    assert "find any unused parameters" not in proc.stderr
    logs = [read_jsonl(os.path.join(out, f"samples-rank{r}.jsonl")) for r in (0, 1)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 31))


@pytest.mark.slow
def test_two_ranks_agree_on_the_best_checkpoint_and_stop_early_together(tmp_path):
    """The best evaluation forces a checkpoint (a collective of both ranks) and --patience ends both ranks'
    loops at the same step, whatever --checkpoint-every says."""
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, SyntheticConfig(num_samples=150, samples_per_shard=150, feature_dims=DIMS,
                                                  lengths={"text": (3, 6), "image": (4, 4), "audio": (3, 8)}))
    out = str(tmp_path / "run")
    proc = torchrun("--data", data, "--out", out, "--steps", "60", "--eval-every", "1", "--patience", "2",
                    "--best-by", "loss", "--lr", "5e-2", "--checkpoint-every", "100")
    val = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "val" and r["step"]]
    best = min(val, key=lambda r: (r["loss"], r["step"]))
    stop = val[-1]["step"]
    assert stop < 60 and "stopping early at step" in proc.stderr
    assert [read_jsonl(os.path.join(out, f"samples-rank{r}.jsonl"))[-1]["step"] for r in (0, 1)] == [stop, stop]
    assert open(os.path.join(out, "checkpoints", "best")).read() == f"step-{best['step']:06d}.pt\n"
    assert open(os.path.join(out, "checkpoints", "latest")).read() == f"step-{stop:06d}.pt\n"
