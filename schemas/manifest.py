"""The dataset-version manifest: ``dataset.json`` and ``versions/NNNNNN.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.version import SCHEMA_VERSION

# the split names a dataset's samples may carry (a ``split`` metadata value: the split folders of an imagefolder,
# a manifest's column), lower-case: those that train, the validation splits and the test splits
TRAIN_SPLITS = ("train", "training")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "eval")
TEST_SPLITS = ("test", "testing")
SPLIT_NAMES = frozenset((*TRAIN_SPLITS, *VALIDATION_SPLITS, *TEST_SPLITS))


def listed_splits(splits: dict[str, int]) -> str:
    """A manifest's ``splits`` as one phrase: "test 8, train 24, validation 8"."""
    return ", ".join(f"{name} {n}" for name, n in sorted(splits.items()))


def split_name(meta: Any) -> str | None:
    """The split a sample's metadata names (its ``split`` value, stripped and lower-case), or None: what a
    manifest's ``splits`` counts, and what ``mbm train --split-by split`` reads."""
    value = meta.get("split") if isinstance(meta, dict) else None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


@dataclass
class DatasetManifest:
    """One immutable dataset version. ``shards`` are paths relative to the dataset folder; reading
    exactly those shards with plain webdataset yields exactly this version's samples."""

    version: int
    shards: list[str]
    shard_sizes: list[int]  # samples per shard, same order as ``shards``
    num_samples: int
    counts: dict[str, int]  # input, ok, rejected, extracted
    index: str  # "index/NNNNNN.parquet"
    fingerprints: dict[str, str] = field(default_factory=dict)  # modality -> extractor fingerprint
    feature_dims: dict[str, int] = field(default_factory=dict)  # modality -> feature dim
    labels: list[Any] = field(default_factory=list)  # sorted label vocabulary of landed samples
    created: str = ""
    parent: int | None = None
    schema_version: int = SCHEMA_VERSION
    # bytes of each shard, same order as ``shards``: a shard cut short is found without reading it (empty in
    # manifests written before it was recorded)
    shard_bytes: list[int] = field(default_factory=list)
    # landed samples per split their metadata names (its ``split`` value, stripped and lower-case: the split
    # folders of an imagefolder, a manifest's column); empty where none names one, and in manifests written
    # before it was recorded
    splits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"dataset version must be >= 1, got {self.version}")
        if len(self.shards) != len(self.shard_sizes):
            raise ValueError("shards and shard_sizes differ in length")
        if self.shard_bytes and len(self.shard_bytes) != len(self.shards):
            raise ValueError("shards and shard_bytes differ in length")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetManifest:
        sv = d.get("schema_version", SCHEMA_VERSION)
        if sv > SCHEMA_VERSION:
            raise ValueError(f"dataset schema version {sv} is newer than this mbm supports ({SCHEMA_VERSION})")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> DatasetManifest:
        return cls.from_dict(json.loads(text))


def version_path(version: int) -> str:
    """Relative path of a version's manifest."""
    return f"versions/{version:06d}.json"


def job_path(version: int) -> str:
    """Relative path of the resolved job spec that made a version (``job.toml`` is the current one's)."""
    return f"versions/{version:06d}.toml"
