from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from pipelines.clean import audio
from pipelines.clean.audio import AudioCleanConfig, _mono, _resample, _resampler, clean_audio
from pipelines.errors import CleanError

CFG = AudioCleanConfig()


def reason(data: bytes, cfg: AudioCleanConfig = CFG) -> CleanError:
    with pytest.raises(CleanError) as info:
        clean_audio(data, cfg)
    assert info.value.reason.startswith("audio.")
    return info.value


def assert_output(y: np.ndarray) -> None:
    assert y.dtype == np.float32 and y.ndim == 1 and y.flags.c_contiguous and np.isfinite(y).all()


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sample_rate": 0}, "sample_rate"),
        ({"sample_rate": 16000.0}, "sample_rate"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"min_seconds": 40.0}, "min_seconds"),
        ({"trim_db": -3}, "trim_db"),
        ({"peak": 1.5}, "peak"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AudioCleanConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    cfg = AudioCleanConfig(sample_rate=22050, trim_db=None, peak=0)
    assert cfg.to_dict()["trim_db"] == 0.0  # off is 0, which TOML can hold (it has no null)
    assert AudioCleanConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("off", [0, 0.0, None])
def test_trim_db_0_turns_trimming_off_as_one_setting(off):
    cfg = AudioCleanConfig(trim_db=off)
    assert cfg.trim_db == 0.0 and isinstance(cfg.trim_db, float)  # the same content hash however it was said
    with pytest.raises(ValueError, match=r"trim_db must be a number >= 0 \(dB below the peak; 0 disables trimming\)"):
        AudioCleanConfig(trim_db=False)


# --- formats and rates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, subtype, sr",
    [
        ("WAV", "PCM_U8", 16000),
        ("WAV", "PCM_16", 16000),
        ("WAV", "PCM_24", 44100),
        ("WAV", "PCM_32", 22050),
        ("WAV", "FLOAT", 16000),
        ("WAV", "DOUBLE", 8000),
        ("WAV", "ULAW", 8000),
        ("WAV", "ALAW", 8000),
        ("FLAC", "PCM_16", 48000),
        ("OGG", "VORBIS", 44100),
        ("OGG", "OPUS", 48000),
        ("MP3", "MPEG_LAYER_III", 44100),
        ("AIFF", "PCM_16", 32000),
    ],
)
def test_formats_decode_a_440_hz_sine(make_sine, make_audio, peak_hz, fmt, subtype, sr):
    y = clean_audio(make_audio(make_sine(440, 0.5, sr), sr, fmt, subtype), CFG)
    assert_output(y)
    assert abs(peak_hz(y, 16000) - 440) <= 4
    assert 0.45 * 16000 <= len(y) <= 0.56 * 16000  # lossy codecs pad or trim a few ms
    assert np.abs(y).max() == pytest.approx(0.95, abs=1e-6)


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 47999])
def test_any_rate_is_resampled(make_sine, make_audio, peak_hz, sr):
    y = clean_audio(make_audio(make_sine(440, 1.0, sr), sr, "WAV", "PCM_16"), AudioCleanConfig(trim_db=None))
    assert_output(y)
    assert abs(len(y) - 16000) <= 2
    assert abs(peak_hz(y, 16000) - 440) <= 2


def test_target_rate_is_configurable(make_sine, make_audio, peak_hz):
    y = clean_audio(
        make_audio(make_sine(1000, 1.0, 44100), 44100), AudioCleanConfig(sample_rate=22050, trim_db=None)
    )
    assert len(y) == 22050 and abs(peak_hz(y, 22050) - 1000) <= 2


