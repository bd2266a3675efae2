import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from other_data import main, mixed_manifest  # noqa: E402


def test_the_mixed_manifest_holds_every_modality_in_readable_files(tmp_path):
    mixed_manifest(tmp_path, n=48)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and len({r["id"] for r in rows}) == 48
    assert all(any(k in r for k in ("text", "image", "audio")) for r in rows)
    counts = {k: sum(k in r for r in rows) for k in ("text", "image", "audio")}
    assert all(c > 10 for c in counts.values()), counts
    assert all(5 <= len(r["text"].split()) <= 60 for r in rows if "text" in r)
    sizes, rates, formats = set(), set(), set()
    for r in rows:
        if "image" in r:
            with Image.open(tmp_path / r["image"]) as im:
                im.load()
                sizes.add(im.size)
                formats.add(im.format)
        if "audio" in r:
            info = sf.info(tmp_path / r["audio"])
            rates.add(info.samplerate)
            formats.add(info.format)
            assert 2 <= info.duration <= 15
            x, _ = sf.read(tmp_path / r["audio"], dtype="float32")
            assert np.abs(x).max() > 0.1
    assert {"JPEG", "PNG", "WAV", "FLAC"} <= formats
    assert rates == {16000, 22050, 44100, 48000} and len(sizes) > 3


def test_other_data_asks_for_a_folder(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "--mixed" in capsys.readouterr().err
