"""Resolving ``--data``: a dataset folder (current version), ``OUT/@N`` (pinned version), or a shard pattern."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import braceexpand

from mbm.data.decode import decode
from mbm.data.errors import CorruptSample, SkipLog, in_shard
from mbm.data.scan import cache as scan_cache
from mbm.data.scan import index_shards
from mbm.data.split import split_name
from mbm.lock import hold_version
from schemas import MODALITIES, DatasetManifest
from schemas.manifest import version_path

log = logging.getLogger(__name__)

_PINNED = re.compile(r"^(?P<root>.*?)/?@(?P<version>\d+)$")


def _pin(spec: str) -> re.Match | None:
    """``ROOT/@N`` (or ``ROOT@N``) split into root and version; None for anything else, and for an
    existing folder whose own name ends in ``@digits`` (a dataset written to ``coco@2017``)."""
    m = _PINNED.match(spec)
    return None if m is None or os.path.isdir(spec) else m


@dataclass
class DataSource:
    """The shards to read and what the trainer must know about them."""

    spec: str
    shards: list[str]  # absolute or cwd-relative paths
    shard_sizes: list[int] | None
    labels: list[Any]
    feature_dims: dict[str, int]
    version: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    # samples per split their metadata names (``mbm.data.split.split_name``): the manifest's (empty in one
    # written before mbm recorded them), or counted while scanning the shards of a pattern
    splits: dict[str, int] = field(default_factory=dict)
    manifest: str | None = None  # the version's manifest file, where read from a dataset folder

    def hold(self) -> None:
        """Keep ``mbm gc`` from deleting this version while this process (and its loader workers) read it
        (``mbm.lock.hold_version`` on its ``versions/N.json``)."""
        if self.manifest is not None and self.version is not None:
            hold_version(os.path.join(os.path.dirname(self.manifest), version_path(self.version))
                         if os.path.basename(self.manifest) == "dataset.json" else self.manifest)


def pinned(spec: str, version: int | None, shards: list[str] | None = None) -> str:
    """What a run records for ``--data``: the dataset's current version as ``ROOT/@N`` (from the folder
    or its ``dataset.json``), a pinned ``ROOT/@N`` written canonically, a glob as the brace list of the
    shards it matched now (a newer version's shards must not join a resumed run), else ``spec``."""
    if (m := _pin(spec)) is not None:
        return f"{(m['root'] or '.').rstrip('/')}/@{int(m['version'])}"
    if version is not None and os.path.isdir(spec):
        return f"{spec.rstrip('/')}/@{version}"
    if version is not None and os.path.basename(spec) == "dataset.json":
        return f"{os.path.dirname(spec) or '.'}/@{version}"
    if shards and glob.has_magic(spec):
        folder = os.path.commonpath(shards) if len(shards) > 1 else os.path.dirname(shards[0])
        names = [os.path.relpath(s, folder) for s in shards]
        return f"{folder}/{{{','.join(names)}}}" if len(names) > 1 else shards[0]
    return spec


def unpinned_root(spec: str) -> str | None:
    """The dataset folder of a pinned ``ROOT/@N``; None when ``spec`` is not pinned."""
    m = _pin(spec)
    return (m["root"] or ".") if m else None


def label_key(label: Any) -> str:
    """Identity of a label: 1 and "1" are different labels (as in the dataset's index)."""
    return json.dumps(label, sort_keys=True)


def sort_labels(labels: list[Any]) -> list[Any]:
    """Labels of mixed types in the order the preprocessing job writes the vocabulary."""
    unique = {label_key(v): v for v in labels if v is not None}
    return sorted(unique.values(), key=lambda v: (type(v).__name__, str(v)))


def resolve_data(spec: str) -> DataSource:
    """A ``DataSource`` for ``--data``; raises ``ValueError`` naming what is wrong."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", spec):
        raise ValueError(f"--data {spec}: the loader reads local shards (it reads each sample's arrays from its "
                         "shard with pread); copy the dataset folder here (gsutil -m cp -r, aws s3 sync) or mount "
                         "it, and give its local path")
    pinned = _pin(spec)
    if pinned:
        root = pinned["root"] or "."
        path = os.path.join(root, version_path(int(pinned["version"])))
        if not os.path.isfile(path) and _current_version(root) == int(pinned["version"]):
            path = os.path.join(root, "dataset.json")  # its versions/ file not written (yet), or not copied
        return _from_manifest(spec, root, path)
    if os.path.isdir(spec):
        return _from_manifest(spec, spec, os.path.join(spec, "dataset.json"))
    if spec.endswith(".json") and os.path.isfile(spec):
        root = os.path.dirname(spec) or "."
        if re.fullmatch(r"\d{6}\.json", os.path.basename(spec)) and os.path.basename(os.path.abspath(root)) == "versions":
            root = os.path.dirname(os.path.abspath(root))  # OUT/versions/000001.json: shard paths are relative to OUT
        return _from_manifest(spec, root, spec)
    if not glob.has_magic(spec) and "{" not in spec and not os.path.exists(spec):
        raise ValueError(f"--data {spec}: no such folder or file; give the output folder of `mbm preprocess` "
                         "(OUT, or OUT/@N for version N), its dataset.json, or shards (a .tar, a pattern)")
    return _from_pattern(spec)


def _current_version(root: str) -> int | None:
    try:
        with open(os.path.join(root, "dataset.json"), encoding="utf-8") as f:
            return DatasetManifest.from_json(f.read()).version
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _from_manifest(spec: str, root: str, manifest_path: str) -> DataSource:
    if not os.path.isfile(manifest_path):
        pinned_version = _pin(spec)
        why = (" (no such version: never committed, or `mbm gc` deleted it; `mbm versions` lists them)"
               if pinned_version else "")
        if pinned_version and not os.path.isdir(root):
            why = (f" ({root} is gone: if the dataset was moved, give --data where it is now, and a resumed run "
                   "goes on with the same version there)")
        raise ValueError(f"--data {spec}: no dataset manifest at {manifest_path}{why}")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = DatasetManifest.from_json(f.read())
    except (ValueError, TypeError, KeyError, AttributeError) as exn:  # not JSON, or not mbm's manifest fields
        raise ValueError(f"--data {spec}: {manifest_path} is not a readable mbm dataset manifest "
                         f"({type(exn).__name__}: {exn})") from None
    if not manifest.shards:
        raise ValueError(f"--data {spec}: dataset version {manifest.version} has no shards")
    dims = {m: int(manifest.feature_dims[m]) for m in MODALITIES if m in manifest.feature_dims}
    if not dims:
        raise ValueError(f"--data {spec}: manifest has no feature_dims")
    missing = [s for s in manifest.shards if not os.path.isfile(os.path.join(root, s))]
    if missing:
        raise ValueError(f"--data {spec}: {len(missing)} of the {len(manifest.shards)} shards of dataset version "
                         f"{manifest.version} are missing from {root} (e.g. {missing[0]}): deleted or moved by hand, or "
                         "by `mbm gc`; put them back, train on another version (`mbm versions`), or write the version "
                         "again with `mbm preprocess --full`")
    return DataSource(spec=spec, shards=[os.path.join(root, s) for s in manifest.shards],
                      shard_sizes=list(manifest.shard_sizes), labels=sort_labels(manifest.labels),
                      feature_dims=dims, version=manifest.version, counts=dict(manifest.counts),
                      splits=dict(manifest.splits), manifest=manifest_path)


def _from_pattern(spec: str) -> DataSource:
    """Shards named by brace ranges (``{000..009}``, as webdataset takes them) and shell globs (``*.tar``)."""
    paths = []
    for path in braceexpand.braceexpand(spec):
        if glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"--data {spec}: not a dataset folder, and {path} matches no file")
            paths.extend(matches)
        else:
            paths.append(path)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--data {spec}: not a dataset folder, and {len(missing)} shard(s) missing, e.g. {missing[0]}")
    sizes, labels, dims, splits = _scan(paths)
    if not dims:
        raise ValueError(f"--data {spec}: no readable samples in {len(paths)} shard(s)")
    return DataSource(spec=spec, shards=paths, shard_sizes=sizes, labels=sort_labels(labels), feature_dims=dims,
                      splits=splits)


def _machine_share(shards: int) -> tuple[int, int]:
    """(processes, first shard) for this process's share of a parallel scan: the cores it may use, divided
    among the ranks torchrun started on this machine (``LOCAL_WORLD_SIZE``), each beginning at its own share."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        rank = min(max(0, int(os.environ.get("LOCAL_RANK") or 0)), local - 1)
    except ValueError:
        local, rank = 1, 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local), shards * rank // local


