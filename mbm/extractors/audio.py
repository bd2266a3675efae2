"""The default audio extractor: log-mel spectrogram frames (torchaudio), no weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.registry import register_extractor
from mbm.extractors.runtime import to_device, to_float16_numpy


@dataclasses.dataclass(kw_only=True, frozen=True)
class LogMelConfig(ExtractorConfig):
    """Log-mel spectrogram; defaults are 25 ms windows every 10 ms, 80 mels, at 16 kHz."""

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    log_offset: float = 1e-6  # log(mel + offset) keeps silence finite

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            self._check_int(field)
        if self.win_length > self.n_fft:
            self._fail("win_length", f"must be <= n_fft ({self.n_fft})")
        bins = self.n_fft // 2 + 1
        if self.n_mels > bins:  # torchaudio only warns, and the extra mel filters give constant features
            self._fail("n_mels", f"must be <= n_fft // 2 + 1 = {bins}, the frequency bins of n_fft = {self.n_fft}: "
                       "more mel filters than bins leaves some with no bin to sum (features always log(log_offset)); "
                       f"set n_mels <= {bins}, or n_fft >= {2 * (self.n_mels - 1)}")
        self._check_float("f_min")
        if self.f_max is not None:
            self._check_float("f_max", minimum=self.f_min, strict=True)
            if self.f_max > self.sample_rate / 2:
                self._fail("f_max", f"must be <= sample_rate / 2 ({self.sample_rate / 2})")
        elif self.f_min >= self.sample_rate / 2:
            self._fail("f_min", f"must be < sample_rate / 2 ({self.sample_rate / 2})")
        self._check_float("log_offset", strict=True)


def num_frames(num_samples: int, n_fft: int, hop_length: int) -> int:
    """Frames of a centred STFT (n_fft // 2 padding each side): 1 + n // hop for an even n_fft."""
    return 1 + (num_samples + 2 * (n_fft // 2) - n_fft) // hop_length


def length_groups(lengths: list[int], ratio: float = 1.25) -> list[list[int]]:
    """Indices grouped by length: sorted, and a group's longest is at most ``ratio`` x its shortest.

    A batch of clips from 1 to 10 s padded to its longest computes up to ~2x the frames it keeps;
    groups bound that to ``ratio``. A clip's frames do not depend on its group (each is reflect-padded
    on its own, and frames past its end are cut), so grouping changes no feature.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= ratio * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _log_mel_module(mel: Any, c: LogMelConfig) -> Any:
    """torchaudio's ``MelSpectrogram`` (its window and mel filters) as log-mel frames (b, frames, n_mels).

    torchaudio takes the power as ``|X|^2`` (``abs`` of the complex STFT, a ``hypot`` per bin: 40 % of
    its CPU time), then multiplies by the mel filters. Here the squares of the real and imaginary
    parts meet each bin's filter weights in one matrix product: ``sum_k fb[k] (re_k^2 + im_k^2)``, with
    each weight repeated for the two parts. The same sum in another order: a float32 rounding step
    from torchaudio's, which the float16 features keep for about 1 value in 2,500 (one float16 step).
    """
    import torch

    class LogMel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("window", mel.spectrogram.window.detach().clone())
            # (2 * n_freqs, n_mels): each bin's weights twice, for its real and imaginary parts
            self.register_buffer("fb2", mel.mel_scale.fb.detach().repeat_interleave(2, dim=0).contiguous())

        def forward(self, waves: torch.Tensor) -> torch.Tensor:
            spec = torch.stft(waves, c.n_fft, c.hop_length, c.win_length, self.window, center=False,
                              normalized=False, onesided=True, return_complex=True)  # (b, n_freqs, frames)
            parts = torch.view_as_real(spec.transpose(1, 2))  # (b, frames, n_freqs, 2)
            squares = parts.square().flatten(2)  # (b, frames, 2 * n_freqs): re^2, im^2 of each bin
            return torch.log(torch.matmul(squares, self.fb2) + c.log_offset)

    return LogMel()


@register_extractor
class LogMelExtractor(Extractor):
    """(1 + n // hop, n_mels) log-mel frames per clip; a clip's frames do not depend on its batch."""

    name = "logmel"
    modality = "audio"
    config_type = LogMelConfig
    revision = 2  # 2: the power spectrum as squares of the STFT's parts summed in the mel product

    def preload_modules(self) -> list[str]:
        return ["torchaudio"]

    def input_spec(self) -> dict[str, Any]:
        return {"sample_rate": self.config.sample_rate}

    @property
    def dim(self) -> int:
        return self.config.n_mels

    def load(self, device: str) -> Any:
        import torchaudio

        c = self.config
        # center=False: each clip is reflect-padded on its own in featurize, so zero padding to the
        # batch's longest clip never leaks into a clip's last frames.
        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            win_length=c.win_length,
            hop_length=c.hop_length,
            f_min=c.f_min,
            f_max=c.f_max,
            n_mels=c.n_mels,
            center=False,
            power=2.0,
        )
        return _log_mel_module(mel, c).eval().to(device)

    def _centre_pad(self, clip: Any, index: int) -> Any:
        """What center=True would do to this clip alone: n_fft // 2 reflected samples on each side."""
        import torch

        if not (
            isinstance(clip, np.ndarray)
            and clip.ndim == 1
            and clip.size > 0
            and np.issubdtype(clip.dtype, np.floating)
        ):
            got = f"{clip.dtype} {clip.shape}" if isinstance(clip, np.ndarray) else type(clip).__name__
            raise ValueError(f"{self.name}: input {index} must be a non-empty 1-D float array, got {got}")
        if not np.isfinite(clip).all():
            raise ValueError(f"{self.name}: input {index} holds non-finite samples")
        pad = self.config.n_fft // 2
        samples = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None]  # (1, n)
        mode = "reflect" if samples.shape[1] > pad else "constant"  # reflect needs more samples than pad
        return torch.nn.functional.pad(samples, (pad, pad), mode=mode)[0]

    def featurize(self, model: Any, batch: list, device: str) -> list[np.ndarray]:
        import torch

        padded = [self._centre_pad(clip, i) for i, clip in enumerate(batch)]
        c = self.config
        out: list[np.ndarray | None] = [None] * len(batch)
        for group in length_groups([len(p) for p in padded]):  # similar lengths: little zero padding
            waves = torch.nn.utils.rnn.pad_sequence([padded[i] for i in group], batch_first=True)  # (b, n_max)
            with torch.inference_mode():  # float32 on every device: the STFT is cheap and precision-sensitive
                logmel = model(to_device(waves, device))  # (b, frames_max, n_mels)
            for i, f in zip(group, to_float16_numpy(logmel, self.name), strict=True):
                out[i] = np.ascontiguousarray(f[: num_frames(len(batch[i]), c.n_fft, c.hop_length)])
        return out
