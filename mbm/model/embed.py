"""Inputs → tokens: per-modality projection to d_model, modality-type embedding, positional encoding."""

from __future__ import annotations

import math

import torch
from torch import nn

POSITIONAL = ("sinusoidal", "learned", "none")


def sinusoidal(max_len: int, d_model: int) -> torch.Tensor:
    """(max_len, d_model) sinusoidal position table."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


class Positions(nn.Module):
    """Adds a position code to (B, T, C); ``kind`` is sinusoidal, learned or none."""

    def __init__(self, kind: str, max_len: int, d_model: int) -> None:
        super().__init__()
        if kind not in POSITIONAL:
            raise ValueError(f"--positional must be one of {', '.join(POSITIONAL)}, got {kind!r}")
        self.kind, self.max_len = kind, max_len
        if kind == "sinusoidal":
            self.register_buffer("table", sinusoidal(max_len, d_model), persistent=False)
        elif kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if self.kind == "none":
            return x
        T = x.shape[1]
        if offset + T > self.max_len:
            raise ValueError(f"sequence of {offset + T} tokens exceeds the model's max_len {self.max_len}")
        return x + self.table[offset: offset + T]


class ModalityEmbedding(nn.Module):
    """Features of each modality (B, T_m, dim_m) → tokens (B, T_m, C) with type and position codes."""

    def __init__(self, feature_dims: dict[str, int], d_model: int, max_len: int, positional: str,
                 dropout: float) -> None:
        super().__init__()
        self.modalities = list(feature_dims)
        # LayerNorm first: extractors differ wildly in scale (MiniLM ~1, EfficientNet ~10, log-mel dB).
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model))
                                   for m, d in feature_dims.items()})
        self.type_embed = nn.Embedding(len(self.modalities), d_model)
        self.pos = Positions(positional, max_len, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, features: dict[str, torch.Tensor], modalities: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for m in modalities:
            norm = self.proj[m][0]
            x = self.proj[m](features[m].to(norm.weight.dtype))  # (B, T_m, C); batches carry float16
            x = self.pos(x + self.type_embed.weight[self.modalities.index(m)])
            out[m] = self.drop(x)
        return out
