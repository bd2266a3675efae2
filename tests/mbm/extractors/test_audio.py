import functools
import math

import numpy as np
import pytest

from mbm.extractors import create_extractor
from mbm.extractors.audio import num_frames

SR = 16000


@pytest.fixture(scope="module")
def logmel():
    extractor = create_extractor("logmel")
    return extractor, extractor.load("cpu")


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)  # HTK, torchaudio's default mel scale


def test_frame_count_is_one_plus_samples_over_hop(logmel):
    extractor, model = logmel
    lengths = [16000, 16159, 16160, 150, 1]
    clips = [np.random.default_rng(n).standard_normal(n).astype(np.float32) for n in lengths]
    features = extractor.featurize(model, clips, "cpu")
    assert [f.shape for f in features] == [(101, 80), (101, 80), (102, 80), (1, 80), (1, 80)]
    assert [num_frames(n, 400, 160) for n in lengths] == [101, 101, 102, 1, 1]
    assert all(f.dtype == np.float16 and np.isfinite(f).all() for f in features)
    assert extractor.input_spec() == {"sample_rate": SR} and extractor.dim == 80


def test_a_clip_gives_the_same_frames_alone_or_in_a_batch(logmel):
    extractor, model = logmel
    short = np.random.default_rng(1).standard_normal(8000).astype(np.float32)
    long = np.random.default_rng(2).standard_normal(48000).astype(np.float32)
    alone = extractor.featurize(model, [short], "cpu")[0]
    batched = extractor.featurize(model, [long, short], "cpu")[1]
    np.testing.assert_allclose(batched.astype(np.float32), alone.astype(np.float32), atol=1e-2)


def test_a_1khz_sine_lights_the_1khz_mel_bin(logmel):
    extractor, model = logmel
    t = np.arange(SR) / SR
    features = extractor.featurize(model, [(0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)], "cpu")[0]
    spectrum = features[5:-5].astype(np.float32).mean(axis=0)  # (80,), edges trimmed
    centres = np.linspace(0.0, _hz_to_mel(SR / 2), 80 + 2)[1:-1]  # triangular filters' centre mels
    expected = int(np.argmin(np.abs(centres - _hz_to_mel(1000.0))))
    assert expected == 28
    assert int(spectrum.argmax()) in (expected - 1, expected, expected + 1)
    assert spectrum.max() - np.median(spectrum) > 10.0  # ~e^10 above the typical bin in power


def test_frames_equal_torchaudios_log_mel_spectrogram_up_to_a_float16_step(logmel):
    import torch
    import torchaudio

    extractor, model = logmel
    rng = np.random.default_rng(4)
    clips = [(rng.standard_normal(n) * rng.uniform(0.01, 1.0)).astype(np.float32) for n in (400, 12345, 16000, 33333)]
    got = extractor.featurize(model, clips, "cpu")
    reference = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=400, hop_length=160, n_mels=80)  # centred
    differing = 0
    for clip, features in zip(clips, got, strict=True):
        with torch.inference_mode():
            expected = torch.log(reference(torch.from_numpy(clip)) + 1e-6).T.numpy().astype(np.float16)
        assert features.shape == expected.shape
        apart = np.abs(features.astype(np.float32) - expected.astype(np.float32))
        step = np.spacing(np.maximum(np.abs(features), np.abs(expected))).astype(np.float32)
        assert (apart <= step).all()  # the same sums in another order: at most one float16 step apart
        differing += int((apart > 0).sum())
    assert differing < 0.002 * sum(f.size for f in got)


def test_silence_is_finite_at_the_log_offset(logmel):
    extractor, model = logmel
    features = extractor.featurize(model, [np.zeros(1600, np.float32)], "cpu")[0]
    np.testing.assert_allclose(features.astype(np.float32), math.log(1e-6), rtol=1e-3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 100), np.float32),
        np.zeros(100, np.int16),
        np.zeros(0, np.float32),
        "audio.wav",
        np.full(10, np.nan, np.float32),
    ],
)
def test_bad_clips_are_rejected(logmel, bad):
    extractor, model = logmel
    with pytest.raises(ValueError, match="input 0"):
        extractor.featurize(model, [bad], "cpu")


