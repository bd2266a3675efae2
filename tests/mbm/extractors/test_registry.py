import subprocess
import sys

import pytest

from mbm.extractors import (
    DEFAULTS,
    Extractor,
    ExtractorConfig,
    available,
    create_extractor,
    register_extractor,
)
from mbm.extractors.audio import LogMelConfig, LogMelExtractor


def test_builtins_are_registered_and_defaults_match_their_modality():
    assert {
        "minilm",
        "hf-text",
        "efficientnet-lite0",
        "torchvision",
        "hf-image",
        "logmel",
        "hf-audio",
    } <= set(available())
    assert available() == sorted(available())
    for modality, name in DEFAULTS.items():
        assert create_extractor(name).modality == modality


def test_unknown_name_lists_available_names():
    with pytest.raises(ValueError, match="unknown extractor 'bert-huge'.*logmel.*minilm"):
        create_extractor("bert-huge")


def test_unknown_option_names_the_key_and_the_valid_keys():
    with pytest.raises(ValueError, match="'n_mel'.*'logmel'.*n_mels") as err:
        create_extractor("logmel", {"n_mel": 40})
    assert "hop_length" in str(err.value)


def test_options_build_the_config():
    extractor = create_extractor("logmel", {"n_mels": 40, "hop_length": 320})
    assert isinstance(extractor, LogMelExtractor)
    assert extractor.config == LogMelConfig(n_mels=40, hop_length=320)
    assert extractor.dim == 40


def test_register_rejects_bad_classes_and_name_clashes():
    class NoModality(LogMelExtractor):
        name = "no-modality"
        modality = "smell"

    with pytest.raises(ValueError, match="modality"):
        register_extractor(NoModality)

    class Clash(LogMelExtractor):
        name = "logmel"

    with pytest.raises(ValueError, match="already registered"):
        register_extractor(Clash)
    assert create_extractor("logmel").__class__ is LogMelExtractor


def test_extractor_rejects_a_foreign_config():
    with pytest.raises(TypeError, match="LogMelConfig"):
        LogMelExtractor(ExtractorConfig())
    assert issubclass(LogMelExtractor, Extractor)


def test_import_is_cheap():
    code = (
        "import sys, mbm.extractors as m; m.available(); m.create_extractor('minilm').dim;"
        "heavy = [k for k in ('torch', 'transformers', 'torchvision', 'torchaudio', 'apache_beam') if k in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
