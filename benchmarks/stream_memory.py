"""Peak memory of one loader epoch, measured on a child process and its data-loader workers.

The child (``benchmarks/stream.py --child-epoch DATA --workers W``) runs one epoch of the mbm
loader. The parent samples the resident set of the child and all its descendants from /proc every
``interval`` seconds: ``tree`` is the largest sum seen (pages that forked workers share with the
main process count once per process), ``largest`` the largest single process seen. (``ru_maxrss``
would not do: Linux carries the parent's high-water mark over fork + exec into the child's.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Peak:
    tree_mib: float
    largest_mib: float
    seconds: float


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s child processes, from /proc (none when it is gone)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return kids


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_kib(pid: int) -> list[int]:
    """Resident KiB of ``pid`` and of each of its descendants now."""
    sizes, todo = [], [pid]
    while todo:
        p = todo.pop()
        sizes.append(_rss_kib(p))
        todo.extend(children(p))
    return sizes


def peak_of_epoch(script: Path, data: str, workers: int, task: list[str], interval: float = 0.02,
                  batch_size: int = 32) -> Peak:
    """Run one mbm loader epoch over ``data`` in a child process (``task``: its --task/--pair arguments)
    in batches of ``batch_size``; its peak memory."""
    cmd = [sys.executable, str(script), "--child-epoch", data, "--workers", str(workers),
           "--batch-size", str(batch_size), *task]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        tree = largest = 0
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            sizes = tree_rss_kib(proc.pid)
            tree, largest = max(tree, sum(sizes)), max(largest, *sizes)
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out = proc.stdout.read()
        proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
    seconds = json.loads(out)["seconds"]
    return Peak(tree_mib=tree / 1024, largest_mib=largest / 1024, seconds=seconds)
