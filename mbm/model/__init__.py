"""The fusion + Transformer model: modality embeddings, fusion strategies, encoder, task heads."""

from mbm.model.decoder import DecoderConfig, TextDecoder
from mbm.model.fusion import FUSIONS, Fused, build_fusion
from mbm.model.heads import recall_at_k
from mbm.model.model import TASKS, ModelConfig, MultimodalModel
from mbm.model.transformer import TransformerConfig

__all__ = [
    "FUSIONS",
    "TASKS",
    "DecoderConfig",
    "Fused",
    "ModelConfig",
    "MultimodalModel",
    "TextDecoder",
    "TransformerConfig",
    "build_fusion",
    "recall_at_k",
]
