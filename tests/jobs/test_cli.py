import contextlib
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
    (["preprocess", "x.toml", "--workers", "0"], "--workers"),
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
