"""Running a preprocessing job end to end: lock, stage, run the Beam pipeline, commit a version."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError

from jobs.runner_config import option_errors_line
from jobs.signals import held_stop, hold_stops, pending
from jobs.spec import JobSpec, SpecError, create_extractors, dump_toml, extractor_modules
from mbm.alloc import Trimmer, arena_env
from mbm.extractors.handler import features_fingerprint
from mbm.lock import FolderLock
from pipelines.build import build_graph, make_runner, pipeline_options
from pipelines.cleaning import CleanConfig
from pipelines.commit import (
    DatasetStateError,
    check_new_folder,
    commit,
    current_manifest,
    delete_tree,
    remove_uncommitted,
)
from pipelines.errors import ResourceError, disk_guard, resource_failure
from pipelines.extract import build_handlers
from pipelines.progress import ProgressMonitor
from pipelines.sink import SinkConfig
from schemas import DatasetManifest
from schemas.manifest import job_path

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job stopped, for a reason its message gives in one line (the machine's, not the data's)."""


@dataclass
class JobResult:
    out_dir: str
    manifest: DatasetManifest
    report: dict[str, Any]


class HeldErrors:
    """While the pipeline runs, Beam's ERROR records and its threads' uncaught exceptions are held
    instead of printed. When a worker fails for a reason the job then states in one line (out of
    memory, killed), they are the same failure told a dozen times over from Beam's side, and go to
    the workers' log (``divert``); otherwise they are printed after the run (``release``)."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.threads: list[str] = []
        self._handlers: list[logging.Handler] = []
        self._hook = threading.excepthook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("apache_beam"):
            return True
        if not any(r is record for r in self.records):  # one record passes every handler's filter
            self.records.append(record)
        return False

    def _thread_exception(self, args: Any) -> None:
        name = args.thread.name if args.thread is not None else "?"
        self.threads.append(f"Exception in thread {name}:\n"
                            + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    def __enter__(self) -> HeldErrors:
        if logging.getLogger("apache_beam").isEnabledFor(logging.DEBUG):  # `-vv`: everything as it happens
            return self
        self._handlers = list(logging.getLogger().handlers)
        for h in self._handlers:
            h.addFilter(self)
        self._hook, threading.excepthook = threading.excepthook, self._thread_exception
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._handlers:
            return
        for h in self._handlers:
            h.removeFilter(self)
        self._handlers = []
        threading.excepthook = self._hook

    def release(self) -> None:
        for text in self.threads:
            sys.stderr.write(text)
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records, self.threads = [], []

    def divert(self, path: str) -> None:
        with suppress(OSError), open(path, "a") as f:
            for text in self.threads:
                f.write(f"driver: {text}")
            for record in self.records:
                f.write(f"driver: {logging.Formatter('%(levelname)s %(name)s: %(message)s').format(record)}\n")
        self.records, self.threads = [], []


def _drop_staging(staging: str, staging_root: str) -> None:
    """Remove a run's staging folder, and the staging root when no other run's is left in it (an object
    store's prefix goes with its last object)."""
    if "://" in staging:
        try:
            delete_tree(staging)
        except Exception as e:  # noqa: BLE001 - BeamIOError: what is left of a failed run is not its failure
            log.warning("the staging folder %s of this failed run could not be deleted (%s); delete it by hand",
                        staging, e)
        return
    shutil.rmtree(staging, ignore_errors=True)
    with suppress(OSError):
        os.rmdir(staging_root)


def killed_worker(worker_log: str | None, spec: JobSpec) -> str | None:
    """What to tell of a job whose Beam worker process a signal killed (the workers' log says so:
    ``pipelines.forkclient``); None when none was."""
    from pipelines.forkclient import KILLED

    if not worker_log:
        return None
    try:
        with open(worker_log, errors="replace") as f:
            lines = [line.strip() for line in f if line.startswith(KILLED)]
    except OSError:
        return None
    if not lines:
        return None
    said = lines[0].removeprefix("mbm: ")
    if "SIGKILL" not in said:
        return f"{said}: a crash in native code or a signal from outside the job; the workers' log has what it printed"
    batches = ", ".join(f"[extract.{m}] batch_size = {e.batch_size}" for m, e in sorted(spec.extract.items()))
    return (f"{said}; nothing was committed. If it was memory: run fewer workers ([runner] workers, now "
            f"{spec.runner.num_workers()}: each holds its own copy of every model and its share of the data "
            f"in flight) or smaller batches ({batches})")


def runner_failure(e: BaseException, name: str, worker_log: str | None) -> str | None:
    """What to tell of a job that a runner with a service of its own (Flink, Spark, Prism, Dataflow) did not
    run: a job server that did not start or answered something else, a remote job that failed. One line;
    Beam's traceback goes to the workers' log. None for the in-process runners, whose failures are mbm's."""
    if name in ("FnApiRunner", "DirectRunner"):
        return None
    details = getattr(e, "details", None)  # a gRPC error's own words, without its debug dump
    said = " ".join(str(details() if callable(details) else e).split()) or type(e).__name__
    if worker_log:
        with suppress(OSError), open(worker_log, "a") as f:
            f.write("driver: " + "".join(traceback.format_exception(e)))
    return (f"[runner] {name}: the job did not run ({type(e).__name__}: {said[:300]}); check the runner's service "
            "and its options")


def _is_local(path: str) -> bool:
    return "://" not in path


LAYOUT_KEYS = ("samples_per_shard", "max_shard_bytes", "include_media")  # how shards are cut, not what they hold


def _warn_output_changes(out_dir: str, version: int, spec: JobSpec) -> None:
    """Shard layout settings apply to the shards a run writes; unchanged samples keep theirs. Say so when
    they differ from the ones that made the current version, rather than let a rerun look like it ignored them."""
    import tomllib

    path = Path(out_dir) / job_path(version)
    try:
        before = tomllib.loads(path.read_bytes().decode("utf-8", "surrogateescape")).get("output", {})
    except (OSError, ValueError):
        return  # a version made before specs were kept per version
    changed = [f"{k} {before[k]!r} -> {getattr(spec.output, k)!r}" for k in LAYOUT_KEYS
               if k in before and before[k] != getattr(spec.output, k)]
    if changed:
        log.warning("[output] %s since version %d: this applies to the shards this run writes; unchanged samples "
                    "keep their shards (run with --full to rewrite them all)", ", ".join(changed), version)


def _check_current_files(out_dir: str, previous: Any) -> None:
    """The current version's index and shards must be there for a run to reuse them; a folder changed by
    hand stops the job before it starts (a --full run reads neither and makes a whole new version)."""
    if not _is_local(out_dir):
        _check_current_objects(out_dir, previous)
        return
    _refuse_missing(out_dir, previous, [p for p in (previous.index, *previous.shards)
                                        if not os.path.isfile(os.path.join(out_dir, p))])
    import pyarrow.parquet as pq

    try:
        with open(os.path.join(out_dir, previous.index), "rb") as f:
            pq.ParquetFile(f).metadata  # noqa: B018  the footer: what a file cut short or emptied lacks
    except Exception as e:  # ArrowInvalid, OSError
        raise SpecError(f"[output] dir {out_dir}: the index of its current version {previous.version}, "
                        f"{previous.index}, cannot be read ({e}): the folder was changed by hand; put it back, or "
                        "rerun with --full (every sample computed again into a new version)") from None
    if (cut := _cut_shard(out_dir, previous)) is not None:
        raise SpecError(f"[output] dir {out_dir}: the shard {cut} of its current version {previous.version} is cut "
                        "short or damaged (its size is not the one recorded, or it does not end as a tar does): the "
                        "folder was changed by hand; put it back, or rerun with --full (every sample computed again "
                        "into a new version)")


def _refuse_missing(out_dir: str, previous: Any, missing: list[str]) -> None:
    """Stop the job when files of the current version are gone (paths relative to ``out_dir``)."""
    if missing:
        raise SpecError(f"[output] dir {out_dir}: {len(missing)} of the files of its current version {previous.version} "
                        f"are missing (e.g. {missing[0]}): the folder was changed by hand; put them back, or rerun "
                        "with --full (every sample computed again into a new version)")


def _check_current_objects(out_dir: str, previous: Any) -> None:
    """``_check_current_files`` in an object store: the current version's index and shards are there, and each
    shard has the size its manifest records (one listing of each folder, not a request per file)."""
    from apache_beam.io.filesystems import FileSystems

    sizes = {}
    for folder in ("index", "shards"):
        (listed,) = FileSystems.match([f"{out_dir}/{folder}/*"])
        sizes.update((m.path, m.size_in_bytes) for m in listed.metadata_list)
    _refuse_missing(out_dir, previous, [p for p in (previous.index, *previous.shards) if f"{out_dir}/{p}" not in sizes])
    recorded = previous.shard_bytes or []
    for shard, size in zip(previous.shards, recorded, strict=False):
        if sizes[f"{out_dir}/{shard}"] != size:
            raise SpecError(f"[output] dir {out_dir}: the shard {shard} of its current version {previous.version} "
                            f"has {sizes[f'{out_dir}/{shard}']} bytes, not the {size} recorded: the folder was changed "
                            "by hand; put it back, or rerun with --full (every sample computed again into a new "
                            "version)")


def _cut_shard(out_dir: str, previous: Any) -> str | None:
    """The first of the current version's shards whose size is not the manifest's, or (a manifest from before
    sizes were recorded) that does not end as every shard mbm writes does: whole 512-byte blocks, the last two
    zeros. Such a shard's unchanged samples would be carried into the next version without being read."""
    for i, shard in enumerate(previous.shards):
        path = os.path.join(out_dir, shard)
        size = os.path.getsize(path)
        if previous.shard_bytes:
            if size != previous.shard_bytes[i]:
                return shard
            continue
        if size < 1024 or size % 512:
            return shard
        with open(path, "rb") as f:
            f.seek(size - 1024)
            if any(f.read(1024)):
                return shard
    return None


def _copies(run: Any) -> dict[str, int]:
    """By modality, the samples whose features were copied from the same input featurized in the run
    (``pipelines.dedupe``), from the pipeline's counters; empty where the runner keeps none."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = run.metrics().query(MetricsFilter().with_name("copies"))["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics: the report says 0
        return {}
    out: dict[str, int] = {}
    for c in counters:
        namespace = c.key.metric.namespace
        if namespace.startswith("mbm_extract_"):
            m = namespace.removeprefix("mbm_extract_")
            out[m] = out.get(m, 0) + int(c.committed or c.attempted or 0)
    return out


def run_preprocess(spec: JobSpec, *, full: bool = False, extra_options: list[str] | None = None,
                   on_progress: Callable[[dict[str, int]], None] | None = None,
                   clock: Callable[[], float] = time.monotonic, fork: Any = None) -> JobResult:
    """Run ``spec`` and commit the result as the output folder's next version.

    Samples whose content and extractor fingerprints match the current version are not reprocessed
    (``full=True`` recomputes everything); when nothing changed no version is made. ``fork`` is a
    started ``pipelines.forkserver.ForkServer`` whose pre-imported workers the local runner uses.
    """
    started = clock()
    spec.runner.check(extra_options)
    out_dir = spec.output.dir
    local = _is_local(out_dir)
    held = ExitStack()
    try:
        check_new_folder(out_dir)  # before the lock, which would leave its file in a folder that is refused
        if local:  # an object store has no lock: one job at a time on a remote folder (README)
            held.enter_context(FolderLock(out_dir))
    except DatasetStateError as e:
        raise SpecError(str(e)) from None
    except BeamIOError as e:  # a remote folder without credentials or options (s3:// needs --s3_* options)
        raise SpecError(f"[output] dir = {out_dir!r} cannot be read: {e}") from None
    except OSError as e:
        raise SpecError(f"[output] dir = {out_dir!r} cannot be created or locked: {e}") from e
    with held:
        staging_root = f"{out_dir.rstrip('/')}/.staging"
        try:
            if local:
                remove_uncommitted(out_dir)  # we hold the lock: anything uncommitted is left from a killed run
            previous = current_manifest(out_dir)
            if previous is not None and not full:
                _check_current_files(out_dir, previous)
        except DatasetStateError as e:
            raise SpecError(str(e)) from None
        except BeamIOError as e:  # a remote folder without credentials or options (s3:// needs --s3_* options)
            raise SpecError(f"[output] dir = {out_dir!r} cannot be read: {e}") from None
        staging = f"{staging_root}/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        if local:
            Path(staging).mkdir(parents=True)
            # whatever stops the run before its commit (a model folder that is no model, Ctrl-C while the
            # pipeline is built) takes its staging with it; a committed run's is gone by then
            held.push(lambda failed, *_: failed is not None and _drop_staging(staging, staging_root))
        if previous is not None and local and not full:
            _warn_output_changes(out_dir, previous.version, spec)
        extractors = create_extractors(spec)
        fingerprints, dims = {}, {}
        for m, ex in extractors.items():
            try:  # checks and hashes the weights and reads the model's config: a folder that is no model fails here
                ex.check_files()
                fingerprints[m] = features_fingerprint(ex, spec.extract[m].batch_size)
                dims[m] = ex.dim
            except (ValueError, OSError) as e:
                raise SpecError(f"[extract.{m}] {ex.name}: {e}") from e
        handlers = build_handlers(extractors, {m: e.batch_size for m, e in spec.extract.items()}, spec.runner.device,
                                  spec.runner.dedupe)
        workers = spec.runner.num_workers()
        os.environ["MBM_WORKERS"] = str(workers)  # extractors size torch's thread pool from this
        options = pipeline_options(spec.runner.name, workers, list(spec.runner.options) + list(extra_options or []))
        progress_dir = f"{staging}/progress"
        worker_log = f"{out_dir.rstrip('/')}/.worker.log" if local else None
        if worker_log:
            Path(worker_log).unlink(missing_ok=True)
        command = None
        if fork is not None:  # not waited for: its workers wait for it while Beam prepares the pipeline
            fork.preload(extractor_modules(extractors))
            command = fork.command()
        try:
            p = beam.Pipeline(runner=make_runner(spec.runner.name, workers, worker_log, command), options=options)
        except ValueError as e:  # Beam's own check of the runner's options (a remote runner's project, region, ...)
            if local:
                shutil.rmtree(staging, ignore_errors=True)
            raise SpecError(f"[runner] {spec.runner.name}: {option_errors_line(str(e))}; pass the runner's options after "
                            "`--` or in [runner] options") from e
        try:
            build_graph(
                p,
                source=spec.input,
                clean=CleanConfig(text=spec.text, image=spec.image, audio=spec.audio, fingerprints=fingerprints,
                                  dedupe=spec.runner.dedupe,
                                  previous_index=None if (full or previous is None) else f"{out_dir}/{previous.index}"),
                handlers=handlers,
                sink=SinkConfig(staging=staging, samples_per_shard=spec.output.samples_per_shard,
                                max_shard_bytes=spec.output.max_shard_bytes, include_text=spec.output.include_media,
                                dataset_dir=out_dir),
                progress_dir=progress_dir,
            )
        except BaseException:
            # Beam removes the pipeline's local temp folder when the pipeline runs; this one never will
            shutil.rmtree(getattr(p, "local_tempdir", ""), ignore_errors=True)
            raise
        monitor = ProgressMonitor(progress_dir, on_progress) if (on_progress and local) else nullcontext()
        beam_errors = HeldErrors()
        try:
            with beam_errors, monitor, Trimmer(), arena_env():  # arena_env: the workers Beam starts
                run = p.run()
                run.wait_until_finish()
                if (stop := pending()) is not None:  # raised in a callback from C, which dropped it: in a
                    raise stop  # run of one worker the DoFns run here (soundfile reads through cffi's)
        except Exception as e:
            failure = (resource_failure(e) or killed_worker(worker_log, spec)
                       or runner_failure(e, spec.runner.name, worker_log if local else None))
            if failure is None:
                beam_errors.release()
                raise
            if worker_log and local:  # Beam's side of the same failure: kept, not printed
                beam_errors.divert(worker_log)
            else:  # no log file to keep it in
                beam_errors.release()
            # nothing of this run is committed; its spilled features go now, not at the next run
            _drop_staging(staging, staging_root)
            where = f" (the workers' log: {worker_log})" if worker_log and os.path.exists(worker_log) else ""
            raise JobError(failure + where) from e
        except BaseException:
            # Interrupted (Ctrl-C): the workers got the same signal, and Beam's threads report each of them
            # as a crash ("Worker subprocess exited with return code -2"); that goes to the workers' log.
            # Nothing is committed, and the run's spilled features go now rather than at the next run.
            if worker_log and local:
                beam_errors.divert(worker_log)
            else:
                beam_errors.release()
            _drop_staging(staging, staging_root)
            raise
        beam_errors.release()
        if local and Path(progress_dir).exists():
            shutil.rmtree(progress_dir)
        try:
            with disk_guard("committing the new version", out_dir):
                result = commit(out_dir, staging, job_toml=dump_toml(spec.to_dict()), clock=clock, started=started,
                                fingerprints=fingerprints, feature_dims=dims, full=full,
                                samples_per_shard=spec.output.samples_per_shard,
                                max_shard_bytes=spec.output.max_shard_bytes, copies=_copies(run),
                                before_commit=hold_stops)  # a version made current is finished, not cut short
        except ResourceError as e:  # nothing committed: the current version stands
            raise JobError(str(e)) from e
        except DatasetStateError as e:  # every input rejected: the current version stands
            raise SpecError(str(e)) from None
        if (stop := held_stop()) is not None:
            log.warning("%s came as version %d was committed: the job finished writing it and ends as done",
                        stop, result.manifest.version)
    return JobResult(out_dir=out_dir, manifest=result.manifest, report=result.report)
