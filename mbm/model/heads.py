"""Task heads on the fused representation: classification and contrastive retrieval."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class ClassifyHead(nn.Module):
    """Pooled (B, C) → logits (B, num_labels); labels index the run's label vocabulary."""

    def __init__(self, d_model: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Dropout(dropout), nn.Linear(d_model, num_labels))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)


class RetrievalHead(nn.Module):
    """Projects two modalities' embeddings to a shared unit sphere; symmetric InfoNCE with a learned temperature."""

    def __init__(self, d_model: int, embed_dim: int) -> None:
        super().__init__()
        self.proj_a = nn.Linear(d_model, embed_dim)
        self.proj_b = nn.Linear(d_model, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.proj_a(a), dim=-1), F.normalize(self.proj_b(b), dim=-1)  # (B, E) each

    def loss(self, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * za @ zb.T  # (B, B)
        target = torch.arange(za.shape[0], device=za.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def recall_at_k(za: torch.Tensor, zb: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of matching pairs (row i of za ↔ row i of zb), averaged over both directions."""
    sim = za @ zb.T  # (N, N)
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        a2b = (sim.topk(kk, dim=1).indices == target[:, None]).any(1).float().mean()
        b2a = (sim.T.topk(kk, dim=1).indices == target[:, None]).any(1).float().mean()
        out[f"recall@{k}"] = float((a2b + b2a) / 2)
    return out
