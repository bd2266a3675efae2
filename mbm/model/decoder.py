"""Text generation head: a Transformer decoder over the tokenizer vocabulary, with greedy and beam search."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mbm.model.embed import Positions
from mbm.model.transformer import Encoder, TransformerConfig


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    vocab_size: int
    bos: int
    eos: int
    pad: int
    max_len: int = 32  # target tokens, [BOS] and [EOS] included
    n_layers: int = 2
    vocab_digest: str | None = None  # the tokenizer's (``vocab_digest``); None in runs from before it was kept

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.max_len < 2:
            raise ValueError("generate needs vocab_size >= 2 and --max-target-len >= 2")


class TextDecoder(nn.Module):
    """Causal self-attention over target tokens, cross-attention to the fused memory; tied output embedding."""

    def __init__(self, cfg: DecoderConfig, block: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, block.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = Positions("sinusoidal", cfg.max_len, block.d_model)
        layers = TransformerConfig(d_model=block.d_model, n_layers=cfg.n_layers, n_heads=block.n_heads,
                                   mlp_ratio=block.mlp_ratio, dropout=block.dropout)
        self.blocks = Encoder(layers, cross=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, V) for ids (B, L)."""
        x = self.pos(self.embed(ids))  # (B, L, C)
        h = self.blocks(x, mask, memory=memory, memory_mask=memory_mask, causal=True)
        return h @ self.embed.weight.T  # (B, L, V)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor,
             memory_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each real next token (teacher forcing)."""
        logits = self.forward(ids[:, :-1], mask[:, :-1], memory, memory_mask)  # (B, L-1, V)
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)

    @torch.no_grad()
    def greedy(self, memory: torch.Tensor, memory_mask: torch.Tensor, max_new: int | None = None) -> list[list[int]]:
        """Most likely token at every step, until [EOS]; returns ids without [BOS]/[EOS]."""
        return self.beam_search(memory, memory_mask, beam=1, max_new=max_new)

    @torch.no_grad()
    def beam_search(self, memory: torch.Tensor, memory_mask: torch.Tensor, beam: int = 4,
                    max_new: int | None = None, length_penalty: float = 1.0) -> list[list[int]]:
        """Beam search per sample (beam=1 is greedy); scores are log-probs / length**length_penalty."""
        steps = min(max_new or self.cfg.max_len, self.cfg.max_len - 1)
        return [self._beam(memory[i: i + 1], memory_mask[i: i + 1], beam, steps, length_penalty)
                for i in range(memory.shape[0])]

    def _beam(self, memory: torch.Tensor, memory_mask: torch.Tensor, beam: int, steps: int,
              alpha: float) -> list[int]:
        cfg = self.cfg
        seqs = torch.full((1, 1), cfg.bos, dtype=torch.long, device=memory.device)  # (K, t)
        scores = torch.zeros(1, device=memory.device)
        done: list[tuple[float, list[int]]] = []
        for _ in range(steps):
            K = seqs.shape[0]
            logits = self.forward(seqs, torch.ones_like(seqs, dtype=torch.bool),
                                  memory.expand(K, -1, -1), memory_mask.expand(K, -1))[:, -1]  # (K, V)
            cand = (scores[:, None] + F.log_softmax(logits.float(), dim=-1)).flatten()  # (K*V,)
            top = cand.topk(min(2 * beam, cand.numel()))
            keep_seqs, keep_scores = [], []
            for rank, (score, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                src, tok = divmod(idx, logits.shape[1])
                ids = seqs[src].tolist()[1:] + [tok]
                if tok == cfg.eos:
                    if rank < beam:  # a finished hypothesis counts only if it would have been a beam
                        done.append((score / len(ids) ** alpha, ids[:-1]))
                elif len(keep_seqs) < beam:
                    keep_seqs.append([cfg.bos, *ids])
                    keep_scores.append(score)
            if not keep_seqs:
                break
            seqs = torch.tensor(keep_seqs, device=memory.device)
            scores = torch.tensor(keep_scores, device=memory.device)
            # enough ended, and the best of them scores above every beam still open (at its length so far)
            if len(done) >= beam and max(d[0] for d in done) >= max(keep_scores) / seqs.shape[1] ** alpha:
                break
        else:  # out of steps: the beams still open compete with those that ended (an early [EOS] may score less)
            done += [(float(s) / seqs.shape[1] ** alpha, q.tolist()[1:]) for s, q in zip(scores, seqs, strict=True)]
        return max(done, key=lambda d: d[0])[1]
