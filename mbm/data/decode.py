"""Raw shard sample → ``Sample`` (parsed json, float16 feature arrays), or ``CorruptSample``."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mbm.data.errors import CorruptSample
from schemas import MODALITIES, SCHEMA_VERSION


@dataclass
class Sample:
    """One decoded shard sample; ``features[m]`` is float16 (tokens, dim) for each present modality."""

    id: str
    key: str
    label: Any = None
    text: str | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)


def load_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes; pickles are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _all_finite(arr: np.ndarray) -> bool:
    """No inf or NaN; float16 is checked on its exponent bits (``np.isfinite`` on float16 is ~15x slower)."""
    if arr.dtype == np.dtype("<f2"):
        return not np.any((arr.view("<u2") & 0x7C00) == 0x7C00)
    return bool(np.isfinite(arr).all())


def _features(raw: dict[str, Any], modality: str, dim: int | None) -> np.ndarray:
    member = f"{modality}.npy"
    if member not in raw:
        raise CorruptSample("npy.missing", f"{raw['__key__']}: {member} listed but absent")
    try:
        arr = load_npy(raw[member])
    except Exception as exn:  # noqa: BLE001 - corrupt bytes can fail in many ways
        raise CorruptSample("npy.bad", f"{raw['__key__']}.{member}: {exn}") from exn
    if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.floating):
        raise CorruptSample("npy.shape", f"{raw['__key__']}.{member}: {arr.dtype} {arr.shape}, want float (n, dim)")
    if dim is not None and arr.shape[1] != dim:
        raise CorruptSample("npy.dim", f"{raw['__key__']}.{member}: dim {arr.shape[1]}, dataset says {dim}")
    if not _all_finite(arr):
        raise CorruptSample("npy.nonfinite", f"{raw['__key__']}.{member}")
    return arr.astype(np.float16, copy=False)


def parse_doc(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's ``json`` member, checked to carry a string id and a schema version we can read."""
    key = raw.get("__key__", "?")
    try:
        doc = json.loads(raw["json"])
    except Exception as exn:  # noqa: BLE001
        raise CorruptSample("json.bad", f"{key}: {exn}") from exn
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
        raise CorruptSample("json.bad", f"{key}: no string id")
    try:
        newer = int(doc.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION
    except (TypeError, ValueError) as exn:
        raise CorruptSample("json.bad", f"{key}: schema_version {doc.get('schema_version')!r}") from exn
    if newer:
        raise CorruptSample("schema.newer", f"{key}: schema_version {doc['schema_version']}")
    return doc


def decode_sample(raw: dict[str, Any], feature_dims: dict[str, int] | None = None,
                  doc: dict[str, Any] | None = None) -> Sample:
    """Decode and check one raw sample; ``feature_dims`` (when given) must match every array's width."""
    key = raw.get("__key__", "?")
    doc = doc if doc is not None else parse_doc(raw)
    listed = doc.get("modalities") or []
    modalities = [m for m in MODALITIES if m in listed]
    if not modalities:
        raise CorruptSample("modalities.none", f"{key}: no modality present")
    dims = feature_dims or {}
    features = {m: _features(raw, m, dims.get(m)) for m in modalities}
    text = doc.get("text")
    return Sample(id=doc["id"], key=key, label=doc.get("label"),
                  text=text if isinstance(text, str) else None, features=features)
