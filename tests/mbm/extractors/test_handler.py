import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.util import assert_that, equal_to

from mbm.extractors import Extractor, ExtractorConfig, ExtractorHandler, create_extractor, register_extractor
from mbm.extractors.handler import configure_threads
from mbm.extractors.runtime import resolve_device


@dataclasses.dataclass(kw_only=True, frozen=True)
class CountingConfig(ExtractorConfig):
    log: str = ""  # file that gets one line per load, so loads are counted across pickling


@register_extractor
class CountingExtractor(Extractor):
    """Fake: input k -> a (k, 2) array filled with k; records each load and its device."""

    name = "test-counting"
    modality = "text"
    config_type = CountingConfig

    @property
    def dim(self) -> int:
        return 2

    def load(self, device: str) -> Any:
        with open(self.config.log, "a") as fh:
            fh.write(device + "\n")
        return {"scale": 1.0}

    def featurize(self, model: Any, batch: list, device: str) -> list[np.ndarray]:
        return [np.full((k, 2), k * model["scale"], dtype=np.float16) for k in batch]


def _summary(features: np.ndarray) -> tuple:
    return features.shape, str(features.dtype), float(features[0, 0])


def test_runinference_loads_once_and_keeps_order(tmp_path):
    log = tmp_path / "loads.txt"
    handler = ExtractorHandler(
        create_extractor("test-counting", {"log": str(log)}), batch_size=3, device="auto"
    )
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(list(range(1, 11))) | RunInference(handler) | beam.Map(_summary)
        assert_that(out, equal_to([((k, 2), "float16", float(k)) for k in range(1, 11)]))
    assert Path(log).read_text().splitlines() == ["cpu"]  # one load, "auto" resolved without a GPU


def test_runinference_with_a_real_extractor_matches_direct_featurize():
    extractor = create_extractor("logmel", {"n_mels": 40})
    clips = [np.random.default_rng(n).standard_normal(n).astype(np.float32) for n in (1600, 3200, 4000)]
    direct = extractor.featurize(extractor.load("cpu"), clips, "cpu")
    expected = [(f.shape, float(f.astype(np.float32).sum())) for f in direct]
    handler = ExtractorHandler(extractor, batch_size=2, device="cpu")
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = (
            p
            | beam.Create(clips)
            | RunInference(handler)
            | beam.Map(lambda f: (f.shape, float(f.astype(np.float32).sum())))
        )
        assert_that(out, equal_to(expected))
    assert [s for s, _ in expected] == [(11, 40), (21, 40), (26, 40)]


def test_handler_contract_and_pickling(tmp_path):
    extractor = create_extractor("logmel")
    handler = ExtractorHandler(extractor, batch_size=8, device="cpu")
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    assert handler.get_metrics_namespace() == "mbm_extract_audio"
    model = handler.load_model()
    clip = np.zeros(320, np.float32)
    assert handler.get_num_bytes([clip, clip]) == 2 * 320 * 4
    assert [f.shape for f in handler.run_inference([clip], model)] == [(3, 80)]
    with pytest.raises(ValueError, match="inference_args"):
        handler.run_inference([clip], model, {"beam": 5})

    clone = pickle.loads(pickle.dumps(handler))
    assert clone.extractor.config == extractor.config
    assert clone.extractor.fingerprint() == extractor.fingerprint()
    assert clone.batch_elements_kwargs() == handler.batch_elements_kwargs()
    assert len(pickle.dumps(handler)) < 4096  # config only, no weights
    text = ExtractorHandler(create_extractor("minilm"), batch_size=4)
    assert text.get_metrics_namespace() == "mbm_extract_text" and len(pickle.dumps(text)) < 4096


def test_handler_validates_its_arguments():
    extractor = create_extractor("logmel")
    with pytest.raises(ValueError, match="batch_size"):
        ExtractorHandler(extractor, batch_size=0)
    with pytest.raises(ValueError, match="device"):
        ExtractorHandler(extractor, device="gpu")
    with pytest.raises(TypeError):
        ExtractorHandler("logmel")


def test_auto_device_prefers_cuda_when_available(monkeypatch):
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_threads_are_split_between_workers(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("mbm.extractors.handler._usable_cores", lambda: 8)
        monkeypatch.setenv("MBM_WORKERS", "3")
        configure_threads()
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("MBM_WORKERS", "16")
        configure_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("MBM_WORKERS", "4")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        configure_threads(load_torch=False)  # torch is imported here: its pool is sized, no variable set
        assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in os.environ
        monkeypatch.delenv("MBM_WORKERS")
        torch.set_num_threads(5)
        configure_threads()
        assert torch.get_num_threads() == 5  # unset: torch's own choice stands
        monkeypatch.setenv("MBM_WORKERS", "zero")
        with pytest.raises(ValueError, match="MBM_WORKERS"):
            configure_threads()
    finally:
        torch.set_num_threads(before)


def test_runinference_with_a_text_encoder(tiny_bert_dir):
    extractor = create_extractor("hf-text", {"path": str(tiny_bert_dir)})
    texts = ["the cat sat on the mat", "hello", "the quick brown fox"]
    direct = extractor.featurize(extractor.load("cpu"), texts, "cpu")
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = (
            p
            | beam.Create(texts)
            | RunInference(ExtractorHandler(extractor, batch_size=2))
            | beam.Map(lambda f: f.shape)
        )
        assert_that(out, equal_to([f.shape for f in direct]))
    assert [f.shape for f in direct] == [(8, 32), (3, 32), (6, 32)]


def test_the_image_pass_shape_is_part_of_the_fingerprint_unless_it_is_32():
    from mbm.extractors.handler import features_fingerprint

    image, audio = create_extractor("efficientnet-lite0", {}), create_extractor("logmel", {})
    assert features_fingerprint(image, 32) == image.fingerprint()
    others = {features_fingerprint(image, n) for n in (1, 16, 64)}
    assert len(others) == 3 and image.fingerprint() not in others
    assert features_fingerprint(image, 16) == features_fingerprint(image, 16)
    assert features_fingerprint(audio, 1) == features_fingerprint(audio, 64) == audio.fingerprint()
