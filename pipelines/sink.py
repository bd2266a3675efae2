"""The shard sink: landed samples and rejects → WebDataset tars + index rows, in a staging folder.

Samples and rejects are spread over buckets by a hash of their key; the bucket count follows from
the number of input samples and ``samples_per_shard``. Each bucket is sorted by key and written as
one or more tars (rolled over by sample count and bytes), then a sidecar ``parts/bNNNNN.json``
listing its shards and index rows. The sidecar is written last, via a temporary name, so its
presence proves the bucket is complete. The same input and spec give the same buckets, order and
bytes; the commit step (``pipelines.commit``) renames staged shards into the dataset.

Samples do not travel through the shuffle: ``StageSamples`` runs right after extraction and appends
each sample's shard members (its json and float16 ``.npy`` features) and index row to a file of its
bundle under ``staging/spill/``; a tuple of primitives saying where they are continues (~150 bytes
encoded, ~480 as the objects a grouping decodes it to, against ~720 and ~1.8 KB for a short caption's
``CleanSample``). The
grouping then moves only those (a runner such as FnApiRunner holds a whole grouping in the driver's
memory, as Python objects while it groups), and ``write_bucket`` reads the bytes back. From a local
staging folder it first reads only each sample's header (member sizes, index row) to plan the shards,
then each sample's bytes as its tar is written, so a worker holds one sample's bytes, not a bucket's
(up to ``samples_per_shard`` samples: 130 MB of the sample data's features, more with bigger models);
a remote one is read a spill file at a time, in offset order, as a whole bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import struct
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.errors import DatasetDamaged, disk_guard
from pipelines.spill import BundleFile, pread_exact, short_read
from schemas import MODALITIES, SCHEMA_VERSION, CleanSample, IndexRow, Reject, sample_key
from schemas.manifest import split_name
from schemas.records import OTHER_KEY

log = logging.getLogger(__name__)

TAR_OVERHEAD = 1024  # tar header + padding per member, a safe upper bound


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    staging: str  # staging folder (path or URI), ends without a slash
    samples_per_shard: int
    max_shard_bytes: int
    include_text: bool = False
    dataset_dir: str = ""  # the dataset folder, where reused features are read from


def num_buckets(n_samples: int, samples_per_shard: int) -> int:
    """How many buckets a job with ``n_samples`` input samples writes."""
    return max(1, math.ceil(n_samples / samples_per_shard))


def bucket_of(key: str, n: int) -> int:
    """Stable bucket of a sample key."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % n


