"""The GPU benchmark's helpers, and a quick CPU run of the whole script (slow)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import gpu_bench  # noqa: E402
from gpu_extract import (  # noqa: E402
    CleanImage,
    audio_batches,
    concat_clips,
    padded_per_real,
    padding_stats,
    regroup,
    split_clips,
)
from gpu_inputs import make_clips, make_jpegs, make_sentences, sample_photos  # noqa: E402
from gpu_monitor import GpuMonitor, timed  # noqa: E402


def test_sentences_have_the_asked_word_counts_and_repeat_with_the_seed():
    sentences = make_sentences(200, seed=3, words=(5, 60))
    counts = [len(s.split()) for s in sentences]
    assert len(sentences) == 200 and min(counts) >= 5 and max(counts) <= 60
    assert max(counts) - min(counts) > 30  # lengths really vary
    assert len(set(sentences)) > 190
    assert make_sentences(200, seed=3) == sentences and make_sentences(200, seed=4) != sentences


def test_jpegs_are_distinct_files_the_image_cleaner_reads(tmp_path):
    paths = make_jpegs(str(tmp_path), 2 * len(sample_photos()) + 1)
    digests = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}
    assert len(digests) == len(paths)
    assert all(Path(p).read_bytes()[:3] == b"\xff\xd8\xff" for p in paths)
    pixels = CleanImage(64)(Path(paths[0]).read_bytes())
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8


def test_clips_last_two_to_ten_seconds():
    clips = make_clips(20, 16000, seed=1)
    seconds = [len(c) / 16000 for c in clips]
    assert min(seconds) >= 2.0 and max(seconds) <= 10.0
    assert all(c.dtype == np.float32 and np.abs(c).max() <= 0.9 + 1e-6 for c in clips)


def test_worker_batches_of_clips_cross_as_one_tensor_and_split_back():
    import torch

    clips = [torch.from_numpy(c) for c in make_clips(5, 8000, seed=2)]
    flat, lengths = concat_clips(clips)
    assert flat.ndim == 1 and lengths.tolist() == [len(c) for c in clips]
    back = split_clips((flat, lengths))
    assert len(back) == 5 and all(np.array_equal(a, c.numpy()) for a, c in zip(back, clips, strict=True))
    # regrouping worker batches into featurize calls keeps every clip in order
    calls = list(regroup(iter([(flat, lengths), concat_clips(clips[:3])]), 4, split_clips))
    assert [len(c) for c in calls] == [4, 4]
    assert np.array_equal(calls[1][3], clips[2].numpy())


def test_length_bucketed_audio_batches_pad_less_and_keep_every_clip():
    rng = np.random.default_rng(0)
    clips = [np.zeros(int(n), np.float32) for n in rng.integers(1000, 10000, size=64)]
    arrival = audio_batches(clips, 8, bucketed=False)
    bucketed = audio_batches(clips, 8, bucketed=True, window=4)
    assert sorted(len(c) for b in bucketed for c in b) == sorted(len(c) for c in clips)
    assert [len(b) for b in arrival] == [8] * 8 == [len(b) for b in bucketed]
    assert padded_per_real(bucketed) < padded_per_real(arrival)
    assert padded_per_real([[clips[0]] * 3]) == 1.0


def test_text_length_buckets_compute_fewer_slots_than_arrival_order():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(8, 90, size=512)]
    stats = padding_stats(lengths, 256, 16384, 256, "cpu", rows=64)
    assert 1.0 <= stats["bucketed"] < stats["arrival_order_64"]


def test_regroup_turns_worker_batches_into_calls_of_a_fixed_size():
    batches = iter([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]])
    assert list(regroup(batches, 4, list)) == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_timed_counts_units_after_warmup():
    calls = []

    def step() -> float:
        calls.append(1)
        return 2.5

    rate = timed(step, seconds=0.0, warmup=2, device="cpu", min_calls=3)
    assert len(calls) == 5 and rate.calls == 3 and rate.units == 7.5
    assert rate.per_s > 0


def test_cpu_monitor_reports_no_utilization():
    monitor = GpuMonitor("cpu")
    with monitor.window() as w:
        pass
    assert monitor.source == "n/a" and w.stats.util_mean is None


def _result(per_s: float, util: float | None = None) -> dict:
    gpu = {"util_mean_pct": util, "mem_peak_gib": 1.5} if util is not None else None
    return {"per_s": per_s, **({"gpu": gpu} if gpu else {})}


def test_table_names_each_rate_and_judges_the_targets_on_cuda():
    results = {
        "image": {"decode": _result(3100), "model": {"256": _result(9000, 80.0)}, "e2e": _result(2900, 35.0),
                  "bound": "decode", "workers": 15},
        "text": {"featurize": _result(8000, 60.0), "batch": 1024, "pass_bounds": [65536, 256]},
        "audio": {"arrival": _result(40000, 20.0)},
        "train": {"memory": {**_result(30000, 70.0), "steps_per_s": 117.2}, "loader": _result(15000, 35.0),
                  "data_overhead": 0.5, "loader_registered": {**_result(28500, 66.0), "data_overhead": 0.05},
                  "loader_registered_alone": _result(60000)},
        "errors": {"x": "Traceback\nValueError: boom"}, "skipped": [],
    }
    verdicts = gpu_bench.targets(results, "cuda")
    assert verdicts["image_e2e"].startswith("met (2,900") and verdicts["text"].startswith("NOT met (8,000")
    assert gpu_bench.targets(results, "cpu")["text"] == "n/a (CPU run)"
    text = gpu_bench.table(results, "cuda")
    assert "images/s, model only (batch 256)" in text and "9,000" in text and "80% / 1.5 GiB" in text
    assert "data overhead 50%" in text and "x: FAILED: ValueError: boom" in text
    assert "loader, registered feed" in text and "data overhead 5%" in text and "60,000" in text


@pytest.mark.slow
def test_quick_cpu_run_measures_every_part(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert gpu_bench.main(["--device", "cpu", "--quick", "--seconds", "0.3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["errors"] == {} and results["skipped"] == []
    image, text, audio, train, pre = (results[p] for p in gpu_bench.PARTS)
    assert image["decode"]["per_s"] > 0 and image["e2e"]["per_s"] > 0
    assert image["layout"] == {"convs": 49, "fused": True, "output_dtypes": ["float16"]}  # the CPU's fused plan
    assert text["featurize"]["per_s"] > 0 and text["featurize"]["unit"] == "sentences"
    assert audio["e2e"]["unit"] == "audio-seconds" and audio["bucketed"]["padded_per_real"] >= 1.0
    assert train["batch_shapes"]["image"][1:] == [49, 1280] and train["loader"]["steps_per_s"] > 0
    assert train["loader_registered"]["steps_per_s"] > 0 and "loader_registered_error" not in train
    assert train["loader_registered_alone"]["hand_over"]["batches"] > 0
    assert [r["samples"] for r in pre["runs"].values()] == [40, 80, 80]  # every sample landed, in each run
    assert all(r["images"] > 0 and r["texts"] > 0 for r in pre["runs"].values())
    # The quick sizes differ by 40 samples, within the start-up's noise: the marginal rate may be absent.
    assert pre["workers"] == 2 and set(pre["marginal"]) == {"samples_per_s", "images_per_s", "texts_per_s"}
    printed = capsys.readouterr().out
    assert "sentences/s, hf-text featurize" in printed and "target text" in printed
    assert "samples/s, mbm preprocess, default 80" in printed


def test_preprocess_job_spec_runs_the_asked_settings(tmp_path):
    from gpu_preprocess import job_spec, marginal

    from jobs.spec import create_extractors, load_spec

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    model = tmp_path / "my model"
    (model).mkdir()
    (model / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    spec = load_spec(str(job_spec(tmp_path, str(model), "cpu", 3, (512, 128))))
    assert spec.runner.device == "cpu" and spec.runner.workers == 3
    assert spec.extract["text"].name == "hf-text" and spec.extract["text"].batch_size == 512
    assert spec.extract["image"].batch_size == 128 and spec.extract["audio"].batch_size == 32
    assert create_extractors(spec)["text"].config.path == str(model)
    plain = load_spec(str(job_spec(tmp_path, str(model), "cuda", 0, None)))
    assert plain.extract["text"].batch_size == 128 and plain.runner.device == "cuda"
    small, large = {"wall_s": 10.0, "samples": 100, "images": 80}, {"wall_s": 14.0, "samples": 500, "images": 400}
    assert marginal(small, large, "samples") == 100.0 and marginal(small, large, "images") == 80.0
    assert marginal(large, {**large}, "samples") is None


def test_table_shows_the_preprocess_runs_and_the_marginal_rate():
    pre = {"runs": {"default 8000": {"wall_s": 20.0, "samples": 8000, "images": 6000, "gpu": {"util_mean_pct": 41.0}},
                    "default 24000": {"wall_s": 40.0, "samples": 24000, "images": 18000,
                                      "gpu": {"util_mean_pct": None}}},
           "marginal": {"samples_per_s": 800.0, "images_per_s": 600.0}, "workers": 16}
    text = gpu_bench.table({"preprocess": pre, "errors": {}, "skipped": []}, "cuda")
    assert "samples/s, mbm preprocess, default 8000" in text and "400" in text and "41%" in text
    assert "whole process 20 s; 300 images/s" in text
    assert "samples/s, mbm preprocess, marginal" in text and "600 images/s, 16 Beam workers" in text
