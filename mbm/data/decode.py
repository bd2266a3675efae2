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
from mbm.data.split import meta_split
from schemas import MODALITIES, SCHEMA_VERSION
from schemas.features import FLOAT16, all_finite


@dataclass
class Sample:
    """One decoded shard sample; ``features[m]`` is float16 (tokens, dim) for each decoded modality (an
    ``InShard`` until the collate reads it into its batch, for ``decode``'s ``in_place`` modalities)."""

    id: str
    key: str
    label: Any = None
    text: str | None = None
    features: dict[str, np.ndarray | InShard] = field(default_factory=dict)
    shard: str = ""  # the shard it was read from, for messages
    content: dict[str, str] = field(default_factory=dict)  # modality -> content hash of its input (the doc's)


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
    shard: str = ""  # the shard it was read from, for messages
    content: dict[str, str] = field(default_factory=dict)  # modality -> content hash of its input (the doc's)
    split: Any = None  # the ``split`` value of its metadata, as the doc holds it (``mbm.data.split.meta_split``)


_NPY_MAGIC = b"\x93NUMPY"
# The header numpy's own writer produces; anything else (fortran order, structured or object dtypes,
# headers from other writers) goes through ``np.load``.
_NPY_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=][biufc]\d+)', 'fortran_order': False, "
    r"'shape': \((?P<shape>(?:\d+, )*(?:\d+,?)?)\), \} *\n?")


def npy_layout(data: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, offset of the data) from the start of .npy bytes written as numpy writes plain
    numeric C-order arrays; None for any other header (or one that ``data`` does not hold whole)."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy array: bad magic")
    if data[6:8] == b"\x01\x00":
        start = 10 + int.from_bytes(data[8:10], "little")
        header = data[10:start]
    elif data[6:8] in (b"\x02\x00", b"\x03\x00"):
        start = 12 + int.from_bytes(data[8:12], "little")
        header = data[12:start]
    else:
        return None
    if len(data) < start:
        return None
    match = _NPY_HEADER.fullmatch(header.decode("latin1"))
    if match is None:
        return None
    return np.dtype(match["descr"]), tuple(int(n) for n in match["shape"].split(",") if n.strip()), start


def load_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes (a read-only view of ``data`` for plain numeric arrays); pickles are refused."""
    layout = npy_layout(data)
    if layout is None:
        return _np_load(data)
    dtype, shape, start = layout
    count = math.prod(shape)
    if len(data) < start + count * dtype.itemsize:
        raise ValueError(f"truncated .npy: {dtype} {shape} needs {start + count * dtype.itemsize} bytes, "
                         f"got {len(data)}")
    return np.frombuffer(data, dtype, count, start).reshape(shape)


def _np_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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
    if not all_finite(arr):
        raise CorruptSample("npy.nonfinite", f"{key}.{member}")
    if arr.dtype == FLOAT16:  # what mbm preprocess writes
        return arr
    with np.errstate(over="ignore"):  # checked below
        half = arr.astype(np.float16)
    if not all_finite(half):  # wider floats beyond float16's ±65504 became inf
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
                     modalities=present, npy={m: raw.get(f"{m}.npy") for m in wanted}, shard=raw.get("__url__", ""),
                     content=content_hashes(doc), split=meta_split(doc))


def content_hashes(doc: dict[str, Any]) -> dict[str, str]:
    """modality -> the content hash of its input: the string values of the doc's ``modality_hashes``."""
    hashes = doc.get("modality_hashes")
    return {m: h for m, h in hashes.items() if isinstance(h, str)} if isinstance(hashes, dict) else {}


@dataclass(frozen=True)
class InShard:
    """A float16 (rows, dim) array still in its shard, its header read and checked: ``read_into`` reads it
    straight into its place in a batch buffer and checks it there, one copy and one pass fewer than
    reading it into bytes and copying those into the batch."""

    key: str
    member: str
    ref: MemberRef
    start: int  # where the data begins in the member
    shape: tuple[int, int]

    def read_into(self, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous float16 of ``shape``); ``CorruptSample`` as ``decode`` would give."""
        view = memoryview(out).cast("B")
        try:
            got = self.ref.read_into(view, self.start)
        except (OSError, ValueError) as exn:
            raise CorruptSample("npy.unreadable", f"{self.key}.{self.member}: {exn}") from exn
        if got < len(view):
            raise CorruptSample("npy.unreadable", f"{self.key}.{self.member}: {self.ref.shard.path}: member at "
                                f"byte {self.ref.offset} cut short since the scan")
        if not all_finite(out):
            raise CorruptSample("npy.nonfinite", f"{self.key}.{self.member}")


_PREFIX = 256  # bytes read for a .npy header (numpy pads its headers to 64 bytes: 128 for (rows, dim))


def _in_shard(key: str, modality: str, ref: MemberRef, dim: int | None,
              max_rows: int | None) -> InShard | None:
    """The member as an ``InShard`` when it is a native float16 (rows, dim) array with every row used and
    nothing to check beyond what ``read_into`` checks; None otherwise (``decode`` then reads it whole and
    raises for whatever is wrong with it)."""
    try:
        layout = npy_layout(ref.read_prefix(_PREFIX))
    except (OSError, ValueError):
        return None
    if layout is None:
        return None
    dtype, shape, start = layout
    if (dtype != FLOAT16 or len(shape) != 2 or shape[0] < 1 or (dim is not None and shape[1] != dim)
            or (max_rows and shape[0] > max_rows) or ref.size < start + shape[0] * shape[1] * 2):
        return None
    return InShard(key, f"{modality}.npy", ref, start, (shape[0], shape[1]))


def decode(sample: Undecoded, feature_dims: dict[str, int] | None = None,
           in_place: dict[str, int | None] | None = None) -> Sample:
    """The sample's kept arrays, checked; ``feature_dims`` (when given) must match every array's width.

    ``in_place`` (modality -> the most rows a batch takes, None for all) lets those modalities' arrays that
    are still in their shard come as ``InShard`` for the collate to read into place, where every row is used.
    """
    dims = feature_dims or {}
    features: dict[str, np.ndarray | InShard] = {}
    for m, data in sample.npy.items():
        lazy = None
        if in_place is not None and m in in_place and isinstance(data, MemberRef):
            lazy = _in_shard(sample.key, m, data, dims.get(m), in_place[m])
        features[m] = lazy if lazy is not None else _features(sample.key, m, data, dims.get(m))
    return Sample(id=sample.id, key=sample.key, label=sample.label, text=sample.text, features=features,
                  shard=sample.shard, content=sample.content)


def settle(sample: Sample, feature_dims: dict[str, int] | None = None) -> Sample:
    """``sample`` with its ``InShard`` arrays read and checked as ``decode`` reads arrays (``CorruptSample``
    as it gives): for a batch where one of them failed as it was read into place."""
    dims = feature_dims or {}
    features = {m: _features(sample.key, m, a.ref, dims.get(m)) if isinstance(a, InShard) else a
                for m, a in sample.features.items()}
    return Sample(id=sample.id, key=sample.key, label=sample.label, text=sample.text, features=features,
                  shard=sample.shard, content=sample.content)


def decode_sample(raw: dict[str, Any], feature_dims: dict[str, int] | None = None,
                  doc: dict[str, Any] | None = None) -> Sample:
    """Decode and check one raw sample: the modalities of ``feature_dims`` when given (widths must match), else all."""
    return decode(undecoded(raw, doc, feature_dims), feature_dims)