def _scan(paths: list[str]) -> tuple[list[int], list[Any], dict[str, int], dict[str, int]]:
    """Per-shard sample counts, labels, feature dims and samples per named split of the samples whose json doc
    is usable, from the shards' scans (``mbm.data.scan``: kept on disk for the loaders, and replayed by later
    commands); dims from the first sample whose arrays decode, each modality's."""
    skips = SkipLog()
    labels, dims = [], {}
    splits: Counter[str] = Counter()
    seen: set[str] = set()
    repeated = 0
    processes, start = _machine_share(len(paths))
    index_shards(paths, processes, start=start)  # a large dataset's first scan, in parallel
    sizes = []
    for path in paths:
        n = 0
        for sample in scan_cache().samples([path], skips, lambda _doc: True, MODALITIES, split="all"):
            n += 1
            if (name := split_name({"split": sample.split})) is not None:
                splits[name] += 1
            repeated += sample.id in seen
            seen.add(sample.id)
            labels.append(sample.label)
            if any(m not in dims for m in sample.npy):
                try:
                    for m, arr in decode(sample).features.items():
                        dims.setdefault(m, int(arr.shape[1]))
                except CorruptSample as exn:
                    skips.skip(exn.reason, in_shard(path, exn.detail))
        sizes.append(n)
    log.info("scanned %d shard(s): %d samples, dims %s, skipped %s", len(paths), sum(sizes), dims, skips.snapshot())
    if repeated:
        versions = sorted({m.group(1) for p in paths if (m := re.fullmatch(r"v(\d{6})-\d{6}\.tar", os.path.basename(p)))})
        log.warning("%d of the %d samples of these %d shards have an id another of them has too, and each is read as "
                    "often as it appears%s", repeated, sum(sizes), len(paths),
                    f": they are shards of {len(versions)} versions of an mbm dataset folder, which keeps every "
                    "version's shards; give the folder (OUT, or OUT/@N for version N) to read one version"
                    if len(versions) > 1 else "")
    return sizes, labels, {m: dims[m] for m in MODALITIES if m in dims}, dict(sorted(splits.items()))