def npy_bytes(features: Any) -> bytes:
    """float16 ``.npy`` bytes of a feature array (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(features, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


class StageSamples(beam.DoFn):
    """Landed samples → their shard members and index row, appended to this bundle's file in
    ``staging/spill/``; what continues is a ``staged`` tuple of primitives (key, id, where its bytes
    are, the modalities reused from the previous version and their shards), ~150 bytes encoded, so
    the writing stage's shuffle, which Beam's local runner holds in the driver, carries no sample."""

    def __init__(self, cfg: SinkConfig) -> None:
        self._cfg = cfg

    def start_bundle(self) -> None:
        self._spill = BundleFile(f"{self._cfg.staging.rstrip('/')}/spill", "writing features")

    def process(self, sample: CleanSample) -> Iterator[tuple]:
        data = stage_bytes(prepare(sample, self._cfg.include_text))
        path, offset = self._spill.append(data)
        yield staged(sample, path, offset, len(data))

    def finish_bundle(self) -> None:
        self._spill.close()


def staged(sample: CleanSample, path: str, offset: int, length: int) -> tuple:
    """What travels to the writing stage for a sample whose staged bytes are ``length`` at ``offset`` of
    ``path``. The id and the path go as bytes: Beam's coder writes a ``str`` as strict UTF-8, and an id
    or a folder name may hold undecodable bytes as lone surrogates."""
    return (sample.key, _raw(sample.id), _raw(path), offset, length, tuple(sorted(sample.reused.items())))


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def _ident(item: tuple | CleanSample) -> tuple[str, str]:
    """(key, id) of a landed sample, staged or not: the order samples take in their shards."""
    return (item.key, item.id) if isinstance(item, CleanSample) else (item[0], _text(item[1]))


@dataclass
class Prepared:
    """A landed sample as the writer needs it: its members (``json``, ``{modality}.npy``, ``txt``; a
    reused modality's ``.npy`` is read from its previous shard at writing), index row (no shard yet),
    label, and the modalities extracted in this run."""

    key: str
    id: str
    members: dict[str, Any]  # bytes, or a ``Ref`` to them until its shard is written
    row: dict[str, Any]
    label: Any
    computed: list[str]
    reused: dict[str, str]
    split: str | None = None  # the split its metadata names (``split_name``), counted in the manifest's ``splits``


@dataclass(frozen=True)
class Ref:
    """A member's bytes not read yet: ``length`` bytes at ``offset`` of the local file ``path`` (a spill
    file, or a previous shard for a reused modality), read when its shard is written."""

    path: str
    offset: int
    length: int


def _local(path: str) -> bool:
    """``path`` is a plain local path (no URI scheme), which ``os.pread`` reads directly."""
    return hasattr(os, "pread") and FileSystems.get_scheme(path) is None


def _resolve(members: dict[str, Any]) -> dict[str, Any]:
    """``members`` with each ``Ref`` read: one read per file (a sample's staged members lie together,
    and its reused ones together in their previous shard)."""
    by_path: dict[str, list[tuple[str, Ref]]] = {}
    for name, value in members.items():
        if isinstance(value, Ref):
            by_path.setdefault(value.path, []).append((name, value))
    if not by_path:
        return members
    out = dict(members)
    for path, named in by_path.items():
        start = min(r.offset for _, r in named)
        end = max(r.offset + r.length for _, r in named)
        fd = os.open(path, os.O_RDONLY)
        try:
            data = pread_exact(fd, end - start, start, path, "file")
        finally:
            os.close(fd)
        view = memoryview(data)
        for name, r in named:
            out[name] = view[r.offset - start:r.offset - start + r.length]
    return out


def prepare(sample: CleanSample, include_text: bool = False) -> Prepared:
    """``sample``'s members and index row; its reused modalities count in the json and the row, their
    ``.npy`` left to ``fill_reused``."""
    placeholders = {m: b"" for m in sample.reused if m not in sample.features}
    full = sample.with_(features={**sample.features, **placeholders}) if placeholders else sample
    members = encode_sample(full, include_text)
    members.pop("__key__")
    for m in sample.reused:
        members.pop(f"{m}.npy", None)
    return Prepared(key=sample.key, id=sample.id, members=members, row=ok_row(full, None).to_dict(),
                    label=sample.label, computed=sample.computed(), reused=dict(sample.reused),
                    split=split_name(sample.meta))


_LEN = struct.Struct("<I")


def stage_bytes(p: Prepared) -> bytes:
    """``p`` as staged: the length of a JSON header, the header (members' names and sizes, row, label,
    computed, split), then the members' bytes. JSON escapes what is not ASCII, lone surrogates too."""
    names = sorted(p.members)
    header = json.dumps({"members": [[n, len(p.members[n])] for n in names], "row": p.row, "label": p.label,
                         "computed": p.computed, "split": p.split}, sort_keys=True).encode("ascii")
    return b"".join([_LEN.pack(len(header)), header, *(p.members[n] for n in names)])


def unstage(data: bytes, key: str, sample_id: str, reused: dict[str, str]) -> Prepared:
    (n,) = _LEN.unpack_from(data)
    header = json.loads(data[_LEN.size:_LEN.size + n])
    at, members = _LEN.size + n, {}
    for name, size in header["members"]:
        members[name] = data[at:at + size]
        at += size
    return _prepared(header, members, key, sample_id, reused)


def _prepared(header: dict[str, Any], members: dict[str, Any], key: str, sample_id: str,
              reused: dict[str, str]) -> Prepared:
    return Prepared(key=key, id=sample_id, members=members, row=header["row"], label=header["label"],
                    computed=header["computed"], reused=reused, split=header["split"])


def load_staged(items: list[Any], include_text: bool = False, *, lazy: bool = False) -> list[Prepared]:
    """``Prepared`` samples of a bucket's ``staged`` tuples (read from their spill files, each once, in
    offset order) and ``CleanSample``s (prepared here), in the order given. ``lazy``: from a local spill
    file only each sample's header is read, its members are ``Ref``s."""
    out: list[Prepared | None] = [None] * len(items)
    by_path: dict[str, list[tuple[int, tuple]]] = {}
    for i, item in enumerate(items):
        if isinstance(item, CleanSample):
            out[i] = prepare(item, include_text)
        else:
            by_path.setdefault(_text(item[2]), []).append((i, item))
    for path, wanted in sorted(by_path.items()):
        wanted.sort(key=lambda w: w[1][3])
        if lazy and _local(path):
            _read_heads(path, wanted, out)
            continue
        with FileSystems.open(path, compression_type="uncompressed") as fh:
            for i, (key, sample_id, _, offset, length, reused) in wanted:
                fh.seek(offset)
                chunk = fh.read(length)
                if len(chunk) != length:
                    raise short_read(path, offset, length, len(chunk))
                out[i] = unstage(chunk, key, _text(sample_id), dict(reused))
    return out  # type: ignore[return-value]


