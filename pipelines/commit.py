"""Committing a job: staged shards and sidecars → a new immutable dataset version.

Runs in the driver after the Beam pipeline finished. Order matters for readers: shards are renamed
to their final names first (new names, never overwriting a shard of an older version), then the
index and ``versions/NNNNNN.json`` are written, and ``dataset.json`` is replaced last and atomically.
A crash at any point leaves ``dataset.json`` at the previous version.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems

from schemas import SCHEMA_VERSION, DatasetManifest
from schemas.arrow import index_table
from schemas.manifest import job_path, version_path

log = logging.getLogger(__name__)


@dataclass
class CommitResult:
    manifest: DatasetManifest
    report: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}"


def read_text(path: str) -> str:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read().decode("utf-8")


def write_atomic(path: str, data: bytes, mime: str = "application/octet-stream") -> None:
    """Write via a temporary name and rename, so readers see the old file or the whole new one.

    Local files are fsynced and swapped with ``os.replace`` (atomic); object stores get
    delete + rename, the best FileSystems offers there.
    """
    tmp = path + ".tmp"
    if "://" not in path:
        import os

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with FileSystems.create(tmp, mime_type=mime) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def current_manifest(out_dir: str) -> DatasetManifest | None:
    path = join(out_dir, "dataset.json")
    if not FileSystems.exists(path):
        return None
    return DatasetManifest.from_json(read_text(path))


def load_sidecars(staging: str) -> list[dict[str, Any]]:
    matches = FileSystems.match([join(staging, "parts/b*.json")])[0].metadata_list
    sidecars = [json.loads(read_text(m.path)) for m in matches]
    return sorted(sidecars, key=lambda s: s["bucket"])


def _label_key(v: Any) -> tuple[str, str]:
    return (type(v).__name__, str(v))


# what the commit reads of the previous index: planning (ids, rejects) and, when nothing changed, the report
PLAN_COLUMNS = ("id", "status", "stage", "reason", "modalities")


def load_index(out_dir: str, manifest: DatasetManifest | None, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of ``manifest``'s index, ``columns`` of them only (a row of all 14 as a dict is ~2.8 KB)."""
    if manifest is None:
        return []
    import pyarrow.parquet as pq

    with FileSystems.open(join(out_dir, manifest.index), compression_type="uncompressed") as f:
        return pq.read_table(f, columns=list(columns)).to_pylist()


def plan_counts(previous_rows: list[dict], new_rows: list[dict], same_rows: list[dict]) -> dict[str, int]:
    """new / changed / unchanged / removed, relative to the previous version's landed samples.

    A sample rejected again exactly as before counts as unchanged; read-stage rejects without an id
    are keyed by their source line.
    """
    prev_ok = {r["id"] for r in previous_rows if r["status"] == "ok"}
    prev_rejects = {(r["id"], r["stage"], r["reason"]) for r in previous_rows if r["status"] == "rejected"}
    seen = {r["id"] for r in new_rows} | {r["id"] for r in same_rows}
    lands = {r["id"] for r in new_rows if r["status"] == "ok"} | {r["id"] for r in same_rows}
    # A reject row of a landed id (a later row repeating the id) does not change that sample.
    changed = {r["id"] for r in new_rows if r["id"] in prev_ok and (r["status"] == "ok" or r["id"] not in lands)}
    same_rejects = {r["id"] for r in new_rows
                    if r["status"] == "rejected" and (r["id"], r["stage"], r["reason"]) in prev_rejects}
    new = {r["id"] for r in new_rows} - changed - same_rejects
    return {"new": len(new), "changed": len(changed), "unchanged": len(same_rows) + len(same_rejects),
            "removed": len(prev_ok - seen)}


def _copy_members(src: str, dst: str, keys: set[str]) -> int:
    """Copy the members of ``keys`` from shard ``src`` to a new shard ``dst`` byte for byte."""
    return _copy_many([(src, keys)], dst)


def _copy_many(sources: list[tuple[str, set[str]]], dst: str) -> int:
    """Copy the members of each ``(shard, keys)`` in order into one new shard ``dst``, byte for byte;
    returns the number of samples copied."""
    import tarfile

    copied: set[tuple[int, str]] = set()
    with FileSystems.create(dst, mime_type="application/x-tar") as out, \
            tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tout:
        for number, (src, keys) in enumerate(sources):
            with FileSystems.open(src, compression_type="uncompressed") as f, \
                    tarfile.open(fileobj=f, mode="r|") as tin:
                for info in tin:
                    if (key := info.name.partition(".")[0]) in keys:
                        tout.addfile(info, tin.extractfile(info))
                        copied.add((number, key))
    return len(copied)


COMPACT_AT = 8  # small shards carried from earlier versions before they are merged


