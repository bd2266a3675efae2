"""A process's descendants, from the parent ids in ``/proc/*/stat`` (Linux; elsewhere none are found).

A local preprocessing run is a tree: the driver, the worker clients Beam starts, the worker fork
server and the workers it forks. A signal sent to the driver alone (SIGTERM from a container runtime
or a batch scheduler) reaches none of the others, where Ctrl-C reaches the terminal's whole process
group; ``signal_descendants`` passes it on to them.
"""

from __future__ import annotations

import contextlib
import os


def parent(pid: int) -> int:
    """The parent id of ``pid``; 0 when it is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children before theirs), not ``root`` itself."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit() and (ppid := parent(int(entry))):  # 0: exited meanwhile
            children.setdefault(ppid, []).append(int(entry))
    tree: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def signal_descendants(root: int, signum: int) -> list[int]:
    """Send ``signum`` to every process below ``root``; returns the ids it reached."""
    reached = []
    for pid in descendants(root):
        with contextlib.suppress(OSError):  # exited meanwhile, or not ours
            os.kill(pid, signum)
            reached.append(pid)
    return reached
