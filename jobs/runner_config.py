"""The ``[runner]`` section of a job spec: which Beam runner, how many workers on which device, and the
Beam options given with it, checked before a job touches its output folder (options Beam does not know or
that mbm sets itself, a runner that would download something, a job server that does not answer, more
workers than the machine holds)."""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

from jobs.errors import SpecError
from mbm.resources import memory_room, usable_cores

log = logging.getLogger(__name__)

RUNNERS = ("FnApiRunner", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PrismRunner")
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "PrismRunner")  # workers run on this machine
# What Beam would download for a runner, and the options that spare it: a local copy of that file, or
# the address of a job server already running.
OFFLINE_OPTIONS = {"PrismRunner": ("the Prism runner binary", ("--prism_location", "--job_endpoint")),
                   "FlinkRunner": ("the Flink job server jar", ("--flink_job_server_jar", "--job_endpoint")),
                   "SparkRunner": ("the Spark job server jar", ("--spark_job_server_jar", "--job_endpoint"))}

# Beam options that mbm sets itself (pipelines.build: pipeline_options, make_runner), and what to set instead
SET_BY_MBM = {
    "runner": "[runner] name (or --runner)",
    "direct_num_workers": "[runner] workers (or --workers)",
    "direct_running_mode": "[runner] workers (or --workers)",
}


class _BeamOptionParser(argparse.ArgumentParser):
    """Beam's options, parsed to check them: a bad value is one SpecError naming the option, where
    argparse would print Beam's whole usage (some 300 lines) and exit."""

    def error(self, message: str) -> NoReturn:
        raise SpecError(f"Beam option {message.removeprefix('argument ')}; fix it in [runner] options or after `--`")


