"""Committing a job: staged shards and sidecars → a new immutable dataset version.

Runs in the driver after the Beam pipeline finished. Order matters for readers: shards are renamed
to their final names first (new names, never overwriting a shard of an older version), then the
index and the version's job spec are written, and ``dataset.json`` is replaced atomically: the commit.
A crash before it leaves ``dataset.json`` at the previous version. ``versions/NNNNNN.json`` is written
right after it, so a version's manifest there always names a committed version.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from schemas import SCHEMA_VERSION, DatasetManifest
from schemas.arrow import index_table
from schemas.manifest import job_path, version_path

log = logging.getLogger(__name__)


@dataclass
class CommitResult:
    manifest: DatasetManifest
    report: dict[str, Any]


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}"


def read_text(path: str) -> str:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read().decode("utf-8")


def write_atomic(path: str, data: bytes | Callable[[BinaryIO], None],
                 mime: str = "application/octet-stream") -> None:
    """Write ``data`` (bytes, or a function that writes to the file it is given) via a temporary name
    and rename, so readers see the old file or the whole new one.

    Local files are fsynced and swapped with ``os.replace`` (atomic); elsewhere the temporary file is
    renamed over the old one (on an object store a copy that replaces it whole), or, where a rename will
    not replace, the old one is deleted first (a function's output is gathered in memory first, as
    remote writers are not seekable files).
    """
    tmp = path + ".tmp"
    if "://" not in path:
        import os

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    if callable(data):
        buf = io.BytesIO()
        data(buf)
        data = buf.getvalue()
    with FileSystems.create(tmp, mime_type=mime) as f:
        f.write(data)
    try:
        # an object store's rename is a copy over the destination and a delete: readers see the old object
        # or the new one, and a failure leaves the old one (deleting it first would leave none)
        FileSystems.rename([tmp], [path])
    except BeamIOError:
        if not FileSystems.exists(path):
            raise
        FileSystems.delete([path])  # a file system whose rename will not replace (HDFS)
        FileSystems.rename([tmp], [path])


class DatasetStateError(ValueError):
    """A dataset folder in a state no run of mbm leaves (its ``dataset.json`` unreadable, or missing or
    older beside newer versions): a job refuses to touch it, saying how to make it whole."""


def current_manifest(out_dir: str) -> DatasetManifest | None:
    path = join(out_dir, "dataset.json")
    if not FileSystems.exists(path):
        return None
    try:
        return DatasetManifest.from_json(read_text(path))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        newest = version_numbers(out_dir)
        fix = (f"copy the version to make current over it (the newest: cp {join(out_dir, version_path(newest[-1]))} "
               f"{path})" if newest else "remove the folder to start the dataset again")
        raise DatasetStateError(f"{path} cannot be read ({type(e).__name__}: {e}); it names the dataset's current "
                                f"version: {fix}") from None


def version_numbers(out_dir: str) -> list[int]:
    """The versions whose manifests ``versions/`` of a local ``out_dir`` holds, in order."""
    import re
    from pathlib import Path

    folder = Path(out_dir) / "versions"
    if "://" in out_dir or not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for f in folder.iterdir() if (m := re.fullmatch(r"(\d{6})\.json", f.name)))


@dataclass
class Staged:
    """What the writing stage left in the staging folder, as the commit plans with it. The index rows are
    Arrow tables (``INDEX_SCHEMA``, a few hundred bytes a row) rather than dicts (~2.8 KB a row): the
    commit of a job of millions of samples holds all of them at once."""

    new: Any  # pa.Table: rows of this run's samples and rejects, bucket by bucket
    same: Any  # pa.Table: rows of unchanged samples carried over from the previous version
    shards: list[dict[str, Any]]  # staged tars, bucket by bucket, part by part
    extracted: dict[str, int]
    labels: list[Any]  # label vocabulary of the landed samples (JSON types kept)
    splits: dict[str, int] = field(default_factory=dict)  # landed samples per named split (``split_name``)


def _bucket_number(path: str) -> int:
    return int(path.rsplit("/", 1)[-1][1:-len(".json")])  # parts/bNNNNN.json


def load_staged(staging: str, previous: DatasetManifest | None) -> Staged:
    """The sidecars of ``staging`` in bucket order, each one's rows turned into Arrow as it is read."""
    import pyarrow as pa

    new, same, shards, labels, splits = [], [], [], {}, Counter()
    extracted = dict.fromkeys(("samples", "text", "image", "audio"), 0)
    for path in sorted(_matching(join(staging, "parts"), "b*.json"), key=_bucket_number):
        sc = json.loads(read_text(path))
        new.append(index_table(sc["rows"]))
        same.append(index_table(sc.get("same", [])))
        shards.extend(sorted(sc["shards"], key=lambda s: s["part"]))
        for k in extracted:
            extracted[k] += sc.get("extracted", {}).get(k, 0)
        labels.update((json.dumps(lbl, sort_keys=True), lbl) for lbl in _labels([sc], sc.get("same", []), previous))
        splits.update(sc.get("splits", {}))
    empty = index_table([])
    return Staged(new=pa.concat_tables(new or [empty]), same=pa.concat_tables(same or [empty]), shards=shards,
                  extracted=extracted, labels=sorted(labels.values(), key=_label_key),
                  splits=dict(sorted(splits.items())))


def _label_key(v: Any) -> tuple[str, str]:
    return (type(v).__name__, str(v))


