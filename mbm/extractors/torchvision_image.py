"""Any torchvision classification architecture, weights from a local state dict, last feature map as patches."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_weights_file,
    images_to_tensor,
    load_state_dict_file,
    load_strict,
    normalize,
    prepare_for,
    to_patches,
)
from mbm.extractors.registry import register_extractor
from mbm.extractors.runtime import autocast, seeded

_POOL_NODES = ("avgpool", "adaptive_avg_pool", "mean")


@dataclasses.dataclass(kw_only=True, frozen=True)
class TorchvisionConfig(ExtractorConfig):
    """A torchvision architecture by name with a local state dict."""

    arch: str = "resnet18"
    weights: str | None = None  # local state dict (torch.save); never downloaded
    allow_random: bool = False  # weights=None is only accepted when this says so
    seed: int = 0  # random init (weights=None) is seeded so every worker computes the same features
    image_size: int = 224
    node: str | None = None  # graph node whose output is the feature map; None: the input of the global pool
    num_classes: int = 1000  # head size of the checkpoint (the head is built to load strictly, then unused)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_str("arch")
        self._check_str("weights", optional=True)
        self._check_bool("allow_random")
        self._check_int("seed", minimum=0)
        self._check_int("image_size", minimum=32)
        self._check_str("node", optional=True)
        self._check_int("num_classes")
        if self.weights is None and not self.allow_random:
            self._fail(
                "weights", "is required (a local state dict path); set allow_random=true for random init"
            )


def feature_node(model: Any, arch: str) -> str:
    """The graph node feeding the last global pooling: the final spatial feature map."""
    from torchvision.models.feature_extraction import get_graph_node_names

    names = get_graph_node_names(model)[1]  # eval-mode nodes, in execution order
    pools = [i for i, n in enumerate(names) if n.rsplit(".", 1)[-1].startswith(_POOL_NODES)]
    if not pools or pools[-1] == 0:
        raise ValueError(f"cannot find the global pooling of {arch!r}; set `node` to one of its graph nodes")
    return names[pools[-1] - 1]


@register_extractor
class TorchvisionExtractor(Extractor):
    """Last spatial feature map of a torchvision classifier as patches (H*W, C), ImageNet normalization."""

    name = "torchvision"
    revision = 2  # 2: channels_last on the CPU, batch norms folded
    modality = "image"
    config_type = TorchvisionConfig
    location_fields = ("weights",)

    def __init__(self, config: TorchvisionConfig | None = None) -> None:
        super().__init__(config)
        self._dim: int | None = None

    def input_spec(self) -> dict[str, Any]:
        return {"image_size": self.config.image_size}

    def weight_paths(self) -> list[str]:
        return [self.config.weights] if self.config.weights else []

    def preload_modules(self) -> list[str]:
        return ["torchvision"]

    def check_files(self) -> None:
        if self.config.weights:
            check_weights_file(self.config.weights)

    def build(self, device: str = "cpu") -> Any:
        """The whole classifier, randomly initialised (seeded), on `device` ("meta": shapes only)."""
        import torch
        import torchvision

        arch = self.config.arch
        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=3)
            raise ValueError(
                f"unknown torchvision arch {arch!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        kwargs = {"weights": None, "num_classes": self.config.num_classes}
        if device != "meta":
            with seeded(self.config.seed):
                return torchvision.models.get_model(arch, **kwargs).eval()
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(arch, **kwargs).eval()
        except (NotImplementedError, RuntimeError):  # builders that compute with tensors (regnet)
            return torchvision.models.get_model(arch, **kwargs).to("meta").eval()

    def feature_module(self, model: Any) -> Any:
        """`model` cut at the feature node; returns {"features": tensor}."""
        from torchvision.models.feature_extraction import create_feature_extractor

        node = self.config.node or feature_node(model, self.config.arch)
        try:
            return create_feature_extractor(model, return_nodes={node: "features"})
        except ValueError as exc:
            raise ValueError(f"{self.config.arch}: bad feature node {node!r}: {exc}") from None

    @property
    def dim(self) -> int:
        if self._dim is None:
            import torch

            size = self.config.image_size
            module = self.feature_module(self.build("meta"))
            with torch.inference_mode():
                features = module(torch.empty(1, 3, size, size, device="meta"))["features"]
            self._dim = int(features.shape[1 if features.dim() == 4 else -1])
        return self._dim

    def load(self, device: str) -> Any:
        model = self.build()
        if self.config.weights:
            load_strict(model, load_state_dict_file(self.config.weights), self.config.weights)
        return prepare_for(self.feature_module(model), device)

    def featurize(self, model: Any, batch: list, device: str) -> list[np.ndarray]:
        import torch

        pixels = images_to_tensor(batch, self.config.image_size, device, self.name)
        pixels = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
        with torch.inference_mode(), autocast(device, self.config.precision):
            features = model(pixels)["features"]  # (B, C, H, W), or (B, N, C) for a token node
        return to_patches(features, self.name)
