"""What this process may use of the machine: CPUs and memory as a container or a batch scheduler limits them.

``os.cpu_count()`` and ``/proc/meminfo`` describe the whole machine. A process pinned to some of its
CPUs (``taskset``, a Slurm allocation, a container's cpuset), or under a cgroup CPU quota (Docker's
``--cpus``, a Kubernetes CPU limit) or memory limit (``--memory``, a pod's limit), that sized its
workers by them would start one per host core: on a 2-CPU pod of a 64-core node, 64 preprocessing
workers loading three models each, stopped at the pod's memory limit, and in training torch's
default of a thread per physical core of the host (32) in a quota of 2 CPUs.

``usable_cores()``: the CPUs of the affinity mask, capped by the CPU quota of the process's cgroup and
its ancestors (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up (2.5 CPUs: 3 workers share
them). ``available_memory()``: ``MemAvailable``, capped by what the memory limit of the cgroup and its
ancestors leaves (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; its reclaimable page cache, the
inactive file pages, counted as free as ``MemAvailable`` counts it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as the largest page-aligned 63-bit number


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_dirs(controller: str, root: str, proc: str) -> Iterator[Path]:
    """The folders of this process's cgroup for ``controller`` and of its ancestors, innermost first.

    v2 (the ``0::/path`` line) keeps every controller in one tree; v1 mounts one per controller
    (``cpu,cpuacct`` under either name). A container may see its own cgroup at the mount's root while
    ``/proc/self/cgroup`` names the host's path; folders that do not exist are skipped, and the root
    is always looked at.
    """
    text = _read(Path(proc)) or ""
    seen: set[Path] = set()
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            bases = [Path(root), Path(root) / "unified"]
        elif controller in controllers.split(","):
            bases = [Path(root) / controllers, Path(root) / controller]
        else:
            continue
        for base in bases:
            if not base.is_dir():
                continue
            here = Path(os.path.normpath(base / path.lstrip("/")))
            for folder in (here, *here.parents, base):
                if folder in seen or not folder.is_relative_to(base):
                    continue
                seen.add(folder)
                if folder.is_dir():
                    yield folder


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc: str = PROC_CGROUP) -> float | None:
    """CPUs the cgroup quotas allow this process (the smallest along its cgroup's ancestry); None: no quota."""
    limits = []
    for folder in _cgroup_dirs("cpu", root, proc):
        v2 = _read(folder / "cpu.max")
        if v2 is not None:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                limits.append((quota, period))
            continue
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None and quota != "-1":
            limits.append((quota, period))
    cpus = []
    for quota, period in limits:
        try:
            q, p = int(quota), int(period)
        except ValueError:
            continue
        if q > 0 and p > 0:
            cpus.append(q / p)
    return min(cpus) if cpus else None


def cgroup_memory_available(root: str = CGROUP_ROOT, proc: str = PROC_CGROUP) -> int | None:
    """Bytes the memory limits of this process's cgroup and its ancestors still leave (limit - usage +
    inactive file pages), the smallest of them; None: no limit."""
    left = []
    for folder in _cgroup_dirs("memory", root, proc):
        limit, usage = _read(folder / "memory.max"), _read(folder / "memory.current")
        if limit is None:
            limit, usage = _read(folder / "memory.limit_in_bytes"), _read(folder / "memory.usage_in_bytes")
        if limit is None or usage is None or limit == "max":
            continue
        try:
            lim, used = int(limit), int(usage)
        except ValueError:
            continue
        if lim >= UNLIMITED:
            continue
        stat = _read(folder / "memory.stat") or ""
        cache = {k: v for k, _, v in (line.partition(" ") for line in stat.splitlines())}
        try:
            inactive = int(cache.get("total_inactive_file", cache.get("inactive_file", "0")))
        except ValueError:
            inactive = 0
        left.append(max(0, lim - used + inactive))
    return min(left) if left else None


def usable_cores(root: str = CGROUP_ROOT, proc: str = PROC_CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup CPU quota (rounded up); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def machine_memory_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The machine's ``MemAvailable`` in bytes; None when unknown (no /proc: macOS)."""
    try:
        with open(meminfo) as f:
            lines = [line for line in f if line.startswith("MemAvailable:")]
        return int(lines[0].split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # no /proc (macOS), or a kernel without the field
        return None


CGROUP_MEMORY = "memory its cgroup's limit leaves (a container's)"


def memory_room(root: str = CGROUP_ROOT, proc: str = PROC_CGROUP,
                meminfo: str = "/proc/meminfo") -> tuple[int | None, str]:
    """``available_memory()`` and what sets it: "free memory" (the machine's ``MemAvailable``) or
    ``CGROUP_MEMORY`` (a limit leaves less)."""
    machine, boxed = machine_memory_available(meminfo), cgroup_memory_available(root, proc)
    if boxed is not None and (machine is None or boxed < machine):
        return boxed, CGROUP_MEMORY
    return machine, "free memory"


def available_memory(root: str = CGROUP_ROOT, proc: str = PROC_CGROUP, meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of memory this process can have without swapping: ``MemAvailable``, capped by what its cgroup's
    memory limits leave; None when unknown."""
    return memory_room(root, proc, meminfo)[0]