def _read_heads(path: str, wanted: list[tuple[int, tuple]], out: list[Prepared | None]) -> None:
    """The staged samples ``wanted`` (in offset order) of the local spill file ``path`` into ``out``, their
    headers read and their members left as ``Ref``s."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        for i, (key, sample_id, _, offset, length, reused) in wanted:
            if offset + length > size:
                raise short_read(path, offset, length, max(0, size - offset))
            fh.seek(offset)
            (n,) = _LEN.unpack(fh.read(_LEN.size))
            header = json.loads(fh.read(n))
            at, members = offset + _LEN.size + n, {}
            for name, member_size in header["members"]:
                members[name] = Ref(path, at, member_size)
                at += member_size
            if at != offset + length:
                raise RuntimeError(f"spill file {path}: the sample at {offset} holds {at - offset} bytes, "
                                   f"not the {length} staged")
            out[i] = _prepared(header, members, key, _text(sample_id), dict(reused))


def encode_sample(sample: CleanSample, include_text: bool = False) -> dict[str, bytes | str]:
    """The WebDataset members of one sample: ``json`` plus one float16 ``.npy`` per featurized modality."""
    members: dict[str, bytes | str] = {"__key__": sample.key}
    doc = sample.shard_json(SCHEMA_VERSION)
    members["json"] = json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8")
    for modality in doc["modalities"]:
        feats = sample.features[modality]
        if isinstance(feats, bytes):  # reused: the previous version's .npy, copied byte for byte at writing
            members[f"{modality}.npy"] = feats
            continue
        members[f"{modality}.npy"] = npy_bytes(feats)
    if include_text and sample.text:
        members["txt"] = sample.text.encode("utf-8")
    return members


def member_bytes(members: dict[str, Any]) -> int:
    return sum((v.length if isinstance(v, Ref) else len(v)) + TAR_OVERHEAD for k, v in members.items()
               if k != "__key__")


def ok_row(sample: CleanSample, shard: str | None) -> IndexRow:
    dropped = sorted(sample.dropped.items())  # stage, reason and detail list the modalities in one order
    stages = list(dict.fromkeys(d.split(": ", 1)[0] for _, d in dropped))
    reasons = [d.split(": ", 2)[1] if d.count(": ") >= 1 else d for _, d in dropped]
    return IndexRow(
        id=sample.id,
        key=sample.key,
        shard=shard,
        content_hash=sample.content_hash,
        fingerprint=json.dumps(sample.fingerprints, sort_keys=True),
        status="ok",
        stage=", ".join(stages),
        reason="; ".join(reasons),
        detail="; ".join(f"{m}: {d}" for m, d in dropped),
        modalities=",".join(m for m in ("text", "image", "audio") if m in sample.features),
        label=None if sample.label is None else str(sample.label),
        source=sample.source,
        version=0,
        modality_hashes=json.dumps(sample.modality_hashes, sort_keys=True),
        media_stats=json.dumps(sample.media_keys, sort_keys=True) if sample.media_keys else None,
    )


def reject_row(reject: Reject) -> IndexRow:
    return IndexRow(
        id=reject.id,
        key=sample_key(reject.id),
        shard=None,
        content_hash="",
        fingerprint="",
        status="rejected",
        stage=reject.stage,
        reason=reject.reason,
        detail=reject.detail,
        modalities="",
        label=None,
        source=reject.source,
        version=0,
    )


def _plan_parts(samples: list[Prepared], cfg: SinkConfig) -> Iterator[list[Prepared]]:
    """Split a bucket into shards under both limits, evenly: 17 samples at 16 per shard give 9 + 8, not 16 + 1."""
    sizes = [member_bytes(p.members) for p in samples]
    n_parts = max(math.ceil(len(samples) / cfg.samples_per_shard), math.ceil(sum(sizes) / cfg.max_shard_bytes), 1)
    target = math.ceil(len(samples) / n_parts)
    part: list[Prepared] = []
    size = 0
    for item, n in zip(samples, sizes, strict=True):
        if part and (len(part) >= target or size + n > cfg.max_shard_bytes):
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part


def tar_member(name: str, data: bytes) -> bytes:
    """The header ``webdataset.TarWriter(user="mbm", group="mbm", mtime=0)`` writes for one member: mode
    0444, fixed owner and an int mtime, so headers stay plain ustar (a float mtime makes tarfile add a
    pax header, two more blocks, to every member; a name over 100 bytes or not ASCII still gets one)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "mbm"
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _write_tar(path: str, part: list[tuple[str, dict]]) -> int:
    """One shard; the bytes ``webdataset.TarWriter`` writes for the same members (tested), without
    tarfile's stream mode, which copies each member through a Python buffer in 10 KB slices (0.9 s of
    a 2000-sample job's two workers went there)."""
    with FileSystems.create(path, mime_type="application/x-tar") as f:
        offset = total = 0
        for key, members in part:
            members = _resolve(members)  # this sample's bytes only, read now
            for suffix in sorted(members):
                if suffix.startswith("_"):  # __key__, and metadata TarWriter leaves out
                    continue
                data = members[suffix]
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise TypeError(f"{key}.{suffix}: a shard member must be bytes, got {type(data).__name__}")
                header = tar_member(f"{key}.{suffix}", data)
                pad = -len(data) % tarfile.BLOCKSIZE
                f.write(header)
                f.write(data)
                if pad:
                    f.write(bytes(pad))
                offset += len(header) + len(data) + pad
                total += len(data)
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tarfile closes
        end += -(offset + end) % tarfile.RECORDSIZE
        f.write(bytes(end))
    return total