def test_mp3_bytes_under_a_wav_name_decode(make_sine, make_audio, peak_hz, tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(make_audio(make_sine(440, 0.5, 16000), 16000, "MP3"))
    assert abs(peak_hz(clean_audio(path.read_bytes(), CFG), 16000) - 440) <= 4


def test_stereo_is_mixed_by_channel_mean(make_sine, make_audio, peak_hz):
    left = make_sine(440, 0.5, 16000)
    right = make_sine(1000, 0.5, 16000, amp=0.25)
    stereo = make_audio(np.stack([left, right], axis=1), 16000, "WAV", "FLOAT")
    y = clean_audio(stereo, AudioCleanConfig(peak=0, trim_db=None))
    assert len(y) == 8000
    assert abs(peak_hz(y, 16000) - 440) <= 4
    spectrum = np.abs(np.fft.rfft(y))  # 2 Hz bins
    assert spectrum[500] > 0.4 * spectrum[220], "the right channel is in the mix"
    assert np.abs(y).max() == pytest.approx(0.375, abs=0.01)  # (0.5 + 0.25) / 2 at most
    # opposite channels cancel: the mean, not the first channel, is taken
    err = reason(make_audio(np.stack([left, -left], axis=1), 16000, "WAV", "FLOAT"))
    assert err.reason == "audio.silent"


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 7, 8, 12])
def test_mono_mix_equals_numpys_channel_mean_bit_for_bit(channels):
    frames = np.random.default_rng(channels).standard_normal((40_001, channels)).astype(np.float32)
    frames[::97] *= 1e-6  # mixed magnitudes: rounding differs with the order of the additions
    expected = frames.mean(axis=1, dtype=np.float32)
    got = _mono(frames)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert _mono(frames)[0] == got[0] and frames.shape == (40_001, channels)  # the input is left alone


@pytest.mark.parametrize("orig", [8000, 11025, 22050, 44100, 48000, 96000])
def test_resampling_gives_torchaudios_samples(orig):
    import torch
    import torchaudio.functional as AF

    rng = np.random.default_rng(orig)
    for seconds in (0.013, 0.5, 2.0, 3.7, 31.0):  # less than one piece, exactly one, several
        x = rng.standard_normal(round(orig * seconds)).astype(np.float32)
        expected = AF.resample(torch.from_numpy(x), orig, 16000).numpy()
        got = _resample(x, orig, 16000)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() < 2e-6  # the same sums, at most a float32 rounding step or two apart
        assert np.array_equal(_resample(x, orig, 16000), got)  # the second call takes the kept kernel


def test_resampling_convolves_pieces_of_one_shape_whatever_the_clip_length(monkeypatch):
    import torch.nn.functional as F

    shapes = []
    conv1d = F.conv1d
    monkeypatch.setattr(F, "conv1d", lambda x, *a, **k: shapes.append(tuple(x.shape)) or conv1d(x, *a, **k))
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (44100 * 2 + 1, 100_000, 150_000, 176_400)]
    first = [_resample(x, 44100, 16000) for x in clips]
    assert len(set(shapes)) == 1 and shapes[0][:2] == (2, 1)  # four lengths, one convolution shape: built once
    assert [len(y) for y in first] == [math.ceil(len(x) * 16000 / 44100) for x in clips]
    _resample(rng.standard_normal(7_777).astype(np.float32), 44100, 16000)  # another shape in between
    for x, y in zip(clips, first, strict=True):  # a clip's samples do not depend on what came before it
        assert np.array_equal(_resample(x, 44100, 16000), y)


def test_resampling_kernels_are_kept_up_to_a_size_for_the_rates_used_last(monkeypatch):
    from collections import OrderedDict

    monkeypatch.setattr(audio, "_RESAMPLERS", OrderedDict())
    assert _resampler(8820, 16000) is _resampler(8820, 16000)  # 1.4 MB, ~1.6 s to build
    monkeypatch.setattr(audio, "_MAX_KEPT_KERNEL", 1000)
    assert _resampler(11025, 16000) is not _resampler(11025, 16000)
    monkeypatch.setattr(audio, "_MAX_KEPT_KERNEL", 10**9)
    monkeypatch.setattr(audio, "_KEPT_KERNELS", 2)
    kept = _resampler(22050, 16000)
    _resampler(8820, 16000)  # used again: 22050 is now the oldest
    _resampler(44100, 16000)
    assert list(audio._RESAMPLERS) == [(8820, 16000), (44100, 16000)]
    assert _resampler(22050, 16000) is not kept


# --- trimming, clipping, normalization ------------------------------------------------------------


