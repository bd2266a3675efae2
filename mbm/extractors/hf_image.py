"""Any local Hugging Face vision model: last_hidden_state tokens (ViT-like) or its feature map as patches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    images_to_tensor,
    normalize,
    prepare_for,
    to_patches,
)
from mbm.extractors.registry import register_extractor
from mbm.extractors.runtime import autocast, seeded
from mbm.extractors.text import HFFolderModel, read_hf_config


@dataclasses.dataclass(kw_only=True, frozen=True)
class HFImageConfig(ExtractorConfig):
    """A local Hugging Face vision model folder."""

    path: str | None = None
    image_size: int | None = None  # None: the model's config.json image_size (else 224)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_str("path")
        if self.image_size is not None:
            self._check_int("image_size", minimum=8)


def pixel_stats(path: str) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """(mean, std, scale) from the folder's preprocessor_config.json, ImageNet's when it has none.

    Only the normalization is taken from the processor: resizing already happened in the cleaner.
    """
    file = Path(path) / "preprocessor_config.json"
    spec = json.loads(file.read_text()) if file.is_file() else {}
    scale = 1.0 / float(spec.get("rescale_factor", 1 / 255)) if spec.get("do_rescale", True) else 1.0
    if not spec.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale
    return tuple(spec.get("image_mean", IMAGENET_MEAN)), tuple(spec.get("image_std", IMAGENET_STD)), scale


class HFImageModel(NamedTuple):
    model: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    image_size: int


@register_extractor
class HFImageExtractor(HFFolderModel, Extractor):
    """last_hidden_state of a local HF vision model (`AutoModel`): tokens (N, D) or patches (H*W, C)."""

    name = "hf-image"
    revision = 2  # 2: channels_last on the CPU, batch norms folded
    modality = "image"
    config_type = HFImageConfig
    location_fields = ("path",)

    def image_size(self) -> int:
        if self.config.image_size is not None:
            return self.config.image_size
        size = read_hf_config(self.config.path).get("image_size", 224)
        return size if isinstance(size, int) else int(size[0])

    def input_spec(self) -> dict[str, Any]:
        return {"image_size": self.image_size()}

    def load(self, device: str) -> HFImageModel:
        import torch
        from transformers import AutoModel

        self.check_files()
        size = self.image_size()
        with seeded(0):  # a pooler missing from the checkpoint initialises the same on every worker
            model = AutoModel.from_pretrained(self.config.path, local_files_only=True, dtype=torch.float32)
        return HFImageModel(prepare_for(model, device), *pixel_stats(self.config.path), size)

    def featurize(self, model: HFImageModel, batch: list, device: str) -> list[np.ndarray]:
        import torch

        pixels = images_to_tensor(batch, model.image_size, device, self.name)
        pixels = normalize(pixels, model.mean, model.std, model.scale)
        with torch.inference_mode(), autocast(device, self.config.precision):
            hidden = model.model(pixel_values=pixels).last_hidden_state  # (B, N, D) or (B, C, H, W)
        return to_patches(hidden, self.name)
