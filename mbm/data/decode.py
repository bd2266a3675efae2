"""Raw shard sample → ``Undecoded`` (json checked, arrays not decoded) → ``Sample`` (float16 arrays), or ``CorruptSample``.

The stream decides what to use from the json doc alone and decodes arrays only for the samples a
process keeps, so the two steps are separate: ``undecoded`` then ``decode``.

Reasons a sample's arrays are corrupt (``CorruptSample.reason``): ``npy.missing`` (listed, absent),
``npy.unreadable`` (the member cannot be read from its shard), ``npy.bad`` (not a .npy array, or a
pickle), ``npy.shape`` (not a float (n, dim) array), ``npy.dim`` (another width than the dataset's),
``npy.nonfinite`` (inf or NaN) and ``npy.out_of_range`` (finite, but beyond float16's range: the
features are batched as float16, where such a value would be inf).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mbm.data.errors import CorruptSample
from mbm.data.shards import MemberRef, read_member
from schemas import MODALITIES, SCHEMA_VERSION


@dataclass
class Sample:
    """One decoded shard sample; ``features[m]`` is float16 (tokens, dim) for each decoded modality."""

    id: str
    key: str
    label: Any = None
    text: str | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Undecoded:
    """A shard sample whose json doc is parsed and checked; its arrays are still .npy bytes, or references to
    them in the shard (None: absent)."""

    id: str
    key: str
    label: Any = None
    text: str | None = None
    modalities: tuple[str, ...] = ()  # listed in the doc, in ``MODALITIES`` order
    npy: dict[str, bytes | MemberRef | None] = field(default_factory=dict)  # the members to decode, by modality


_NPY_MAGIC = b"\x93NUMPY"
# The header numpy's own writer produces; anything else (fortran order, structured or object dtypes,
# headers from other writers) goes through ``np.load``.
_NPY_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=][biufc]\d+)', 'fortran_order': False, "
    r"'shape': \((?P<shape>(?:\d+, )*(?:\d+,?)?)\), \} *\n?")


def load_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes (a read-only view of ``data`` for plain numeric arrays); pickles are refused."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy array: bad magic")
    if data[6:8] == b"\x01\x00":
        start = 10 + int.from_bytes(data[8:10], "little")
        header = data[10:start]
    elif data[6:8] in (b"\x02\x00", b"\x03\x00"):
        start = 12 + int.from_bytes(data[8:12], "little")
        header = data[12:start]
    else:
        return _np_load(data)
    match = _NPY_HEADER.fullmatch(header.decode("latin1"))
    if match is None:
        return _np_load(data)
    dtype = np.dtype(match["descr"])
    shape = tuple(int(n) for n in match["shape"].split(",") if n.strip())
    count = math.prod(shape)
    if len(data) < start + count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {dtype} {shape} needs {start + count * dtype.itemsize} bytes, "
                         f"got {len(data)}")
    return np.frombuffer(data, dtype, count, start).reshape(shape)


def _np_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


_F16 = np.dtype("<f2")


def _all_finite(arr: np.ndarray) -> bool:
    """No inf or NaN. float16 is checked on its exponent bits, whose largest value (all five set) only inf and
    NaN have: 6 us for a 49 x 1280 array, against 9 us comparing every element with it and 43 us for
    ``np.isfinite``."""
    if arr.dtype == _F16:
        return int((arr.view("<u2") & 0x7C00).max(initial=0)) < 0x7C00
    return bool(np.isfinite(arr).all())


def _features(key: str, modality: str, data: bytes | MemberRef | None, dim: int | None) -> np.ndarray:
    member = f"{modality}.npy"
    if data is None:
        raise CorruptSample("npy.missing", f"{key}: {member} listed but absent")
    try:
        data = read_member(data)  # bytes left in the shard by a lazy scan are read now
    except (OSError, ValueError) as exn:
        raise CorruptSample("npy.unreadable", f"{key}.{member}: {exn}") from exn
    try:
        arr = load_npy(data)
    except Exception as exn:  # noqa: BLE001 - corrupt bytes can fail in many ways
        raise CorruptSample("npy.bad", f"{key}.{member}: {exn}") from exn
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.dtype.kind != "f":
        raise CorruptSample("npy.shape", f"{key}.{member}: {arr.dtype} {arr.shape}, want float (n, dim)")
    if dim is not None and arr.shape[1] != dim:
        raise CorruptSample("npy.dim", f"{key}.{member}: dim {arr.shape[1]}, dataset says {dim}")
    if not _all_finite(arr):
        raise CorruptSample("npy.nonfinite", f"{key}.{member}")
    if arr.dtype == _F16:  # what mbm preprocess writes
        return arr
    with np.errstate(over="ignore"):  # checked below
        half = arr.astype(np.float16)
    if not _all_finite(half):  # wider floats beyond float16's ±65504 became inf
        raise CorruptSample("npy.out_of_range", f"{key}.{member}: values beyond float16's range (±65504)")
    return half


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


def undecoded(raw: dict[str, Any], doc: dict[str, Any] | None = None,
              modalities: Collection[str] | None = None) -> Undecoded:
    """The sample with its doc checked; keeps the .npy bytes of the listed modalities in ``modalities`` (None: all)."""
    key = raw.get("__key__", "?")
    doc = doc if doc is not None else parse_doc(raw)
    listed = doc.get("modalities") or []
    present = tuple(m for m in MODALITIES if m in listed)
    if not present:
        raise CorruptSample("modalities.none", f"{key}: no modality present")
    text = doc.get("text")
    wanted = present if modalities is None else [m for m in present if m in modalities]
    return Undecoded(id=doc["id"], key=key, label=doc.get("label"), text=text if isinstance(text, str) else None,
                     modalities=present, npy={m: raw.get(f"{m}.npy") for m in wanted})


def decode(sample: Undecoded, feature_dims: dict[str, int] | None = None) -> Sample:
    """The sample's kept arrays, checked; ``feature_dims`` (when given) must match every array's width."""
    dims = feature_dims or {}
    features = {m: _features(sample.key, m, data, dims.get(m)) for m, data in sample.npy.items()}
    return Sample(id=sample.id, key=sample.key, label=sample.label, text=sample.text, features=features)


def decode_sample(raw: dict[str, Any], feature_dims: dict[str, int] | None = None,
                  doc: dict[str, Any] | None = None) -> Sample:
    """Decode and check one raw sample: the modalities of ``feature_dims`` when given (widths must match), else all."""
    return decode(undecoded(raw, doc, feature_dims), feature_dims)
