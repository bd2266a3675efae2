"""The preprocessing job spec: TOML in, validated dataclasses out.

A minimal spec needs only ``[input]`` (one of ``manifest``, ``folder``, ``shards``) and
``[output] dir``. Relative paths resolve against the spec file's folder; an input path that does not
exist there but does relative to the current directory is taken from the current directory.
Every problem raises ``SpecError`` naming the section and key, so the CLI can exit 2 with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from mbm.resources import memory_room, usable_cores

log = logging.getLogger(__name__)

RUNNERS = ("FnApiRunner", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner", "PrismRunner")
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "PrismRunner")  # workers run on this machine
# What Beam would download for a runner, and the options that spare it: a local copy of that file, or
# the address of a job server already running.
OFFLINE_OPTIONS = {"PrismRunner": ("the Prism runner binary", ("--prism_location", "--job_endpoint")),
                   "FlinkRunner": ("the Flink job server jar", ("--flink_job_server_jar", "--job_endpoint")),
                   "SparkRunner": ("the Spark job server jar", ("--spark_job_server_jar", "--job_endpoint"))}
SECTIONS = ("input", "output", "text", "image", "audio", "extract", "runner")
INPUT_KINDS = {"manifest": "manifest file", "folder": "imagefolder or audiofolder", "shards": "WebDataset tars"}


class SpecError(ValueError):
    """A job spec or CLI argument that cannot work; the message says what to fix."""


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


@dataclass(kw_only=True)
class OutputConfig:
    dir: str
    samples_per_shard: int = 1000
    max_shard_bytes: int = 512 * 1024 * 1024
    include_media: bool = False  # also store the cleaned text (.txt) next to the features

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("dir must be a non-empty path")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes < 1024 * 1024:
            raise ValueError(f"max_shard_bytes must be >= 1 MiB (1048576), got {self.max_shard_bytes}")


# Inputs per extractor call. Text is cheap to hold and runs in fixed-shape passes per length
# bucket, so bigger calls fill those passes better (mbm/extractors/text.py, pass_shape).
DEFAULT_BATCH_SIZE = {"text": 128, "image": 32, "audio": 32}
MODEL_PATH_KEYS = ("path", "weights")  # extractor options that name local files (resolved like input paths)


@dataclass(kw_only=True)
class ExtractConfig:
    name: str
    batch_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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

    def check_offline(self, extra: list[str] | None = None) -> None:
        """Runners that Beam would fetch something for (the Prism binary, a Flink or Spark job server
        jar) need a local copy or a running job server among their options: mbm never downloads."""
        if self.name not in OFFLINE_OPTIONS:
            return
        what, keys = OFFLINE_OPTIONS[self.name]
        from apache_beam.options.pipeline_options import PipelineOptions

        given = PipelineOptions(list(self.options) + list(extra or [])).get_all_options()
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
        from apache_beam.options.pipeline_options import PipelineOptions

        endpoint = PipelineOptions(list(self.options) + list(extra or [])).get_all_options().get("job_endpoint")
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


@dataclass(kw_only=True)
class JobSpec:
    """A resolved, validated preprocessing job."""

    input: Any  # pipelines.readers.source.SourceConfig
    output: OutputConfig
    text: Any  # pipelines.clean.text.TextCleanConfig
    image: Any  # pipelines.clean.image.ImageCleanConfig
    audio: Any  # pipelines.clean.audio.AudioCleanConfig
    extract: dict[str, ExtractConfig]  # modality -> extractor
    runner: RunnerConfig
    source_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (what ``job.toml`` records)."""
        d: dict[str, Any] = {
            "input": _asdict(self.input),
            "output": _asdict(self.output),
            "text": _asdict(self.text),
            "image": _asdict(self.image),
            "audio": _asdict(self.audio),
            "extract": {m: {"name": e.name, "batch_size": e.batch_size, **e.options} for m, e in self.extract.items()},
            "runner": _asdict(self.runner),
        }
        return d


def _asdict(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}


