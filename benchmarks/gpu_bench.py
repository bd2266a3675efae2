"""Extraction and training throughput on one GPU: images/s, sentences/s, audio-seconds/s, train samples/s.

Parts (each bounded by --seconds of timed work, after untimed warm-up calls):

- image: the sample photos re-encoded as distinct JPEGs; (a) decode + clean only, in DataLoader
  worker processes running the pipeline's image cleaner; (b) the efficientnet-lite0 extractor's
  ``featurize`` on decoded arrays; (c) end to end, decode workers feeding ``featurize`` (pinned memory);
- text: the hf-text extractor on a MiniLM-shaped encoder with random weights, on captions of 5-60 words;
- audio: the logmel extractor on 2-10 s clips already decoded, in arrival order and length-bucketed;
  then WAV decode + clean in workers, alone and feeding the extractor;
- train: ``Trainer.train_step`` on cached batches, then fed by the streaming loader;
- preprocess: the whole ``mbm preprocess`` job (Beam, one worker per core) on the sample media
  repeated to thousands of samples, at two sizes (the marginal rate leaves start-up out), then with
  bigger text and image batches (``benchmarks/gpu_preprocess.py``).

Runs offline (nothing is downloaded); only the preprocess part needs Apache Beam. ``benchmarks/gpu.sh`` wraps it:

    python benchmarks/gpu_bench.py --device cuda --json out.json
    python benchmarks/gpu_bench.py --device cpu --quick        # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from gpu_extract import Sizes, run_audio, run_image, run_text  # noqa: E402
from gpu_monitor import GpuMonitor  # noqa: E402
from gpu_preprocess import PreprocessSizes, run_preprocess  # noqa: E402
from gpu_train import TrainSizes, run_train  # noqa: E402

PARTS = ("image", "text", "audio", "train", "preprocess")
TARGETS = {"image_e2e": 2500.0, "text": 10000.0}  # images/s end to end (decode-bound), sentences/s


def cores() -> int:
    from mbm.resources import usable_cores

    return usable_cores()


def preprocess_sizes(args: argparse.Namespace) -> PreprocessSizes:
    if args.quick:
        return PreprocessSizes(small=40, large=80, workers=2, gpu_batches=(64, 16))
    if args.preprocess_samples:
        return PreprocessSizes(small=args.preprocess_samples[0], large=args.preprocess_samples[1])
    return PreprocessSizes()


def sizes_for(args: argparse.Namespace) -> tuple[Sizes, TrainSizes]:
    workers = args.workers if args.workers is not None else max(1, cores() - 1)
    if args.quick:
        sizes = Sizes(images=24, image_batch=8, image_batches=(8,), worker_batch=4, sentences=64, text_batch=32,
                      clips=16, wavs=8, audio_batch=4, workers=min(workers, 2), seconds=args.seconds or 1.0,
                      warmup=1)
        train = TrainSizes(samples=96, samples_per_shard=24, batch=8, workers=min(workers, 2), cached_batches=2,
                           d_model=32, layers=1, heads=2, seconds=args.seconds or 1.0, warmup=1,
                           more_workers=tuple(args.train_more_workers))
    else:
        sizes = replace(Sizes(), workers=workers, seconds=args.seconds or Sizes.seconds)
        train = replace(TrainSizes(), workers=min(args.train_workers, workers), seconds=args.seconds or TrainSizes.seconds,
                        more_workers=tuple(args.train_more_workers))
    if args.text_batch:
        sizes = replace(sizes, text_batch=args.text_batch)
    if args.train_d_model:
        train = replace(train, d_model=args.train_d_model, heads=args.train_heads or train.heads)
    if args.train_layers:
        train = replace(train, layers=args.train_layers)
    return sizes, train


def environment(device: str) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cores": cores(),
           "device": device, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if os.path.isdir("/dev/shm"):  # DataLoader workers hand batches over through it
        shm = os.statvfs("/dev/shm")
        env["dev_shm_free_gib"] = round(shm.f_bavail * shm.f_frsize / 2**30, 1)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # not installed here: the report leaves the version out
        pass
    return env


def fmt_rate(part: dict | None, *keys: str) -> str:
    for key in keys:
        part = part.get(key) if isinstance(part, dict) else None
    return f"{part['per_s']:,.0f}" if isinstance(part, dict) and "per_s" in part else "-"


def fmt_gpu(part: dict | None, *keys: str) -> str:
    for key in keys:
        part = part.get(key) if isinstance(part, dict) else None
    gpu = part.get("gpu") if isinstance(part, dict) else None
    if not gpu or gpu.get("util_mean_pct") is None:
        return "n/a"
    mem = gpu.get("mem_peak_gib")
    return f"{gpu['util_mean_pct']:.0f}%" + (f" / {mem:.1f} GiB" if mem is not None else "")


def pad(audio: dict, key: str) -> str:
    value = audio.get(key, {}).get("padded_per_real")
    return f"{value:.2f} samples per real one" if value else "-"


def targets(results: dict[str, Any], device: str) -> dict[str, str]:
    """Each target: met / not met with the number, or why it cannot be judged here."""
    got = {"image_e2e": results.get("image", {}).get("e2e", {}).get("per_s"),
           # the job's calls (FillBatches: whole passes) where measured; calls in arrival order otherwise
           "text": (results.get("text", {}).get("featurize_filled")
                    or results.get("text", {}).get("featurize", {})).get("per_s")}
    out = {}
    for key, target in TARGETS.items():
        if not device.startswith("cuda"):
            out[key] = "n/a (CPU run)"
        elif got[key] is None:
            out[key] = "not measured"
        else:
            out[key] = f"{'met' if got[key] >= target else 'NOT met'} ({got[key]:,.0f} vs {target:,.0f})"
    return out


def table(results: dict[str, Any], device: str) -> str:
    img, txt, aud, trn, pre = (results.get(p, {}) for p in PARTS)
    best = max(img.get("model", {}).items(), key=lambda kv: kv[1]["per_s"], default=(None, None))
    rows = [
        ("images/s, decode+clean only", fmt_rate(img, "decode"), "n/a", f"{img.get('workers', '-')} workers"),
        (f"images/s, model only (batch {best[0]})", fmt_rate(best[1]), fmt_gpu(best[1]), "efficientnet-lite0"),
        ("images/s, end to end", fmt_rate(img, "e2e"), fmt_gpu(img, "e2e"), f"bound: {img.get('bound', '-')}"),
        ("sentences/s, hf-text featurize", fmt_rate(txt, "featurize"), fmt_gpu(txt, "featurize"),
         f"batch {txt.get('batch', '-')} in arrival order, passes <= {txt.get('pass_bounds', ['-', '-'])[1]} rows"),
        ("sentences/s, the job's calls (FillBatches)", fmt_rate(txt, "featurize_filled"),
         fmt_gpu(txt, "featurize_filled"), f"{txt.get('padding', {}).get('filled', '-')} token slots per token"),
        *((f"sentences/s, the job's calls, passes <= {name.removeprefix('featurize_filled_rows')} rows",
           fmt_rate(txt, name), fmt_gpu(txt, name), f"{txt[name].get('slots_per_token', '-')} token slots per token")
          for name in sorted((n for n in txt if n.startswith("featurize_filled_rows")),
                             key=lambda n: -int(n.removeprefix("featurize_filled_rows")))),
        ("audio-s/s, logmel, arrival order", fmt_rate(aud, "arrival"), fmt_gpu(aud, "arrival"),
         f"decode excluded, {pad(aud, 'arrival')}"),
        ("audio-s/s, logmel, length-bucketed", fmt_rate(aud, "bucketed"), fmt_gpu(aud, "bucketed"),
         f"decode excluded, {pad(aud, 'bucketed')}"),
        ("audio-s/s, WAV decode+clean only", fmt_rate(aud, "decode"), "n/a", "workers"),
        ("audio-s/s, end to end from WAV", fmt_rate(aud, "e2e"), fmt_gpu(aud, "e2e"), "workers + logmel"),
        ("train samples/s, cached batches", fmt_rate(trn, "memory"), fmt_gpu(trn, "memory"),
         f"{trn.get('memory', {}).get('steps_per_s', '-')} steps/s"),
        ("train samples/s, streaming loader", fmt_rate(trn, "loader"), fmt_gpu(trn, "loader"),
         f"data overhead {trn['data_overhead']:.0%}" if "data_overhead" in trn else "-"),
        *((f"train samples/s, loader with {name.split('_')[1]} workers", fmt_rate(trn, name), fmt_gpu(trn, name),
           f"data overhead {trn[name]['data_overhead']:.0%}") for name in trn
          if name.startswith("loader_") and name.endswith("_workers")),
        *((f"held-out samples/s, evaluation {name.removeprefix('eval_').replace('_', ' ')}", fmt_rate(trn, name),
           "-", f"{trn[name]['seconds_per_pass']} s a pass of {trn[name]['samples']}")
          for name in trn if name.startswith("eval_")),
        *((f"samples/s, loader alone, {name.split('_')[2]} workers", fmt_rate(trn, name), "n/a", "no step")
          for name in trn if name.startswith("loader_alone_")),
        *((f"train samples/s, loader, registered feed{', alone' if name.endswith('alone') else ''}",
           fmt_rate(trn, name), fmt_gpu(trn, name),
           f"data overhead {trn[name]['data_overhead']:.0%}" if not name.endswith("alone") else "no step")
          for name in ("loader_registered", "loader_registered_alone") if name in trn),
        *preprocess_rows(pre),
    ]
    widths = [max(len(r[i]) for r in rows + [("measure", "rate", "GPU util / peak mem", "note")]) for i in range(4)]
    line = "  ".join(f"{{:{'<' if i in (0, 3) else '>'}{w}}}" for i, w in enumerate(widths))
    out = [line.format("measure", "rate", "GPU util / peak mem", "note"), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    for key, verdict in targets(results, device).items():
        out.append(f"target {key} (>= {TARGETS[key]:,.0f}/s): {verdict}")
    layout = img.get("layout")
    if layout and layout.get("fused"):
        out.append(f"image convs: {layout['convs']} fused oneDNN convolutions (CPU, float32), features "
                   f"{', '.join(layout['output_dtypes'])}")
    elif layout:
        out.append(f"image convs: {layout['channels_last_inputs']}/{layout['convs']} channels_last inputs, "
                   f"outputs {', '.join(layout['output_dtypes'])}")
    if "model_no_autotune" in img:
        out.append(f"image model only, batch {img['model_no_autotune']['batch']}, cudnn.benchmark off (as in the "
                   f"pipeline): {img['model_no_autotune']['per_s']:,.0f} images/s")
    if txt.get("padding"):
        out.append(f"text token slots per real token: {txt['padding']}")
    if "weights" in txt:
        out.append("text weights are random (same architecture and tokenizer): throughput is that of the real model")
    for part, err in results.get("errors", {}).items():
        out.append(f"{part}: FAILED: {err.splitlines()[-1]}")
    for part in results.get("skipped", []):
        out.append(f"{part}: skipped (time budget)")
    return "\n".join(out)


def preprocess_rows(pre: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The preprocess part's rows: each run's whole-process rates, and the marginal rate."""
    rows = []
    for name, r in pre.get("runs", {}).items():
        gpu = r.get("gpu", {}).get("util_mean_pct")
        rows.append((f"samples/s, mbm preprocess, {name}", f"{r['samples'] / r['wall_s']:,.0f}",
                     "n/a" if gpu is None else f"{gpu:.0f}%",
                     f"whole process {r['wall_s']:.0f} s; {r['images'] / r['wall_s']:,.0f} images/s"))
    m = pre.get("marginal", {})
    if m.get("samples_per_s") is not None:
        rows.append(("samples/s, mbm preprocess, marginal", f"{m['samples_per_s']:,.0f}", "n/a",
                     f"{m['images_per_s']:,.0f} images/s, {pre.get('workers', '-')} Beam workers"))
    return rows


