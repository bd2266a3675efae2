"""Audio cleaner: bytes of any format libsndfile reads -> float32 (n,) mono at ``cfg.sample_rate``.

The format is sniffed by libsndfile from the content (WAV PCM/float/µ-law/A-law, FLAC, OGG/Vorbis,
Opus, MP3, AIFF, ...), never from a file name. Steps: decode as float32 (at most ``max_seconds``, plus
as much again of leading silence that trimming may remove, so an hour-long file costs no more than a
minute; longer leading digital silence is read past), reject non-finite samples, mix to mono (channel
mean), reject digital silence, trim leading and trailing parts quieter than ``peak - trim_db`` dB (0: none),
check ``min_seconds``, clip to ``max_seconds``, resample (torchaudio's polyphase sinc kernel),
peak-normalize. Every failure is a ``CleanError`` with
an ``audio.*`` reason.

Partial decodes are accepted when libsndfile returns them without an error (a WAV or MP3 cut short);
when libsndfile raises (a FLAC that loses sync, an OGG whose last page is cut) the file is rejected.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import soundfile as sf

from pipelines.clean.formats import ogg_codec, unidentified
from pipelines.errors import CleanError
from pipelines.media import LocalFile

log = logging.getLogger(__name__)

#: Peak at or below -90 dBFS (one 16-bit LSB) is digital silence: rejected as ``audio.silent``.
SILENCE_PEAK = 10 ** (-90 / 20)
#: Sample rates outside this range are not audio anyone recorded; rejected as ``audio.bad_sample_rate``.
RATE_RANGE = (1000, 768_000)
#: Above this many taps x phases torchaudio's polyphase kernel gets slow (47999 -> 16000 Hz takes
#: ~45 s); such co-prime rate pairs are resampled in the frequency domain instead.
_MAX_POLYPHASE = 4_000_000
_SF_ERR_UNRECOGNISED_FORMAT = 1
#: resampling kernels kept (``_resampler``): how many rate pairs, and the largest kernel in floats
#: (44.1 -> 16 kHz: 76,000; 8.82 -> 16 kHz: 364,000)
_KEPT_KERNELS = 16
_MAX_KEPT_KERNEL = 4_000_000
_RESAMPLERS: OrderedDict[tuple[int, int], Any] = OrderedDict()
_RESAMPLERS_LOCK = threading.Lock()
#: numpy sums a row of this many channels or more pairwise (``_mono`` adds columns in order below it)
_PAIRWISE_FROM = 8
#: ``_polyphase`` runs torchaudio's convolution over pieces of this many seconds of output, as one batch
_PIECE_SECONDS = 2.0


@dataclass(kw_only=True)
class AudioCleanConfig:
    """Target rate, duration limits, silence trimming and normalization for audio."""

    sample_rate: int = 16000
    max_seconds: float = 30.0  # longer is clipped (not rejected)
    min_seconds: float = 0.01  # shorter after trimming -> audio.too_short
    trim_db: float = 40.0  # 0 disables trimming (TOML has no null); None, from Python, is taken as 0
    peak: float = 0.95  # peak-normalize to this; 0 disables
    max_bytes: int = 256 * 1024 * 1024  # held in memory at most; a larger local file is decoded from its file

    def __post_init__(self) -> None:
        for name in ("sample_rate", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AudioCleanConfig.{name} must be an integer >= 1, got {value!r}")
        lo, hi = RATE_RANGE
        if not lo <= self.sample_rate <= hi:
            raise ValueError(f"AudioCleanConfig.sample_rate must be in {lo}..{hi} Hz, got {self.sample_rate}")
        if not _is_number(self.max_seconds) or not 0 < self.max_seconds < math.inf:
            raise ValueError(f"AudioCleanConfig.max_seconds must be a number > 0, got {self.max_seconds!r}")
        if not _is_number(self.min_seconds) or not 0 <= self.min_seconds <= self.max_seconds:
            raise ValueError(
                f"AudioCleanConfig.min_seconds must be a number in 0..max_seconds ({self.max_seconds}), "
                f"got {self.min_seconds!r}"
            )
        if self.trim_db is None:
            self.trim_db = 0.0
        if not _is_number(self.trim_db) or not 0 <= self.trim_db < math.inf:
            raise ValueError(
                f"AudioCleanConfig.trim_db must be a number >= 0 (dB below the peak; 0 disables trimming), "
                f"got {self.trim_db!r}"
            )
        if self.trim_db == 0:
            self.trim_db = 0.0  # one value for off, whichever way it was given: it is part of the content hash
        if not _is_number(self.peak) or not 0 <= self.peak <= 1:
            raise ValueError(
                f"AudioCleanConfig.peak must be a number in 0..1 (0 disables), got {self.peak!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def clean_audio(data: bytes | LocalFile, cfg: AudioCleanConfig) -> np.ndarray:
    """Decode, check, mono-mix, trim, clip, resample and normalize one clip; float32 (n,), all finite. A
    ``LocalFile`` (a local file over ``max_bytes``) is decoded from its file, never read whole."""
    if not isinstance(data, LocalFile):
        if len(data) == 0:
            raise CleanError("audio.empty", "0 bytes")
        if len(data) > cfg.max_bytes:
            raise CleanError("audio.file_too_large", f"{len(data)} bytes, limit is {cfg.max_bytes}")
    lead = cfg.max_seconds if cfg.trim_db else 0.0
    frames, sr, skipped = _decode(data, cfg.max_seconds + lead, skip_silence=bool(cfg.trim_db))
    if not np.isfinite(frames).all():
        bad = ~np.isfinite(frames)
        first = int(np.flatnonzero(bad.any(axis=1))[0])
        raise CleanError("audio.non_finite", f"{int(bad.sum())} NaN/Inf samples, first at frame {first}")
    x = _mono(frames)
    peak = float(np.abs(x).max())
    if peak <= SILENCE_PEAK:
        raise CleanError("audio.silent", f"peak {peak:.3g} is at or below -90 dBFS over {_span(len(x) + skipped, sr)}")
    if cfg.trim_db:
        loud = np.flatnonzero(np.abs(x) >= peak * 10 ** (-cfg.trim_db / 20))
        x = x[loud[0] : loud[-1] + 1]
    if len(x) / sr < cfg.min_seconds:
        raise CleanError(
            "audio.too_short", f"{_span(len(x), sr)} after trimming, minimum is {cfg.min_seconds} s"
        )
    x = x[: math.ceil(cfg.max_seconds * sr)]
    y = _resample(x, sr, cfg.sample_rate)[: round(cfg.max_seconds * cfg.sample_rate)]
    top = float(np.abs(y).max()) if y.size else 0.0
    if cfg.peak > 0 and top > 0:
        y = np.clip(y * np.float32(cfg.peak / top), -cfg.peak, cfg.peak)  # float32 rounding stays <= peak
    y = np.ascontiguousarray(y, dtype=np.float32)
    if y.size == 0 or not np.isfinite(y).all():
        raise CleanError(
            "audio.non_finite", f"resampling {sr} -> {cfg.sample_rate} Hz gave no finite samples"
        )
    return y


def _span(frames: int, sr: int) -> str:
    """A clip's length as frames and seconds, with enough digits to compare with a limit (0.00998 s, not 0.0100)."""
    return f"{frames} frames at {sr} Hz ({frames / sr:.4g} s)"