# what the commit reads of the previous index: planning (ids, rejects) and, when nothing changed, the report
PLAN_COLUMNS = ("id", "status", "stage", "reason", "modalities")


def load_index(out_dir: str, manifest: DatasetManifest | None, columns: tuple[str, ...],
               missing_ok: bool = False) -> Any:
    """``columns`` of ``manifest``'s index as an Arrow table (no rows without a manifest, nor, with
    ``missing_ok``, when the index file is gone)."""
    import pyarrow.parquet as pq

    if manifest is None or (missing_ok and not FileSystems.exists(join(out_dir, manifest.index))):
        return index_table([]).select(list(columns))
    try:
        with FileSystems.open(join(out_dir, manifest.index), compression_type="uncompressed") as f:
            return pq.read_table(f, columns=list(columns))
    except Exception:  # ArrowInvalid: a file cut short or emptied by hand
        if missing_ok:  # a --full run reads no index: as if it were gone
            return index_table([]).select(list(columns))
        raise


def _ids(table: Any, where: Any = None) -> Any:
    """The distinct ids of ``table``'s rows (those where ``where`` holds), as one array."""
    import pyarrow.compute as pc

    column = table.column("id")
    return pc.unique(column if where is None else column.filter(where))


def _count_not_in(values: Any, *sets: Any) -> int:
    import pyarrow.compute as pc

    keep = None
    for s in sets:
        out = pc.invert(pc.is_in(values, value_set=s))
        keep = out if keep is None else pc.and_(keep, out)
    return len(values) if keep is None else pc.sum(keep).as_py() or 0


REJECT_KEYS = ("id", "stage", "reason")  # what makes a reject the same as an earlier one


def _rejects(table: Any) -> Any:
    """The (id, stage, reason) of ``table``'s rejected rows."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("status"), "rejected")).select(list(REJECT_KEYS))


def plan_counts(previous: Any, new: Any, same: Any) -> dict[str, int]:
    """new / changed / unchanged / removed, relative to the previous version's landed samples, from
    tables with the index's id, status, stage and reason.

    A sample rejected again exactly as before counts as unchanged; read-stage rejects without an id
    are keyed by their source line.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    new_ok = pc.equal(new.column("status"), "ok")
    prev_ok = _ids(previous, pc.equal(previous.column("status"), "ok"))
    seen = pc.unique(pa.concat_arrays([_ids(new), _ids(same)]))
    lands = pc.unique(pa.concat_arrays([_ids(new, new_ok), _ids(same)]))
    # A reject row of a landed id (a later row repeating the id) does not change that sample.
    changed = _ids(new, pc.and_(pc.is_in(new.column("id"), value_set=prev_ok),
                                pc.or_(new_ok, pc.invert(pc.is_in(new.column("id"), value_set=lands)))))
    same_rejects = _ids(_rejects(new).join(_rejects(previous), keys=list(REJECT_KEYS), join_type="left semi"))
    return {"new": _count_not_in(_ids(new), changed, same_rejects), "changed": len(changed),
            "unchanged": same.num_rows + len(same_rejects), "removed": _count_not_in(prev_ok, seen)}


def _check_some_land(staged: Staged, previous: DatasetManifest | None) -> None:
    """A run in which no sample lands would commit a version without any, removing every sample of the
    one before: inputs that all fail at once (a media folder moved, a drive not mounted) are far likelier
    than a dataset emptied on purpose. A first run would exit 0 with a dataset of nothing, which a
    pipeline goes on to train on. ``DatasetStateError`` instead; nothing is committed."""
    import pyarrow.compute as pc

    new = staged.new
    if staged.same.num_rows or pc.any(pc.equal(new.column("status"), "ok")).as_py():
        return
    if not new.num_rows:  # not even a reject
        raise DatasetStateError(
            "no sample and no reject reached the commit, so nothing was committed: an input without rows, or, with "
            "a remote runner, an [output] dir that its workers and this machine do not share (use gs://, s3://)")
    rejected = new.filter(pc.equal(new.column("status"), "rejected"))
    reasons = sorted(_tally(rejected.column("reason")).items(), key=lambda x: -x[1])[:3]
    top = ", ".join(f"{reason} {n}" for reason, n in reasons)
    shown = []
    for reason, _ in reasons:
        row = rejected.filter(pc.equal(rejected.column("reason"), reason)).slice(0, 1).to_pylist()[0]
        shown.append(f"{row['id']}: {row['detail'] or reason}")
    examples = "; ".join(shown)
    # files not found at once: the media moved; other reasons (paths outside the folder, a format) say their fix
    fix = ("Fix what they lack (a moved media folder, a drive not mounted?)" if reasons[0][0].startswith("file.")
           else "Fix what these say")
    if previous is None:
        raise DatasetStateError(
            f"every one of the {new.num_rows} inputs was rejected ({top}), so nothing was committed: a first version "
            f"would hold no sample ({examples}). {fix}")
    raise DatasetStateError(
        f"every one of the {new.num_rows} inputs was rejected ({top}): a version of that would hold no sample, "
        f"removing the {previous.num_samples} of version {previous.version}, so nothing was committed ({examples}). "
        f"{fix}; to empty the dataset on purpose, remove its folder")


