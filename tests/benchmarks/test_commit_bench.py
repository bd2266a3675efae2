import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from commit import main, run_child, stage_first, stage_rerun  # noqa: E402


def test_the_commit_benchmark_commits_a_first_run_and_a_rerun_of_what_it_staged(tmp_path):
    out = tmp_path / "dataset"
    first = run_child(out, stage_first(out, 2000))
    assert first["planned"] == {"new": 2000, "changed": 0, "unchanged": 0, "removed": 0}
    assert first["peak_mib"] >= first["above_mib"] > 0 and first["seconds"] > 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["num_samples"] == 1900 and manifest["counts"]["rejected"] == 100  # every 20th is a reject

    second = run_child(out, stage_rerun(out))
    # one in 20 landed samples re-extracted; the other landed ones and the 100 rejects as they were
    assert second["planned"] == {"new": 0, "changed": 100, "unchanged": 1900, "removed": 0}
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["version"] == 2 and manifest["num_samples"] == 1900


def test_rows_are_checked(capsys):
    for bad in ("10", "abc", ""):
        with pytest.raises(SystemExit) as e:
            main(["--rows", bad])
        assert e.value.code == 2
    assert "--rows" in capsys.readouterr().err
