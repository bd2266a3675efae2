"""The default models as a user writes them without mbm: the baselines' ``--stock`` models.

By default the baselines call mbm's extractor classes, so what those do (EfficientNet-Lite0 with its batch
norms folded and its ReLU6s fused into oneDNN convolutions in channels_last, MiniLM without
transformers in fixed-shape passes from packed weights) they do too, and the comparison isolates what
only mbm's runtime adds. With ``--stock`` they load the same weights the way a user's own script does:

- text (``minilm``): transformers' ``AutoTokenizer`` and ``AutoModel`` from the same folder, each batch
  padded to its longest text (``padding=True, truncation=True, max_length``), float32;
  ``last_hidden_state`` of each text's real tokens;
- image (``efficientnet-lite0``): ``efficientnet_lite_pytorch``'s ``EfficientNet`` with the same state
  dict, eval mode, NCHW, ``extract_features`` of ``(pixels - 127) / 128``;
- anything else (log-mel audio, other extractors a job names): mbm's class, as by default.

Both take mbm's cleaned values (the same decode and cleaning) and give the same features up to float
rounding (dynamic padding changes a text's pass shape, and so the last bits of its float32 sums).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class StockMiniLM:
    """MiniLM through transformers, as a user calls it."""

    def __init__(self, path: str, max_length: int) -> None:
        self.path, self.max_length = path, max_length

    def load(self, device: str) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path), AutoModel.from_pretrained(self.path).eval().to(device)

    def featurize(self, model: tuple[Any, Any], texts: list[str], device: str) -> list[np.ndarray]:
        import torch

        tokenizer, encoder = model
        enc = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = encoder(**enc.to(device)).last_hidden_state
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        return [hidden[i, :n].float().cpu().numpy().astype(np.float16) for i, n in enumerate(lengths)]


class StockEfficientNetLite0:
    """EfficientNet-Lite0's feature map through ``efficientnet_lite_pytorch`` in eval mode, as a user calls it."""

    def __init__(self, weights: str, image_size: int, mean: float, std: float) -> None:
        self.weights, self.image_size = weights, image_size
        self.mean, self.std = mean, std  # the Lite models' TF preprocessing, as mbm's extractor takes it

    def load(self, device: str) -> Any:
        from efficientnet_lite_pytorch import EfficientNet

        from mbm.extractors.image import load_state_dict_file  # torch.load, unwrapping {"state_dict": ...}

        model = EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size)
        model.load_state_dict(load_state_dict_file(self.weights))
        return model.eval().to(device)

    def featurize(self, model: Any, images: list[np.ndarray], device: str) -> list[np.ndarray]:
        import torch

        pixels = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            features = model.extract_features((pixels - self.mean) / self.std)  # (B, 1280, H/32, W/32)
        return list(features.flatten(2).transpose(1, 2).float().cpu().numpy().astype(np.float16))


def stock(name: str, extractor: Any) -> Any | None:
    """The stock counterpart of mbm's ``extractor`` (registered as ``name``), or None where mbm's class is
    what a user would call too."""
    if name == "minilm":
        return StockMiniLM(extractor.model_path(), extractor.config.max_length)
    if name == "efficientnet-lite0":
        return StockEfficientNetLite0(extractor.weights_path(), extractor.config.image_size, extractor.MEAN,
                                      extractor.STD)
    return None
