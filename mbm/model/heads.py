"""Task heads on the fused representation: classification and contrastive retrieval."""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class ClassifyHead(nn.Module):
    """Pooled (B, C) → logits (B, num_labels); labels index the run's label vocabulary. ``class_weights``: a
    weight per label in the cross-entropy (the weighted mean over the batch), e.g. against uneven classes."""

    def __init__(self, d_model: int, num_labels: int, dropout: float,
                 class_weights: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Dropout(dropout), nn.Linear(d_model, num_labels))
        # not in the state dict: the model config holds the weights, and older checkpoints load as they are
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.class_weight
        if weight is not None and not torch.is_autocast_enabled(logits.device.type):
            # cross_entropy takes weights of the logits' dtype; under autocast it computes in float32 from
            # the weights as given, and bfloat16 logits must not round them (0.8333 -> 0.8320)
            weight = weight.to(logits.dtype)
        return F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE)


class RetrievalHead(nn.Module):
    """Projects two modalities' embeddings to a shared unit sphere; symmetric InfoNCE with a learned temperature."""

    def __init__(self, d_model: int, embed_dim: int) -> None:
        super().__init__()
        self.proj_a = nn.Linear(d_model, embed_dim)
        self.proj_b = nn.Linear(d_model, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.proj_a(a), dim=-1), F.normalize(self.proj_b(b), dim=-1)  # (B, E) each

    def loss(self, za: torch.Tensor, zb: torch.Tensor,
             groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the batch. ``groups``: per row, ids of its a-side and b-side content; a
        pair other than the row's own whose a or b content is the row's (the same picture under another
        caption in the batch) is left out of the negatives rather than pushed apart."""
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * za @ zb.T  # (B, B)
        target = torch.arange(za.shape[0], device=za.device)
        if groups is not None:
            ga, gb = groups
            same = (ga[:, None] == ga[None, :]) | (gb[:, None] == gb[None, :])
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))  # no .any(): a step does not wait for the device
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def recall_at_k(za: torch.Tensor, zb: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                groups: tuple[torch.Tensor, torch.Tensor] | None = None, chunk: int = 4096) -> dict[str, float]:
    """Recall@k of matching pairs (row i of za ↔ row i of zb), averaged over both directions.

    ``groups``: for each row, ids of its a-side and its b-side content; a retrieved row counts as a match
    when either side's content is the query's (the same picture under another of its captions, the same
    caption of another picture). Without them, with COCO-style data (five captions of one picture in the
    split), one picture's copies tie, and its other captions count as misses. Rows are ranked ``chunk``
    queries at a time, so memory stays (chunk, N), not (N, N)."""
    n = za.shape[0]
    ga, gb = groups if groups is not None else (torch.arange(n), torch.arange(n))
    ga, gb = ga.to(za.device), gb.to(za.device)
    k_max = min(max(ks), zb.shape[0])
    hits = {k: 0.0 for k in ks}
    for queries, keys in ((za, zb), (zb, za)):
        for start in range(0, n, chunk):
            top = (queries[start:start + chunk] @ keys.T).topk(k_max, dim=1).indices  # (chunk, k_max)
            rows = torch.arange(start, start + top.shape[0], device=za.device)[:, None]
            match = (ga[top] == ga[rows]) | (gb[top] == gb[rows])
            for k in ks:
                hits[k] += float(match[:, :min(k, k_max)].any(1).sum())
    return {f"recall@{k}": hits[k] / (2 * n) for k in ks}


def chance_at_k(k: int, groups: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Recall@k of a ranking drawn at random, matches counted as ``recall_at_k`` counts them with ``groups``: a
    row with m matching rows (itself included) among n finds one in its top k with 1 - C(n - m, k) / C(n, k).
    With five captions per picture in the split, that is about 5 k / n, not k / n."""
    ga, gb = (g.tolist() for g in groups)
    by_a, by_b, by_both = Counter(ga), Counter(gb), Counter(zip(ga, gb, strict=True))
    total = 0.0
    for a, b in zip(ga, gb, strict=True):
        matches = by_a[a] + by_b[b] - by_both[a, b]  # rows sharing either side's content with this one
        miss = 1.0
        for t in range(min(k, len(ga))):  # C(n - m, k) / C(n, k) as a product, no huge integers
            miss *= max(len(ga) - matches - t, 0) / (len(ga) - t)
        total += 1.0 - miss
    return total / len(ga) if ga else 0.0
