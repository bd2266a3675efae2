import os
import subprocess
import sys
from pathlib import Path

from mbm.scanfiles import forget, scan_file


def test_forget_deletes_the_scans_of_the_given_shards_only(tmp_path, monkeypatch):
    folder = tmp_path / "scans"
    folder.mkdir()
    shards = [str(tmp_path / f"s{i}.tar") for i in range(3)]
    for shard in shards[:2]:
        open(scan_file(str(folder), shard), "w").close()
    # a relative path names the same file as its absolute one
    monkeypatch.chdir(tmp_path)
    assert forget(["s0.tar", shards[2]], str(folder)) == 1  # s2 has no scan
    assert os.listdir(folder) == [os.path.basename(scan_file(str(folder), shards[1]))]
    monkeypatch.setenv("MBM_SCAN_DIR", "off")
    assert forget(shards) == 0
    monkeypatch.setenv("MBM_SCAN_DIR", str(folder))
    assert forget(shards) == 1 and os.listdir(folder) == []


def test_it_imports_no_torch():
    """``mbm gc`` (a dataset command, which starts without torch) uses it."""
    code = "import sys, mbm.scanfiles; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
