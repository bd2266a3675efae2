import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from mbm.extractors import create_extractor
from mbm.extractors.audio import LogMelConfig
from mbm.extractors.hashing import weights_sha256
from mbm.extractors.hf_audio import HFAudioConfig
from mbm.extractors.hf_image import HFImageConfig
from mbm.extractors.image import EfficientNetLiteConfig
from mbm.extractors.text import HFTextConfig, MiniLMConfig
from mbm.extractors.torchvision_image import TorchvisionConfig


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: MiniLMConfig(max_length=0), "max_length"),
        (lambda: MiniLMConfig(max_length=True), "max_length"),
        (lambda: MiniLMConfig(max_length=2), "max_length"),
        (lambda: MiniLMConfig(max_length=512, max_batch_tokens=100), "max_batch_tokens"),
        (lambda: HFTextConfig(), "path"),
        (lambda: HFImageConfig(path=""), "path"),
        (lambda: HFAudioConfig(), "path"),
        (lambda: EfficientNetLiteConfig(image_size=16), "image_size"),
        (lambda: TorchvisionConfig(arch="resnet18"), "weights"),
        (lambda: TorchvisionConfig(allow_random="yes"), "allow_random"),
        (lambda: LogMelConfig(win_length=800), "win_length"),
        (lambda: LogMelConfig(f_max=9000.0), "f_max"),
        (lambda: LogMelConfig(f_min=100.0, f_max=50.0), "f_max"),
        (lambda: LogMelConfig(log_offset=0.0), "log_offset"),
        (lambda: LogMelConfig(hop_length=-160), "hop_length"),
        (lambda: LogMelConfig(n_mels=202), "n_mels"),
        (lambda: MiniLMConfig(precision="float16"), "precision"),
        (lambda: EfficientNetLiteConfig(precision=None), "precision"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\.{field} "):
        make()


def test_configs_are_keyword_only_and_round_trip():
    with pytest.raises(TypeError):
        LogMelConfig(16000)
    config = LogMelConfig(n_mels=64, f_max=7000.0)
    assert LogMelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="'nmels'"):
        LogMelConfig.from_dict({"nmels": 3})


def test_fingerprint_follows_the_config():
    a, b = create_extractor("logmel"), create_extractor("logmel", {"n_mels": 80})
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64 and int(a.fingerprint(), 16) >= 0
    assert create_extractor("logmel", {"n_mels": 64}).fingerprint() != a.fingerprint()
    assert (
        create_extractor("minilm", {"max_length": 128}).fingerprint()
        != create_extractor("minilm").fingerprint()
    )


def test_precision_is_in_the_fingerprint_only_when_set():
    """``auto`` (the default) leaves fingerprints as they were before the option existed, so datasets
    made before do not recompute; an explicit precision is part of the fingerprint."""
    import json

    default = create_extractor("logmel")
    config = {k: v for k, v in default.config.to_dict().items() if k != "precision"}
    before = json.dumps({"name": "logmel", "config": config, "weights": [], "revision": 2}, sort_keys=True,
                        separators=(",", ":"), default=str)
    assert default.fingerprint() == hashlib.sha256(before.encode()).hexdigest()
    assert create_extractor("logmel", {"precision": "auto"}).fingerprint() == default.fingerprint()
    prints = {p: create_extractor("minilm", {"precision": p}).fingerprint() for p in ("auto", "float32", "bfloat16")}
    assert len(set(prints.values())) == 3
    assert prints["auto"] == create_extractor("minilm").fingerprint()


def test_fingerprint_is_stable_across_processes():
    code = "import mbm.extractors as m; print(m.create_extractor('minilm').fingerprint(), m.create_extractor('logmel').fingerprint())"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == [create_extractor("minilm").fingerprint(), create_extractor("logmel").fingerprint()]


def test_fingerprint_hashes_weight_bytes_not_their_location(tiny_bert_dir, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_bert_dir, copy)
    original = create_extractor("hf-text", {"path": str(tiny_bert_dir)}).fingerprint()
    assert create_extractor("hf-text", {"path": str(copy)}).fingerprint() == original
    (copy / "README.md").write_text("docs do not change the weights")
    assert create_extractor("hf-text", {"path": str(copy)}).fingerprint() == original
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))  # a new mtime must invalidate the in-process cache
    assert create_extractor("hf-text", {"path": str(copy)}).fingerprint() != original


def test_weights_hash_of_a_file_is_its_sha256(tmp_path):
    file = tmp_path / "w.pt"
    file.write_bytes(b"weights")
    assert weights_sha256(file) == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(ValueError, match="does not exist"):
        weights_sha256(tmp_path / "missing.pt")


def test_weights_hash_of_a_folder_with_a_file_name_that_is_not_utf8(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / os.fsdecode(b"notes_caf\xe9.txt")).write_text("latin-1 name")
    first = weights_sha256(folder)
    (folder / os.fsdecode(b"notes_caf\xe9.txt")).write_text("changed")
    assert len(first) == 64 and weights_sha256(folder) != first
