import json
import os
import subprocess
import sys

import pytest

from mbm.lock import FolderLock, FolderLockedError
from pipelines.progress import ProgressWriter, read_progress

HOLDER = """
import sys, time
from mbm.lock import FolderLock
with FolderLock(sys.argv[1]):
    print("ready", flush=True)
    sys.stdin.readline()
"""


def _held_here(folder) -> bool:
    """Whether the folder's lock file names this process as its holder."""
    return json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


def _start_holder(folder, script=HOLDER):
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_second_job_on_same_folder_refuses_and_lock_frees_after(tmp_path):
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(FolderLockedError, match="another mbm job"):
            with FolderLock(str(tmp_path)):
                pytest.fail("the lock was taken twice")
    finally:
        proc.communicate("go\n", timeout=30)
    with FolderLock(str(tmp_path)):  # released once the holder is gone
        assert _held_here(tmp_path)


def test_lock_is_released_when_holder_is_killed(tmp_path):
    proc = _start_holder(tmp_path)
    proc.kill()
    proc.wait(30)
    with FolderLock(str(tmp_path)):
        assert _held_here(tmp_path)


def test_progress_files_sum_across_writers(tmp_path):
    a, b = ProgressWriter(str(tmp_path), interval=0), ProgressWriter(str(tmp_path), interval=3600)
    for _ in range(3):
        a.add("read")
    b.add("read")
    b.add("rejected")
    assert read_progress(str(tmp_path))["read"] == 3  # b has not flushed yet (long interval)
    b.flush()
    counts = read_progress(str(tmp_path))
    assert counts["read"] == 4 and counts["rejected"] == 1


def test_the_same_process_cannot_take_a_folder_twice(tmp_path):
    with FolderLock(str(tmp_path)):
        with pytest.raises(FolderLockedError, match="this process"):
            with FolderLock(str(tmp_path)):
                pytest.fail("the lock was taken twice")
    with FolderLock(str(tmp_path)):
        assert _held_here(tmp_path)


FORKER = """
import os, sys, time
from mbm.lock import FolderLock
lock = FolderLock(sys.argv[1]).__enter__()
if os.fork() == 0:  # a child that outlives its parent (an orphaned data-loader worker)
    time.sleep(10)
    os._exit(0)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    proc = _start_holder(tmp_path, FORKER)
    proc.kill()
    proc.wait(30)
    with FolderLock(str(tmp_path)):  # free although the child still runs
        assert _held_here(tmp_path)


def test_the_refusal_names_the_holder_in_words(tmp_path):
    """It showed the lock file's JSON: ({"pid": 30454, "host": "vm", "since": "..."})."""
    import socket

    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(FolderLockedError) as exc:
            with FolderLock(str(tmp_path)):
                pytest.fail("the lock was taken twice")
    finally:
        proc.communicate("go\n", timeout=30)
    said = str(exc.value)
    assert f"(pid {proc.pid} on {socket.gethostname()}, since 20" in said and "{" not in said


def test_the_lock_file_follows_the_umask_as_the_folder_s_other_files_do(tmp_path):
    """A group that may write the dataset (umask 002) may also take its lock: the file was always 0644."""
    old = os.umask(0o002)
    try:
        with FolderLock(str(tmp_path)):
            assert (tmp_path / ".lock").is_file()
    finally:
        os.umask(old)
    assert (tmp_path / ".lock").stat().st_mode & 0o777 == 0o664
