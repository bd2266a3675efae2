import argparse
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from preprocess import dataset, precision_arg  # noqa: E402

from jobs.spec import create_extractors, load_spec  # noqa: E402


def test_precision_argument_is_checked():
    assert precision_arg("text=bfloat16") == ("text", "bfloat16")
    for bad in ("text", "txt=bfloat16", "image=float16", "=auto"):
        with pytest.raises(argparse.ArgumentTypeError, match="MODALITY=PRECISION"):
            precision_arg(bad)


def test_dataset_spec_carries_the_precision_to_every_pipelines_extractors(tmp_path):
    spec = load_spec(str(dataset(tmp_path, 12, {"text": "bfloat16"})))
    extractors = create_extractors(spec)
    assert extractors["text"].config.precision == "bfloat16"
    assert extractors["image"].config.precision == "auto" and extractors["audio"].config.precision == "auto"
    manifest = (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 12
    plain = load_spec(str(dataset(tmp_path / "plain", 3)))
    assert all(ex.config.precision == "auto" for ex in create_extractors(plain).values())