def load_spec(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> JobSpec:
    """Read, merge CLI ``overrides`` (section -> key -> value) into, and validate a TOML job spec."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"job spec {path} is a folder; give the job's .toml file")
    if not path.is_file():
        raise SpecError(f"job spec {path} does not exist")
    try:
        # surrogateescape: a path written in another encoding (a Latin-1 folder name) keeps its bytes;
        # utf-8-sig: the byte order mark Windows editors (Notepad) put first is not TOML
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig", "surrogateescape"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from e
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return parse_spec(raw, base_dir=path.parent, source_path=str(path))


def parse_spec(raw: dict[str, Any], *, base_dir: Path, source_path: str = "<spec>") -> JobSpec:
    """Validate a spec given as a dict (already parsed TOML)."""
    from mbm.extractors.registry import DEFAULTS
    from pipelines.clean.audio import AudioCleanConfig
    from pipelines.clean.image import ImageCleanConfig
    from pipelines.clean.text import TextCleanConfig
    from pipelines.readers.source import SourceConfig

    where = source_path
    for section in raw:
        if section not in SECTIONS:
            raise SpecError(f"{where}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(raw[section], dict):
            raise SpecError(f"{where}: [{section}] must be a table, got {type(raw[section]).__name__}")
    if "input" not in raw:
        raise SpecError(f"{where}: missing [input] section (set manifest, folder or shards)")
    if "dir" not in raw.get("output", {}):
        raise SpecError(f"{where}: missing [output] dir (the dataset folder to write)")

    inp = dict(raw["input"])
    for key in ("manifest", "folder", "shards"):
        if isinstance(inp.get(key), str):
            if not inp[key].strip():  # "" would resolve to the spec's own folder
                raise SpecError(f"{where}: [input] {key} is empty; set the {INPUT_KINDS[key]} to read")
            inp[key] = _resolve_input(inp[key], base_dir, where, key)
    out = dict(raw["output"])
    if isinstance(out["dir"], str):
        if not out["dir"].strip():
            raise SpecError(f"{where}: [output] dir is empty; set the dataset folder to write")
        if "://" not in out["dir"]:  # a URI stays as it is (str(Path("gs://b/x")) is the local "gs:/b/x")
            out["dir"] = str(_resolve(out["dir"], base_dir))
        else:
            from apache_beam.io.filesystems import FileSystems

            try:
                FileSystems.get_filesystem(out["dir"])
            except ValueError as e:  # gs:// without apache-beam[gcp], an unknown scheme
                raise SpecError(f"{where}: [output] dir = {out['dir']!r}: {e}") from None
        _check_output_dir(out["dir"], where)
        if isinstance(inp.get("folder"), str) and _inside(out["dir"], inp["folder"]):
            raise SpecError(f"{where}: [output] dir = {out['dir']!r} is inside [input] folder = {inp['folder']!r}, "
                            "whose every file is read as input (the dataset would read itself on the next run); "
                            "choose an output folder outside it")

    extract_raw = raw.get("extract", {})
    extract: dict[str, ExtractConfig] = {}
    for modality in extract_raw:
        if modality not in DEFAULTS:
            raise SpecError(f"{where}: unknown section [extract.{modality}] (known: {', '.join(DEFAULTS)})")
    for modality, default_name in DEFAULTS.items():
        section = extract_raw.get(modality, {})
        if not isinstance(section, dict):
            raise SpecError(f"{where}: [extract.{modality}] must be a table (e.g. [extract.{modality}] "
                            f"name = {default_name!r}), got {type(section).__name__} {section!r}")
        section = dict(section)
        for key in MODEL_PATH_KEYS:  # a model folder or weights file: relative to the spec, like the input
            if isinstance(section.get(key), str) and section[key].strip() and "://" not in section[key]:
                section[key] = _resolve_existing(section[key], base_dir)
        name = section.pop("name", default_name)
        batch_size = section.pop("batch_size", DEFAULT_BATCH_SIZE[modality])
        extract[modality] = _build(ExtractConfig, {"name": name, "batch_size": batch_size, "options": section},
                                   f"extract.{modality}", where)

    spec = JobSpec(
        input=_build(SourceConfig, inp, "input", where),
        output=_build(OutputConfig, out, "output", where),
        text=_build(TextCleanConfig, raw.get("text", {}), "text", where),
        image=raw.get("image", {}),
        audio=raw.get("audio", {}),
        extract=extract,
        runner=_build(RunnerConfig, raw.get("runner", {}), "runner", where),
        source_path=source_path,
    )
    extractors = create_extractors(spec)
    _input_spec(extractors, "text", where)  # checks the token limit against the model
    image_spec, audio_spec = (_input_spec(extractors, m, where) for m in ("image", "audio"))
    spec.image = _build(ImageCleanConfig, raw.get("image", {}), "image", where,
                        derived={"size": (image_spec["image_size"], f"[extract.image] {spec.extract['image'].name}")})
    spec.audio = _build(AudioCleanConfig, raw.get("audio", {}), "audio",
                        where, derived={"sample_rate": (audio_spec["sample_rate"],
                                                   f"[extract.audio] {spec.extract['audio'].name}")})
    return spec


def _input_spec(extractors: dict[str, Any], modality: str, where: str) -> dict[str, Any]:
    """What the modality's extractor needs of the cleaned input (read from its model folder)."""
    try:
        return extractors[modality].input_spec()
    except (ValueError, OSError) as e:
        raise SpecError(f"{where}: [extract.{modality}]: {e}") from e


def create_extractors(spec: JobSpec) -> dict[str, Any]:
    """One extractor per modality from the spec; bad names and options raise SpecError."""
    from mbm.extractors.registry import create_extractor

    out = {}
    for modality, cfg in spec.extract.items():
        try:
            ex = create_extractor(cfg.name, cfg.options)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise SpecError(f"{spec.source_path}: [extract.{modality}]: {e}") from e
        if ex.modality != modality:
            raise SpecError(f"{spec.source_path}: [extract.{modality}] name = {cfg.name!r} is an extractor of "
                            f"{ex.modality}, not of {modality}")
        for path in ex.weight_paths():  # models load from local files only: say so before any work starts
            if "://" not in path and not os.path.exists(path):
                raise SpecError(f"{spec.source_path}: [extract.{modality}] {cfg.name}: the model path {path!r} "
                                "does not exist (models load from local folders only, never from a hub)")
        out[modality] = ex
    return out


def extractor_modules(extractors: dict[str, Any]) -> list[str]:
    """The modules the extractors import when they load (for a worker fork server to preload)."""
    return sorted({module for ex in extractors.values() for module in ex.preload_modules()})


def _build(cls: type, values: dict[str, Any], section: str, where: str, derived: dict[str, Any] | None = None) -> Any:
    """``cls(**values)`` with unknown keys, wrong types and invalid values reported as SpecError.

    ``derived`` holds keys the spec may not choose freely (the image size is the image extractor's):
    a user value that disagrees with the derived one is an error naming where it comes from.
    """
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    values = dict(values)
    for key in values:
        if key not in known:
            raise SpecError(f"{where}: unknown key {key!r} in [{section}] (known: {', '.join(sorted(known))})")
    for key, (value, origin) in (derived or {}).items():
        if key in values and values[key] != value:
            raise SpecError(f"{where}: [{section}] {key} = {values[key]!r} conflicts with {origin}, which needs "
                            f"{value!r}; remove {key} from [{section}] or change the extractor's setting")
        values[key] = value
    for f in dataclasses.fields(cls):
        if f.name in values:
            values[f.name] = _check_type(values[f.name], f.type, f"{where}: [{section}] {f.name}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        said = str(e)  # a message that names its section already (SourceConfig's) keeps its own
        raise SpecError(f"{where}: {said}" if said.startswith(f"[{section}]") else f"{where}: [{section}]: {said}") from e


_SCALARS: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(value: Any, annotation: Any, what: str) -> Any:
    """Check a TOML value against a simple field annotation (``int``, ``str | None``, ``tuple[...]``)."""
    ann = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace(" ", "")
    if ann == "list[str]":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise SpecError(f"{what} must be a list of strings (e.g. [\"--opt=value\"]), got {value!r}")
    options = ann.split("|")
    if ann.startswith("tuple") and isinstance(value, list):
        return tuple(value)
    for name in options:
        if name == "None":
            continue
        typ = _SCALARS.get(name)
        if typ is None:
            return value  # not a simple scalar annotation: the dataclass validates it
        if isinstance(value, typ) and (name == "bool" or not isinstance(value, bool)):
            return value
    if value is None and "None" in options:
        return value
    raise SpecError(f"{what} must be {' or '.join(options)}, got {value!r}")


def _resolve(p: str, base_dir: Path) -> Path:
    if "://" in p:
        return Path(p)  # callers keep URIs as strings: str() of this Path turns "gs://b" into "gs:/b"
    path = Path(os.path.expanduser(p))
    try:
        return path if path.is_absolute() else (base_dir / path).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise SpecError(f"{p!r}: cannot resolve the path ({e})") from e


def file_in_the_way(path: str) -> str | None:
    """Why a local folder ``path`` cannot be used or created: it is a file, or lies under one; else None."""
    p = Path(os.path.abspath(path))
    for candidate in (p, *p.parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            return "is a file" if candidate == p else f"cannot be created: {candidate} is a file"
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether local ``path`` is ``folder`` or below it."""
    if "://" in path or "://" in folder:
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_output_dir(path: str, where: str) -> None:
    """A local output folder must be a folder, or creatable: no file in its place or above it."""
    if "://" not in path and (what := file_in_the_way(path)):
        raise SpecError(f"{where}: [output] dir = {path!r} {what}; choose a folder")


def _resolve_existing(p: str, base_dir: Path) -> str:
    """``p`` against the spec's folder, or against the current folder when only that one exists."""
    resolved = _resolve(p, base_dir)
    if _exists(resolved):
        return str(resolved)
    cwd_relative = Path(os.path.expanduser(p)).resolve()
    if _exists(cwd_relative):
        log.info("%r: not found next to the spec, using %s", p, cwd_relative)
        return str(cwd_relative)
    return str(resolved)


def _resolve_input(p: str, base_dir: Path, where: str, key: str) -> str:
    if "://" in p:
        return p
    resolved = _resolve_existing(p, base_dir)
    if _exists(Path(resolved)):
        return resolved  # a manifest pattern that matches files: the input check says to join them
    why = ""
    if key == "manifest" and any(c in p for c in "*?[{"):
        from pipelines.readers.source import NOT_EXPANDED

        why = f" ({NOT_EXPANDED})"
    raise SpecError(f"{where}: [input] {key} = {p!r}: {resolved} does not exist{why}")


def _exists(path: Path) -> bool:
    if path.exists():
        return True
    text = str(path)
    if any(c in text for c in "*?[{"):  # glob / brace patterns for shards: check that something matches
        import glob

        import braceexpand

        return any(glob.glob(x) for x in braceexpand.braceexpand(text))
    return False


def dump_toml(d: dict[str, Any]) -> str:
    """Serialize the resolved spec (nested dicts of scalars, lists, dicts) as TOML."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if prefix and (scalars or not tables):
            lines.append("")
        for k, v in tables.items():
            emit(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    emit("", d)
    return "\n".join(lines).rstrip() + "\n"


def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