def test_logmel_fingerprint_comes_from_config_alone():
    assert create_extractor("logmel").weight_paths() == []
    assert create_extractor("logmel").revision == 2  # the power spectrum's sums changed: older features recompute
    assert (
        create_extractor("logmel", {"hop_length": 80}).fingerprint()
        != create_extractor("logmel").fingerprint()
    )


def test_hf_audio_tiny_wav2vec2_frames_match_the_model(tiny_wav2vec2_dir):
    import torch
    from transformers import Wav2Vec2Model

    extractor = create_extractor("hf-audio", {"path": str(tiny_wav2vec2_dir)})
    assert extractor.input_spec() == {"sample_rate": SR} and extractor.dim == 32
    model = extractor.load("cpu")
    rng = np.random.default_rng(3)
    short, long = (rng.standard_normal(n).astype(np.float32) * 0.3 + 0.1 for n in (1600, 4000))
    features = extractor.featurize(model, [long, short], "cpu")
    assert [f.shape for f in features] == [(399, 32), (159, 32)]  # (n - 10) // 5 + 1, then (L - 3) // 2 + 1
    reference = Wav2Vec2Model.from_pretrained(tiny_wav2vec2_dir, local_files_only=True).eval()
    normalized = (short - short.mean()) / np.sqrt(short.var() + 1e-7)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(normalized)[None]).last_hidden_state[0].numpy()
    np.testing.assert_allclose(features[1].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="shorter than one frame"):
        extractor.featurize(model, [np.zeros(12, np.float32)], "cpu")


def test_hf_audio_refuses_a_folder_without_a_waveform_front_end(tiny_bert_dir, tiny_vit_dir, tiny_wav2vec2_dir):
    create_extractor("hf-audio", {"path": str(tiny_wav2vec2_dir)}).check_files()
    for path, held in ((tiny_bert_dir, "holds a text model (config.json: model_type 'bert', architectures BertModel"),
                       (tiny_vit_dir, "holds an image model (config.json: model_type 'vit', architectures ViTModel")):
        extractor = create_extractor("hf-audio", {"path": str(path)})
        said = (f"path = '{path}' {held}; no conv_kernel and conv_stride lists of a front end over the waveform); set "
                "path to the folder of a wav2vec2-style speech encoder (wav2vec2, HuBERT, WavLM)")
        for step in (extractor.check_files, functools.partial(extractor.load, "cpu")):
            with pytest.raises(ValueError) as err:
                step()
            assert str(err.value) == said


def test_more_mels_than_frequency_bins_are_refused_with_the_numbers():
    from mbm.extractors.audio import LogMelConfig

    assert LogMelConfig(n_fft=400, n_mels=201).n_mels == 201  # one per bin: the most there is room for
    with pytest.raises(ValueError) as err:
        LogMelConfig(n_fft=256, win_length=256, n_mels=130)
    assert str(err.value) == (
        "LogMelConfig.n_mels must be <= n_fft // 2 + 1 = 129, the frequency bins of n_fft = 256: more mel filters "
        "than bins leaves some with no bin to sum (features always log(log_offset)); set n_mels <= 129, or "
        "n_fft >= 258, got 130")


def test_length_groups_sort_and_bound_the_padding():
    from mbm.extractors.audio import length_groups

    lengths = [100, 1000, 120, 126, 900, 1250, 10]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[6], [0, 2], [3], [4, 1], [5]]
    for g in groups:
        assert max(lengths[i] for i in g) <= 1.25 * min(lengths[i] for i in g)
    assert length_groups([]) == []


def test_grouped_batches_give_every_clip_its_own_frames(logmel):
    extractor, model = logmel
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 1600, 48000, 17000, 800, 47000)]
    together = extractor.featurize(model, clips, "cpu")
    for clip, got in zip(clips, together, strict=True):
        assert np.array_equal(got, extractor.featurize(model, [clip], "cpu")[0])