def _landed_modalities(rows: Any) -> set[str]:
    """The modalities a landed row of ``rows`` has: only their extractors' fingerprints decide whether a
    run changed anything (an image extractor's settings in a job of captions make no new version)."""
    import pyarrow.compute as pc

    landed = rows.filter(pc.equal(rows.column("status"), "ok")).column("modalities").unique().to_pylist()
    return {m for value in landed if value for m in value.split(",")}


def _same_rejects(a: Any, b: Any) -> bool:
    """Whether tables ``a`` and ``b`` hold the same (id, stage, reason) rejects, as many times each."""
    order = [(k, "ascending") for k in REJECT_KEYS]
    a, b = _rejects(a).sort_by(order), _rejects(b).sort_by(order)
    return a.num_rows == b.num_rows and all(a.column(k).equals(b.column(k)) for k in REJECT_KEYS)


def _copy_members(src: str, dst: str, keys: set[str]) -> int:
    """Copy the members of ``keys`` from shard ``src`` to a new shard ``dst`` byte for byte."""
    return _copy_many([(src, keys)], dst)


def _copy_many(sources: list[tuple[str, set[str]]], dst: str) -> int:
    """Copy the members of each ``(shard, keys)`` in order into one new shard ``dst``, byte for byte (headers
    included); returns the number of samples copied. A shard that cannot be read as a tar, or lacks samples
    its index lists, raises ``DatasetStateError`` naming it."""
    import tarfile

    copied, written = 0, 0
    with FileSystems.create(dst, mime_type="application/x-tar") as out:
        for src, keys in sources:
            found: set[str] = set()
            try:
                with FileSystems.open(src, compression_type="uncompressed") as f:
                    for name, header, size in _tar_members(f):
                        padded = size + (-size % tarfile.BLOCKSIZE)
                        if (key := name.partition(".")[0]) in keys:
                            data = f.read(padded)
                            if len(data) < padded:
                                raise EOFError(f"{name}: unexpected end of data")
                            out.write(header)
                            out.write(data)
                            written += len(header) + padded
                            found.add(key)
                        else:
                            _skip(f, padded, name)
            except (tarfile.TarError, EOFError, ValueError) as e:  # cut short, or not a tar
                raise DatasetStateError(f"the shard {src}, which this version carries samples of, cannot be read "
                                        f"({e}): put it back, or rerun with --full") from None
            if len(found) != len(keys):
                raise DatasetStateError(f"the shard {src} holds {len(found)} of the {len(keys)} samples its index "
                                        "lists: put it back, or rerun with --full")
            copied += len(found)
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tarfile closes a tar
        out.write(bytes(end + -(written + end) % tarfile.RECORDSIZE))
    return copied