def read_members(tar_path: str, wanted: dict[str, set[str]]) -> dict[tuple[str, str], Any]:
    """The members ``{key}.{suffix}`` of one shard for the keys and suffixes in ``wanted``: their bytes,
    or for a local shard ``Ref``s to them (its headers read, its data skipped)."""
    found: dict[tuple[str, str], Any] = {}
    local = _local(tar_path)
    with contextlib.ExitStack() as stack:
        if local:
            tf = stack.enter_context(tarfile.open(tar_path, mode="r:"))  # seeks over the members' data
        else:
            f = stack.enter_context(FileSystems.open(tar_path, compression_type="uncompressed"))
            tf = stack.enter_context(tarfile.open(fileobj=f, mode="r|"))
        for info in tf:
            key, _, suffix = info.name.partition(".")
            if suffix in wanted.get(key, ()):
                found[(key, suffix)] = (Ref(tar_path, info.offset_data, info.size) if local
                                        else tf.extractfile(info).read())
    return found


def fill_reused(samples: list[Prepared], dataset_dir: str) -> None:
    """Give reused modalities their previous .npy (bytes, or ``Ref``s into a local dataset's shards),
    reading each old shard once."""
    needs: dict[str, dict[str, set[str]]] = {}
    sources: dict[tuple[str, str], str] = {}  # (sample key, modality) -> the key its features are copied from
    for p in samples:
        for m, where in p.reused.items():
            shard, _, other = where.partition(OTHER_KEY)  # another sample's features: a new caption of a known picture
            sources[(p.key, m)] = other or p.key
            needs.setdefault(shard, {}).setdefault(other or p.key, set()).add(f"{m}.npy")
    found: dict[tuple[str, str], Any] = {}
    for shard, wanted in sorted(needs.items()):
        try:
            found.update(read_members(f"{dataset_dir.rstrip('/')}/{shard}", wanted))
        except (tarfile.TarError, EOFError, OSError) as e:  # cut short, deleted, not a tar any more
            raise DatasetDamaged(f"{dataset_dir}: the current version's shard {shard} cannot be read ({type(e).__name__}: "
                                 f"{e}), so the features it holds cannot be reused: the dataset folder was changed by "
                                 "hand; put the shard back, or rerun with --full (every sample computed again)") from e
    for p in samples:
        if p.reused:
            missing = [m for m in p.reused if (sources[(p.key, m)], f"{m}.npy") not in found]
            if missing:
                shards = sorted({w.partition(OTHER_KEY)[0] for w in p.reused.values()})
                raise DatasetDamaged(f"{dataset_dir}: sample {p.id!r}'s {', '.join(missing)} features are missing from "
                                     f"{', '.join(shards)}: the dataset folder was changed by "
                                     "hand; rerun with --full (every sample computed again)")
            p.members.update({f"{m}.npy": found[(sources[(p.key, m)], f"{m}.npy")] for m in p.reused})


