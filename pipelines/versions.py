"""Dataset versions: list, diff, and garbage-collect what no kept version references."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from schemas import DatasetManifest
from schemas.manifest import job_path, version_path

log = logging.getLogger(__name__)


def list_versions(out_dir: str) -> list[DatasetManifest]:
    """Every committed version still on disk, oldest first; the current one (``dataset.json``) last, also
    where its ``versions/`` file is gone (a copy of the folder without it)."""
    from pipelines.commit import current_manifest

    root = Path(out_dir)
    current = current_manifest(out_dir)  # an unreadable one: DatasetStateError (a ValueError) saying how to fix it
    if current is None:
        raise ValueError(f"{out_dir} is not an mbm dataset folder (no dataset.json)")
    found = []
    for p in sorted((root / "versions").glob("[0-9]" * 6 + ".json")):
        if int(p.stem) >= current.version:
            continue  # the current one is dataset.json's; one above it is no committed version
        m = read_manifest(p)
        if m.version < current.version:
            found.append(m)
    return [*found, current]


def read_manifest(path: Path) -> DatasetManifest:
    """A ``versions/NNNNNN.json``; one that cannot be read (changed by hand, cut short by a full disk, a
    copy broken on the way) raises ``ValueError`` naming it and how to go on."""
    try:
        return DatasetManifest.from_json(path.read_bytes().decode("utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON or UTF-8, a field missing or mistyped
        said = f"{path} cannot be read ({type(e).__name__}: {e})"
    version, current = int(path.stem), path.parent.parent / "dataset.json"
    if version == _version_of(current):
        raise ValueError(f"{said}; it is a copy of the current version's {current.name}: cp {current} {path}") from None
    raise ValueError(f"{said}: put back a good copy of it, or delete it to give up version {version} (mbm gc then "
                     "deletes the shards and index only that version used)") from None


def load_version(out_dir: str, version: int) -> DatasetManifest:
    path = Path(out_dir) / version_path(version)
    if not path.is_file():
        raise ValueError(f"version {version} of {out_dir} does not exist (or was garbage-collected)")
    return read_manifest(path)


def _version_of(manifest: Path) -> int | None:
    """The version a manifest file names, if it can be read."""
    try:
        return json.loads(manifest.read_bytes()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def _landed(out_dir: str, manifest: DatasetManifest) -> dict[str, tuple[str, str]]:
    try:
        f = open(Path(out_dir) / manifest.index, "rb")  # an open file: Arrow refuses non-UTF-8 path names
    except OSError as e:
        raise ValueError(f"version {manifest.version}'s index {manifest.index} cannot be read ({e.strerror}): "
                         "the folder was changed by hand; diff compares the indexes of both versions") from None
    with f:
        rows = pq.read_table(f, columns=["id", "status", "content_hash", "fingerprint"])
    return {r["id"]: (r["content_hash"], r["fingerprint"]) for r in rows.to_pylist() if r["status"] == "ok"}


def diff_versions(out_dir: str, a: int, b: int) -> dict[str, list[str]]:
    """Sample ids added, changed (content or features) and removed from version ``a`` to ``b``."""
    old, new = _landed(out_dir, load_version(out_dir, a)), _landed(out_dir, load_version(out_dir, b))
    return {
        "added": sorted(set(new) - set(old)),
        "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k]),
        "removed": sorted(set(old) - set(new)),
    }


def gc(out_dir: str, keep: int, *, dry_run: bool = False) -> dict[str, Any]:
    """Keep the newest ``keep`` versions (always the current one); delete other versions' manifests and
    every shard and index file no kept version references. Returns what was (or would be) deleted."""
    if keep < 1:
        raise ValueError(f"--keep must be >= 1, got {keep}")
    root = Path(out_dir)
    versions = list_versions(out_dir)
    from pipelines.commit import version_numbers

    above = [v for v in version_numbers(out_dir) if v > versions[-1].version]
    if above:  # dataset.json put back by hand: their files would count as unreferenced, their manifests stay
        raise ValueError(f"{out_dir} holds version{'s' if len(above) > 1 else ''} {', '.join(map(str, above))} above its "
                         f"current one ({versions[-1].version}; dataset.json was put back by hand?): gc deletes "
                         f"nothing until the version you want is current (the newest: cp "
                         f"{root / version_path(above[-1])} {root / 'dataset.json'}), or those versions' manifests "
                         "are removed")
    from mbm.lock import version_in_use

    kept = versions[-keep:]
    in_use = [m for m in versions[:-keep] if version_in_use(str(root / version_path(m.version)))]
    kept = sorted(kept + in_use, key=lambda m: m.version)  # read by a running training or evaluation
    from pipelines.commit import keys_path

    referenced = {s for m in kept for s in m.shards} | {m.index for m in kept} | {keys_path(m.index) for m in kept}
    kept_numbers = {m.version for m in kept}
    doomed_versions = [root / version_path(m.version) for m in versions if m.version not in kept_numbers]
    doomed_specs = [p for m in versions if m.version not in kept_numbers and (p := root / job_path(m.version)).is_file()]
    doomed_files = [p for folder in ("shards", "index") if (root / folder).is_dir()
                    for p in sorted((root / folder).iterdir())
                    if f"{folder}/{p.name}" not in referenced and p.is_file()]
    freed = sum(p.stat().st_size for p in doomed_files)
    if not dry_run:
        for p in doomed_versions + doomed_specs + doomed_files:  # manifests first: no version points at a missing shard
            p.unlink()
    return {"kept_versions": sorted(kept_numbers), "in_use": [m.version for m in in_use], "deleted_versions": [int(p.stem) for p in doomed_versions],
            "deleted_files": [str(p.relative_to(root)) for p in doomed_files], "freed_bytes": freed}


def describe(m: DatasetManifest, current: int) -> dict[str, Any]:
    return {"version": m.version, "current": m.version == current, "created": m.created,
            "samples": m.num_samples, "shards": len(m.shards), **{k: m.counts.get(k) for k in ("input", "rejected")},
            "splits": dict(m.splits)}


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
