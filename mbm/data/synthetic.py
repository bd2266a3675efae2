"""A synthetic dataset in the exact on-disk contract of ``mbm preprocess``, for tests, demos and benchmarks.

Features carry a learnable signal: a class prototype plus a per-sample latent shared by text and
image (so text↔image retrieval is possible beyond the label), noise on top; captions name the class
and an attribute fixed by the latent, so they can be generated from the image/audio features.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mbm.data.source import sort_labels
from schemas import SCHEMA_VERSION, DatasetManifest, sample_key
from schemas.manifest import split_name, version_path

CLASS_WORDS = ["cat", "dog", "bird", "horse", "fish", "frog", "car", "ship"]
ATTR_WORDS = ["red", "blue", "small", "large"]


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    num_samples: int = 200
    samples_per_shard: int = 100
    feature_dims: dict[str, int] = field(default_factory=lambda: {"text": 384, "image": 1280, "audio": 80})
    lengths: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"text": (6, 16), "image": (16, 16), "audio": (20, 60)})
    labels: tuple[Any, ...] = ("cat", "dog", "bird", 0, 1)  # several label sets: strings and ints
    class_weights: tuple[float, ...] | None = None  # default: uneven (a clear majority class)
    missing: dict[str, float] = field(default_factory=lambda: {"text": 0.1, "image": 0.15, "audio": 0.15})
    null_label: float = 0.05
    noise: float = 1.0
    seed: int = 0
    # consecutive samples sharing their image and audio (features and modality_hashes), as COCO's five
    # captions of one picture do
    media_repeats: int = 1
    meta: dict[str, Any] = field(default_factory=dict)  # every sample's metadata, e.g. {"split": "test"}
    # sample i names the split splits[i % len(splits)] in its metadata (over ``meta``'s), as a dataset with
    # train, validation and test splits does
    splits: tuple[str, ...] = ()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def _sample(i: int, cfg: SyntheticConfig, rng: np.random.Generator, proj: dict[str, np.ndarray],
            protos: np.ndarray, weights: np.ndarray, shared: dict[str, tuple[int, bytes]]) -> dict[str, Any]:
    c = int(rng.choice(len(cfg.labels), p=weights))
    z = rng.normal(size=protos.shape[1])
    present = [m for m in cfg.feature_dims if rng.random() >= cfg.missing.get(m, 0.0)]
    if not present:
        present = [next(iter(cfg.feature_dims))]
    attr = ATTR_WORDS[int(z[0] > 0) * 2 + int(z[1] > 0)]
    text = f"a {attr} {CLASS_WORDS[c % len(CLASS_WORDS)]}"
    sid = f"s{i:06d}"
    members: dict[str, Any] = {"__key__": sample_key(sid)}
    for m in present:
        lo, hi = cfg.lengths[m]
        n = int(rng.integers(lo, hi + 1))
        signal = protos[c] + (z if m != "audio" else 0.0)
        feats = signal @ proj[m] + cfg.noise * rng.normal(size=(n, cfg.feature_dims[m]))
        members[f"{m}.npy"] = _npy(feats)
        if m != "text" and cfg.media_repeats > 1:  # the group's first sample's features, for all of it
            group = i // cfg.media_repeats
            if shared.get(m, (None,))[0] != group:
                shared[m] = (group, members[f"{m}.npy"])
            members[f"{m}.npy"] = shared[m][1]
    label = None if rng.random() < cfg.null_label else cfg.labels[c]
    doc = {"id": sid, "label": label, "text": text if "text" in present else None, "modalities": present,
           "content_hash": f"{i:040x}", "fingerprint": {}, "dropped": {},
           "meta": {**cfg.meta, **({"split": cfg.splits[i % len(cfg.splits)]} if cfg.splits else {})},
           "modality_hashes": {m: f"{m}-{i // cfg.media_repeats if m != 'text' else i:060x}" for m in present},
           "schema_version": SCHEMA_VERSION}
    members["json"] = json.dumps(doc, sort_keys=True).encode("utf-8")
    return members


def write_synthetic_dataset(out: str, cfg: SyntheticConfig | None = None, version: int = 1) -> DatasetManifest:
    """Write shards, ``versions/NNNNNN.json`` and ``dataset.json`` under ``out``; returns the manifest."""
    import webdataset as wds

    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    latent = 16
    proj = {m: rng.normal(size=(latent, d)) / np.sqrt(latent) for m, d in cfg.feature_dims.items()}
    protos = rng.normal(size=(len(cfg.labels), latent))
    w = np.array(cfg.class_weights or [2.0 ** -k for k in range(len(cfg.labels))], float)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    shards, sizes, labels = [], [], []
    splits: dict[str, int] = {}
    shared: dict[str, tuple[int, bytes]] = {}
    for start in range(0, cfg.num_samples, cfg.samples_per_shard):
        rel = f"shards/v{version:06d}-{len(shards):06d}.tar"
        n = min(cfg.samples_per_shard, cfg.num_samples - start)
        with wds.TarWriter(os.path.join(out, rel), encoder=False, mtime=0) as sink:
            for i in range(start, start + n):
                members = _sample(i, cfg, rng, proj, protos, w / w.sum(), shared)
                doc = json.loads(members["json"])
                labels.append(doc["label"])
                if (name := split_name(doc["meta"])) is not None:
                    splits[name] = splits.get(name, 0) + 1
                sink.write(members)
        shards.append(rel)
        sizes.append(n)
    manifest = DatasetManifest(
        version=version, shards=shards, shard_sizes=sizes, num_samples=sum(sizes),
        counts={"input": sum(sizes), "ok": sum(sizes), "rejected": 0, "extracted": sum(sizes)},
        index=f"index/{version:06d}.parquet", feature_dims=dict(cfg.feature_dims), labels=sort_labels(labels),
        splits=dict(sorted(splits.items())))
    os.makedirs(os.path.join(out, "versions"), exist_ok=True)
    for rel in (version_path(version), "dataset.json"):
        with open(os.path.join(out, rel), "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
    return manifest


def write_tiny_tokenizer(folder: str) -> str:
    """A WordPiece tokenizer covering the synthetic captions, saved to ``folder`` (for tests and demos)."""
    from transformers import BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", *CLASS_WORDS, *ATTR_WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder
