"""Fusion strategies: modality tokens → one pooled vector (B, C) plus a token memory (B, T, C).

Every strategy takes ``tokens[m]`` (B, T_m, C) and ``masks[m]`` (B, T_m) for any non-empty subset
of the model's modalities, so the same module embeds one modality alone (retrieval) or all of them.
Learned summary ([CLS]-like) tokens are always valid, so no attention row is ever fully masked,
even for a sample that lacks every modality in the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mbm.model.transformer import Encoder, TransformerConfig

FUSIONS = ("concat", "weighted_sum", "gated", "cross_attention")


@dataclass
class Fused:
    pooled: torch.Tensor  # (B, C)
    tokens: torch.Tensor  # (B, T, C) memory for a decoder
    mask: torch.Tensor  # (B, T) True = real token


def _summary(param: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    return param.expand(B, -1, -1), torch.ones(B, param.shape[1], dtype=torch.bool, device=param.device)


class ConcatFusion(nn.Module):
    """Token-level early fusion: [CLS] + every modality's tokens in one sequence through the encoder."""

    def __init__(self, cfg: TransformerConfig, modalities: list[str]) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.encoder = Encoder(cfg)

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> Fused:
        B = next(iter(tokens.values())).shape[0]
        cls, cls_mask = _summary(self.cls, B)
        x = torch.cat([cls, *tokens.values()], dim=1)  # (B, 1 + ΣT_m, C)
        mask = torch.cat([cls_mask, *masks.values()], dim=1)
        h = self.encoder(x, mask)
        return Fused(pooled=h[:, 0], tokens=h, mask=mask)


class LateFusion(nn.Module):
    """Encode each modality alone ([CLS_m] + tokens, shared encoder); subclasses combine the pooled vectors."""

    def __init__(self, cfg: TransformerConfig, modalities: list[str]) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.cls = nn.Parameter(torch.randn(len(modalities), 1, cfg.d_model) * 0.02)
        self.encoder = Encoder(cfg)

    def combine(self, pooled: torch.Tensor, present: torch.Tensor, index: list[int]) -> torch.Tensor:
        """(B, M, d) pooled vectors and (B, M) presence → (B, d); each late fusion defines its own."""
        raise NotImplementedError(f"{type(self).__name__} must define combine()")

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> Fused:
        index = [self.modalities.index(m) for m in tokens]
        seqs, seq_masks, pooled = [], [], []
        for i, m in zip(index, tokens, strict=True):
            cls, cls_mask = _summary(self.cls[i: i + 1], tokens[m].shape[0])
            h = self.encoder(torch.cat([cls, tokens[m]], 1), torch.cat([cls_mask, masks[m]], 1))  # (B, 1+T_m, C)
            present = masks[m].any(dim=1)  # (B,)
            seqs.append(h)
            seq_masks.append(torch.cat([present[:, None], masks[m]], 1))
            pooled.append(h[:, 0])
        pooled_t = torch.stack(pooled, dim=1)  # (B, M', C)
        present_t = torch.stack([m.any(dim=1) for m in masks.values()], dim=1)  # (B, M')
        fused = self.combine(pooled_t, present_t, index)  # (B, C)
        ones = torch.ones_like(present_t[:, :1])
        return Fused(pooled=fused, tokens=torch.cat([fused[:, None], *seqs], 1),
                     mask=torch.cat([ones, *seq_masks], 1))


def _masked_softmax(logits: torch.Tensor, present: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over present modalities; a sample with none present gets uniform weights (over zeros)."""
    none = ~present.any(dim=1, keepdim=True)
    keep = present | none
    while keep.dim() < logits.dim():
        keep = keep.unsqueeze(-1)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=dim)


class WeightedSumFusion(LateFusion):
    """Learned softmax weights over the pooled modality vectors (absent modalities get weight 0)."""

    def __init__(self, cfg: TransformerConfig, modalities: list[str]) -> None:
        super().__init__(cfg, modalities)
        self.logits = nn.Parameter(torch.zeros(len(modalities)))

    def combine(self, pooled: torch.Tensor, present: torch.Tensor, index: list[int]) -> torch.Tensor:
        logits = self.logits[index].expand_as(present)  # (B, M')
        w = _masked_softmax(logits, present, dim=1)
        return (w[..., None] * pooled).sum(dim=1)  # (B, C)


class GatedFusion(LateFusion):
    """Gated multimodal unit: h_m = tanh(W_m v_m), z = softmax_m(W_z [v_1; …; v_M]), out = Σ_m z_m ⊙ h_m."""

    def __init__(self, cfg: TransformerConfig, modalities: list[str]) -> None:
        super().__init__(cfg, modalities)
        C, M = cfg.d_model, len(modalities)
        self.hidden = nn.ModuleList(nn.Linear(C, C) for _ in modalities)
        self.gate = nn.Linear(M * C, M * C)

    def combine(self, pooled: torch.Tensor, present: torch.Tensor, index: list[int]) -> torch.Tensor:
        B, _, C = pooled.shape
        full = pooled.new_zeros(B, len(self.modalities), C)  # absent modalities enter the gate as zeros
        full[:, index] = pooled * present[..., None]
        z = self.gate(full.flatten(1)).view(B, -1, C)[:, index]  # (B, M', C)
        z = _masked_softmax(z, present, dim=1)
        h = torch.stack([torch.tanh(self.hidden[i](pooled[:, j])) for j, i in enumerate(index)], dim=1)
        return (z * h).sum(dim=1)  # (B, C)


class CrossAttentionFusion(nn.Module):
    """[CLS] + text tokens attend to the encoded image/audio tokens (plus an always-valid null token)."""

    def __init__(self, cfg: TransformerConfig, modalities: list[str]) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.null = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.context = Encoder(cfg)
        self.query = Encoder(cfg, cross=True)

    def forward(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> Fused:
        B = next(iter(tokens.values())).shape[0]
        cls, cls_mask = _summary(self.cls, B)
        null, null_mask = _summary(self.null, B)
        text = [m for m in tokens if m == "text"]
        other = [m for m in tokens if m != "text"]
        q = torch.cat([cls, *(tokens[m] for m in text)], 1)  # (B, 1 + T_text, C)
        q_mask = torch.cat([cls_mask, *(masks[m] for m in text)], 1)
        ctx_mask = torch.cat([null_mask, *(masks[m] for m in other)], 1)
        ctx = self.context(torch.cat([null, *(tokens[m] for m in other)], 1), ctx_mask)  # (B, 1 + ΣT_m, C)
        h = self.query(q, q_mask, memory=ctx, memory_mask=ctx_mask)
        return Fused(pooled=h[:, 0], tokens=torch.cat([h, ctx], 1), mask=torch.cat([q_mask, ctx_mask], 1))


def build_fusion(name: str, cfg: TransformerConfig, modalities: list[str]) -> nn.Module:
    """The fusion module called ``name`` over ``modalities``."""
    classes = {"concat": ConcatFusion, "weighted_sum": WeightedSumFusion, "gated": GatedFusion,
               "cross_attention": CrossAttentionFusion}
    if name not in classes:
        raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, got {name!r}")
    return classes[name](cfg, modalities)