def _option_values(args: list[str], names: list[str]) -> list[str]:
    """The values ``args`` give the option called ``names`` (``--opt=value`` or ``--opt value``)."""
    values = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            values.append(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    return values


# What one preprocessing worker may need, for the default worker count. Measured with the default
# extractors (MiniLM, EfficientNet-Lite0, log-mel): 0.9-1.2 GB of PSS per worker on the CPU
# (docs/benchmarks.md: 2.6 GB for two workers and the driver), 1.6-2.4 GiB of GPU memory per worker on
# an H200 (a CUDA context, three models, their passes).
WORKER_HOST_BYTES = 2 << 30
DRIVER_HOST_BYTES = 1 << 30
WORKER_GPU_BYTES = 5 << 29  # 2.5 GiB


def gpu_memory(device: str) -> int | None:
    """Total bytes of the GPU ``device`` ("cuda", "cuda:N" or "auto") names, from ``nvidia-smi``, which
    does not start CUDA in this process; None without an NVIDIA GPU or the tool."""
    import shutil
    import subprocess

    if device == "cpu" or shutil.which("nvidia-smi") is None:
        return None
    index = device.partition(":")[2] or "0"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", index],
                             capture_output=True, text=True, timeout=20)
        return int(out.stdout.split()[0]) << 20 if out.returncode == 0 else None  # MiB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class WorkerRoom:
    """How many preprocessing workers this machine holds: one per core this process may use, as many as
    fit in the free memory (a worker may need ``WORKER_HOST_BYTES``, the driver ``DRIVER_HOST_BYTES``) and,
    on a GPU, in its memory (each worker holds its own models there). Cores and memory are what a
    container or batch scheduler leaves this process (``mbm.resources``: CPU affinity, cgroup CPU quota
    and memory limit). The machine is asked for what is not given."""

    def __init__(self, device: str, cores: int | None = None, memory: int | None = None,
                 gpu: int | None = None) -> None:
        if cores is None:
            cores = usable_cores()
            if cores < (os.cpu_count() or 1):
                log.info("%d of this machine's %d cores are this job's to use (CPU affinity, or a container's CPU "
                         "quota): one worker per core of those", cores, os.cpu_count())
        self.memory_name = "free memory"
        if memory is None:
            memory, self.memory_name = memory_room()
        self.cores, self.memory = cores, memory
        self.gpu = gpu_memory(device) if gpu is None else gpu
        self.limits = {"cores": cores}  # what bounds the worker count -> that bound
        if memory:
            self.limits[self.memory_name] = max(1, (memory - DRIVER_HOST_BYTES) // WORKER_HOST_BYTES)
        if self.gpu:
            self.limits["GPU memory"] = max(1, int(self.gpu * 0.9) // WORKER_GPU_BYTES)

    def memory_limit(self) -> tuple[str, int] | None:
        """(name, workers) of the tighter of host and GPU memory; None when neither is known."""
        bounds = [(n, k) for n, k in self.limits.items() if n != "cores"]
        return min(bounds, key=lambda b: b[1]) if bounds else None

    def size(self, name: str) -> str:
        """``name``'s bytes and a worker's need of them, for messages."""
        have, need = ((self.gpu, WORKER_GPU_BYTES) if name == "GPU memory" else (self.memory, WORKER_HOST_BYTES))
        return f"{have / 2**30:.1f} GiB; a worker may need {need / 2**30:.1f} GiB"


def auto_workers(device: str, cores: int | None = None, memory: int | None = None,
                 gpu: int | None = None) -> int:
    """Workers for ``workers = 0``: one per core, as far as memory holds (``WorkerRoom``)."""
    room = WorkerRoom(device, cores, memory, gpu)
    n = min(room.limits.values())
    if n < room.cores:
        why = min(room.limits, key=room.limits.get)
        log.warning("%d preprocessing workers, not one per core (%d): that is what the %s holds (%s); set [runner] "
                    "workers to choose", n, room.cores, why, room.size(why))
    return n


@dataclass(kw_only=True)
class RunnerConfig:
    name: str = "FnApiRunner"
    workers: int = 0  # 0: one per core
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    options: list[str] = field(default_factory=list)  # extra Beam pipeline options
    dedupe: bool = True  # media that repeat in the input are decoded and featurized once (pipelines.dedupe)

    def __post_init__(self) -> None:
        if self.name not in RUNNERS:
            raise ValueError(f"name must be one of {', '.join(RUNNERS)}, got {self.name!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per core), got {self.workers}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def num_workers(self) -> int:
        """``workers``, or for 0 one per core, as many as this machine's free memory (and a local run's
        GPU memory) holds (``auto_workers``; worked out once per spec)."""
        if self.workers:
            return self.workers
        auto = getattr(self, "_auto_workers", None)  # not a field: job.toml records workers = 0
        if auto is None:
            auto = auto_workers(self.device) if self.name in LOCAL_RUNNERS else (os.cpu_count() or 1)
            object.__setattr__(self, "_auto_workers", auto)
        return auto

    def check(self, extra: list[str] | None = None) -> None:
        """Every check of the section, before a job touches its output folder: the device, the Beam options
        ([runner] options and those after ``--``), what the runner would download or connect to, and the
        worker count."""
        self.check_device()
        self.check_options(extra)
        self.check_offline(extra)
        self.check_endpoint(extra)
        self.check_beam_options(extra)
        self.check_workers()

    def _given(self, extra: list[str] | None) -> dict[str, Any]:
        """The Beam options [runner] options and ``extra`` give, by name, as Beam parses them."""
        from apache_beam.options.pipeline_options import PipelineOptions

        return PipelineOptions(list(self.options) + list(extra or [])).get_all_options()

    def check_offline(self, extra: list[str] | None = None) -> None:
        """Runners that Beam would fetch something for (the Prism binary, a Flink or Spark job server
        jar) need a local copy or a running job server among their options: mbm never downloads."""
        if self.name not in OFFLINE_OPTIONS:
            return
        what, keys = OFFLINE_OPTIONS[self.name]
        given = self._given(extra)
        for key in keys:
            value = given.get(key.removeprefix("--"))
            if value and key != "--job_endpoint" and not os.path.isfile(value):
                raise SpecError(f"[runner] {key}={value!r} is not a file on this machine (mbm never downloads)")
            if value:
                return
        raise SpecError(f"[runner] name = {self.name!r} makes Beam download {what} at run "
                        f"time, and mbm never downloads; give {' or '.join(f'{k}=...' for k in keys)} in [runner] "
                        "options (or after `--`)")

    def check_endpoint(self, extra: list[str] | None = None, timeout: float = 5.0) -> None:
        """A ``--job_endpoint`` (a Flink, Spark or Prism job server already running) must accept a connection:
        Beam waits ``--job_server_timeout`` (300 s) for one that does not, then fails with a traceback."""
        if self.name not in OFFLINE_OPTIONS:
            return
        endpoint = self._given(extra).get("job_endpoint")
        host, sep, port = (endpoint or "").rpartition(":")
        if not sep or not port.isdigit():
            return  # none given, or one of Beam's own ("embed")
        import socket

        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout).close()
        except OSError as e:
            why = e.strerror or type(e).__name__  # TimeoutError has no strerror
            raise SpecError(f"[runner] --job_endpoint={endpoint}: no {self.name} job server answers there ({why}); "
                            "start it first, or give the address it listens on") from None

    def check_beam_options(self, extra: list[str] | None = None) -> None:
        """Beam's own check of a remote runner's options (Dataflow's project, region, temp_location), made here
        before the output folder is touched; Beam makes it again when it builds the pipeline."""
        if self.name in LOCAL_RUNNERS:
            return
        from apache_beam.options.pipeline_options import PipelineOptions
        from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
        from apache_beam.runners.runner import create_runner

        options = PipelineOptions([f"--runner={self.name}", *self.options, *(extra or [])])
        errors = PipelineOptionsValidator(options, create_runner(self.name)).validate()
        if errors:
            raise SpecError(f"[runner] {self.name}: {option_errors_line(errors)}; pass the runner's options after `--` or in "
                            "[runner] options")

    def check_options(self, extra: list[str] | None = None) -> None:
        """Every Beam option ([runner] options, and those after ``--``) must be one Beam knows: Beam
        only logs and drops an unknown one, so a typo (``--direct_num_worker``) would run the job with
        other settings than asked."""
        import difflib

        from apache_beam.options.pipeline_options import PipelineOptions

        parser = _BeamOptionParser(allow_abbrev=False, add_help=False)
        for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
            cls._add_argparse_args(parser)  # noqa: SLF001 - how Beam itself collects its options
        _, unknown = parser.parse_known_args(list(self.options) + list(extra or []))
        if not unknown:
            self._check_set_by_mbm(parser, extra or [])
            return
        known = [opt for action in parser._actions for opt in action.option_strings]  # noqa: SLF001
        shown = []
        for arg in unknown:
            near = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.8) if arg.startswith("--") else []
            shown.append(f"{arg!r}" + (f" (did you mean {near[0]}?)" if near else ""))
        raise SpecError(f"Beam knows no option {', '.join(shown)}; it would ignore it and run the job with other "
                        "settings than asked: fix it in [runner] options or after `--`")

    def _check_set_by_mbm(self, parser: argparse.ArgumentParser, extra: list[str]) -> None:
        """The Beam options mbm sets itself (``SET_BY_MBM``) given in [runner] options or after ``--``: a
        runner other than [runner] name's is ignored (mbm hands Beam the runner it builds), and a worker
        count or mode would disagree with the one mbm starts workers, sizes their threads and checks the
        memory for."""
        for action in parser._actions:  # noqa: SLF001
            if action.dest not in SET_BY_MBM:
                continue
            for where, args in (("in [runner] options", self.options), ("after `--`", extra)):
                for value in _option_values(list(args), action.option_strings):
                    if action.dest == "runner" and _runner_key(value) == _runner_key(self.name):
                        continue  # says what [runner] name says
                    said = f"{action.option_strings[0]}={value}"
                    if action.dest == "runner":
                        raise SpecError(f"Beam option {said} {where}: mbm runs the job on [runner] name = "
                                        f"{self.name!r} and would ignore it; set the runner with "
                                        f"{SET_BY_MBM['runner']} instead")
                    raise SpecError(f"Beam option {said} {where}: mbm sets it from {SET_BY_MBM[action.dest]}; "
                                    "set that instead")

    def check_workers(self, room: WorkerRoom | None = None) -> None:
        """An explicit ``workers`` of a local runner that is more than both this machine's cores and what
        its memory holds (``WorkerRoom``) fails here: each worker is a process holding its own copy of every
        model, so such a count only runs out of memory, or forks processes by the thousand for a typo.
        More workers than cores alone are allowed, with a warning: they share the cores, gaining nothing."""
        if not self.workers or self.name not in LOCAL_RUNNERS:
            return
        room = room or WorkerRoom(self.device)
        bound = room.memory_limit()
        if bound is not None and self.workers > max(room.cores, bound[1]):
            name, fit = bound
            raise SpecError(
                f"[runner] workers = {self.workers} (or --workers): this machine has {room.cores} core"
                f"{'s' if room.cores > 1 else ''} and its {name} holds about {fit} worker{'s' if fit > 1 else ''} "
                f"({room.size(name)}); set workers = 0 for one per core as far as memory holds, or at most "
                f"{max(room.cores, fit)}")
        if self.workers > room.cores:
            log.warning("[runner] workers = %d on %d cores: the workers share the cores, which gains nothing for "
                        "work that keeps a core busy", self.workers, room.cores)

    def check_device(self) -> None:
        """A local run's CUDA device must exist on this machine: say so before any worker starts.

        Remote runners (Dataflow, Flink, Spark) are not checked: their workers, not the machine
        that submits the job, hold the GPUs.
        """
        if self.name not in LOCAL_RUNNERS or not self.device.startswith("cuda"):
            return
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(self.device.partition(":")[2] or 0)
        if index >= count:
            seen = "no GPU" if count == 0 else f"{count} GPU{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})"
            raise SpecError(f"[runner] device = {self.device!r}, but torch sees {seen} on this machine; use "
                            f"device = \"auto\" (a GPU when there is one) or \"cpu\"")


def option_errors_line(lines: list[str] | str) -> str:
    """Beam's list of option errors (one a line, each ending in a full stop) as one line."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    said = [line.strip().rstrip(".") for line in lines if line.strip()]
    if said and said[0].endswith(":"):  # "Pipeline has validations errors:" heads the list
        said = said[1:]
    return "; ".join(said)


def _runner_key(name: str) -> str:
    """A runner's name as Beam matches it (``dataflow`` is ``DataflowRunner``)."""
    return name.lower().removesuffix("runner")
