import contextlib
import os
import subprocess
import sys

import pytest

from jobs.cli import main


def test_bad_spec_exits_2_with_message(tmp_path, capsys):
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "missing.jsonl"\n[output]\ndir = "o"\n')
    assert main(["preprocess", str(tmp_path / "job.toml")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "does not exist" in err


@pytest.mark.parametrize("args, needle", [
    (["preprocess", "x.toml", "--workers", "0"], "--workers: must be >= 1; leave --workers out (or set [runner] "
                                                 "workers = 0) for one worker per core"),
    (["demo", "--workers", "0"], "leave --workers out"),
    (["preprocess", "x.toml", "--workers", "-2"], "--workers: must be >= 1, got -2"),
    (["preprocess", "x.toml", "--runner", "Prism2"], "--runner"),
    (["nonsense"], "invalid choice"),
])
def test_bad_cli_arguments_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n')
    assert main(["preprocess", str(tmp_path / "job.toml"), "--device", "cuda", "--no-progress"]) == 2
    assert "device = 'cuda', but torch sees no GPU on this machine" in capsys.readouterr().err
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "preprocess" in out.stdout


def test_dataset_command_exit_status_and_output_survive_the_fast_exit(tmp_path):
    """Dataset commands end with ``os._exit``: the status and every line printed must still arrive."""
    import json
    import os

    from schemas import DatasetManifest

    out = tmp_path / "ds"
    (out / "versions").mkdir(parents=True)
    for v in (1, 2):
        m = DatasetManifest(version=v, shards=[f"shards/{v:06d}-{i:06d}.tar" for i in range(300)],
                            shard_sizes=[10] * 300, num_samples=3000 * v, counts={"input": 3000, "rejected": 7},
                            index=f"index/{v:06d}.parquet", created=f"2026-01-0{v}T00:00:00Z")
        (out / "versions" / f"{v:06d}.json").write_text(m.to_json())
    (out / "dataset.json").write_text(m.to_json())
    cmd = [sys.executable, "-m", "jobs.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is block-buffered
    ok = subprocess.run([*cmd, "versions", str(out), "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)  # complete: the buffered output was flushed before exiting
    assert [(r["version"], r["samples"], r["shards"], r["current"]) for r in rows] == [
        (1, 3000, 300, False), (2, 6000, 300, True)]
    bad = subprocess.run([*cmd, "versions", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                         env=env)
    assert bad.returncode == 2 and "is not an mbm dataset folder" in bad.stderr
    usage = subprocess.run([*cmd, "preprocess", "x.toml", "--workers", "0"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert usage.returncode == 2 and "--workers" in usage.stderr


def _forkservers() -> set[int]:
    """Pids of fork servers started by this process."""
    import os
    from pathlib import Path

    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"pipelines.forkserver" in (entry / "cmdline").read_bytes():
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("args", [
    ["preprocess", "missing-spec.toml"],  # SpecError
    ["preprocess", "x.toml", "--workers", "0"],  # argparse exits
])
def test_a_failed_preprocess_leaves_no_fork_server(args, capsys):
    with contextlib.suppress(SystemExit):
        main(args)
    assert _forkservers() == set()


def test_a_job_that_fails_while_building_its_pipeline_leaves_no_beam_temp_folder(tmp_path, monkeypatch):
    import tempfile

    import jobs.preprocess as preprocess

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where Beam makes each pipeline's local temp folder

    def broken(*args, **kwargs):
        raise RuntimeError("the graph broke")

    monkeypatch.setattr(preprocess, "build_graph", broken)
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n')
    with pytest.raises(RuntimeError, match="the graph broke"):
        main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"])
    assert not list(temp.glob("beam-pipeline-temp*"))
    assert not (tmp_path / "out" / ".staging").exists()  # nor its staging folder


def test_a_model_folder_that_is_no_model_leaves_no_staging(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # no width: found when the job hashes the model
    (tmp_path / "model" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n'
                                       '[extract.text]\nname = "hf-text"\npath = "model"\n')
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"]) == 2
    assert "[extract.text] hf-text:" in capsys.readouterr().err
    assert not (tmp_path / "out" / ".staging").exists()


BERT_CONFIG = '{"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 14, "hidden_size": 32}'


@pytest.mark.parametrize("extract, said", [
    ('[extract.image]\nweights = "notes.txt"\n',
     "[extract.image] efficientnet-lite0: weights = '{d}/notes.txt' is not a PyTorch weights file (it starts with "
     "b'these are notes\\n'); set weights to a state dict saved with torch.save"),
    ('[extract.audio]\nname = "hf-audio"\npath = "bert"\n',
     "[extract.audio] hf-audio: path = '{d}/bert' holds a text model (config.json: model_type 'bert', architectures "
     "BertModel; no conv_kernel and conv_stride lists of a front end over the waveform); set path to the folder of a "
     "wav2vec2-style speech encoder"),
    ('[extract.image]\nname = "hf-image"\npath = "bert"\n',
     "[extract.image] hf-image: path = '{d}/bert' holds a text model (config.json: model_type 'bert', architectures "
     "BertModel), not an image model; set path to the folder of a vision model"),
])
def test_model_files_of_the_wrong_kind_stop_the_job_in_the_driver_in_one_line(tmp_path, capsys, extract, said):
    (tmp_path / "notes.txt").write_text("these are notes\n")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(BERT_CONFIG)
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n' + extract)
    assert main(["preprocess", str(tmp_path / "job.toml"), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mbm: error: {said.format(d=tmp_path)}") and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "dataset.json").exists() and not (tmp_path / "out" / ".staging").exists()


def test_a_dataset_folder_that_lost_its_dataset_json_is_left_as_it_is(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n')
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"]) == 0
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello again"}\n')
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"]) == 0
    out = tmp_path / "out"
    (out / "dataset.json").unlink()
    before = sorted(p.name for p in out.rglob("*") if p.is_file())
    capsys.readouterr()
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"]) == 2
    assert f"mbm: error: {out} holds versions 1, 2 above its current one (it has no dataset.json)" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == before  # no version deleted


def _failing_job(tmp_path, error: str, workers: int):
    import json

    rows = [{"id": f"s{i:02d}", "text": "an oom text" if i == 7 else f"caption number {i}"} for i in range(24)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "job.toml").write_text(
        '[input]\nmanifest = "m.jsonl"\n[extract.text]\nname = "failing-text"\n'
        f'error = "{error}"\n[runner]\nworkers = {workers}\n[output]\ndir = "out"\n')
    return tmp_path / "job.toml"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_out_of_memory_stops_the_job_in_one_line_and_rejects_nothing(tmp_path, monkeypatch, capsys, workers):
    """Out of memory is the machine's failure: no sample becomes a reject for it, no version is made,
    and the command says what to change in one line (Beam's relayed worker tracebacks stay in the log)."""
    import os
    from pathlib import Path

    import tests.support.failing_extractor  # noqa: F401 - registers "failing-text" here and, preloaded, in workers

    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    spec = _failing_job(tmp_path, "MemoryError", workers)
    assert main(["preprocess", str(spec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mbm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "extract.text: failing-text on cpu ran out of host memory" in lines[0]
    assert f"[runner] workers, now {workers}" in lines[0] and "[extract.text] batch_size, now 128" in lines[0]
    out = tmp_path / "out"
    assert not (out / "dataset.json").exists() and not list(out.glob("versions/*"))
    assert not (out / ".staging").exists()  # the spilled features of the stopped run are gone
    # The same data with the trigger gone lands every sample: nothing was lost to the stopped run.
    (tmp_path / "m.jsonl").write_text((tmp_path / "m.jsonl").read_text().replace("an oom text", "a fine text"))
    assert main(["preprocess", str(spec), "--no-progress"]) == 0
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["counts"]["rejected"] == 0 and report["counts"]["ok"] == 24


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device every write to fails")
@pytest.mark.timeout(120)
def test_a_failed_bundle_is_reported_when_the_workers_log_cannot_be_written(tmp_path, monkeypatch, capsys):
    """A full disk under the output folder also fills the workers' log there. Beam's worker prints a failed
    bundle's traceback to stderr before it tells the runner, and that print raised: the runner waited
    for the answer forever (found with the output on a full 20 MB tmpfs). /dev/full stands in for that log."""
    from pathlib import Path

    import jobs.preprocess as preprocess
    import tests.support.failing_extractor  # noqa: F401

    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    real = preprocess.make_runner
    monkeypatch.setattr(preprocess, "make_runner", lambda name, workers, log, command: real(name, workers,
                                                                                           "/dev/full", command))
    spec = _failing_job(tmp_path, "MemoryError", 2)
    assert main(["preprocess", str(spec), "--no-progress"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mbm: error:")]
    assert len(lines) == 1 and "ran out of host memory" in lines[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and signals as on Linux")
@pytest.mark.timeout(120)
def _job_asleep_in_featurize(tmp_path, preexec_fn):
    """A real 2-worker preprocessing job in a process of its own, returned once its workers are in their
    bundles, one of them asleep in a featurize call (the failing extractor's SLEEP mode)."""
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    spec = _failing_job(tmp_path, "SLEEP", 2)
    code = "import sys, tests.support.failing_extractor; from jobs.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    job = subprocess.Popen([sys.executable, "-c", code, "preprocess", str(spec), "--no-progress"], cwd=root,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    log = tmp_path / "out" / ".worker.log"
    deadline = time.monotonic() + 90
    while "loading extractor failing-text" not in (log.read_text() if log.exists() else ""):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    return job


def test_ctrl_c_stops_the_job_in_one_line_and_leaves_nothing_to_clean(tmp_path):
    """Ctrl-C reaches the driver and its workers (one process group). Beam's threads reported each worker
    that exited on it as a crash, printed before "mbm: interrupted", and the run's staging stayed until
    the next run."""
    import signal

    def own_group():
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell's children start with it ignored

    job = _job_asleep_in_featurize(tmp_path, own_group)
    os.killpg(job.pid, signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert err.strip().splitlines()[-1] == "mbm: interrupted" and "Traceback" not in err, err
    out = tmp_path / "out"
    assert not (out / ".staging").exists() and not (out / "dataset.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers are found in /proc")
@pytest.mark.parametrize("name, code, said", [("SIGTERM", 143, "mbm: terminated (SIGTERM)"),
                                              ("SIGINT", 130, "mbm: interrupted")])
def test_a_signal_to_the_driver_alone_stops_the_workers_and_leaves_nothing_to_clean(tmp_path, name, code, said):
    """A container runtime or a batch scheduler stops a job with SIGTERM to its main process alone; ``kill
    -INT``, ``timeout -s INT`` or a supervisor send SIGINT to it alone. On SIGTERM the driver died at once
    (status -15) and its workers went on until they noticed; on SIGINT Beam's clean-up waited for workers
    that never got it, and the job could hang holding the folder's lock. The run's staging stayed."""
    import signal
    import time

    from pipelines.forkclient import running
    from pipelines.proctree import descendants

    def started(ignore_sigint=name == "SIGTERM"):  # `mbm preprocess ... &` in a script, or nohup: SIGINT ignored
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)

    job = _job_asleep_in_featurize(tmp_path, started)
    tree = descendants(job.pid)
    assert len(tree) >= 3  # the fork server, the workers' clients and the workers
    job.send_signal(getattr(signal, name))
    _, err = job.communicate(timeout=60)
    assert job.returncode == code
    assert err.strip().splitlines()[-1] == said and "Traceback" not in err, err
    out = tmp_path / "out"
    assert not (out / ".staging").exists() and not (out / "dataset.json").exists()
    deadline = time.monotonic() + 2  # the workers watch their clients every 0.5 s; the signal is quicker
    while (left := [pid for pid in tree if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left


@pytest.mark.parametrize("error, code, said", [
    ("SIGINT", 130, "mbm: interrupted"),
    ("SIGTERM", 143, "mbm: terminated (SIGTERM)"),
    ("DROPPED_SIGINT", 130, "mbm: interrupted"),
])
def test_a_one_worker_job_stops_on_a_signal_in_one_line_and_commits_nothing(tmp_path, capsys, error, code, said):
    """With one worker the DoFns run in the driver's main thread, where the signal's exception is raised.
    Beam wrapped Ctrl-C's KeyboardInterrupt in a RuntimeError (a traceback, exit 1, the staging left);
    and one raised in a callback from C (soundfile reads through cffi's) was printed and dropped there,
    and the job went on to commit a version."""
    import signal

    import tests.support.failing_extractor  # noqa: F401

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["preprocess", str(_failing_job(tmp_path, error, 1)), "--no-progress"]) == code
    finally:
        signal.signal(signal.SIGTERM, before)  # after a SIGTERM the command leaves it ignored
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == said, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    out = tmp_path / "out"
    assert not (out / ".staging").exists() and not (out / "dataset.json").exists()


def test_a_bad_input_still_becomes_a_reject_row(tmp_path, monkeypatch, capsys):
    import json

    import tests.support.failing_extractor  # noqa: F401

    spec = _failing_job(tmp_path, "ValueError", 1)
    assert main(["preprocess", str(spec), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["rejected"] == 1 and report["counts"]["ok"] == 23


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server reports the signal")
def test_a_worker_killed_by_the_oom_killer_stops_the_job_with_one_line(tmp_path, monkeypatch, capsys):
    """SIGKILL is what the kernel's out-of-memory killer sends: Beam reports a closed channel and a
    dozen threads' tracebacks; the command says which signal killed a worker and what to lower."""
    import os
    from pathlib import Path

    import tests.support.failing_extractor  # noqa: F401

    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    spec = _failing_job(tmp_path, "SIGKILL", 2)
    assert main(["preprocess", str(spec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mbm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "a Beam worker process was killed by SIGKILL (on Linux usually the kernel's out-of-memory killer" in lines[0]
    assert "[runner] workers, now 2" in lines[0] and "[extract.text] batch_size = 128" in lines[0]
    out = tmp_path / "out"
    assert not (out / "dataset.json").exists() and not (out / ".staging").exists()
    log = (out / ".worker.log").read_text()
    assert "killed by SIGKILL" in log and "driver: " in log  # Beam's side of it is kept there


def test_a_full_disk_at_commit_is_one_line_and_the_current_version_stands(tmp_path, monkeypatch, capsys):
    import errno

    import jobs.preprocess as preprocess
    import tests.support.failing_extractor  # noqa: F401

    spec = _failing_job(tmp_path, "ValueError", 1)
    assert main(["preprocess", str(spec), "--no-progress"]) == 0  # version 1
    (tmp_path / "m.jsonl").write_text((tmp_path / "m.jsonl").read_text().replace("caption number 3", "a new caption"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preprocess, "commit", full)
    capsys.readouterr()
    assert main(["preprocess", str(spec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mbm: error: committing the new version: no space left in") and "Traceback" not in err
    assert __import__("json").loads((tmp_path / "out" / "dataset.json").read_text())["version"] == 1


def test_a_dataset_folder_whose_name_looks_like_a_pattern_gets_its_samples(tmp_path, capsys):
    """``run [1]`` was read as a character class where the commit looked for the staged parts: it found
    none, committed a version of no sample, and then failed to delete the staging folder."""
    import json

    import tests.support.failing_extractor  # noqa: F401  registers failing-text

    folder = tmp_path / "run [1]"
    folder.mkdir()
    (folder / "m.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": f"caption {i}"}) + "\n"
                                            for i in range(3)))
    (folder / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n[runner]\nworkers = 1\n'
                                     '[extract.text]\nname = "failing-text"\n')
    assert main(["preprocess", str(folder / "job.toml"), "--no-progress"]) == 0
    manifest = json.loads((folder / "out" / "dataset.json").read_text())
    assert manifest["num_samples"] == 3 and not (folder / "out" / ".staging").exists()


def test_gc_of_a_folder_it_cannot_write_is_one_line_and_a_dry_run_needs_no_lock(tmp_path, monkeypatch, capsys):
    from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from mbm.lock import FolderLock

    out = tmp_path / "ds"
    write_synthetic_dataset(str(out), SyntheticConfig(num_samples=6, samples_per_shard=5, feature_dims={"text": 4}))

    def read_only(self):
        raise OSError(30, "Read-only file system", str(out / ".lock"))

    monkeypatch.setattr(FolderLock, "__enter__", read_only)  # what a read-only mount gives
    assert main(["gc", str(out), "--keep", "1"]) == 2
    assert capsys.readouterr().err == f"mbm: error: gc of {out}: Read-only file system: {out / '.lock'}\n"
    assert main(["gc", str(out), "--keep", "1", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("kept versions [1]; would delete versions [] and 0 files")


@pytest.mark.parametrize("stored", ["job.toml", "versions/000001.toml"])
def test_a_moved_dataset_folders_own_spec_does_not_write_to_the_old_place(tmp_path, capsys, monkeypatch, stored):
    """The stored spec names its folder with an absolute path: run from the folder's new place it updated
    (or created anew) the old one."""
    import jobs.cli as cli

    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    moved = tmp_path / "moved"
    (moved / "versions").mkdir(parents=True)
    (moved / "dataset.json").write_text('{"version": 1}')
    old = tmp_path / "old"
    (moved / stored).write_text(f'[input]\nmanifest = "{tmp_path / "m.jsonl"}"\n[output]\ndir = "{old}"\n')
    assert main(["preprocess", str(moved / stored), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mbm: error: {moved / stored} is the job spec stored with the dataset at {moved}, but its [output] dir is "
        f"{old} (was the folder moved or copied?): give --output {moved} to update this dataset, or --output {old} "
        "to write there")
    assert not old.exists()
    ran = []
    monkeypatch.setattr(cli, "_run_and_summarize", lambda spec, args: ran.append(spec.output.dir) or 0)
    assert main(["preprocess", str(moved / stored), "--output", str(moved), "--no-progress"]) == 0
    (moved / "dataset.json").unlink()  # not a dataset folder: a spec named job.toml like any other
    assert main(["preprocess", str(moved / stored), "--no-progress"]) == 0
    assert ran == [str(moved), str(old)]


def test_a_remote_output_dir_is_never_written_to_a_local_folder(tmp_path, capsys, monkeypatch):
    """str(Path("gs://bucket/ds")) is "gs:/bucket/ds": the dataset went to ./gs:/bucket/ds, exit 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "gs://bucket/ds"\n')
    from apache_beam.io.filesystems import FileSystems

    with contextlib.suppress(ValueError):
        FileSystems.get_filesystem("gs://bucket/ds")
        pytest.skip("apache-beam[gcp] is installed here")
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"]) == 2
    assert "[output] dir = 'gs://bucket/ds': Unable to get filesystem" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress", "--output", "s3://bucket/ds"]) == 2
    assert "[output] dir = 's3://bucket/ds' cannot be read" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["job.toml", "m.jsonl"]


def test_an_output_folder_that_is_no_dataset_is_refused_before_it_is_touched(tmp_path, capsys):
    """[output] dir = "." next to the spec: the commit overwrote the user's job.toml with mbm's record of it."""
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    spec = '[input]\nmanifest = "m.jsonl"\n[output]\ndir = "."\n'
    (tmp_path / "job.toml").write_text(spec)
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mbm: error: {tmp_path} is not empty and is no mbm dataset (it has no dataset.json; it holds 2 other "
        "entries: job.toml, m.jsonl): nothing was changed. Give an [output] dir (or --output) that is new or empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "m.jsonl"]  # no .lock left either
    assert (tmp_path / "job.toml").read_text() == spec
    assert main(["preprocess", str(tmp_path / "job.toml"), "--no-progress", "--output", str(tmp_path / "ds")]) == 0
    assert (tmp_path / "ds" / "dataset.json").is_file()


@pytest.mark.parametrize("args, said", [
    (["demo", "--output", "", "--workers", "1", "--no-progress"],
     "--output is empty; give the dataset folder to write"),
    (["preprocess", "", "--no-progress"], "the job spec is empty; give its .toml file, e.g. jobs/examples/demo.toml"),
    (["versions", ""], "the dataset folder is empty; give the folder mbm preprocess wrote, e.g. out/demo"),
    (["diff", " ", "1", "2"], "the dataset folder is empty; give the folder mbm preprocess wrote, e.g. out/demo"),
    (["gc", "", "--keep", "1"], "the dataset folder is empty; give the folder mbm preprocess wrote, e.g. out/demo"),
])
def test_an_empty_path_argument_is_one_line_and_touches_nothing(tmp_path, monkeypatch, capsys, args, said):
    """``Path("")`` is the current folder: ``mbm demo --output ""`` wrote the demo dataset there."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [f"mbm: error: {said}"]
    assert list(tmp_path.iterdir()) == []


def test_a_quoted_tilde_in_a_path_argument_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """Quoted, ``"~/ds"`` reaches mbm as written: the dataset went to a folder named ``~`` in the current one."""
    import json

    import jobs.demo
    import tests.support.failing_extractor  # noqa: F401
    from jobs.spec import SpecError

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    _failing_job(home, "ValueError", 1)
    assert main(["preprocess", "~/job.toml", "--output", "~/ds", "--no-progress"]) == 0
    assert json.loads((home / "ds" / "dataset.json").read_text())["version"] == 1
    capsys.readouterr()
    assert main(["versions", "~/ds", "--json"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == [1]
    assert main(["gc", "~/ds", "--keep", "1", "--dry-run"]) == 0
    asked = []

    def demo_spec(output, workers=None):
        asked.append(output)
        raise SpecError("enough")

    monkeypatch.setattr(jobs.demo, "demo_spec", demo_spec)
    assert main(["demo", "--output", "~/demo"]) == 2
    assert asked == [str(home / "demo")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def _manifests(out, versions: int, shards: int = 1):
    from schemas import DatasetManifest

    (out / "versions").mkdir(parents=True)
    for v in range(1, versions + 1):
        m = DatasetManifest(version=v, shards=[f"shards/v{v:06d}-{i:06d}.tar" for i in range(shards)],
                            shard_sizes=[10] * shards, num_samples=10 * shards, counts={"input": 10, "rejected": 0},
                            index=f"index/{v:06d}.parquet", created="2026-01-01T00:00:00Z")
        (out / "versions" / f"{v:06d}.json").write_text(m.to_json())
    (out / "dataset.json").write_text(m.to_json())


@pytest.mark.parametrize("damage", [lambda text: text[:50], lambda text: "{}"])
def test_a_damaged_old_version_manifest_is_one_line_naming_it(tmp_path, capsys, damage):
    out = tmp_path / "ds"
    _manifests(out, 2)
    old = out / "versions" / "000001.json"
    old.write_text(damage(old.read_text()))
    for args in (["versions", str(out)], ["gc", str(out), "--keep", "1"], ["diff", str(out), "1", "2"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"mbm: error: {old} cannot be read ("), err
        assert err.endswith(": put back a good copy of it, or delete it to give up version 1 (mbm gc then deletes "
                            "the shards and index only that version used)\n"), err
    assert old.exists()


def _closed_pipe():
    """A pipe whose reader is gone, as after ``| head -1`` has read its line: every write to it fails."""
    read, write = os.pipe()
    os.close(read)
    return write


def test_output_into_a_closed_pipe_ends_quietly_with_status_141(tmp_path):
    """``mbm versions OUT | head -1`` printed a BrokenPipeError traceback once the listing outgrew a buffer."""
    out = tmp_path / "ds"
    _manifests(out, 150)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    pipe = _closed_pipe()
    try:
        listed = subprocess.run([sys.executable, "-m", "jobs.cli", "versions", str(out)], stdout=pipe,
                                stderr=subprocess.PIPE, text=True, timeout=120, env=env)
        # a command that exits the usual way (sys.exit), as training, evaluate and generate do
        script = ("import sys, jobs.cli as cli; cli.main = lambda argv: print('{}\\n' * 20000) or 0; "
                  "sys.argv = ['mbm', 'evaluate']; cli.run()")
        evaluated = subprocess.run([sys.executable, "-c", script], stdout=pipe, stderr=subprocess.PIPE, text=True,
                                   timeout=120, env=env)
    finally:
        os.close(pipe)
    for done in (listed, evaluated):
        assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("name, said", [("SIGTERM", "SIGTERM"), ("SIGINT", "Ctrl-C")])
def test_a_stop_right_after_the_commit_lets_the_run_finish_and_succeed(tmp_path, monkeypatch, capsys, caplog, name,
                                                                       said):
    """Once dataset.json names the new version it is committed: a stop then ended the run with 143 (or 130),
    before its versions/ manifest, job.toml and report.json were written, and its staging went."""
    import json
    import signal

    import pipelines.commit as commit
    import tests.support.failing_extractor  # noqa: F401
    from tests.support.signals import send

    replace = commit.write_atomic

    def then_stop(path, data, *args):
        replace(path, data, *args)
        if path.endswith("/dataset.json"):
            send(getattr(signal, name))

    monkeypatch.setattr(commit, "write_atomic", then_stop)
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["preprocess", str(_failing_job(tmp_path, "ValueError", 1)), "--no-progress"]) == 0
    finally:
        signal.signal(signal.SIGTERM, before)  # after a SIGTERM the command leaves it ignored
    captured = capsys.readouterr()
    assert f"{said} came as version 1 was committed: the job finished writing it and ends as done" in caplog.text
    assert "Traceback" not in captured.err and "terminated" not in captured.err and "interrupted" not in captured.err
    assert "version 1" in captured.out
    out = tmp_path / "out"
    assert json.loads((out / "versions" / "000001.json").read_text())["version"] == 1
    assert (out / "job.toml").exists() and json.loads((out / "report.json").read_text())["version"] == 1
    assert not (out / ".staging").exists()


def test_no_dedupe_turns_the_spec_s_dedupe_off(tmp_path):
    from jobs.cli import _overrides, build_parser
    from jobs.spec import load_spec

    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "out"\n[runner]\ndedupe = true\n')
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x"}\n')
    for argv, dedupe in ((["--no-dedupe"], False), ([], True)):
        args = build_parser().parse_args(["preprocess", str(tmp_path / "job.toml"), *argv])
        assert load_spec(args.spec, _overrides(args)).runner.dedupe is dedupe


def test_gc_deletes_the_kept_scans_of_the_shards_it_deletes(tmp_path, monkeypatch, capsys):
    from mbm.scanfiles import scan_file

    out = tmp_path / "ds"
    _manifests(out, 2, shards=2)
    (out / "shards").mkdir()
    for v in (1, 2):
        for i in range(2):
            (out / "shards" / f"v{v:06d}-{i:06d}.tar").write_bytes(b"x")
    folder = tmp_path / "scans"
    folder.mkdir()
    monkeypatch.setenv("MBM_SCAN_DIR", str(folder))
    names = {f"v{v:06d}-{i:06d}.tar": scan_file(str(folder), str(out / "shards" / f"v{v:06d}-{i:06d}.tar"))
             for v in (1, 2) for i in range(2)}
    for file in names.values():
        open(file, "w").close()
    assert main(["gc", str(out), "--keep", "1", "--dry-run"]) == 0
    assert all(os.path.exists(f) for f in names.values())  # a dry run deletes nothing
    assert main(["gc", str(out), "--keep", "1"]) == 0
    assert "deleted versions [1] and 2 files" in capsys.readouterr().out
    assert {n for n, f in names.items() if os.path.exists(f)} == {"v000002-000000.tar", "v000002-000001.tar"}
