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
from schemas.manifest import version_path

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
    """Write via a temporary name and rename, so readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with FileSystems.create(tmp, mime_type=mime) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])  # os.rename would replace atomically; FileSystems.rename refuses
    FileSystems.rename([tmp], [path])


def replace_atomic_local(path: str, data: bytes) -> None:
    import os

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def commit(out_dir: str, staging: str, *, job_toml: str, clock, started: float,
           fingerprints: dict[str, str], feature_dims: dict[str, int]) -> CommitResult:
    """Turn the staging folder of a finished pipeline into the next dataset version."""
    previous = current_manifest(out_dir)
    version = (previous.version if previous else 0) + 1
    sidecars = load_sidecars(staging)

    renames: dict[str, str] = {}
    shards: list[str] = []
    sizes: list[int] = []
    for sc in sidecars:
        for sh in sorted(sc["shards"], key=lambda s: s["part"]):
            final = f"shards/v{version:06d}-{len(shards):06d}.tar"
            renames[sh["path"]] = final
            shards.append(final)
            sizes.append(sh["samples"])
    if renames:
        if not FileSystems.exists(join(out_dir, "shards")):
            FileSystems.mkdirs(join(out_dir, "shards"))
        FileSystems.rename([join(staging, s) for s in renames], [join(out_dir, d) for d in renames.values()])

    rows = [r for sc in sidecars for r in sc["rows"]]
    for r in rows:
        r["version"] = version
        if r["shard"] is not None:
            r["shard"] = renames[r["shard"]]
    rows.sort(key=lambda r: (r["id"], r["source"], r["status"]))
    labels = {json.dumps(lbl, sort_keys=True): lbl for sc in sidecars for lbl in sc.get("labels", [])}

    index_rel = f"index/{version:06d}.parquet"
    buf = io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(index_table(rows), buf, compression="zstd")
    write_atomic(join(out_dir, index_rel), buf.getvalue())

    counts, report = build_report(rows, clock() - started)
    manifest = DatasetManifest(
        version=version,
        shards=shards,
        shard_sizes=sizes,
        num_samples=sum(sizes),
        counts=counts,
        index=index_rel,
        fingerprints=fingerprints,
        feature_dims=feature_dims,
        labels=sorted(labels.values(), key=_label_key),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        parent=previous.version if previous else None,
        schema_version=SCHEMA_VERSION,
    )
    vpath = join(out_dir, version_path(version))
    if FileSystems.exists(vpath):
        raise RuntimeError(f"{vpath} already exists; versions are immutable")
    write_atomic(vpath, manifest.to_json().encode("utf-8"), "application/json")
    write_atomic(join(out_dir, "job.toml"), job_toml.encode("utf-8"), "application/toml")
    report["version"] = version
    report["seconds"] = round(clock() - started, 3)
    report["samples_per_second"] = round(counts["input"] / report["seconds"], 3) if report["seconds"] > 0 else 0.0
    write_atomic(join(out_dir, "report.json"), (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    dataset_json = join(out_dir, "dataset.json")
    if "://" in out_dir:
        write_atomic(dataset_json, manifest.to_json().encode("utf-8"), "application/json")
    else:
        replace_atomic_local(dataset_json, manifest.to_json().encode("utf-8"))
    FileSystems.delete([staging])
    _remove_if_empty(join(out_dir, ".staging"))
    return CommitResult(manifest=manifest, report=report, rows=rows)


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
