"""The multimodal model: modality embeddings → fusion (+ Transformer encoder) → task head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mbm.model.decoder import DecoderConfig, TextDecoder
from mbm.model.embed import POSITIONAL, ModalityEmbedding
from mbm.model.fusion import FUSIONS, Fused, build_fusion
from mbm.model.heads import ClassifyHead, RetrievalHead
from mbm.model.transformer import TransformerConfig

TASKS = ("classify", "retrieve", "generate")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    task: str
    feature_dims: dict[str, int]  # modality → feature width, from the dataset
    fusion: str = "concat"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    positional: str = "sinusoidal"
    max_len: int = 512  # longest token sequence per modality
    num_labels: int = 0  # classify
    class_weights: tuple[float, ...] | None = None  # classify: the loss weight of each label (--class-weights)
    pair: tuple[str, str] | None = None  # retrieve
    embed_dim: int = 128  # retrieve
    decoder: DecoderConfig | None = None  # generate

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.positional not in POSITIONAL:
            raise ValueError(f"--positional must be one of {', '.join(POSITIONAL)}, got {self.positional!r}")
        if self.task == "classify" and self.num_labels < 2:
            raise ValueError(f"classify needs at least 2 labels in the dataset, found {self.num_labels}")
        if self.class_weights is not None and (len(self.class_weights) != self.num_labels
                                               or not all(w >= 0 for w in self.class_weights)):
            raise ValueError(f"class weights must be {self.num_labels} numbers >= 0, one per label, got "
                             f"{self.class_weights}")
        if self.task == "retrieve" and (not self.pair or any(m not in self.feature_dims for m in self.pair)):
            raise ValueError(f"--pair {self.pair} must name two modalities of the dataset {list(self.feature_dims)}")
        if self.task == "generate" and self.decoder is None:
            raise ValueError("generate needs a tokenizer (--tokenizer)")
        if self.task == "generate" and not self.input_modalities():
            raise ValueError(f"generate writes a sample's text from its image or audio features, and this dataset "
                             f"has {', '.join(self.feature_dims) or 'no'} features only: preprocess it with "
                             "[extract.image] or [extract.audio], or train --task classify or retrieve on it")

    def input_modalities(self) -> list[str]:
        """Modalities the encoder reads: all for classify, the pair for retrieve, all but text for generate."""
        if self.task == "retrieve":
            return list(self.pair or ())
        if self.task == "generate":
            return [m for m in self.feature_dims if m != "text"]
        return list(self.feature_dims)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["transformer"] = TransformerConfig(**d["transformer"])
        d["decoder"] = DecoderConfig(**d["decoder"]) if d.get("decoder") else None
        d["pair"] = tuple(d["pair"]) if d.get("pair") else None
        d["class_weights"] = tuple(d["class_weights"]) if d.get("class_weights") else None
        return cls(**d)


class MultimodalModel(nn.Module):
    """``forward(batch)`` returns {"loss", ...task outputs}; batches come from ``mbm.data.collate``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t = cfg.transformer
        self.embed = ModalityEmbedding(cfg.feature_dims, t.d_model, cfg.max_len, cfg.positional, t.dropout)
        self.fusion = build_fusion(cfg.fusion, t, list(cfg.feature_dims))
        if cfg.task == "classify":
            self.head = ClassifyHead(t.d_model, cfg.num_labels, t.dropout, cfg.class_weights)
        elif cfg.task == "retrieve":
            self.head = RetrievalHead(t.d_model, cfg.embed_dim)
        else:
            self.head = TextDecoder(cfg.decoder, t)

    def fuse(self, batch: dict[str, Any], modalities: list[str]) -> Fused:
        tokens = self.embed(batch["features"], modalities)  # m → (B, T_m, C)
        return self.fusion(tokens, {m: batch["masks"][m] for m in modalities})

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.task == "classify":
            logits = self.head(self.fuse(batch, cfg.input_modalities()).pooled)  # (B, num_labels)
            return {"loss": self.head.loss(logits, batch["labels"]), "logits": logits}
        if cfg.task == "retrieve":
            a, b = cfg.pair
            za, zb = self.head(self.fuse(batch, [a]).pooled, self.fuse(batch, [b]).pooled)  # (B, E) each
            content = batch.get("content", {})
            groups = (content[a], content[b]) if a in content and b in content else None
            return {"loss": self.head.loss(za, zb, groups), "za": za, "zb": zb}
        fused = self.fuse(batch, cfg.input_modalities())
        return {"loss": self.head.loss(batch["target_ids"], batch["target_mask"], fused.tokens, fused.mask)}

    @torch.no_grad()
    def unit_embeddings(self, batch: dict[str, Any], modality: str) -> torch.Tensor:
        """A retrieve model's unit embeddings (B, E) of one of its pair's modalities, as ``forward`` gives them
        (``za`` for the pair's first, ``zb`` for its second); rows of samples without it mean nothing."""
        if self.cfg.task != "retrieve" or modality not in (self.cfg.pair or ()):
            raise ValueError(f"embeddings are a retrieve run's, of its pair {self.cfg.pair}; got {modality!r} of a "
                             f"{self.cfg.task} run")
        pooled = self.fuse(batch, [modality]).pooled
        proj = self.head.proj_a if modality == self.cfg.pair[0] else self.head.proj_b
        return torch.nn.functional.normalize(proj(pooled), dim=-1)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], beam: int = 1, max_new: int | None = None) -> list[list[int]]:
        """Token ids decoded from each sample's non-text features (greedy when ``beam`` is 1)."""
        if self.cfg.task != "generate":
            raise ValueError(f"this run was trained for {self.cfg.task}, not generate")
        fused = self.fuse(batch, self.cfg.input_modalities())
        return self.head.beam_search(fused.tokens, fused.mask, beam=beam, max_new=max_new)
