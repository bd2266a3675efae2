"""Streaming loader and training data overhead, side by side in one run.

Writes a synthetic dataset in the `mbm preprocess` contract (realistic feature shapes, float16,
some modalities missing) of --samples samples and a 4x copy, then measures:

1. streaming, one epoch each, --reps times interleaved: the mbm loader (the trainer's path: train
   split, shuffle buffer, collate) and plain `webdataset.WebDataset` with the same decoding,
   samples and collate, with each of --workers data-loader workers; and the tar bytes alone;
2. training data overhead: `Trainer.train_step` fed by its loader vs the same batches in memory,
   for each of --train-workers;
3. memory: peak RSS of one loader epoch (child process + workers) at 1x and 4x the dataset size.

With --data, an existing dataset folder (what `mbm preprocess` wrote) replaces the synthetic one, and
the 4x dataset of the memory check is a view that lists each of its shards four times. The loaders
deliver, and the training part trains, the samples of --task: classify (the default where the dataset
has labels; the synthetic one has), else retrieve between the two modalities found together most
often, as `mbm train --task retrieve` picks them (a caption dataset: image and text), else generate.

Prints a table and, with --write, updates the section in docs/benchmarks.md.

    .venv/bin/python benchmarks/stream.py --write
    .venv/bin/python benchmarks/stream.py --samples 300 --reps 1 --steps 10   # a quick check
    .venv/bin/python benchmarks/stream.py --samples 300 --profile              # where an epoch's time goes
    .venv/bin/python benchmarks/stream.py --breakdown    # loader CPU per batch; step time, wait and CPU
    .venv/bin/python benchmarks/stream.py --scan --workers 1,2,4   # the scan per sample: fresh, from disk,
                                                                    # from memory; workers' CPU with and without
    .venv/bin/python benchmarks/stream.py --data out/mydata   # another dataset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from report import cores_description, cpu_description, write_section

HEAD = "## Streaming and training overhead"
TARGETS = {"ratio": 0.9, "overhead": 0.05, "memory": 1.2}
USES = {"classify": "unlabelled", "retrieve": "lacking one of the pair", "generate": "without text"}  # the rest


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="samples in the dataset (default 2000)")
    ap.add_argument("--per-shard", type=int, default=100, help="samples per shard (default 100)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (default 3)")
    ap.add_argument("--workers", type=ints, default=[1, 2], help="loader workers to compare (default 1,2)")
    ap.add_argument("--train-workers", type=ints, default=[0, 2],
                    help="loader workers for the training overhead (default 0,2; 0 is mbm train's default)")
    ap.add_argument("--memory-workers", type=int, default=None, help="loader workers for the memory check "
                    "(default: the largest of --workers)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50, help="timed optimizer steps (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--profile", action="store_true", help="only cProfile one epoch of each reader (0 workers)")
    ap.add_argument("--breakdown", action="store_true", help="only print the loader's CPU time per batch and, "
                    "for each of --train-workers, the training step's wall time, wait for data and CPU time")
    ap.add_argument("--scan", action="store_true", help="only print the CPU time per sample of the stream's scan "
                    "(every shard scanned, its scans replayed from MBM_SCAN_DIR's files, and from memory), and "
                    "the CPU per batch of each of --workers with the scans on disk and without")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a dataset folder written by mbm preprocess, instead of the synthetic dataset")
    ap.add_argument("--task", choices=("classify", "retrieve", "generate"), default=None,
                    help="the task whose samples the loaders deliver and the training part trains (default: "
                    "classify where the dataset has labels, else retrieve, else generate)")
    ap.add_argument("--pair", default=None, help=argparse.SUPPRESS)  # retrieve's pair, for --child-epoch
    ap.add_argument("--child-epoch", metavar="DATA", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.data and args.write:
        ap.error("--write records the synthetic dataset; leave out --data")
    for name in ("samples", "per_shard", "reps", "batch_size", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or any(w < 0 for w in (*args.workers, *args.train_workers)):
        ap.error("--warmup and loader worker counts must be >= 0")
    if not args.workers or not args.train_workers:
        ap.error("--workers and --train-workers need at least one count, e.g. 0,2")
    if args.data:
        from mbm.data.source import resolve_data

        try:
            resolve_data(args.data)
        except ValueError as e:
            ap.error(str(e))
    return args


def base_config(data: str, args: argparse.Namespace):
    from mbm.train.config import TrainConfig

    pair = args.pair.split(",") if args.pair else []
    return TrainConfig(data=data, task=args.task, pair=pair, batch_size=args.batch_size, workers=0)


def pick_task(source, args: argparse.Namespace) -> None:
    """``args.task`` (and ``args.pair`` for retrieve) for ``source``: what --task says, else classify where it
    has labels, else retrieve between the two modalities found together most often, else generate."""
    from mbm.train.build import common_pair

    task = args.task
    if task is None:
        task = "classify" if source.labels else "retrieve"
    if task == "retrieve":
        try:
            args.pair = ",".join(common_pair(source))
        except ValueError:
            if args.task == "retrieve":
                raise SystemExit(f"--task retrieve: no sample of {source.spec} has two modalities") from None
            task = "generate"
    if task == "classify" and not source.labels:
        raise SystemExit(f"--task classify: {source.spec} has no labelled samples")
    if task == "generate" and not has_text(source):
        why = "" if args.task else " no labels (classify), no sample with two modalities (retrieve),"
        raise SystemExit(f"--data {source.spec}: nothing to train on:{why} no sample with a text (generate)")
    args.task = task


def has_text(source, limit: int = 1000) -> bool:
    """Whether one of the first ``limit`` samples of ``source`` has a text (what generate trains on)."""
    from mbm.data.shards import iter_tar

    seen = 0
    for path in source.shards:
        try:
            for raw in iter_tar(path, lazy=True):
                text = json.loads(raw.get("json") or b"{}").get("text")
                if isinstance(text, str) and text:
                    return True
                seen += 1
                if seen >= limit:
                    return False
        except Exception:  # noqa: BLE001 - a corrupt shard or json: the loader reports it when it reads it
            continue
    return False


def child_epoch(args: argparse.Namespace) -> int:
    """One mbm loader epoch (the memory check's child process); prints its timing as JSON."""
    from stream_read import mbm_epoch, with_workers

    from mbm.data.source import resolve_data

    cfg = with_workers(base_config(args.child_epoch, args), args.workers[0])
    epoch = mbm_epoch(resolve_data(args.child_epoch), cfg)
    print(json.dumps({"seconds": epoch.seconds, "samples": epoch.samples}))
    return 0


def profile(source, cfg) -> None:
    import cProfile
    import pstats

    from stream_read import mbm_epoch, wds_epoch, with_workers

    for name, reader in (("mbm loader", mbm_epoch), ("plain webdataset", wds_epoch)):
        prof = cProfile.Profile()
        prof.enable()
        epoch = reader(source, with_workers(cfg, 0))
        prof.disable()
        print(f"\n=== {name}, 0 workers: {epoch.seconds:.2f} s, {epoch.samples} samples in batches")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def breakdown(source, cfg, args, tmp: str) -> None:
    from stream_read import loader_cpu, with_workers
    from stream_train import step_breakdown

    print("| loader workers | main process CPU ms/batch | workers' CPU ms/batch | wall ms/batch |")
    print("| ---: | ---: | ---: | ---: |")
    for w in sorted({0, *args.workers}):
        main, workers, wall = loader_cpu(source, with_workers(cfg, w), epochs=max(args.reps, 3))
        print(f"| {w} | {main:.1f} | {workers:.1f} | {wall:.1f} |")
    if sys.platform.startswith("linux"):
        from stream_read import persistent_epochs

        print("\nWorkers that live across epochs, as the trainer's (the first epoch scans the shards; later "
              "epochs replay the scans from memory, or with MBM_SCAN_CACHE=0 from MBM_SCAN_DIR; with "
              "MBM_SCAN_DIR=off too, every epoch scans):\n")
        print("| loader workers | epoch | workers' CPU ms/batch | wall ms/batch |")
        print("| ---: | ---: | ---: | ---: |")
        for w in sorted(set(args.workers) - {0}):
            for e, (cpu, wall) in enumerate(persistent_epochs(source, with_workers(cfg, w), epochs=4)):
                print(f"| {w} | {e + 1} | {cpu:.1f} | {wall:.1f} |")
    print("\n| loader workers | ms/step | of which waiting for a batch | training process CPU ms/step |")
    print("| ---: | ---: | ---: | ---: |")
    for w in args.train_workers:
        b = step_breakdown(with_workers(cfg, w), os.path.join(tmp, f"breakdown-{w}"), args.warmup, args.steps)
        print(f"| {w} | {b.step_ms:.1f} | {b.wait_ms:.1f} | {b.cpu_ms:.0f} |")


def scan_workers(source, cfg, args) -> None:
    """Workers living across 4 epochs with no scan memory (MBM_SCAN_CACHE=0, a dataset past it): their
    CPU per batch with the scans kept on disk and with MBM_SCAN_DIR=off, --reps rounds interleaved."""
    from stream_read import environ, persistent_epochs, with_workers

    workers = sorted(set(args.workers) - {0})
    if not workers or not sys.platform.startswith("linux"):
        return
    runs: dict[tuple[str, int], list[list[tuple[float, float]]]] = {}
    for _ in range(args.reps):
        for mode in ("disk", "off"):  # on disk: a fresh folder of persistent_epochs's
            with environ(MBM_SCAN_CACHE="0", MBM_SCAN_DIR=None if mode == "disk" else "off"):
                for w in workers:
                    runs.setdefault((mode, w), []).append(persistent_epochs(source, with_workers(cfg, w), epochs=4))
    print(f"\nWorkers living across 4 epochs, MBM_SCAN_CACHE=0, {args.reps} round(s) interleaved (the first epoch "
          "scans, with the scans on disk after the loader's parallel scan; workers' CPU does not count that scan):\n")
    print("| loader workers | workers' CPU ms/batch, epochs 2–4: scans on disk | the same, MBM_SCAN_DIR=off "
          "| epoch 1: on disk | epoch 1: off |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for w in workers:
        later = {mode: [cpu for epochs in runs[(mode, w)] for cpu, _ in epochs[1:]] for mode in ("disk", "off")}
        first = {mode: " / ".join(f"{epochs[0][0]:.1f}" for epochs in runs[(mode, w)]) for mode in ("disk", "off")}
        print(f"| {w} | {min(later['disk']):.1f}–{max(later['disk']):.1f} | {min(later['off']):.1f}–"
              f"{max(later['off']):.1f} | {first['disk']} | {first['off']} |")


def spread(values: list[float], fmt: str) -> tuple[str, str]:
    """(median, min–max) formatted."""
    return format(statistics.median(values), fmt), f"{format(min(values), fmt)}–{format(max(values), fmt)}"


def streaming(source, cfg, args, n: int) -> tuple[list[str], dict[int, float]]:
    """Rows of the streaming table and, per worker count, the ratio of median rates mbm / webdataset."""
    from stream_read import mbm_epoch, no_kept_scans, tar_epoch, wds_epoch, with_workers

    runs: dict[tuple[str, int], list] = {}
    for _ in range(args.reps):  # interleaved, so drift in the machine's load hits every reader alike
        for w in args.workers:
            for name, reader in (("mbm", mbm_epoch), ("wds", wds_epoch)):
                with no_kept_scans():  # a run's first epoch on this data
                    runs.setdefault((name, w), []).append(reader(source, with_workers(cfg, w)))
        runs.setdefault(("tar", 1), []).append(tar_epoch(source, cfg))
    size_mb = sum(os.path.getsize(p) for p in source.shards) / 1e6
    labels = {"mbm": "mbm loader", "wds": "plain webdataset", "tar": "tar bytes only (tarfile, 1 process)"}
    rows, ratios = [], {}
    for (name, w), epochs in runs.items():
        rates = [n / e.seconds for e in epochs]
        med, rng = spread(rates, ".0f")
        mbs = statistics.median(size_mb / e.seconds for e in epochs)
        batches = epochs[0].batches if name != "tar" else "–"
        rows.append(f"| {labels[name]} | {w if name != 'tar' else '–'} | {med} | {rng} | {mbs:.0f} | "
                    f"{batches} | {epochs[0].samples} |")
    for w in args.workers:
        ratios[w] = (statistics.median(n / e.seconds for e in runs[("mbm", w)])
                     / statistics.median(n / e.seconds for e in runs[("wds", w)]))
    return rows, ratios


def training(cfg, args, tmp: str) -> tuple[list[str], dict[int, float]]:
    from stream_read import with_workers
    from stream_train import overhead

    runs: dict[int, list] = {}
    for rep in range(args.reps):
        for w in args.train_workers:
            # which of the pair runs first alternates, so drift in the machine's load cancels out
            runs.setdefault(w, []).append(overhead(with_workers(cfg, w), tmp, args.warmup, args.steps,
                                                   f"w{w}-r{rep}", memory_first=rep % 2 == 1))
    rows, result = [], {}
    for w, times in runs.items():
        lm, lr = spread([t.loader * 1e3 for t in times], ".1f")
        mm, mr = spread([t.memory * 1e3 for t in times], ".1f")
        om, orng = spread([t.overhead * 100 for t in times], ".1f")
        result[w] = statistics.median(t.overhead for t in times)
        rows.append(f"| {w} | {lm} ({lr}) | {mm} ({mr}) | {om} % ({orng}) |")
    return rows, result


def memory(datasets: list[tuple[str, str, int]], workers: int, args: argparse.Namespace) -> tuple[list[str], float]:
    from stream_memory import peak_of_epoch

    task = ["--task", args.task, *(["--pair", args.pair] if args.pair else [])]
    peaks = [(label, n, peak_of_epoch(Path(__file__).resolve(), path, workers, task,
                                              batch_size=args.batch_size)) for label, path, n in datasets]
    rows = [f"| {label} | {n} | {p.tree_mib:.0f} | {p.largest_mib:.0f} | {p.seconds:.1f} |" for label, n, p in peaks]
    return rows, peaks[-1][2].tree_mib / peaks[0][2].tree_mib


def times_four(source, folder: str) -> str:
    """A dataset folder under ``folder`` whose version lists each of ``source``'s shards four times
    (symlinks): 4x the samples to read, each id four times, for the memory check of a real dataset."""
    from schemas import DatasetManifest

    os.makedirs(os.path.join(folder, "shards"))
    sizes = source.shard_sizes or [0] * len(source.shards)
    shards, counts = [], []
    for copy in range(4):
        for i, path in enumerate(source.shards):
            name = f"shards/c{copy}-{i:06d}.tar"
            os.symlink(os.path.abspath(path), os.path.join(folder, name))
            shards.append(name)
            counts.append(sizes[i])
    manifest = DatasetManifest(version=1, shards=shards, shard_sizes=counts, num_samples=sum(counts), counts={},
                               index="", feature_dims=dict(source.feature_dims), labels=list(source.labels))
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    return folder


def machine() -> str:
    import torch
    import webdataset

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {cores_description()} ({cpu_description()}), {dev}, "
            f"Python {platform.python_version()}, "
            f"torch {torch.__version__}, webdataset {webdataset.__version__}; load average at start {load}")


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def report(args, info: dict, stream_rows, ratios, train_rows, overheads, mem_rows, mem_ratio) -> str:
    ratio_txt = "; ".join(f"{w} worker{'s' * (w != 1)}: {r:.2f} ({verdict(r >= TARGETS['ratio'])})"
                          for w, r in ratios.items())
    over_txt = "; ".join(f"{w} worker{'s' * (w != 1)}: {o:.1%} ({verdict(o < TARGETS['overhead'])})"
                         for w, o in overheads.items())
    return "\n".join([
        f"Machine: {info['machine']}. Dataset: {info['dataset']} in {info['shards']} shards "
        f"({info['size_mb']:.0f} MB), in the page cache. Each figure: median of {args.reps} run(s), min–max in "
        "brackets or beside it.",
        "",
        f"**Streaming**, one epoch, batch {args.batch_size}, shuffle buffer {info['buffer']}, worker start-up "
        f"included; rate = dataset samples / epoch wall time. Both loaders deliver the train split's samples that "
        f"{info['task']} uses (the rest: held-out, or {USES[args.task]}) through mbm's `collate` (float16 "
        "features); every mbm "
        "loader worker reads every shard's headers and json but reads and decodes only the arrays of the "
        "batches it owns (the same order for any worker count) and sends each batch as one shared-memory "
        "buffer; webdataset gives each worker its own shards and sends torch's usual one segment per tensor. "
        "Each mbm epoch starts with no shard scan kept on disk, as a run's first epoch on new data does (with "
        "2 or more workers the loader scans the shards in parallel before they start; later epochs and runs "
        "replay the scans: \"Shard scans kept on disk\").",
        "",
        "| reader | workers | samples/s | min–max | MB/s | batches | samples in batches |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *stream_rows,
        "",
        f"**Training data overhead**: `Trainer.train_step` (default model, {info['task']}, batch {args.batch_size}) "
        f"over {args.steps} steps after {args.warmup} warm-up steps, fed by its streaming loader vs the same "
        "batches collected in memory first; overhead = (loader − memory) / loader. On a CPU-only machine "
        "the training step already uses every core, so loader workers take their CPU time from it "
        "(they run at niceness 19, `MBM_LOADER_NICE`). The timed steps cross an epoch boundary "
        f"({info['batches']} batches per epoch here); the workers live for the whole run.",
        "",
        "| loader workers | ms/step, loader | ms/step, memory | overhead |",
        "| ---: | ---: | ---: | ---: |",
        *train_rows,
        "",
        f"**Memory**: peak resident memory of one mbm loader epoch ({info['memory_workers']} workers) in a "
        "child process, sampled from /proc every 20 ms: the sum over the process and its workers, and the "
        "largest single process.",
        "",
        "| dataset | samples | peak RSS, all processes MiB | largest process MiB | epoch s |",
        "| --- | ---: | ---: | ---: | ---: |",
        *mem_rows,
        "",
        "| target | result |",
        "| --- | --- |",
        f"| mbm loader / plain webdataset ≥ {TARGETS['ratio']} | {ratio_txt} |",
        f"| training data overhead < {TARGETS['overhead']:.0%} | {over_txt} |",
        f"| peak RSS 4× / 1× dataset ≤ {TARGETS['memory']} | {mem_ratio:.2f} ({verdict(mem_ratio <= TARGETS['memory'])}) |",
    ])


def write_doc(table: str) -> None:
    command = shlex.join([".venv/bin/python", "benchmarks/stream.py", *sys.argv[1:]])
    write_section(HEAD, f"Reproduce: `{command}`\n\n{table}")


def main() -> int:
    args = parse_args()
    if args.child_epoch:
        return child_epoch(args)
    from stream_read import make_dataset

    with tempfile.TemporaryDirectory(prefix="mbm-bench-stream-") as tmp:
        if not os.environ.get("MBM_SCAN_DIR", "").strip():  # scans of the datasets written here go with them
            os.environ["MBM_SCAN_DIR"] = os.path.join(tmp, "scans")
        start = time.perf_counter()
        if args.data:
            from mbm.data.source import resolve_data

            x1 = args.data
            source = resolve_data(x1)
            n = sum(source.shard_sizes) if source.shard_sizes else int(source.counts.get("ok", 0))
            described = f"{n} samples of {x1}"
        else:
            x1 = os.path.join(tmp, "x1")
            source = make_dataset(x1, args.samples, args.per_shard)
            n = args.samples
            described = (f"{n} synthetic samples (float16 text 20–60×384, image 49×1280, audio 100–400×80; each "
                         "modality absent from 10–15 % of samples, 5 % unlabelled)")
        print(f"dataset: {n} samples, {len(source.shards)} shards "
              f"({time.perf_counter() - start:.0f} s to write)", file=sys.stderr)
        pick_task(source, args)
        print(f"task: {args.task}" + (f" ({args.pair})" if args.task == "retrieve" else ""), file=sys.stderr)
        cfg = base_config(x1, args)
        if args.profile:
            profile(source, cfg)
            return 0
        if args.breakdown:
            breakdown(source, cfg, args, tmp)
            return 0
        if args.scan:
            from stream_read import scan_costs

            folder = tempfile.mkdtemp(prefix="scans-", dir=tmp)
            if not args.data:  # written seconds ago: date the shards back so that their scans are kept on disk
                then = time.time_ns() - 3600 * 10**9
                for shard in source.shards:
                    os.utime(shard, ns=(then, then))
            c = scan_costs(source, cfg, max(args.reps, 5), folder)
            print(f"{c['samples']} samples in {c['shards']} shards; CPU µs per sample, best of {max(args.reps, 5)}: "
                  f"scanned {c['scanned_us']:.1f}, replayed from disk {c['disk_us']:.1f} "
                  f"({c['scanned_us'] / c['disk_us']:.1f}x), from memory {c['memory_us']:.1f} "
                  f"({c['scanned_us'] / c['memory_us']:.1f}x); {c['files']} scan files, "
                  f"{c['bytes_per_sample']:.0f} bytes a sample")
            scan_workers(source, cfg, args)
            return 0
        task = f"{args.task} ({args.pair.replace(',', '–')})" if args.task == "retrieve" else args.task
        info = {"machine": machine(), "dataset": described, "shards": len(source.shards), "task": task,
                "buffer": cfg.shuffle_buffer,
                "size_mb": sum(os.path.getsize(p) for p in source.shards) / 1e6,
                "memory_workers": args.memory_workers if args.memory_workers is not None else max(args.workers)}
        stream_rows, ratios = streaming(source, cfg, args, n)
        info["batches"] = int(stream_rows[0].split("|")[6])  # the mbm loader's batches in one epoch
        print("streaming done", file=sys.stderr)
        train_rows, overheads = training(cfg, args, tmp)
        print("training done", file=sys.stderr)
        x4 = os.path.join(tmp, "x4")
        if args.data:
            times_four(source, x4)
        else:
            make_dataset(x4, 4 * n, args.per_shard)
        mem_rows, mem_ratio = memory([("1×", x1, n), ("4×", x4, 4 * n)], info["memory_workers"], args)
    table = report(args, info, stream_rows, ratios, train_rows, overheads, mem_rows, mem_ratio)
    print(table)
    if args.write:
        write_doc(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
