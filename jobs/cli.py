"""The ``mbm`` command line: preprocess, demo, train, evaluate, generate."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jobs.environment import check_environment
from jobs.runner_config import RUNNERS
from jobs.signals import broken_pipe, report, stop_signals
from jobs.spec import SpecError
from schemas.manifest import listed_splits

EXIT_USAGE = 2
EXIT_FAILED = 1  # the job stopped: out of memory, a failed GPU (what to change is in its message)


def _stop_workers() -> None:
    """SIGTERM, and SIGINT sent to the driver's pid alone (``kill -INT``, ``timeout -s INT``; Ctrl-C
    reaches the terminal's whole process group), reach the driver alone: the workers, their clients and
    the fork server get SIGTERM, and the driver stops as on Ctrl-C (Beam's clean-up waited for workers
    that had not been told, and hung). SIGTERM and not SIGINT: a job started in the background (``&`` in
    a script, nohup) has SIGINT ignored from its start, and so would they."""
    import signal

    from pipelines.proctree import signal_descendants

    signal_descendants(os.getpid(), signal.SIGTERM)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its format but say what to fix
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mbm: error: {message}\n")


def _local_arg(value: str, what: str, example: str) -> str:
    """A path given on the command line, with ``~`` expanded (given quoted, ``"~/x"``, it reaches mbm as
    written) and an empty one refused: ``Path("")`` is the current folder, which a job would write into."""
    if not value.strip():
        raise SpecError(f"{what} is empty; give {example}")
    return os.path.expanduser(value)


def _dataset_dir(args: argparse.Namespace) -> str:
    """The local dataset folder that versions, diff and gc read: they list and delete files as a local file
    system has them, so a remote folder (gs://, s3://) is refused in one line rather than misread."""
    folder = _local_arg(args.dir, "the dataset folder", DATASET_EXAMPLE)
    if "://" in folder:
        raise SpecError(f"mbm {args.command} reads a local dataset folder, not {folder!r}: copy the folder here "
                        f"(gsutil -m cp -r, aws s3 sync) or mount it, and give its local path")
    return folder


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _workers(text: str) -> int:
    """``--workers``: as ``_positive_int``; 0, which means one per core in a spec's [runner] workers, says so."""
    if text.strip() == "0":
        raise argparse.ArgumentTypeError("must be >= 1; leave --workers out (or set [runner] workers = 0) for one "
                                         "worker per core")
    return _positive_int(text)


DATASET_COMMANDS = ("preprocess", "demo", "versions", "diff", "gc")  # none of them needs the trainer
DATASET_EXAMPLE = "the folder mbm preprocess wrote, e.g. out/demo"


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(with_train: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``with_train=False`` leaves out the trainer's commands, which import torch
    (1.5 s that a preprocessing run's driver process would otherwise spend before any work)."""
    parser = _Parser(prog="mbm", description="Multimodal datasets → feature shards → fusion models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pre = sub.add_parser("preprocess", help="run a preprocessing job spec (TOML)",
                         description="Run a preprocessing job. Beam pipeline options may follow `--`.")
    pre.add_argument("spec", help="job spec, e.g. jobs/examples/demo.toml")
    pre.add_argument("--output", help="dataset folder to write (overrides [output] dir)")
    pre.add_argument("--runner", choices=RUNNERS, help="Beam runner (default FnApiRunner: in-process, one worker per core)")
    pre.add_argument("--workers", type=_workers, help="worker processes for local runners (default: one per core)")
    pre.add_argument("--device", help="extractor device: auto, cpu, cuda, cuda:N (default auto)")
    pre.add_argument("--full", action="store_true", help="recompute every sample, not only what changed")
    pre.add_argument("--no-dedupe", action="store_true",
                     help="decode and featurize every copy of a repeated image or clip (overrides [runner] dedupe)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)

    demo = sub.add_parser("demo", help="preprocess the bundled sample dataset")
    demo.add_argument("--output", default="out/demo", help="dataset folder to write (default out/demo)")
    demo.add_argument("--workers", type=_workers, help="worker processes (default: one per core)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)

    ver = sub.add_parser("versions", help="list a dataset folder's versions")
    ver.add_argument("dir", help="dataset folder")
    ver.add_argument("--json", action="store_true", help="print JSON")
    ver.set_defaults(func=cmd_versions)

    dif = sub.add_parser("diff", help="sample ids added / changed / removed between two versions")
    dif.add_argument("dir", help="dataset folder")
    dif.add_argument("a", type=_positive_int, help="older version")
    dif.add_argument("b", type=_positive_int, help="newer version")
    dif.add_argument("--json", action="store_true", help="print JSON")
    dif.set_defaults(func=cmd_diff)

    gcp = sub.add_parser("gc", help="delete versions beyond --keep and files no kept version references")
    gcp.add_argument("dir", help="dataset folder")
    gcp.add_argument("--keep", type=_positive_int, required=True, help="how many newest versions to keep")
    gcp.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    gcp.set_defaults(func=cmd_gc)

    train_cli = None
    if with_train:
        try:
            from jobs import train_cli
        except ImportError:  # the trainer is optional for preprocessing-only installs
            train_cli = None
    if train_cli is not None:
        for name in ("add_train_parser", "add_evaluate_parser", "add_generate_parser", "add_predict_parser"):
            if hasattr(train_cli, name):
                getattr(train_cli, name)(sub)
    return parser


class _DropImportNoise(logging.Filter):
    """Beam warns at import time about optional GCP clients that local runs never use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


def _offline_environment() -> None:
    # Nothing may download at run time; worker processes inherit these.
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    _offline_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    command = _command(argv)
    try:
        check_environment(os.environ)
    except SpecError as e:
        print(f"mbm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    with stop_signals(passed_on=_stop_workers if command in ("preprocess", "demo") else None):
        try:
            return _main(command, argv, beam_args)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM, once _main has closed its fork server
            return report(stop)


def _main(command: str | None, argv: list[str], beam_args: list[str]) -> int:
    if command in ("preprocess", "demo"):  # before any thread or worker process starts
        from mbm.alloc import limit_arenas

        limit_arenas()
    fork = _early_fork_server(command, argv)
    try:  # whatever happens (argparse exits on a bad argument), the server must not outlive this call
        args = build_parser(with_train=command not in DATASET_COMMANDS).parse_args(argv)
        args.fork = fork
        args.beam_args = beam_args
        logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                            format="%(levelname)s %(name)s: %(message)s")
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropImportNoise())
        if args.verbose < 2:
            for noisy in ("apache_beam", "absl", "urllib3"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
        return int(args.func(args) or 0)
    except SpecError as e:
        print(f"mbm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if fork is not None:
            fork.close()


def run() -> None:
    """The ``mbm`` console script: ``main()``, then exit.

    After a dataset command the interpreter is not torn down: with Beam and torch imported (Beam's
    RunInference imports torch in the driver too), freeing every module's objects took 0.9 s after
    the work was done, longer than a no-change incremental run's commit. By then the pipeline has
    stopped its workers, the fork server is closed and the version is committed; logging and the
    standard streams are flushed before ``os._exit``. Other commands (training, which may own
    DataLoader workers and process groups) exit normally.

    Output piped into a reader that stops early (``| head -1``) ends the command quietly with exit status
    141, as SIGPIPE ends a Unix tool (``jobs.signals.broken_pipe``).
    """
    argv = sys.argv[1:]
    try:
        code = main(argv)
        sys.stdout.flush()  # here, where a reader that went away can still be told from a failure
    except BrokenPipeError:
        code = broken_pipe()
    if _command(argv) in DATASET_COMMANDS:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said on it
                stream.flush()
        os._exit(code)
    sys.exit(code)


def cmd_versions(args: argparse.Namespace) -> int:
    from pipelines.versions import describe, list_versions, to_json

    args.dir = _dataset_dir(args)
    try:
        versions = list_versions(args.dir)
    except ValueError as e:
        raise SpecError(str(e)) from e
    current = versions[-1].version if versions else 0
    rows = [describe(m, current) for m in versions]
    if args.json:
        print(to_json(rows))
        return 0
    print(f"{'version':>7}  {'samples':>8}  {'shards':>6}  {'input':>7}  {'rejected':>8}  created")
    for r in rows:
        mark = "  (current)" if r["current"] else ""
        splits = listed_splits(r["splits"])
        print(f"{r['version']:>7}  {r['samples']:>8}  {r['shards']:>6}  {r['input'] or 0:>7}  {r['rejected'] or 0:>8}  "
              f"{r['created']}{mark}" + (f"  splits: {splits}" if splits else ""))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from pipelines.versions import diff_versions, to_json

    args.dir = _dataset_dir(args)
    try:
        d = diff_versions(args.dir, args.a, args.b)
    except ValueError as e:
        raise SpecError(str(e)) from e
    if args.json:
        print(to_json(d))
        return 0
    for kind, sign in (("added", "+"), ("changed", "~"), ("removed", "-")):
        for sid in d[kind]:
            print(f"{sign} {sid}")
    print(f"{len(d['added'])} added, {len(d['changed'])} changed, {len(d['removed'])} removed")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from mbm.lock import FolderLock, FolderLockedError
    from mbm.scanfiles import forget
    from pipelines.versions import gc

    args.dir = _dataset_dir(args)
    if not Path(args.dir, "dataset.json").is_file():
        raise SpecError(f"{args.dir} is not an mbm dataset folder (no dataset.json)")
    try:
        if args.dry_run:  # reads only: also in a folder that cannot be written (no lock file there)
            result = gc(args.dir, args.keep, dry_run=True)
        else:
            with FolderLock(args.dir):
                result = gc(args.dir, args.keep)
            # the loaders' kept scans of the deleted shards (mbm.data.scan) go with them
            forget([str(Path(args.dir, f)) for f in result["deleted_files"] if f.endswith(".tar")])
    except FolderLockedError as e:
        print(f"mbm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a read-only folder (its lock file), a file that cannot be deleted
        print(f"mbm: error: gc of {args.dir}: {e.strerror or e}{f': {e.filename}' if e.filename else ''}",
              file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:
        raise SpecError(str(e)) from e
    verb = "would delete" if args.dry_run else "deleted"
    in_use = (f" ({', '.join(map(str, result['in_use']))} beyond --keep: a running mbm train, evaluate or generate "
              "reads it; run gc again once it has ended)" if result["in_use"] else "")
    print(f"kept versions {result['kept_versions']}{in_use}; {verb} versions {result['deleted_versions']} and "
          f"{len(result['deleted_files'])} files ({result['freed_bytes'] / 1e6:.1f} MB)")
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    o: dict[str, dict[str, Any]] = {}
    if getattr(args, "output", None) is not None:
        out = _local_arg(args.output, "--output", "the dataset folder to write")
        o.setdefault("output", {})["dir"] = str(Path(out).resolve()) if "://" not in out else out
    for flag, key in (("runner", "name"), ("workers", "workers"), ("device", "device")):
        if getattr(args, flag, None) is not None:
            o.setdefault("runner", {})[key] = getattr(args, flag)
    if getattr(args, "no_dedupe", False):
        o.setdefault("runner", {})["dedupe"] = False
    return o


def cmd_preprocess(args: argparse.Namespace) -> int:
    from jobs.spec import load_spec

    args.spec = _local_arg(args.spec, "the job spec", "its .toml file, e.g. jobs/examples/demo.toml")
    spec = load_spec(args.spec, _overrides(args))
    if args.output is None:
        _check_stored_spec(args.spec, spec.output.dir)
    return _run_and_summarize(spec, args)


def _check_stored_spec(path: str, out_dir: str) -> None:
    """A dataset folder's own ``job.toml`` (or ``versions/N.toml``) names, with an absolute path, the folder it
    was written in: run from a moved or copied folder, it would update the old place (or start a new dataset
    there) instead of the folder it lies in."""
    import re

    spec = Path(path).resolve()
    if re.fullmatch(r"\d{6}\.toml", spec.name) and spec.parent.name == "versions":
        folder = spec.parent.parent
    elif spec.name == "job.toml":
        folder = spec.parent
    else:
        return
    if "://" in out_dir or not (folder / "dataset.json").is_file() or Path(out_dir).resolve() == folder:
        return
    raise SpecError(f"{path} is the job spec stored with the dataset at {folder}, but its [output] dir is {out_dir} "
                    f"(was the folder moved or copied?): give --output {folder} to update this dataset, or "
                    f"--output {out_dir} to write there")


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import demo_spec

    spec = demo_spec(_local_arg(args.output, "--output", "the dataset folder to write"), workers=args.workers)
    code = _run_and_summarize(spec, args)
    if code == 0:
        out = spec.output.dir
        print(f"\nShards are in {out}/shards (dataset.json lists the current version).")
        print("Train on them:")
        print(f"  .venv/bin/mbm train --data {out} --task classify --fusion concat --steps 200 --batch-size 8 --out runs/demo")
    return code


def _early_fork_server(command: str | None, argv: list[str]):
    """Start the worker fork server (``pipelines.forkserver``) before the heavy imports, so that its
    imports overlap the driver's; only for preprocessing on a machine with several cores."""
    from mbm.resources import usable_cores

    if command not in ("preprocess", "demo") or usable_cores() < 2 or any(a in ("-h", "--help") for a in argv):
        return None
    from pipelines import forkserver

    if not forkserver.supported():
        return None
    try:
        return forkserver.ForkServer()
    except OSError as e:  # no temporary folder, no process: workers start the usual way
        logging.getLogger(__name__).warning("cannot start the worker fork server (%s); starting workers the usual way", e)
        return None


def _run_and_summarize(spec, args: argparse.Namespace) -> int:
    fork = getattr(args, "fork", None)
    if fork is not None and (spec.runner.name != "FnApiRunner" or spec.runner.num_workers() <= 1):
        fork.close()
        fork = None
    if fork is not None:  # as early as possible: the server imports these while the driver imports Beam
        from jobs.spec import create_extractors, extractor_modules

        fork.preload(extractor_modules(create_extractors(spec)))
    from jobs.preprocess import JobError, run_preprocess
    from mbm.lock import FolderLockedError

    bar = None if args.no_progress or not sys.stderr.isatty() else _ProgressBar()
    try:
        result = run_preprocess(spec, full=getattr(args, "full", False), extra_options=args.beam_args,
                                on_progress=bar, fork=fork)
    except FolderLockedError as e:
        print(f"mbm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as e:
        if bar is not None:
            bar.close()
            bar = None
        print(f"mbm: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if bar is not None:
            bar.close()
    print_summary(result.out_dir, result.report)
    return 0


class _ProgressBar:
    """tqdm bar fed with the workers' counts: samples finished (landed or rejected) out of samples read."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="sample", desc="preprocess", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, counts: dict[str, int]) -> None:
        done = counts.get("extracted", 0) + counts.get("rejected", 0)
        total = counts.get("read", 0)  # samples and unreadable lines seen so far
        self._bar.total = max(total, done)
        self._bar.n = done
        self._bar.set_postfix(ok=counts.get("extracted", 0), rejected=counts.get("rejected", 0), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def print_summary(out_dir: str, report: dict[str, Any]) -> None:
    c = report["counts"]
    print(f"dataset {out_dir} version {report.get('version')}")
    print(f"  samples in   {c['input']:>8}")
    print(f"  ok           {c['ok']:>8}   (extracted {c['extracted']})")
    print(f"  rejected     {c['rejected']:>8}")
    for stage, n in report.get("rejected_by_stage", {}).items():
        print(f"    at {stage:<20} {n:>6}")
    for reason, n in report.get("rejected_by_reason", {}).items():
        print(f"    {reason:<40} {n:>6}")
    if report.get("dropped_modalities_by_reason"):
        print("  modalities dropped from samples that landed:")
        for reason, n in report["dropped_modalities_by_reason"].items():
            print(f"    {reason:<40} {n:>6}")
    copies = {m: n for m, n in report.get("copies_by_modality", {}).items() if n}
    if copies:
        listed = ", ".join(f"{m} {n}" for m, n in copies.items())
        print(f"  repeats      {sum(copies.values()):>8}   (features copied from the same input in this run: {listed})")
    if report.get("media_keys_updated"):
        print(f"  media keys   {report['media_keys_updated']:>8}   (samples whose files were moved, copied or touched, "
              "bytes unchanged: recorded for the next run, which does not read them)")
    if report.get("splits"):
        print("  splits       " + listed_splits(report["splits"])
              + "   (named in the samples' metadata; mbm train --split-by split)")
    print(f"  time         {report['seconds']:>8.1f} s   ({report['samples_per_second']:.1f} samples/s)")
    print(f"  report       {out_dir}/report.json")


if __name__ == "__main__":
    run()


