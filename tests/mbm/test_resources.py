import os
import subprocess
import sys
import textwrap

import pytest

from mbm import resources
from mbm.resources import available_memory, cgroup_cpu_limit, cgroup_memory_available, usable_cores

GiB = 1 << 30


def tree(root, files):
    """Write ``files`` (relative path -> text) under ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def proc_file(tmp_path, text):
    path = tmp_path / "proc-cgroup"
    path.write_text(text)
    return str(path)


def test_cgroup_v2_quota_and_memory_are_the_smallest_along_the_ancestry(tmp_path):
    root = tmp_path / "cg"
    tree(root, {
        "kubepods/cpu.max": "150000 100000\n",  # 1.5 CPUs for the pod
        "kubepods/job/cpu.max": "max 100000\n",  # no quota of its own
        "kubepods/memory.max": str(8 * GiB),
        "kubepods/memory.current": str(1 * GiB),
        "kubepods/memory.stat": "anon 123\n",
        "kubepods/job/memory.max": str(2 * GiB),
        "kubepods/job/memory.current": str(1 * GiB),
        "kubepods/job/memory.stat": "anon 1\ninactive_file 268435456\nactive_file 5\n",
    })
    proc = proc_file(tmp_path, "0::/kubepods/job\n")
    assert cgroup_cpu_limit(str(root), proc) == 1.5
    assert cgroup_memory_available(str(root), proc) == GiB + (256 << 20)  # 2 - 1 GiB used + reclaimable cache
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {256 << 20} kB\nMemAvailable: {64 << 20} kB\n")
    assert available_memory(str(root), proc, str(meminfo)) == GiB + (256 << 20)  # the limit, not the host's 64 GiB


def test_cgroup_v1_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    # Docker without a cgroup namespace: /proc/self/cgroup names the host's path, which does not exist
    # under the container's mounts; the container's own limits sit at each controller's root.
    root = tmp_path / "cg"
    tree(root, {
        "cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "memory/memory.limit_in_bytes": str(4 * GiB),
        "memory/memory.usage_in_bytes": str(3 * GiB),
        "memory/memory.stat": "cache 9\ntotal_inactive_file 1073741824\n",
    })
    proc = proc_file(tmp_path, "12:cpu,cpuacct:/docker/0123abcd\n4:memory:/docker/0123abcd\n0::/\n")
    assert cgroup_cpu_limit(str(root), proc) == 2.0
    assert cgroup_memory_available(str(root), proc) == 2 * GiB


def test_no_limit_reads_as_none(tmp_path):
    root = tmp_path / "cg"
    tree(root, {
        "cpu/cpu.cfs_quota_us": "-1\n",
        "cpu/cpu.cfs_period_us": "100000\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "unlimited"
        "memory/memory.usage_in_bytes": str(GiB),
        "unified/cpu.max": "max 100000\n",
        "unified/memory.max": "max\n",
        "unified/memory.current": "1\n",
    })
    proc = proc_file(tmp_path, "3:cpu:/\n4:memory:/\n0::/\n")
    assert cgroup_cpu_limit(str(root), proc) is None
    assert cgroup_memory_available(str(root), proc) is None
    missing = str(tmp_path / "no-such-file")
    assert cgroup_cpu_limit(str(root), missing) is None and cgroup_memory_available(str(root), missing) is None


def test_usable_cores_is_the_affinity_mask_capped_by_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    root = tmp_path / "cg"
    proc = proc_file(tmp_path, "0::/pod\n")
    for quota, expected in (("250000 100000", 3), ("50000 100000", 1), ("max 100000", 64), ("9000000 100000", 64)):
        tree(root, {"pod/cpu.max": quota})
        assert usable_cores(str(root), proc) == expected, quota
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 5}, raising=False)
    assert usable_cores(str(root), proc) == 2  # the mask, below the quota of 90


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_process_pinned_to_one_cpu_gets_one_worker_and_one_thread_per_worker():
    code = textwrap.dedent("""
        import os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from mbm.resources import usable_cores
        from jobs.runner_config import RunnerConfig
        print(usable_cores(), RunnerConfig(device="cpu").num_workers())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_auto_workers_count_the_cores_this_process_may_use(monkeypatch):
    from jobs import runner_config as runner

    monkeypatch.setattr(runner, "usable_cores", lambda: 3)
    assert runner.auto_workers("cpu", memory=64 * GiB, gpu=0) == 3


def test_cpu_training_threads_are_the_ranks_share_of_the_usable_cores(monkeypatch):
    import torch

    from mbm.train import trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)  # torch's default: the host's cores
    monkeypatch.setattr(trainer, "usable_cores", lambda: 2)
    assert trainer.cpu_threads() == 2
    monkeypatch.setattr(trainer, "usable_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert trainer.cpu_threads() == 2
    monkeypatch.setattr(trainer, "usable_cores", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert trainer.cpu_threads() is None  # torch's own count is already within the share
    monkeypatch.setattr(trainer, "usable_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert trainer.cpu_threads() is None  # the user's setting stands


def test_the_real_machine_reads_without_error():
    assert usable_cores() >= 1
    memory = available_memory()
    assert memory is None or memory > 0
    assert resources.cgroup_cpu_limit() is None or resources.cgroup_cpu_limit() > 0


def test_auto_workers_name_a_containers_memory_limit_when_it_is_what_holds_them_back(monkeypatch, caplog):
    import logging

    from jobs import runner_config as runner
    from mbm import resources

    monkeypatch.setattr(runner, "usable_cores", lambda: 8)
    monkeypatch.setattr(resources, "machine_memory_available", lambda *where: 64 * GiB)
    monkeypatch.setattr(resources, "cgroup_memory_available", lambda *where: 5 * GiB)
    with caplog.at_level(logging.WARNING, logger="jobs.runner_config"):
        assert runner.auto_workers("cpu", gpu=0) == 2  # (5 - 1) / 2, not (64 - 1) / 2
    assert "memory its cgroup's limit leaves" in caplog.text and "5.0 GiB" in caplog.text
    monkeypatch.setattr(resources, "cgroup_memory_available", lambda *where: None)
    assert runner.auto_workers("cpu", gpu=0) == 8
