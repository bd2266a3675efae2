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
    """At most ``max_len`` rows: text keeps its first tokens, image/audio are average-pooled in time (float32)."""
    n = arr.shape[0]
    if not max_len or n <= max_len:
        return arr
    if modality == "text":
        return arr[:max_len]
    starts = np.linspace(0, n, max_len + 1).astype(np.int64)
    sums = np.add.reduceat(_to_float32(arr).numpy(), starts[:-1], axis=0)
    # float32 / float32 rounds to the same value as float64 division rounded to float32
    return np.divide(sums, np.diff(starts).astype(np.float32)[:, None], out=sums)


def pad_modality(arrays: list[np.ndarray | None], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, dim) float32 zero-padded features and (B, T) bool mask; absent samples are all False."""
    present = [a for a in arrays if a is not None]
    T = max([a.shape[0] for a in present], default=1)
    # Padding in float16 (the shards' dtype) copies without casting; one cast to float32 follows.
    dtype = np.float16 if present and all(a.dtype == np.float16 for a in present) else np.float32
    x = np.zeros((len(arrays), T, dim), dtype)
    lengths = np.zeros(len(arrays), np.int64)
    for i, a in enumerate(arrays):
        if a is not None:
            x[i, : a.shape[0]] = a
            lengths[i] = a.shape[0]
    mask = torch.arange(T)[None, :] < torch.from_numpy(lengths)[:, None]
    return _to_float32(x), mask


_SERIAL = 32768  # elements; torch copies fewer than this on the calling thread (at::internal::GRAIN_SIZE)


def _to_float32(x: np.ndarray) -> torch.Tensor:
    """A float32 tensor of ``x`` (shared when ``x`` is a writable, C-contiguous float32 array, else a copy).

    torch casts float16 several times faster than numpy. The copy goes in chunks that torch runs on
    this thread: a parallel copy leaves OpenMP threads spinning afterwards, which slows the numpy work
    that follows when the cores are shared.
    """
    if x.dtype != np.float16:  # other dtypes, and float16 of the other byte order: numpy's cast
        x = np.asarray(x, dtype=np.float32)
    if not (x.flags.writeable and x.flags.c_contiguous):
        x = x.copy()  # torch wraps only writable arrays with non-negative strides
    src = torch.from_numpy(x)
    if src.dtype == torch.float32:
        return src
    out = torch.empty(x.shape, dtype=torch.float32)
    flat, src = out.view(-1), src.reshape(-1)
    for start in range(0, src.numel(), _SERIAL):
        flat[start:start + _SERIAL].copy_(src[start:start + _SERIAL])
    return out


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
