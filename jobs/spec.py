"""The preprocessing job spec: TOML in, validated dataclasses out.

A minimal spec needs only ``[input]`` (one of ``manifest``, ``folder``, ``shards``) and
``[output] dir``. Relative paths resolve against the spec file's folder; an input path that does not
exist there but does relative to the current directory is taken from the current directory.
Every problem raises ``SpecError`` naming the section and key, so the CLI can exit 2 with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import SpecError
from jobs.runner_config import RunnerConfig

log = logging.getLogger(__name__)

SECTIONS = ("input", "output", "text", "image", "audio", "extract", "runner")
INPUT_KINDS = {"manifest": "manifest file", "folder": "imagefolder or audiofolder", "shards": "WebDataset tars"}


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
            from pipelines.readers.common import strip_slashes

            # gs://b/out/ and gs://b/out are one folder, but an object store's keys are strings: out//index/x
            # is not out/index/x, and every path the job builds joins with "/"
            out["dir"] = strip_slashes(out["dir"])
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
    if spec.runner.name == "DataflowRunner" and "://" not in spec.output.dir:
        # Dataflow's workers are other machines: they would stage shards on their own disks, and the commit
        # here would find none of them
        raise SpecError(f"{where}: [output] dir = {spec.output.dir!r} is a local folder, which Dataflow's workers "
                        "cannot write to: give a gs:// folder (and copy the dataset here to train on it)")
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
    """Whether ``path`` is ``folder`` or below it (two local paths, or two URIs)."""
    if ("://" in path) != ("://" in folder):
        return False
    if "://" in path:
        from pipelines.readers.common import strip_slashes

        return (strip_slashes(path) + "/").startswith(strip_slashes(folder) + "/")
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
        return _check_remote_input(p, where, key)
    resolved = _resolve_existing(p, base_dir)
    if _exists(Path(resolved)):
        return resolved  # a manifest pattern that matches files: the input check says to join them
    why = ""
    if key == "manifest" and any(c in p for c in "*?[{"):
        from pipelines.readers.source import NOT_EXPANDED

        why = f" ({NOT_EXPANDED})"
    raise SpecError(f"{where}: [input] {key} = {p!r}: {resolved} does not exist{why}")


def _check_remote_input(p: str, where: str, key: str) -> str:
    """A remote [input] manifest must be an object and a folder must hold objects; shards are matched later.
    An object store has no folders: a folder URI exists when something is stored under it."""
    from apache_beam.io.filesystem import BeamIOError
    from apache_beam.io.filesystems import FileSystems

    from pipelines.readers.common import remote_folder_exists, strip_slashes

    if key == "shards":
        return p
    if key == "folder":
        p = strip_slashes(p)
    try:
        FileSystems.get_filesystem(p)
        found = FileSystems.exists(p) if key == "manifest" else remote_folder_exists(p)
    except ValueError as e:  # gs:// without apache-beam[gcp], an unknown scheme
        raise SpecError(f"{where}: [input] {key} = {p!r}: {e}") from None
    except BeamIOError as e:  # no credentials, no such bucket
        raise SpecError(f"{where}: [input] {key} = {p!r} cannot be read: {e}") from None
    if not found:
        raise SpecError(f"{where}: [input] {key} = {p!r} does not exist"
                        + (" (nothing is stored under it)" if key == "folder" else ""))
    return p


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