def _tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes, int]]:
    """``(name, header blocks, data size)`` of each file in the uncompressed tar read from ``f``, its data
    next in ``f`` when yielded. Plain ustar headers are parsed here (tarfile's stream reading cost ~0.1 ms
    a member: 43 s of a 400,000-sample commit's copy-on-write); a pax or GNU long-name header travels with
    the member it names. ``tarfile.ReadError`` for a header that is not one (a bad checksum)."""
    import tarfile

    pending, long_name = b"", None
    while True:
        header = f.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise EOFError("unexpected end of data" if header or pending else "no end-of-archive blocks")
        if not any(header):
            return  # the end-of-archive blocks
        stored = header[148:156].split(b"\0")[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise tarfile.ReadError("bad checksum in a member's header")
        size = (int.from_bytes(header[125:136], "big") if header[124] & 0x80
                else int(header[124:136].split(b"\0")[0].strip() or b"0", 8))
        kind = header[156:157]
        if kind in (b"x", b"g", b"L"):  # pax extended header / GNU long name: its data, then the member
            data = f.read(size + (-size % tarfile.BLOCKSIZE))
            if len(data) < size:
                raise EOFError("unexpected end of data")
            pending += header + data
            if kind == b"L":
                long_name = data[:size].split(b"\0")[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                long_name = _pax_path(data[:size]) or long_name
            continue
        name = header[:100].split(b"\0")[0]
        if header[257:263] == b"ustar\0" and (prefix := header[345:500].split(b"\0")[0]):  # POSIX, not GNU
            name = prefix + b"/" + name
        yield long_name or name.decode("utf-8", "surrogateescape"), pending + header, size
        pending, long_name = b"", None


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a pax extended header's records (``"LEN path=VALUE\\n"`` each), if it holds one."""
    pos = 0
    while pos < len(records):
        length = int(records[pos:records.index(b" ", pos)])
        key, _, value = records[records.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _skip(f: BinaryIO, n: int, name: str) -> None:
    """Move past ``n`` bytes of ``f``: a seek where it can (past the end of a shard cut short, the next
    header's read finds nothing), else reads (a shard read from an object store may not seek)."""
    if f.seekable():
        f.seek(n, 1)
        return
    while n:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"{name}: unexpected end of data")
        n -= len(chunk)


COMPACT_AT = 8  # small shards carried from earlier versions before they are merged


def _compact(out_dir: str, staging: str, shards: list[str], sizes: list[int], keep: _Kept,
             renames: dict[str, str], samples_per_shard: int, next_name,
             max_shard_bytes: int | None = None) -> tuple[list[str], list[int]]:
    """Merge the small shards the previous versions left (each incremental run adds one or more shards of
    only its changed samples) once there are ``COMPACT_AT`` of them: their members are copied byte for
    byte into shards of up to ``samples_per_shard`` samples and ``max_shard_bytes`` bytes. Small is under
    a quarter of both: a shard that ``max_shard_bytes`` cut (big samples) is full, however few samples
    it holds. Earlier versions keep the originals."""
    origin = {new: old for old, new in renames.items()}  # a shard rewritten this run -> the one it replaces

    def path(shard: str) -> str:
        return join(staging, shard) if shard in origin else join(out_dir, shard)

    small_size = max(1, samples_per_shard // 4)
    counted = [i for i, size in enumerate(sizes) if size < small_size]
    nbytes = dict(zip(counted, _file_sizes([path(shards[i]) for i in counted]), strict=True)) if counted else {}
    byte_cap = max_shard_bytes or 0
    small = [i for i in counted if not byte_cap or nbytes[i] < byte_cap // 4]
    if len(small) < COMPACT_AT:
        return shards, sizes
    groups: list[list[int]] = [[]]
    total = total_bytes = 0
    for i in small:
        if groups[-1] and (total + sizes[i] > samples_per_shard or (byte_cap and total_bytes + nbytes[i] > byte_cap)):
            groups.append([])
            total = total_bytes = 0
        groups[-1].append(i)
        total += sizes[i]
        total_bytes += nbytes[i]
    merged: dict[int, tuple[str, int]] = {}
    for group in groups:
        name = next_name()
        members = [shards[i] for i in group]
        sources = [(path(s), keep[origin.get(s, s)]) for s in members]
        merged[group[0]] = (name, _copy_many(sources, join(staging, name)))
        for s in members:
            renames[origin.get(s, s)] = name
    out_shards, out_sizes = [], []
    for i, (shard, size) in enumerate(zip(shards, sizes, strict=True)):
        if i in merged:
            out_shards.append(merged[i][0])
            out_sizes.append(merged[i][1])
        elif i not in small:
            out_shards.append(shard)
            out_sizes.append(size)
    return out_shards, out_sizes


def _file_sizes(paths: list[str]) -> list[int]:
    """Bytes of each of ``paths`` (local or any filesystem Beam reads; a local name is no pattern)."""
    import os

    if all("://" not in p for p in paths):
        return [os.path.getsize(p) for p in paths]
    results = FileSystems.match(paths)
    if gone := [p for p, result in zip(paths, results, strict=True) if not result.metadata_list]:
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        raise DatasetStateError(f"{gone[0]}{more} went missing while the run wrote the new version, so nothing was "
                                "committed: was the folder changed by hand meanwhile? Run again (with --full if "
                                "shards of the current version are gone)")
    return [result.metadata_list[0].size_in_bytes for result in results]


def _matching(folder: str, pattern: str) -> list[str]:
    """The paths of ``folder``'s files matching the glob ``pattern``; a local folder's own name is taken
    as it is (``run [1]`` is no character class: the staged parts of such a folder were not found, and an
    empty version was committed)."""
    if "://" not in folder:
        import glob

        return glob.glob(f"{glob.escape(folder)}/{pattern}")
    return [m.path for m in FileSystems.match([join(folder, pattern)])[0].metadata_list]


def delete_tree(path: str) -> None:
    """Delete the folder ``path`` and all below it (Beam's local delete reads the path as a pattern; an
    object store's deletes a prefix only when it ends in a slash, else the one object of that name)."""
    if "://" not in path:
        import shutil

        shutil.rmtree(path)
    else:
        FileSystems.delete([path.rstrip("/") + "/"])


class _Kept:
    """shard -> the keys of its samples that an unchanged row keeps, from the ``same`` table; each shard's
    set is built when asked for (only shards rewritten or merged need it)."""

    def __init__(self, same: Any) -> None:
        grouped = same.select(["shard", "key"]).group_by("shard").aggregate([("key", "list")])
        self._row = {s: i for i, s in enumerate(grouped.column("shard").to_pylist())}
        self._keys = grouped.column("key_list")
        self.counts = {s: len(self._keys[i]) for s, i in self._row.items()}

    def __getitem__(self, shard: str) -> set[str]:
        i = self._row.get(shard)
        return set() if i is None else set(self._keys[i].as_py())


def assemble_shards(out_dir: str, staging: str, version: int, previous: DatasetManifest | None,
                    staged_shards: list[dict], same: Any, samples_per_shard: int | None = None,
                    max_shard_bytes: int | None = None) -> tuple[list[str], list[int], dict[str, str]]:
    """The new version's shards: untouched old shards shared, touched ones rewritten, small ones left by
    earlier versions merged (with ``samples_per_shard`` and ``max_shard_bytes``), new ones renamed in.

    Returns (shards, sizes, renames) where renames maps staged or old shard paths to new paths.
    """
    shards: list[str] = []
    sizes: list[int] = []
    renames: dict[str, str] = {}
    keep = _Kept(same)
    n_new = 0

    def next_name() -> str:
        nonlocal n_new
        n_new += 1
        return f"shards/v{version:06d}-{n_new - 1:06d}.tar"

    if previous is not None:
        for shard, size in zip(previous.shards, previous.shard_sizes, strict=True):
            n_kept = keep.counts.get(shard, 0)
            if n_kept == size:
                shards.append(shard)  # untouched: shared with the previous version
                sizes.append(size)
            elif n_kept:  # lost or changed samples: copy-on-write
                name = next_name()
                _copy_members(join(out_dir, shard), join(staging, name), keep[shard])
                renames[shard] = name
                shards.append(name)
                sizes.append(n_kept)
        if samples_per_shard:
            shards, sizes = _compact(out_dir, staging, shards, sizes, keep, renames, samples_per_shard, next_name,
                                     max_shard_bytes)
    staged: dict[str, str] = {}
    for sh in staged_shards:
        name = next_name()
        staged[sh["path"]] = name
        shards.append(name)
        sizes.append(sh["samples"])
    moves = {join(staging, n): join(out_dir, n) for n in set(renames.values()) if n in shards}
    moves.update({join(staging, src): join(out_dir, dst) for src, dst in staged.items()})
    if moves:
        if not FileSystems.exists(join(out_dir, "shards")):
            FileSystems.mkdirs(join(out_dir, "shards"))
        FileSystems.rename(list(moves), list(moves.values()))
    renames.update(staged)
    return shards, sizes, renames


@contextlib.contextmanager
def _arrow_pool() -> Iterator[None]:
    """Arrow's allocations here from jemalloc (glibc's malloc where pyarrow has no jemalloc) instead of
    its default mimalloc, which held ~50 % more memory and took ~40 % longer over the commit's thousands
    of per-sidecar buffers (``benchmarks/commit.py``, 400,000 rows)."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def commit(out_dir: str, staging: str, *, job_toml: str, clock, started: float,
           fingerprints: dict[str, str], feature_dims: dict[str, int],
           samples_per_shard: int | None = None, max_shard_bytes: int | None = None, full: bool = False,
           before_commit: Callable[[], None] | None = None, copies: dict[str, int] | None = None) -> CommitResult:
    """Turn the staging folder of a finished pipeline into the next dataset version.

    When nothing changed (no new, changed or removed sample, the same rejects) no version is made and
    the returned manifest is the current one. A ``full`` run reuses nothing, so the current version's
    index may be gone (a folder changed by hand): its samples then count as new. ``before_commit`` is
    called right before ``dataset.json`` is replaced (a caller stops taking interrupts from there on).
    ``copies``: by modality, the features copied from the same input featurized in the run (the report's
    ``copies_by_modality``; ``pipelines.dedupe``).
    """
    with _arrow_pool():
        return _commit(out_dir, staging, job_toml=job_toml, clock=clock, started=started,
                       fingerprints=fingerprints, feature_dims=feature_dims, samples_per_shard=samples_per_shard,
                       max_shard_bytes=max_shard_bytes, full=full, before_commit=before_commit, copies=copies)


def _commit(out_dir: str, staging: str, *, job_toml: str, clock, started: float,
            fingerprints: dict[str, str], feature_dims: dict[str, int],
            samples_per_shard: int | None, max_shard_bytes: int | None = None, full: bool = False,
            before_commit: Callable[[], None] | None = None, copies: dict[str, int] | None = None) -> CommitResult:
    import pyarrow as pa

    previous = current_manifest(out_dir)
    previous_rows = load_index(out_dir, previous, PLAN_COLUMNS, missing_ok=full)
    job_bytes = job_toml.encode("utf-8", "surrogateescape")  # a path in another encoding keeps its bytes
    version = (previous.version if previous else 0) + 1
    staged = load_staged(staging, previous)
    labels, splits = staged.labels, staged.splits
    planned = plan_counts(previous_rows, staged.new, staged.same)
    pa.default_memory_pool().release_unused()  # the sets and joins of the planning
    extracted = staged.extracted
    unchanged = (previous is not None and planned["new"] == planned["changed"] == planned["removed"] == 0
                 and _same_rejects(staged.new, previous_rows)
                 and all(previous.fingerprints.get(m) == fingerprints.get(m) for m in _landed_modalities(previous_rows))
                 # a version written before the split counts were recorded gets a new version that has them
                 and previous.splits == splits)

    vpath = join(out_dir, version_path(version))
    if not unchanged and FileSystems.exists(vpath):
        # before any shard is renamed: a committed version's files must not be written over (a remote folder
        # whose dataset.json was put back to an older version; a local one is refused before the run)
        raise DatasetStateError(f"{vpath} already exists, above the current version {version - 1}: versions are "
                                "immutable, and nothing was changed. Make the version you want current (copy its "
                                "versions/ manifest over dataset.json) and run again")
    if not unchanged and (previous is None or previous.num_samples):
        _check_some_land(staged, previous)
    keys_updated = 0
    if unchanged:
        manifest = previous
        rows = previous_rows
        keys_updated = record_media_keys(out_dir, previous, staged.same)
    else:
        shards, sizes, renames = assemble_shards(out_dir, staging, version, previous, staged.shards, staged.same,
                                                 samples_per_shard, max_shard_bytes)
        new = _set_column(staged.new, "version", pa.repeat(pa.scalar(version, pa.int32()), staged.new.num_rows))
        new = _set_column(new, "shard", _renamed(new.column("shard"), renames))
        same = _set_column(staged.same, "shard", _renamed(staged.same.column("shard"), renames))
        rows = pa.concat_tables([new, same])
        del new, same, staged
        index_rel = f"index/{version:06d}.parquet"
        write_atomic(join(out_dir, index_rel), lambda f: write_index(rows, f))
        manifest = DatasetManifest(
            version=version, shards=shards, shard_sizes=sizes, num_samples=sum(sizes),
            counts={}, index=index_rel, fingerprints=fingerprints, feature_dims=feature_dims,
            labels=labels, splits=splits,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            parent=previous.version if previous else None, schema_version=SCHEMA_VERSION,
            shard_bytes=_file_sizes([join(out_dir, s) for s in shards]) if shards else [],
        )
    counts, report = build_report(rows, clock() - started)
    counts["extracted"] = extracted["samples"]
    report["counts"] = counts
    report["planned"] = planned
    report["extracted_by_modality"] = {m: extracted[m] for m in ("text", "image", "audio")}
    report["copies_by_modality"] = {m: (copies or {}).get(m, 0) for m in ("text", "image", "audio")}
    report["splits"] = dict(manifest.splits)  # landed samples per split their metadata names
    report["version"] = manifest.version
    report["new_version"] = not unchanged
    report["media_keys_updated"] = keys_updated
    if not unchanged:
        manifest.counts = counts
        write_atomic(join(out_dir, job_path(version)), job_bytes, "application/toml")
    report["seconds"] = round(clock() - started, 3)
    report["samples_per_second"] = round(counts["input"] / report["seconds"], 3) if report["seconds"] > 0 else 0.0
    if not unchanged:  # until here readers still see the previous version
        manifest_bytes = manifest.to_json().encode("utf-8")
        if before_commit is not None:
            before_commit()
        write_atomic(join(out_dir, "dataset.json"), manifest_bytes, "application/json")
        # After the commit: a versions/ manifest then always names a committed version, so no later run takes
        # one for an interrupted run's leftovers (remove_uncommitted writes it where a kill came between the two).
        write_atomic(vpath, manifest_bytes, "application/json")
    report_text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    try:
        if not unchanged:
            # The current version's spec; a run killed before this line gets it restored by remove_uncommitted.
            write_atomic(join(out_dir, "job.toml"), job_bytes, "application/toml")
        write_atomic(join(out_dir, "report.json"), report_text.encode("utf-8", "surrogateescape"))
    except OSError as e:  # the version is committed all the same: a failure here must not say it is not
        log.warning("version %d of %s is committed, but writing its job.toml and report.json failed (%s); the "
                    "next run writes job.toml again", manifest.version, out_dir, e)
    try:
        delete_tree(staging)
    except Exception as e:  # noqa: BLE001 - BeamIOError, OSError: the version is committed all the same
        log.warning("version %d of %s is committed, but its staging folder %s could not be deleted (%s); delete "
                    "it by hand", manifest.version, out_dir, staging, e)
    _remove_if_empty(join(out_dir, ".staging"))
    return CommitResult(manifest=manifest, report=report)


KEY_COLUMNS = ("id", "source", "media_stats")  # a keys file's columns (``keys_path``)


def keys_path(index: str) -> str:
    """The keys file beside a version's index (``index/NNNNNN.parquet`` -> ``index/_NNNNNN.keys.parquet``;
    the underscore keeps it out of what Arrow, pandas and Spark read as the dataset ``index/``).

    A re-run that changes nothing makes no version, and so writes no index; the media keys it found
    (``CleanSample.media_keys``: which files a re-run need not read) go there instead, for every landed
    sample, in the index's order. The files of a dataset folder copied, moved or restored keep their bytes
    but not their inodes and status-change times: without this, each later run read them all again until
    some sample changed. The version itself, its index included, stays as it was written."""
    folder, _, name = index.rpartition("/")
    return f"{folder}/_{name[: -len('.parquet')]}.keys.parquet" if folder else f"_{name[: -len('.parquet')]}.keys.parquet"


def _read_columns(path: str, columns: tuple[str, ...]) -> Any:
    """``columns`` of the Parquet file at ``path``, those it has (an older index has no ``media_stats``)."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as f:
        pf = pq.ParquetFile(f)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])


def recorded_keys(index_path: str, landed: Any) -> Any | None:
    """The media keys of ``landed`` (a version's landed index rows, in the index's order) that a later
    run recorded in the version's keys file, aligned with those rows; None when there is no such file, or
    it cannot be read or does not hold the same samples in the same order (the index's keys then hold)."""
    path = keys_path(index_path)
    try:
        if not FileSystems.exists(path):
            return None
        keys = _read_columns(path, KEY_COLUMNS)
    except Exception as e:  # ArrowInvalid, OSError: a file cut short or changed by hand only costs reads
        log.warning("ignoring the media keys in %s (%s): unchanged media files are read again", path, e)
        return None
    if keys.column_names != list(KEY_COLUMNS) or keys.num_rows != landed.num_rows or not all(
            keys.column(c).equals(landed.column(c)) for c in ("id", "source")):
        log.warning("ignoring the media keys in %s: they are not those of the version's landed samples; "
                    "unchanged media files are read again", path)
        return None
    return keys.column("media_stats")


def record_media_keys(out_dir: str, manifest: DatasetManifest, same: Any) -> int:
    """After a run that changed nothing: write the media keys it found (``same``, the landed rows it carried
    over, with this run's ``media_stats``) to the current version's keys file where they differ from those
    the version has (its keys file's, else its index's). Returns how many samples' keys changed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index_path = join(out_dir, manifest.index)
    landed = _read_columns(index_path, ("id", "source", "status", "media_stats"))
    landed = landed.filter(pc.equal(landed.column("status"), "ok"))
    before = recorded_keys(index_path, landed)
    if before is None:
        before = (landed.column("media_stats") if "media_stats" in landed.column_names
                  else pa.nulls(landed.num_rows, pa.string()))
    found = same.select(list(KEY_COLUMNS))
    found = found.take(pc.sort_indices(found, sort_keys=INDEX_ORDER[:2]))  # the index's order
    if found.num_rows != landed.num_rows or not all(found.column(c).equals(landed.column(c)) for c in ("id", "source")):
        return 0  # not the version's landed samples (cannot happen when nothing changed): keep what it has
    now = found.column("media_stats")
    changed = pc.sum(pc.not_equal(pc.fill_null(now, ""), pc.fill_null(before, ""))).as_py() or 0  # null: no keys
    if changed:
        import pyarrow.parquet as pq

        table = pa.table({c: found.column(c) for c in KEY_COLUMNS})
        path = join(out_dir, keys_path(manifest.index))
        try:
            write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))
        except OSError as e:  # the run changed nothing: not being able to say so costs the next run reads only
            log.warning("could not record the media keys of %d samples in %s (%s): the next run reads their files "
                        "again", changed, path, e)
            return 0
    return changed


INDEX_ORDER = [("id", "ascending"), ("source", "ascending"), ("status", "ascending")]
INDEX_SLICE_BYTES = 64 << 20  # rows of the index put in order and written at a time


def write_index(rows: Any, sink: Any) -> None:
    """Write the index ``rows`` to ``sink`` as zstd Parquet, in ``INDEX_ORDER`` (a stable sort, so rows
    equal in it keep their order). Rows are put in order a slice of about ``INDEX_SLICE_BYTES`` at a
    time, each slice a row group, so the sorted copy never holds the whole index."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    order = pc.sort_indices(rows, sort_keys=INDEX_ORDER)
    step = max(1, INDEX_SLICE_BYTES * rows.num_rows // max(1, rows.nbytes))
    with pq.ParquetWriter(sink, rows.schema, compression="zstd") as writer:
        for start in range(0, max(1, rows.num_rows), step):
            writer.write_table(rows.take(order.slice(start, step)))


def _set_column(table: Any, name: str, column: Any) -> Any:
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)


def _renamed(column: Any, renames: dict[str, str]) -> Any:
    """``column`` of shard paths with each one ``renames`` names replaced (nulls stay)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = pc.unique(column)
    if not len(names):
        return column
    mapped = pa.array([renames.get(s, s) if s is not None else None for s in names.to_pylist()], pa.string())
    return pc.take(mapped, pc.index_in(column, value_set=names))


def _labels(sidecars: list[dict], same_rows: list[dict], previous: DatasetManifest | None) -> list[Any]:
    """Label vocabulary of the landed samples, keeping the JSON type (int or str) of each label."""
    labels = {json.dumps(lbl, sort_keys=True): lbl for sc in sidecars for lbl in sc.get("labels", [])}
    by_text = {str(lbl): lbl for lbl in (previous.labels if previous else [])}
    for r in same_rows:
        # the unchanged sample's label as read, with its JSON type (1 is not "1"); older rows: the index's text
        lbl = r["label_value"] if "label_value" in r else by_text.get(r["label"], r["label"])
        if lbl is not None:
            labels[json.dumps(lbl, sort_keys=True)] = lbl
    return sorted(labels.values(), key=_label_key)


def remove_uncommitted(out_dir: str) -> list[str]:
    """Delete what a killed run left behind in a local dataset folder; returns the removed paths.

    Only files no committed version can reference go: the staging folder, temporary files, and index
    files, shards and job specs named for versions above the current one (names carry their version).
    A run writes a version's ``versions/`` manifest only after its commit, so one above the current
    version means ``dataset.json`` was deleted or an older copy put back: ``DatasetStateError``, and
    nothing is removed. A run killed between its commit and that manifest gets it written here.
    """
    import re
    import shutil
    from pathlib import Path

    root = Path(out_dir)
    current = current_manifest(out_dir)
    top = current.version if current else 0
    above = [v for v in version_numbers(out_dir) if v > top]
    if above:
        now = f"dataset.json names version {top}" if current else "it has no dataset.json"
        raise DatasetStateError(
            f"{out_dir} holds version{'s' if len(above) > 1 else ''} {_versions_shown(above)} above its current "
            f"one ({now}), which no interrupted "
            "run leaves: was dataset.json deleted, or restored from an older copy? Nothing was changed. Make the "
            f"version you want current (the newest: cp {root / version_path(above[-1])} {root / 'dataset.json'}) "
            "and run again")
    if current is None:
        check_new_folder(out_dir)
    removed = []
    if (root / ".staging").exists():
        shutil.rmtree(root / ".staging")
        removed.append(str(root / ".staging"))
    for folder, pattern in _LEFTOVER_FOLDERS.items():
        if not (root / folder).is_dir():
            continue
        for f in (root / folder).iterdir():
            m = re.match(pattern, f.name)
            if m and (int(m.group(1)) > top or f.name.endswith(".tmp")):
                f.unlink()
                removed.append(str(f))
    for f in root.glob("*.tmp"):
        f.unlink()
        removed.append(str(f))
    if removed:
        log.warning("removed %d leftovers of an interrupted run in %s", len(removed), out_dir)
    spec, current_spec = root / job_path(top), root / "job.toml"
    if current is not None and spec.is_file() and not (root / version_path(top)).is_file():
        (root / version_path(top)).write_bytes((root / "dataset.json").read_bytes())  # killed right after the commit
        log.warning("wrote %s from dataset.json (a run stopped between the two)", root / version_path(top))
    if top and spec.is_file() and (not current_spec.is_file() or current_spec.read_bytes() != spec.read_bytes()):
        current_spec.write_bytes(spec.read_bytes())  # killed after the commit, before job.toml
        log.warning("restored %s from %s (a run stopped between the two)", current_spec, spec)
    return removed


# What an mbm run writes into its folder before the first version is committed; a killed first run leaves only these.
_LEFTOVER_FILES = r"^(\.lock|\.worker\.log|.*\.tmp)$"
_LEFTOVER_FOLDERS = {"versions": r"^(\d{6})\.(json|toml)(\.tmp)?$", "index": r"^(?=\d{6}\.parquet|_\d{6}\.keys\.parquet)_?(\d{6})(?:\.keys)?\.parquet(\.tmp)?$",
                     "shards": r"^v(\d{6})-\d{6}\.tar(\.tmp)?$"}


def check_new_folder(out_dir: str) -> None:
    """A folder without ``dataset.json`` becomes a dataset only if it is empty or holds nothing but a killed
    first run's leftovers: in any other folder, files named like mbm's (``job.toml``, ``index/000001.parquet``,
    ``*.tmp``) would be taken for leftovers and deleted or overwritten."""
    import re
    from pathlib import Path

    if "://" in out_dir:
        foreign = _foreign_objects(out_dir)
    else:
        root = Path(out_dir)
        if not root.is_dir() or (root / "dataset.json").exists() or version_numbers(out_dir):
            return  # a dataset, or one whose dataset.json was lost (remove_uncommitted says what to do)
        found = []
        for f in sorted(root.iterdir()):
            if f.name == ".staging" and f.is_dir():
                continue
            if f.is_dir() and f.name in _LEFTOVER_FOLDERS:
                found += [g for g in sorted(f.iterdir()) if not re.match(_LEFTOVER_FOLDERS[f.name], g.name)]
            elif not (f.is_file() and re.match(_LEFTOVER_FILES, f.name)):
                found.append(f)
        foreign = [str(f.relative_to(root)) for f in found]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DatasetStateError(
            f"{out_dir} is not empty and is no mbm dataset (it has no dataset.json; it holds {len(foreign)} other "
            f"entr{'ies' if len(foreign) > 1 else 'y'}: {shown}): nothing was changed. Give an [output] dir "
            "(or --output) that is new or empty")


def _foreign_objects(out_dir: str) -> list[str]:
    """``check_new_folder`` in an object store: what is stored under ``out_dir`` (a prefix of its keys) that a
    killed first run of mbm does not leave; nothing when it holds a ``dataset.json`` or ``versions/`` manifests."""
    import re

    prefix = out_dir.rstrip("/") + "/"
    if FileSystems.exists(prefix + "dataset.json"):  # a dataset: not a listing of all its shards
        return []
    (listed,) = FileSystems.match([prefix + "**"])
    rels = sorted(m.path[len(prefix):] for m in listed.metadata_list if m.path.startswith(prefix))
    if "dataset.json" in rels or any(re.fullmatch(r"versions/\d{6}\.json", r) for r in rels):
        return []
    foreign = []
    for rel in rels:
        folder, _, name = rel.rpartition("/")
        if folder == ".staging" or folder.startswith(".staging/"):
            continue
        if folder in _LEFTOVER_FOLDERS and re.match(_LEFTOVER_FOLDERS[folder], name):
            continue
        if not folder and re.match(_LEFTOVER_FILES, name):
            continue
        foreign.append(rel)
    return foreign


def _versions_shown(versions: list[int]) -> str:
    return ", ".join(map(str, versions)) if len(versions) <= 4 else f"{versions[0]}..{versions[-1]}"


def _remove_if_empty(folder: str) -> None:
    if "://" in folder:
        return  # object stores have no empty folders
    import os

    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (another run's leftovers) or already gone


def _tally(values: Any) -> dict[str, int]:
    import pyarrow.compute as pc

    if not len(values):
        return {}
    counted = pc.value_counts(values)
    return dict(sorted(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)))


def build_report(rows: Any, seconds: float) -> tuple[dict[str, int], dict[str, Any]]:
    """Counts per status, stage and reason over the index rows (a table with the index's status, stage,
    reason and modalities)."""
    import pyarrow.compute as pc

    rows = rows.select(["status", "stage", "reason", "modalities"])
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    rejected = rows.filter(pc.equal(rows.column("status"), "rejected"))
    counts = {"input": rows.num_rows, "ok": ok.num_rows, "rejected": rejected.num_rows, "extracted": ok.num_rows}
    reasons = ok.column("reason").filter(pc.not_equal(ok.column("reason"), ""))
    dropped = pc.list_flatten(pc.split_pattern(reasons, "; "))
    modalities = pc.list_flatten(pc.split_pattern(ok.column("modalities"), ","))
    report = {
        "counts": counts,
        "rejected_by_reason": _tally(rejected.column("reason")),
        "rejected_by_stage": _tally(rejected.column("stage")),
        "dropped_modalities_by_reason": _tally(dropped),
        "modalities": _tally(modalities.filter(pc.not_equal(modalities, ""))),
        "seconds": round(seconds, 3),
        "samples_per_second": round(rows.num_rows / seconds, 3) if seconds > 0 else 0.0,
    }
    return counts, report