def write_bucket(bucket: int, items: Iterable[tuple[str, Any]], cfg: SinkConfig) -> dict[str, Any]:
    """Write one bucket's tars and sidecar; returns the sidecar's content. Landed samples come as
    ``("ok", staged tuple)`` (``StageSamples``) or ``("ok", CleanSample)``."""
    items = list(items)
    oks = sorted((x for tag, x in items if tag == "ok"), key=_ident)
    samples = load_staged(oks, cfg.include_text, lazy=True)  # from a local staging folder: headers only
    fill_reused(samples, cfg.dataset_dir)
    rejects = sorted((x for tag, x in items if tag == "reject"), key=lambda r: (r.id, r.source, r.stage))
    same = sorted((x for tag, x in items if tag == "same"), key=lambda r: (r["id"], r["source"]))
    shards: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for i, part in enumerate(_plan_parts(samples, cfg)):
        rel = f"shards/b{bucket:05d}-{i:03d}.tar"
        nbytes = _write_tar(f"{cfg.staging}/{rel}", [(p.key, p.members) for p in part])
        shards.append({"path": rel, "samples": len(part), "bytes": nbytes, "part": i})
        rows.extend({**p.row, "shard": rel} for p in part)
    rows.extend(reject_row(r).to_dict() for r in rejects)
    labels = sorted({json.dumps(p.label, sort_keys=True) for p in samples if p.label is not None})
    extracted = {"samples": sum(1 for p in samples if p.computed),
                 **{m: sum(m in p.computed for p in samples) for m in MODALITIES}}
    splits = Counter(p.split for p in samples if p.split is not None)
    splits.update(r["split_value"] for r in same if r.get("split_value") is not None)
    sidecar = {"bucket": bucket, "shards": shards, "rows": rows, "same": same, "extracted": extracted,
               "labels": [json.loads(x) for x in labels], "splits": dict(sorted(splits.items()))}
    final = f"{cfg.staging}/parts/b{bucket:05d}.json"
    tmp = final + ".tmp"
    with FileSystems.create(tmp, mime_type="application/json") as f:
        f.write(json.dumps(sidecar, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([tmp], [final])
    return sidecar


class WriteBucketFn(beam.DoFn):
    def __init__(self, cfg: SinkConfig) -> None:
        self._cfg = cfg
        self._written = Metrics.counter("mbm", "written")
        self._shards = Metrics.counter("mbm", "shards")

    def process(self, element: tuple[int, Iterable[tuple[str, Any]]]):
        bucket, items = element
        with disk_guard("writing shards", self._cfg.staging):
            sidecar = write_bucket(bucket, items, self._cfg)
        self._written.inc(sum(s["samples"] for s in sidecar["shards"]))
        self._shards.inc(len(sidecar["shards"]))
        yield bucket


def _tag_same(row: dict[str, Any]) -> tuple[str, Any]:
    return row["key"], ("same", row)


def _tag_ok(sample: tuple) -> tuple[str, Any]:
    return sample[0], ("ok", sample)  # a ``staged`` tuple: its key first


def _tag_reject(reject: Reject) -> tuple[str, Any]:
    return sample_key(reject.id), ("reject", reject)


def _to_bucket(keyed: tuple[str, Any], n_input: int, samples_per_shard: int) -> tuple[int, Any]:
    key, item = keyed
    return bucket_of(key, num_buckets(n_input, samples_per_shard)), item


class WriteShards(beam.PTransform):
    """(samples, rejects, input count) → staged tars and sidecars; outputs the bucket numbers written."""

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__()
        self._cfg = cfg

    def expand(self, pcolls):
        samples, rejects, unchanged, n_input = pcolls
        ok = samples | "TagOk" >> beam.Map(_tag_ok)
        bad = rejects | "TagRejects" >> beam.Map(_tag_reject)
        same = unchanged | "TagUnchanged" >> beam.Map(_tag_same)
        return (
            (ok, bad, same)
            | "Merge" >> beam.Flatten()
            | "Bucket" >> beam.Map(_to_bucket, beam.pvalue.AsSingleton(n_input), self._cfg.samples_per_shard)
            | "GroupBuckets" >> beam.GroupByKey()
            | "WriteBuckets" >> beam.ParDo(WriteBucketFn(self._cfg))
        )
