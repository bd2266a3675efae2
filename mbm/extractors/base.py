"""The feature-extractor interface and the config base class every extractor configures itself with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Self

import numpy as np

from mbm.extractors.hashing import weights_sha256

MODALITIES = ("text", "image", "audio")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(kw_only=True, frozen=True)
class ExtractorConfig:
    """Base of extractor configs: keyword-only, immutable, JSON-friendly (paths are stored as str).

    ``precision`` is the model's compute precision (features are stored as float16 whatever it is):
    "auto" runs bfloat16 autocast on CUDA and float32 on the CPU; "float32" and "bfloat16" apply on
    every device. bfloat16 on a CPU is fast only where the CPU has bfloat16 dot products (AVX512-BF16,
    AMX); measured on one with AVX512-BF16: MiniLM 3x faster at 0.6 % relative difference from float32,
    EfficientNet-Lite0 2.3x faster at 8 %. Weight-free extractors (log-mel) compute in float32 always.
    """

    precision: str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, f.name, os.fspath(value))
        if self.precision not in PRECISIONS:
            self._fail("precision", f"must be one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what a job spec or a fingerprint records)."""
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        """Names accepted as keyword options."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict, rejecting keys that are not fields."""
        unknown = sorted(set(data) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown option {unknown[0]!r} for {cls.__name__}; valid options: {', '.join(cls.option_names())}"
            )
        return cls(**data)

    # -- validation helpers for subclasses' __post_init__ ------------------------------------------

    def _fail(self, field: str, message: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field} {message}, got {getattr(self, field)!r}")

    def _check_int(self, field: str, *, minimum: int = 1) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self._fail(field, f"must be an int >= {minimum}")

    def _check_float(self, field: str, *, minimum: float = 0.0, strict: bool = False) -> None:
        value = getattr(self, field)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
        if not ok or value < minimum or (strict and value == minimum):
            self._fail(field, f"must be a finite number {'>' if strict else '>='} {minimum}")

    def _check_bool(self, field: str) -> None:
        if not isinstance(getattr(self, field), bool):
            self._fail(field, "must be true or false")

    def _check_str(self, field: str, *, optional: bool = False) -> None:
        value = getattr(self, field)
        if value is None and optional:
            return
        if not isinstance(value, str) or not value:
            self._fail(field, "must be a non-empty string" + (" or None" if optional else ""))


class Extractor(ABC):
    """A frozen encoder that turns cleaned inputs of one modality into float16 feature sequences.

    Subclasses set the class attributes, implement `load`/`featurize`/`dim`, and list the
    files that define their weights in `weight_paths` so the fingerprint follows the bytes.
    """

    name: ClassVar[str]
    modality: ClassVar[str]
    config_type: ClassVar[type[ExtractorConfig]]
    # Config fields that only say *where* the weights are; the fingerprint hashes the bytes instead,
    # so the same weights installed elsewhere (another venv, another worker) fingerprint the same.
    location_fields: ClassVar[tuple[str, ...]] = ()
    # Bumped when the computation changes the features for the same config and weights (batch
    # shapes, memory layout), so that datasets made before recompute instead of mixing the two.
    revision: ClassVar[int] = 1

    def __init__(self, config: ExtractorConfig | None = None) -> None:
        if config is None:
            config = self.config_type()
        if not isinstance(config, self.config_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_type.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self._fingerprint: str | None = None

    def input_spec(self) -> dict[str, Any]:
        """What the cleaner must produce for this extractor (e.g. {"image_size": 224})."""
        return {}

    @abstractmethod
    def load(self, device: str) -> Any:
        """Load weights from local files, in eval mode, on `device`; return the model object."""

    @abstractmethod
    def featurize(self, model: Any, batch: list, device: str) -> list[np.ndarray]:
        """One finite float16 array (n_i, dim) per input, in input order."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Feature dimension."""

    def pass_keys(self, device: str) -> Callable[[Any], tuple[Any, int]] | None:
        """For batching that fills forward passes: a function giving an input the key of the pass
        shape ``featurize`` runs it in on ``device`` and how many inputs of that key fill one pass.
        None (the default): a batch is one pass, whatever its inputs."""
        return None

    def weight_paths(self) -> list[str]:
        """Files or folders whose bytes define the weights (none for weight-free extractors)."""
        return []

    def preload_modules(self) -> list[str]:
        """Modules ``load`` imports, which a worker fork server can import once for all workers."""
        return []

    def check_files(self) -> None:
        """Whether the model files are what ``load`` needs, from their headers or config.json alone (nothing
        is loaded: the job's driver runs this before any worker starts); ValueError saying what to fix."""
        return None  # nothing to check (weight-free extractors)

    def fingerprint(self) -> str:
        """sha256 hex of name, config and weights hash; equal configs and weights give equal fingerprints."""
        if self._fingerprint is None:
            config = {k: v for k, v in self.config.to_dict().items() if k not in self.location_fields}
            if config.get("precision") == "auto":  # the default leaves fingerprints as they were before the option
                del config["precision"]
            payload = {
                "name": self.name,
                "config": config,
                "weights": [weights_sha256(p) for p in self.weight_paths()],
            }
            if self.revision != 1:  # revision 1 fingerprints stay what they were before revisions existed
                payload["revision"] = self.revision
            blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
