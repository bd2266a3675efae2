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


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "preprocess" in out.stdout


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