def test_leading_and_trailing_silence_are_trimmed(make_sine, make_audio):
    x = np.concatenate(
        [np.zeros(8000, np.float32), make_sine(440, 1.0, 16000), np.full(8000, 1e-4, np.float32)]
    )
    data = make_audio(x, 16000, "WAV", "FLOAT")
    y = clean_audio(data, CFG)
    assert abs(len(y) - 16000) <= 2
    assert len(clean_audio(data, AudioCleanConfig(trim_db=None))) == 32000
    assert len(clean_audio(data, AudioCleanConfig(trim_db=0))) == 32000


def test_long_audio_is_clipped_not_rejected(make_sine, make_audio):
    y = clean_audio(make_audio(make_sine(440, 3.0, 44100), 44100), AudioCleanConfig(max_seconds=1.0))
    assert len(y) == 16000


def test_leading_silence_does_not_eat_the_clip(make_sine, make_audio):
    # up to max_seconds of leading silence is decoded, trimmed, and the clip still gets its full length
    x = np.concatenate([np.zeros(16000 * 3 // 2, np.float32), make_sine(440, 3.0, 16000)])
    y = clean_audio(make_audio(x, 16000, "FLAC"), AudioCleanConfig(max_seconds=2.0))
    assert len(y) == 32000 and np.abs(y[:100]).max() > 0.01


def test_peak_normalization(make_sine, make_audio):
    data = make_audio(make_sine(440, 0.5, 16000, amp=0.2), 16000, "WAV", "FLOAT")
    assert np.abs(clean_audio(data, AudioCleanConfig(peak=0.5))).max() == pytest.approx(0.5, abs=1e-6)
    assert np.abs(clean_audio(data, AudioCleanConfig(peak=0))).max() == pytest.approx(0.2, abs=0.01)


def test_too_short_after_trimming(make_sine, make_audio):
    x = np.concatenate(
        [np.zeros(16000, np.float32), make_sine(440, 0.005, 16000), np.zeros(16000, np.float32)]
    )
    err = reason(make_audio(x, 16000, "WAV", "FLOAT"))
    assert err.reason == "audio.too_short" and "minimum is 0.01" in err.detail
    assert len(clean_audio(make_audio(x, 16000, "WAV", "FLOAT"), AudioCleanConfig(min_seconds=0.001))) < 100


def test_too_short_says_frames_and_enough_digits(make_sine, make_audio):
    # 159 frames at 16 kHz is 0.0099375 s: a detail of "0.0100 s ... minimum is 0.01 s" would contradict itself
    data = make_audio(make_sine(440, 159 / 16000, 16000), 16000, "WAV", "FLOAT")
    err = reason(data, AudioCleanConfig(trim_db=None))
    assert err.reason == "audio.too_short"
    assert err.detail == "159 frames at 16000 Hz (0.009938 s) after trimming, minimum is 0.01 s"
    assert len(clean_audio(make_audio(make_sine(440, 160 / 16000, 16000), 16000, "WAV", "FLOAT"),
                           AudioCleanConfig(trim_db=None))) == 160


def test_digital_silence_is_rejected(make_audio):
    assert reason(make_audio(np.zeros(16000, np.float32), 16000, "WAV", "PCM_16")).reason == "audio.silent"
    err = reason(make_audio(np.zeros(5 * 16000, np.float32), 16000, "WAV", "PCM_16"), AudioCleanConfig(max_seconds=1.0))
    assert err.detail.endswith("over 80000 frames at 16000 Hz (5 s)")  # the whole file, not the part decoded


@pytest.mark.parametrize("silence", [2.2, 7.5])
def test_sound_after_long_leading_silence_lands(make_sine, make_audio, peak_hz, silence):
    # more leading silence than max_seconds and the lead decoded for trimming: the tone is found all the same
    tone = make_sine(440, 1.6, 16000)
    x = np.concatenate([np.zeros(round(silence * 16000), np.float32), tone, np.zeros(8000, np.float32)])
    y = clean_audio(make_audio(x, 16000, "WAV", "FLOAT"), AudioCleanConfig(max_seconds=1.0))
    assert len(y) == 16000 and abs(peak_hz(y, 16000) - 440) < 5  # a full max_seconds of the tone
    assert reason(make_audio(x, 16000, "WAV", "FLOAT"), AudioCleanConfig(max_seconds=1.0, trim_db=None)).reason \
        == "audio.silent"  # untrimmed, the clip is its first second, which is silent


# --- bad input ------------------------------------------------------------------------------------


def test_zero_bytes_and_zero_frames_are_empty(make_audio):
    assert reason(b"").reason == "audio.empty"
    assert reason(make_audio(np.zeros(0, np.float32), 16000, "WAV", "PCM_16")).reason == "audio.empty"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_rejected(make_sine, make_audio, value):
    x = make_sine(440, 0.5, 16000)
    x[1234] = value
    err = reason(make_audio(x, 16000, "WAV", "FLOAT"))
    assert err.reason == "audio.non_finite" and "frame 1234" in err.detail


def _patched(wav: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(wav)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_broken_wav_header(wav_16k):
    assert reason(wav_16k[:30]).reason == "audio.decode_error"
    assert reason(_patched(wav_16k, 12, "4s", b"junk")).reason == "audio.decode_error"


def test_zero_channel_header(wav_16k):
    assert reason(_patched(wav_16k, 22, "<H", 0)).reason == "audio.decode_error"


def test_unknown_codec_tag(wav_16k):
    err = reason(_patched(wav_16k, 20, "<H", 0x1234))
    assert err.reason == "audio.decode_error" and "libsndfile code" in err.detail


def test_corrupt_flac(make_sine, make_audio):
    flac = bytearray(make_audio(make_sine(440, 1.0, 16000), 16000, "FLAC"))
    for i in range(len(flac) // 3, len(flac) // 3 + 200):
        flac[i] ^= 0x5A
    assert reason(bytes(flac)).reason == "audio.decode_error"


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_ogg(make_sine, make_audio, keep):
    ogg = make_audio(make_sine(440, 3.0, 16000), 16000, "OGG", "VORBIS")
    assert reason(ogg[: int(len(ogg) * keep)]).reason == "audio.truncated"


def test_not_audio_is_unidentified():
    assert reason(b"%PDF-1.4\n" + b"x" * 200).reason == "audio.unidentified"


def test_max_bytes(wav_16k):
    assert reason(wav_16k, AudioCleanConfig(max_bytes=len(wav_16k) - 1)).reason == "audio.file_too_large"


def _local(tmp_path, name: str, data: bytes):
    from pipelines.media import LocalFile

    path = tmp_path / name
    path.write_bytes(data)
    return LocalFile(path=str(path), size=len(data), name=str(path))


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_a_local_file_over_max_bytes_is_decoded_from_its_file_as_from_memory(make_sine, make_audio, tmp_path, fmt,
                                                                              subtype):
    """What the cleaning stage gives for a local file over ``max_bytes``: the clip decoded from the file, up to
    ``max_seconds``, the same samples as from its bytes in memory."""
    data = make_audio(make_sine(440, 5.0, 44100), 44100, fmt, subtype)
    cfg = AudioCleanConfig(max_seconds=2.0, max_bytes=1000)
    from_file = clean_audio(_local(tmp_path, f"a.{fmt.lower()}", data), cfg)
    from_memory = clean_audio(data, AudioCleanConfig(max_seconds=2.0))
    assert_output(from_file)
    assert len(from_file) == 32000 and np.array_equal(from_file, from_memory)


def test_a_local_file_over_max_bytes_that_does_not_decode_says_why(make_sine, make_audio, tmp_path):
    cfg = AudioCleanConfig(max_bytes=100)
    pdf = _local(tmp_path, "a.pdf", b"%PDF-1.4\n" + b"x" * 200_000)
    assert reason(pdf, cfg).reason == "audio.unidentified" and "%PDF" in reason(pdf, cfg).detail
    ogg = make_audio(make_sine(440, 3.0, 16000), 16000, "OGG", "VORBIS")
    for keep in (0.5, 0.97):  # the last page, found in the file's tail
        assert reason(_local(tmp_path, "cut.ogg", ogg[: int(len(ogg) * keep)]), cfg).reason == "audio.truncated"