def _compact(out_dir: str, staging: str, shards: list[str], sizes: list[int], keep: dict[str, set[str]],
             renames: dict[str, str], samples_per_shard: int, next_name) -> tuple[list[str], list[int]]:
    """Merge the small shards the previous versions left (each incremental run adds one or more shards of
    only its changed samples) once there are ``COMPACT_AT`` of them: their members are copied byte for
    byte into shards of up to ``samples_per_shard`` samples. Earlier versions keep the originals."""
    small_size = max(1, samples_per_shard // 4)
    small = [i for i, size in enumerate(sizes) if size < small_size]
    if len(small) < COMPACT_AT:
        return shards, sizes
    groups: list[list[int]] = [[]]
    total = 0
    for i in small:
        if groups[-1] and total + sizes[i] > samples_per_shard:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += sizes[i]
    origin = {new: old for old, new in renames.items()}  # a shard rewritten this run -> the one it replaces
    merged: dict[int, tuple[str, int]] = {}
    for group in groups:
        name = next_name()
        members = [shards[i] for i in group]
        sources = [(join(staging, s) if s in origin else join(out_dir, s), keep[origin.get(s, s)]) for s in members]
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


def assemble_shards(out_dir: str, staging: str, version: int, previous: DatasetManifest | None,
                    sidecars: list[dict], same_rows: list[dict], samples_per_shard: int | None = None
                    ) -> tuple[list[str], list[int], dict[str, str]]:
    """The new version's shards: untouched old shards shared, touched ones rewritten, small ones left by
    earlier versions merged (with ``samples_per_shard``), new ones renamed in.

    Returns (shards, sizes, renames) where renames maps staged or old shard paths to new paths.
    """
    shards: list[str] = []
    sizes: list[int] = []
    renames: dict[str, str] = {}
    keep: dict[str, set[str]] = {}
    for r in same_rows:
        keep.setdefault(r["shard"], set()).add(r["key"])
    n_new = 0

    def next_name() -> str:
        nonlocal n_new
        n_new += 1
        return f"shards/v{version:06d}-{n_new - 1:06d}.tar"

    if previous is not None:
        for shard, size in zip(previous.shards, previous.shard_sizes, strict=True):
            kept = keep.get(shard, set())
            if len(kept) == size:
                shards.append(shard)  # untouched: shared with the previous version
                sizes.append(size)
            elif kept:  # lost or changed samples: copy-on-write
                name = next_name()
                _copy_members(join(out_dir, shard), join(staging, name), kept)
                renames[shard] = name
                shards.append(name)
                sizes.append(len(kept))
        if samples_per_shard:
            shards, sizes = _compact(out_dir, staging, shards, sizes, keep, renames, samples_per_shard, next_name)
    staged: dict[str, str] = {}
    for sc in sidecars:
        for sh in sorted(sc["shards"], key=lambda s: s["part"]):
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


def commit(out_dir: str, staging: str, *, job_toml: str, clock, started: float,
           fingerprints: dict[str, str], feature_dims: dict[str, int],
           samples_per_shard: int | None = None) -> CommitResult:
    """Turn the staging folder of a finished pipeline into the next dataset version.

    When nothing changed (no new, changed or removed sample, the same rejects) no version is made and
    the returned manifest is the current one.
    """
    previous = current_manifest(out_dir)
    previous_rows = load_index(out_dir, previous, PLAN_COLUMNS)
    job_bytes = job_toml.encode("utf-8", "surrogateescape")  # a path in another encoding keeps its bytes
    version = (previous.version if previous else 0) + 1
    sidecars = load_sidecars(staging)
    new_rows = [r for sc in sidecars for r in sc["rows"]]
    same_rows = [r for sc in sidecars for r in sc.get("same", [])]
    planned = plan_counts(previous_rows, new_rows, same_rows)
    extracted = {k: sum(sc.get("extracted", {}).get(k, 0) for sc in sidecars)
                 for k in ("samples", "text", "image", "audio")}
    rejects_now = sorted((r["id"], r["stage"], r["reason"]) for r in new_rows if r["status"] == "rejected")
    rejects_before = sorted((r["id"], r["stage"], r["reason"]) for r in previous_rows if r["status"] == "rejected")
    unchanged = (previous is not None and planned["new"] == planned["changed"] == planned["removed"] == 0
                 and rejects_now == rejects_before and previous.fingerprints == fingerprints)

    if unchanged:
        manifest = previous
        rows = previous_rows
    else:
        shards, sizes, renames = assemble_shards(out_dir, staging, version, previous, sidecars, same_rows,
                                                 samples_per_shard)
        for r in new_rows:
            r["version"] = version
            if r["shard"] is not None:
                r["shard"] = renames[r["shard"]]
        for r in same_rows:
            r["shard"] = renames.get(r["shard"], r["shard"])
        rows = sorted(new_rows + same_rows, key=lambda r: (r["id"], r["source"], r["status"]))
        index_rel = f"index/{version:06d}.parquet"
        buf = io.BytesIO()
        import pyarrow.parquet as pq

        pq.write_table(index_table(rows), buf, compression="zstd")
        write_atomic(join(out_dir, index_rel), buf.getvalue())
        manifest = DatasetManifest(
            version=version, shards=shards, shard_sizes=sizes, num_samples=sum(sizes),
            counts={}, index=index_rel, fingerprints=fingerprints, feature_dims=feature_dims,
            labels=_labels(sidecars, same_rows, previous),
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            parent=previous.version if previous else None, schema_version=SCHEMA_VERSION,
        )
    counts, report = build_report(rows, clock() - started)
    counts["extracted"] = extracted["samples"]
    report["counts"] = counts
    report["planned"] = planned
    report["extracted_by_modality"] = {m: extracted[m] for m in ("text", "image", "audio")}
    report["version"] = manifest.version
    report["new_version"] = not unchanged
    if not unchanged:
        manifest.counts = counts
        vpath = join(out_dir, version_path(version))
        if FileSystems.exists(vpath):
            raise RuntimeError(f"{vpath} already exists; versions are immutable")
        write_atomic(vpath, manifest.to_json().encode("utf-8"), "application/json")
        write_atomic(join(out_dir, job_path(version)), job_bytes, "application/toml")
    report["seconds"] = round(clock() - started, 3)
    report["samples_per_second"] = round(counts["input"] / report["seconds"], 3) if report["seconds"] > 0 else 0.0
    if not unchanged:  # until here readers still see the previous version
        write_atomic(join(out_dir, "dataset.json"), manifest.to_json().encode("utf-8"), "application/json")
        # The current version's spec; a run killed before this line gets it restored by remove_uncommitted.
        write_atomic(join(out_dir, "job.toml"), job_bytes, "application/toml")
    report_text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    write_atomic(join(out_dir, "report.json"), report_text.encode("utf-8", "surrogateescape"))
    FileSystems.delete([staging])
    _remove_if_empty(join(out_dir, ".staging"))
    return CommitResult(manifest=manifest, report=report, rows=rows)


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

    Only files no committed version can reference go: the staging folder, and manifests, index
    files and shards named for versions above the current one (names carry their version).
    """
    import re
    import shutil
    from pathlib import Path

    root = Path(out_dir)
    current = current_manifest(out_dir)
    top = current.version if current else 0
    removed = []
    if (root / ".staging").exists():
        shutil.rmtree(root / ".staging")
        removed.append(str(root / ".staging"))
    patterns = {"versions": r"^(\d{6})\.(json|toml)(\.tmp)?$", "index": r"^(\d{6})\.parquet(\.tmp)?$",
                "shards": r"^v(\d{6})-\d{6}\.tar$"}
    for folder, pattern in patterns.items():
        if not (root / folder).is_dir():
            continue
        for f in (root / folder).iterdir():
            m = re.match(pattern, f.name)
            if m and int(m.group(1)) > top:
                f.unlink()
                removed.append(str(f))
    for f in root.glob("*.tmp"):
        f.unlink()
        removed.append(str(f))
    if removed:
        log.warning("removed %d leftovers of an interrupted run in %s", len(removed), out_dir)
    spec, current_spec = root / job_path(top), root / "job.toml"
    if top and spec.is_file() and (not current_spec.is_file() or current_spec.read_bytes() != spec.read_bytes()):
        current_spec.write_bytes(spec.read_bytes())  # killed after the commit, before job.toml
        log.warning("restored %s from %s (a run stopped between the two)", current_spec, spec)
    return removed


def _remove_if_empty(folder: str) -> None:
    if "://" in folder:
        return  # object stores have no empty folders
    import os

    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (another run's leftovers) or already gone


def build_report(rows: list[dict[str, Any]], seconds: float) -> tuple[dict[str, int], dict[str, Any]]:
    """Counts per status, stage and reason over the index rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    counts = {"input": len(rows), "ok": len(ok), "rejected": len(rejected), "extracted": len(ok)}
    dropped = Counter(code for r in ok if r["reason"] for code in r["reason"].split("; "))
    modalities = Counter(m for r in ok for m in r["modalities"].split(",") if m)
    report = {
        "counts": counts,
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "rejected_by_stage": dict(sorted(Counter(r["stage"] for r in rejected).items())),
        "dropped_modalities_by_reason": dict(sorted(dropped.items())),
        "modalities": dict(sorted(modalities.items())),
        "seconds": round(seconds, 3),
        "samples_per_second": round(len(rows) / seconds, 3) if seconds > 0 else 0.0,
    }
    return counts, report