def _decode(data: bytes | LocalFile, max_seconds: float, skip_silence: bool = False) -> tuple[np.ndarray, int, int]:
    """float32 (frames, channels) of at most ``max_seconds``, the file's sample rate, and the frames
    skipped before them: with ``skip_silence``, pieces of ``max_seconds`` that are digital silence
    throughout are read past (trimming would remove them), so a recording whose sound starts later than
    that is not taken for silence (the piece where it starts then comes with half as much again after
    it); a file that is silent to its end gives its last such piece."""
    try:
        with (data.open() if isinstance(data, LocalFile) else io.BytesIO(data)) as source, sf.SoundFile(source) as f:
            sr, channels, what = f.samplerate, f.channels, f"{f.format}/{f.subtype}"
            if channels < 1:
                raise CleanError("audio.decode_error", f"{what} header has {channels} channels")
            if not RATE_RANGE[0] <= sr <= RATE_RANGE[1]:
                raise CleanError("audio.bad_sample_rate", f"{what} header says {sr} Hz")
            wanted = math.ceil(max_seconds * sr)
            frames, skipped = f.read(wanted, dtype="float32", always_2d=True), 0
            while skip_silence and len(frames) == wanted and _silent(frames):
                more = f.read(wanted, dtype="float32", always_2d=True)
                if not len(more):
                    break
                frames, skipped = more, skipped + len(frames)
            if skipped and len(frames) == wanted and not _silent(frames):  # the sound may start late in it
                frames = np.concatenate([frames, f.read(wanted // 2, dtype="float32", always_2d=True)])
    except CleanError:
        raise
    except sf.LibsndfileError as e:
        raise _error(
            data, f"{e.error_string.strip() or 'libsndfile error'} (libsndfile code {e.code})", e.code
        ) from None
    except Exception as e:  # soundfile's own checks (ValueError, RuntimeError) and anything else
        raise _error(data, f"{type(e).__name__}: {e}", None) from None
    if frames.shape[0] == 0:
        if _ogg_truncated(*_ends(data)):
            raise CleanError("audio.truncated", f"{what}: no decodable frames, last Ogg page is cut off")
        raise CleanError("audio.empty", f"{what} has 0 frames")
    return frames, sr, skipped


def _silent(frames: np.ndarray) -> bool:
    """Whether every sample is digital silence (a NaN is not: the caller rejects it as non-finite)."""
    return bool((np.abs(frames) <= SILENCE_PEAK).all())


def _ends(data: bytes | LocalFile) -> tuple[bytes, bytes]:
    """The first and the last bytes of a clip (all of them, for bytes in memory)."""
    if isinstance(data, LocalFile):
        try:
            return data.head(), data.tail()
        except OSError:
            return b"", b""
    return data, data


def _error(data: bytes | LocalFile, detail: str, code: int | None) -> CleanError:
    head, tail = _ends(data)
    if code == _SF_ERR_UNRECOGNISED_FORMAT or (head.startswith(b"OggS") and ogg_codec(head)):
        return CleanError("audio.unidentified", unidentified(head, "audio", "an audio format libsndfile reads"))
    if _ogg_truncated(head, tail):
        return CleanError("audio.truncated", f"Ogg stream cut off: {detail}")
    return CleanError("audio.decode_error", detail)


def _ogg_truncated(head: bytes, tail: bytes) -> bool:
    """True for an Ogg file whose last page is incomplete or is not an end-of-stream page: ``head`` its first
    bytes, ``tail`` its last ones, holding the last page's start (the same bytes for a clip in memory)."""
    if not head.startswith(b"OggS"):
        return False
    i = tail.rfind(b"OggS")
    if i < 0 or len(tail) < i + 27:
        return True
    nseg = tail[i + 26]
    body = sum(tail[i + 27 : i + 27 + nseg])
    if len(tail) < i + 27 + nseg + body:
        return True
    return not tail[i + 5] & 0x04


def _mono(frames: np.ndarray) -> np.ndarray:
    """The channel mean of float32 (frames, channels), bit for bit ``frames.mean(axis=1, dtype=float32)``.

    numpy reduces a row of a few channels one after another, so adding whole columns in the same order
    gives the same sums, without its per-row reduction loop: 2.6 instead of 71 ms for a minute of 48 kHz
    stereo. From 8 channels numpy sums a row pairwise, so those go through ``mean``.
    """
    channels = frames.shape[1]
    if channels == 1:
        return frames[:, 0]
    if channels >= _PAIRWISE_FROM:
        return frames.mean(axis=1, dtype=np.float32)
    x = frames[:, 0] + frames[:, 1]
    for c in range(2, channels):
        x += frames[:, c]
    x /= np.float32(channels)
    return x


def _resampler(orig: int, new: int) -> Any:
    """torchaudio's ``Resample`` for one rate pair, its sinc kernel kept for the next clip at that rate
    (``torchaudio.functional.resample`` builds it again for every clip: up to seconds for rates such as
    8820 Hz; the same kernel, bit for bit). The ``_KEPT_KERNELS`` pairs used last are kept,
    each kernel at most ``_MAX_KEPT_KERNEL`` floats."""
    with _RESAMPLERS_LOCK:
        found = _RESAMPLERS.get((orig, new))
        if found is not None:
            _RESAMPLERS.move_to_end((orig, new))
            return found
    import torch
    import torchaudio.transforms as AT

    resampler = AT.Resample(orig, new, dtype=torch.float32)
    if resampler.kernel.numel() <= _MAX_KEPT_KERNEL:
        with _RESAMPLERS_LOCK:
            _RESAMPLERS[(orig, new)] = resampler
            while len(_RESAMPLERS) > _KEPT_KERNELS:
                _RESAMPLERS.popitem(last=False)
    return resampler


def _polyphase(t: Any, orig: int, new: int) -> Any:
    """torchaudio's polyphase sinc resampling of the 1-d float32 tensor ``t``, its kernel applied to
    pieces of ``_PIECE_SECONDS`` of output stacked as one batch, the last one filled with zeros.

    torchaudio convolves the whole clip at once, and oneDNN builds (JIT-compiles) a convolution for
    every input length it meets: 2-3 ms per clip of a corpus whose clips all differ in length, more
    than the convolution itself (389 clips of 2-15 s: 1.6 s, 0.7 s of it the convolutions). Pieces of
    one length make a clip one of at most ``max_seconds / _PIECE_SECONDS`` shapes per rate pair, each
    built once per process: 0.8 s for those clips. Each output sample is the same sum over the same
    inputs; oneDNN's kernel for the pieces may add in another order than for the whole clip (for a few
    short clips and rates such as 96 kHz it differs by a float32 rounding step, as cleaner revision 2)."""
    import torch
    import torch.nn.functional as F

    resampler = _resampler(orig, new)
    g = math.gcd(orig, new)
    stride, phases = orig // g, new // g  # input samples per output frame, output samples per frame
    kernel, width = resampler.kernel, resampler.width  # (phases, 1, taps), taps = 2 * width + stride
    target = math.ceil(phases * len(t) / stride)  # torchaudio's output length
    frames = max(1, math.ceil(_PIECE_SECONDS * new / phases))  # output frames per piece
    pieces = max(1, math.ceil(math.ceil(target / phases) / frames))
    span = (frames - 1) * stride + kernel.shape[-1]  # input samples one piece reads
    padded = torch.zeros((pieces * frames - 1) * stride + kernel.shape[-1], dtype=torch.float32)
    padded[width : width + len(t)] = t  # torchaudio's left padding of ``width`` zeros; zeros after the clip
    out = F.conv1d(padded.unfold(0, span, frames * stride)[:, None], kernel, stride=stride)  # (pieces, phases, frames)
    return out.transpose(1, 2).reshape(-1)[:target]


def _resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Band-limited resampling: torchaudio's polyphase sinc, or an FFT for awkward co-prime rates."""
    if orig == new:
        return x
    import torch

    g = math.gcd(orig, new)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        if (orig // g) * (new // g) <= _MAX_POLYPHASE:
            return _polyphase(t, orig, new).numpy()
        log.debug("resampling %d -> %d Hz in the frequency domain", orig, new)
        n_out = max(1, math.ceil(len(x) * new / orig))
        spec = torch.fft.rfft(t.double())
        return (torch.fft.irfft(spec, n=n_out) * (n_out / len(x))).float().numpy()
