"""Any local wav2vec2-style Hugging Face speech encoder (wav2vec2, HuBERT, WavLM): last_hidden_state frames."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.registry import register_extractor
from mbm.extractors.runtime import autocast, seeded, to_device, to_float16_numpy
from mbm.extractors.text import KINDS, WANTED, HFFolderModel, about_model, model_kind, read_hf_config


@dataclasses.dataclass(kw_only=True, frozen=True)
class HFAudioConfig(ExtractorConfig):
    """A local speech encoder folder (config.json with conv_kernel/conv_stride, weights, preprocessor)."""

    path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_str("path")


class HFAudioModel(NamedTuple):
    model: Any
    normalize: bool  # zero-mean unit-variance per clip, as the model's feature extractor does
    masked: bool  # layer-norm front ends take an attention mask; group-norm ones see padding, so run alone
    kernels: list[int]
    strides: list[int]

    def frames(self, num_samples: int) -> int:
        return output_frames(num_samples, self.kernels, self.strides)


def output_frames(num_samples: int, kernels: list[int], strides: list[int]) -> int:
    """Frames the convolutional front end makes of `num_samples` (0 when the clip is too short)."""
    length = num_samples
    for kernel, stride in zip(kernels, strides, strict=True):
        length = max(0, (length - kernel) // stride + 1)
    return length


@register_extractor
class HFAudioExtractor(HFFolderModel, Extractor):
    """last_hidden_state (frames, hidden) of a local wav2vec2-style encoder; ~50 frames per second."""

    name = "hf-audio"
    modality = "audio"
    config_type = HFAudioConfig
    location_fields = ("path",)

    def _preprocessor(self) -> dict[str, Any]:
        file = Path(self.config.path) / "preprocessor_config.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def input_spec(self) -> dict[str, Any]:
        return {"sample_rate": int(self._preprocessor().get("sampling_rate", 16000))}

    def check_files(self) -> None:
        """config.json must declare the convolutional front end over the waveform that ``load`` reads."""
        config = read_hf_config(self.config.path)
        if isinstance(config.get("conv_kernel"), list) and isinstance(config.get("conv_stride"), list):
            return
        kind = model_kind(config)
        held = f"holds {KINDS[kind]}" if kind not in (None, "audio") else "holds no wav2vec2-style encoder"
        raise ValueError(f"path = {self.config.path!r} {held} ({about_model(config)}; no conv_kernel and conv_stride "
                         f"lists of a front end over the waveform); set path to the folder of {WANTED['audio']}")

    def load(self, device: str) -> HFAudioModel:
        import torch
        from transformers import AutoModel

        self.check_files()
        config = read_hf_config(self.config.path)
        with seeded(0):  # weights missing from the checkpoint initialise the same on every worker
            model = AutoModel.from_pretrained(self.config.path, local_files_only=True, dtype=torch.float32)
        normalize = bool(self._preprocessor().get("do_normalize", True))
        masked = config.get("feat_extract_norm", "group") == "layer"
        kernels, strides = list(config["conv_kernel"]), list(config["conv_stride"])
        return HFAudioModel(model.eval().to(device), normalize, masked, kernels, strides)

    def featurize(self, model: HFAudioModel, batch: list, device: str) -> list[np.ndarray]:
        clips = [self._check(clip, i, model) for i, clip in enumerate(batch)]
        groups = [list(range(len(clips)))] if model.masked else [[i] for i in range(len(clips))]
        out: list[np.ndarray | None] = [None] * len(clips)
        for group in groups:
            for i, features in zip(
                group, self._forward(model, [clips[i] for i in group], device), strict=True
            ):
                out[i] = features
        return out

    def _check(self, clip: Any, index: int, model: HFAudioModel) -> np.ndarray:
        ok = isinstance(clip, np.ndarray) and clip.ndim == 1 and np.issubdtype(clip.dtype, np.floating)
        if not ok or not np.isfinite(clip).all():
            raise ValueError(f"{self.name}: input {index} must be a finite 1-D float array")
        if model.frames(len(clip)) < 1:
            raise ValueError(f"{self.name}: input {index} ({len(clip)} samples) is shorter than one frame")
        clip = clip.astype(np.float32)
        return (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7) if model.normalize else clip

    def _forward(self, model: HFAudioModel, clips: list[np.ndarray], device: str) -> list[np.ndarray]:
        import torch

        lengths = [len(c) for c in clips]
        waves = torch.zeros(len(clips), max(lengths))  # (B, n_max), zero padded
        mask = torch.zeros(len(clips), max(lengths), dtype=torch.long)
        for b, clip in enumerate(clips):
            waves[b, : len(clip)] = torch.from_numpy(clip)
            mask[b, : len(clip)] = 1
        inputs = {"input_values": to_device(waves, device)}
        if model.masked:
            inputs["attention_mask"] = to_device(mask, device)
        with torch.inference_mode(), autocast(device, self.config.precision):
            hidden = model.model(**inputs).last_hidden_state  # (B, frames_max, D)
        features = to_float16_numpy(hidden, self.name)
        return [np.ascontiguousarray(f[: model.frames(n)]) for f, n in zip(features, lengths, strict=True)]
