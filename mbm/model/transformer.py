"""Pre-norm Transformer blocks on ``scaled_dot_product_attention``; masks are bool, True = a real token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} must be divisible by --heads {self.n_heads}")
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError("--layers and --heads must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor,
                causal: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        S = ctx.shape[1]
        q = self.q(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, C/H)
        k, v = self.kv(ctx).view(B, S, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, S, C/H)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        if causal:
            mask = mask & torch.ones(T, S, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Self-attention (optionally causal), optional cross-attention to a memory, then an MLP; all pre-norm."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln_x = nn.LayerNorm(cfg.d_model) if cross else None
        self.cross = Attention(cfg) if cross else None
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, mask, causal=causal))  # (B, T, C)
        if self.cross is not None:
            x = x + self.drop(self.cross(self.ln_x(x), memory, memory_mask))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """A stack of pre-norm blocks with a final LayerNorm; padded positions never act as keys."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, cross=cross) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, memory, memory_mask, causal)
        return self.ln(x)  # (B, T, C)
