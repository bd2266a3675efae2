"""Collate: a list of ``Sample`` → padded tensors and masks per modality (True = a real token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mbm.data.decode import Sample
from mbm.data.source import label_key
from mbm.data.tokenizer import encode_targets, load_tokenizer, special_tokens

TASKS = ("classify", "retrieve", "generate")
IGNORE = -100  # label of a sample without one (ignored by cross-entropy)


@dataclass(frozen=True, kw_only=True)
class CollateConfig:
    feature_dims: dict[str, int]  # modalities the model reads → feature width
    max_tokens: dict[str, int] = field(default_factory=dict)  # longer sequences: text truncated, others pooled
    labels: tuple[Any, ...] = ()  # label vocabulary (classify)
    tokenizer: str | None = None  # generate: tokenizer folder (None: the text extractor's)
    max_target_len: int = 32
    with_targets: bool = False  # generate: tokenize the text


def fit_length(arr: np.ndarray, max_len: int | None, modality: str) -> np.ndarray:
    """At most ``max_len`` rows: text keeps its first tokens, image/audio are average-pooled in time."""
    n = arr.shape[0]
    if not max_len or n <= max_len:
        return arr
    if modality == "text":
        return arr[:max_len]
    starts = np.linspace(0, n, max_len + 1).astype(np.int64)
    sums = np.add.reduceat(arr.astype(np.float32), starts[:-1], axis=0)
    return sums / np.diff(starts)[:, None]


def pad_modality(arrays: list[np.ndarray | None], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, dim) float32 zero-padded features and (B, T) bool mask; absent samples are all False."""
    T = max([a.shape[0] for a in arrays if a is not None], default=1)
    x = np.zeros((len(arrays), T, dim), np.float32)
    mask = np.zeros((len(arrays), T), bool)
    for i, a in enumerate(arrays):
        if a is not None:
            x[i, : a.shape[0]] = a
            mask[i, : a.shape[0]] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def pad_ids(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) int64 ids padded with ``pad`` and their (B, L) bool mask."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def collate(samples: list[Sample], cfg: CollateConfig) -> dict[str, Any]:
    """A batch dict: ids, texts, features/masks per modality, present (B, M), labels (B,), targets for generate."""
    features, masks = {}, {}
    for m, dim in cfg.feature_dims.items():
        arrays = [fit_length(s.features[m], cfg.max_tokens.get(m), m) if m in s.features else None
                  for s in samples]
        features[m], masks[m] = pad_modality(arrays, dim)
    index = {label_key(v): i for i, v in enumerate(cfg.labels)}
    labels = [index.get(label_key(s.label), IGNORE) if s.label is not None else IGNORE for s in samples]
    batch: dict[str, Any] = {
        "ids": [s.id for s in samples],
        "texts": [s.text for s in samples],
        "features": features,
        "masks": masks,
        "present": torch.tensor([[m in s.features for m in cfg.feature_dims] for s in samples], dtype=torch.bool),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if cfg.with_targets:
        tok = load_tokenizer(cfg.tokenizer)
        seqs = encode_targets(tok, [s.text or "" for s in samples], cfg.max_target_len)
        batch["target_ids"], batch["target_mask"] = pad_ids(seqs, special_tokens(tok).pad)
    return batch


def batch_to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with every tensor (also inside dicts) on ``device``."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v
    return {k: move(v) for k, v in batch.items()}