def sample_pair(text: str) -> tuple[int, int]:
    """"SMALL,LARGE": two sample counts, 1 <= SMALL < LARGE."""
    try:
        small, large = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SMALL,LARGE (two integers), got {text!r}") from None
    if not 1 <= small < large:
        raise argparse.ArgumentTypeError(f"expected 1 <= SMALL < LARGE, got {text!r}")
    return small, large


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny inputs and ~1 s per measure (a CPU smoke run)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per measure (default 12, so that a default run does every part within --budget; quick 1)")
    p.add_argument("--budget", type=float, default=420.0, help="skip parts that would end past this many seconds")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: cores - 1)")
    p.add_argument("--text-batch", type=int, default=None, help="sentences per featurize call (default 1024)")
    p.add_argument("--train-workers", type=int, default=8)
    p.add_argument("--train-more-workers", type=lambda t: [int(x) for x in t.split(",")], default=[],
                   metavar="N[,N...]", help="also measure the training loader with these worker counts")
    p.add_argument("--train-d-model", type=int, default=None)
    p.add_argument("--train-heads", type=int, default=None)
    p.add_argument("--train-layers", type=int, default=None)
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave cudnn autotuning off, as mbm's pipeline does")
    p.add_argument("--preprocess-samples", type=sample_pair, default=None, metavar="SMALL,LARGE",
                   help="samples in the preprocess part's first run and in its two others (default 8000,24000)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tmp", default=None, help="folder for generated inputs (default: a temporary one)")
    args = p.parse_args(argv)
    bad = sorted(set(args.parts.split(",")) - set(PARTS))
    if bad:
        p.error(f"--parts: unknown {', '.join(bad)}; choose from {', '.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    return args


def estimate(part: str, seconds: float) -> float:
    """Rough wall time of a part on the GPU machine: timed measures plus set-up."""
    return {"image": 4.3 * seconds + 15, "text": 3 * seconds + 25, "audio": 2 * seconds + 10,
            "train": 3.5 * seconds + 35, "preprocess": 90}[part]  # train: memory, loader, registered feed


def run(args: argparse.Namespace, log: Callable[[str], None] = print,
        save: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """All selected parts in order; ``save`` gets the results so far after each part (a timeout keeps them)."""
    device = args.device
    if args.quick:
        torch.set_num_threads(1)  # a smoke run on a shared CPU: oversubscribed threads stall it
    torch.backends.cudnn.benchmark = device == "cuda" and not args.no_cudnn_benchmark
    sizes, train_sizes = sizes_for(args)
    results: dict[str, Any] = {"env": environment(device), "sizes": asdict(sizes), "train_sizes": asdict(train_sizes),
                               "errors": {}, "skipped": []}
    log(f"environment: {json.dumps(results['env'])}")
    if device == "cpu" and not args.quick:
        log("note: full sizes on the CPU take many minutes (the training part most); --quick is the CPU smoke run")
    monitor = GpuMonitor(device)
    results["env"]["gpu_sampler"] = monitor.source
    start = time.perf_counter()
    runners = {"image": lambda t: run_image(sizes, device, monitor, t, log),
               "text": lambda t: run_text(sizes, device, monitor, t, log),
               "audio": lambda t: run_audio(sizes, device, monitor, t, log),
               "train": lambda t: run_train(train_sizes, device, monitor, t, log),
               "preprocess": lambda t: run_preprocess(preprocess_sizes(args), device, monitor, t, log)}
    with tempfile.TemporaryDirectory(prefix="mbm-gpu-bench-", dir=args.tmp) as tmp:
        for part in args.parts.split(","):
            elapsed = time.perf_counter() - start
            if not args.quick and elapsed + estimate(part, sizes.seconds) > args.budget:
                results["skipped"].append(part)
                log(f"{part}: skipped, {elapsed:.0f} s spent of a {args.budget:.0f} s budget")
                continue
            part_start = time.perf_counter()
            try:
                results[part] = run_part(runners[part], os.path.join(tmp, part))
            except Exception:  # noqa: BLE001 - one failing part must not lose the others' numbers
                results["errors"][part] = traceback.format_exc()
                log(f"{part}: FAILED\n{results['errors'][part]}")
            log(f"{part}: {time.perf_counter() - part_start:.0f} s")
            save(results)
            if device == "cuda":
                torch.cuda.empty_cache()
    results["targets"] = targets(results, device)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    return results


def run_part(runner: Callable[[str], dict], folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    return runner(folder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def save(results: dict[str, Any]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")

    results = run(args, log=lambda msg: print(msg, flush=True), save=save)
    save(results)
    print()
    print(table(results, args.device))
    print(f"wall time {results['wall_s']:.0f} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
