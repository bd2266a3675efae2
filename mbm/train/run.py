"""A run folder: resolved config, label vocabulary, metrics.jsonl, plot, checkpoints, per-rank sample logs.

Files are UTF-8; ``surrogateescape`` keeps paths the file system spells in another encoding (a
Latin-1 folder name in ``--data`` or ``--out``) as their bytes instead of failing the run."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from mbm.train.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints
from mbm.train.config import TrainConfig, merge, saved_settings

log = logging.getLogger(__name__)


class RunDir:
    """Paths and small files of one run (``--out``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.checkpoints = os.path.join(root, "checkpoints")
        self.metrics = os.path.join(root, "metrics.jsonl")
        self.plot = os.path.join(root, "metrics.png")
        self.labels_path = os.path.join(root, "labels.json")
        self.config_json = os.path.join(root, "config.json")

    def samples_log(self, rank: int) -> str:
        return os.path.join(self.root, f"samples-rank{rank}.jsonl")

    def has_checkpoints(self) -> bool:
        return bool(list_checkpoints(self.checkpoints))

    def latest(self) -> str | None:
        return latest_checkpoint(self.checkpoints)

    def remove_partial_files(self) -> list[str]:
        """Delete what a killed process left half-written (``NAME.tmp-PID`` beside the run's files and
        checkpoints); call it holding the run folder's lock. Returns the paths removed."""
        removed = []
        for folder in (self.root, self.checkpoints):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if ".tmp-" in name and os.path.isfile(os.path.join(folder, name)):
                        os.remove(os.path.join(folder, name))
                        removed.append(os.path.join(folder, name))
        return removed

    def candidates(self) -> list[str]:
        """Checkpoint paths to resume from, best first: the one ``latest`` names, then the rest newest first."""
        latest = self.latest()
        rest = [os.path.join(self.checkpoints, checkpoint_name(s)) for s in reversed(list_checkpoints(self.checkpoints))]
        return ([latest] if latest else []) + [p for p in rest if p != latest]

    def write_config(self, cfg: TrainConfig) -> None:
        os.makedirs(self.root, exist_ok=True)
        _write_text(self.config_json, cfg.to_json())
        _write_text(os.path.join(self.root, "config.toml"), cfg.to_toml())

    def read_config(self) -> dict[str, Any]:
        """The run's saved settings (as a dict to merge under new ones)."""
        if not os.path.isfile(self.config_json):
            raise ValueError(f"--run {self.root}: no config.json; is this a training run folder?")
        settings = _read_json(self.config_json, "the run's settings")
        if not isinstance(settings, dict):
            raise ValueError(f"{self.config_json} holds a JSON {type(settings).__name__}, not the run's settings; "
                             "put back the file the run wrote")
        return saved_settings(settings, self.config_json)

    def config(self) -> TrainConfig:
        return merge(self.read_config())

    def write_labels(self, labels: list[Any]) -> None:
        _write_text(self.labels_path, json.dumps(labels, ensure_ascii=False) + "\n")

    def read_labels(self) -> list[Any] | None:
        if not os.path.isfile(self.labels_path):
            return None
        labels = _read_json(self.labels_path, "the run's label vocabulary")
        if not isinstance(labels, list):
            raise ValueError(f"{self.labels_path} holds a JSON {type(labels).__name__}, not the run's list of labels; "
                             "put back the file the run wrote")
        return labels


def _read_json(path: str, what: str) -> Any:
    """A run file's JSON; ``ValueError`` naming the file when it is not JSON (cut short, edited by hand)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); it holds {what}: put back the file the run "
                             "wrote") from None


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """One JSON line (``json_line``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(record) + "\n")


def json_line(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: a NaN or infinite metric is null (strict JSON readers refuse
    NaN). A string holding a lone surrogate (a sample id read from a JSON ``"\\ud800"`` escape, or from a
    file name that is not UTF-8) cannot be written as UTF-8: that line escapes it (``\\ud800``), which
    JSON readers give back as the same string."""
    record = _finite(record)
    text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record, ensure_ascii=True, allow_nan=False)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line cut short (a full disk, a crash inside a write) is
    dropped with a warning; a bad line elsewhere is an error naming the file and line."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as exn:
            if i < len(lines) - 1 or line.endswith("\n"):
                raise ValueError(f"{path} line {n} is not JSON ({exn}); remove or fix that line") from None
            log.warning("%s: dropping its last line, which was cut short: %r", path, line[:80])
    return records


def truncate_jsonl(path: str, step: int) -> None:
    """Drop records after ``step`` (written by a run that went on past its last checkpoint)."""
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        _write_text(path, "".join(json_line(r) + "\n" for r in kept))


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    os.replace(tmp, path)
