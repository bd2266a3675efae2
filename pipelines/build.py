"""The preprocessing pipeline: read → clean → extract → write shards, as one Beam graph."""

from __future__ import annotations

import logging
import os
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cleaning import REJECTS, UNCHANGED, CleanConfig, CleanSampleFn
from pipelines.extract import ExtractFeatures
from pipelines.progress import CountProgress
from pipelines.sink import SinkConfig, StageSamples, WriteShards

log = logging.getLogger(__name__)


def pipeline_options(runner: str, workers: int, extra: list[str]) -> PipelineOptions:
    """Beam options for ``runner``; local runners get one worker process per requested core."""
    args = [f"--runner={runner}", "--default_sdk_harness_log_level=WARNING"]
    if runner == "FnApiRunner":
        # Worker processes come from make_runner's environment; in_memory keeps Beam from replacing it.
        args += [f"--direct_num_workers={workers}", "--direct_running_mode=in_memory"]
    elif runner == "DirectRunner":
        args.append(f"--direct_num_workers={workers}")
        args.append("--direct_running_mode=" + ("multi_processing" if workers > 1 else "in_memory"))
    return PipelineOptions(args + list(extra))


def make_runner(name: str, workers: int = 1, worker_log: str | None = None, worker_command: str | None = None):
    """The runner object; local runners are named explicitly so Beam never tries to download Prism.

    ``FnApiRunner`` with several workers runs them as subprocesses (Beam's ``multi_processing``
    mode), with their stderr (Beam's per-worker start-up chatter) appended to ``worker_log``.
    ``worker_command`` replaces the default ``python -m pipelines.forkclient`` (Beam's
    ``sdk_worker_main`` in that process, ``pipelines.forkclient.run_here``; ``pipelines.forkserver``
    gives one that forks pre-imported workers).
    """
    if name == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        if workers <= 1:
            return FnApiRunner()
        import shlex
        import sys

        from apache_beam.transforms.environments import SubprocessSDKEnvironment

        # pipelines.forkclient without a server runs Beam's worker with a stderr that cannot fail it
        command = worker_command or f"{shlex.quote(sys.executable)} -m pipelines.forkclient"
        if worker_log:  # through the environment: Beam sends the command as UTF-8, a path may not be
            os.environ["MBM_WORKER_LOG"] = worker_log
            command += ' 2>>"$MBM_WORKER_LOG"'
        from pipelines.runner import BalancedFnApiRunner

        return BalancedFnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))
    if name == "DirectRunner":
        return offline_direct_runner()
    return name


def offline_direct_runner() -> Any:
    """Beam's DirectRunner without its first try on Prism.

    Beam's DirectRunner runs a batch pipeline on Prism when it can, downloading the Prism binary from
    GitHub at run time (and, offline, failing, logging it and leaving a ``beam-temp*`` folder in the
    temp dir); it then falls back to the FnApiRunner. Beam skips Prism for interactive pipelines, and
    that flag is read nowhere else, so this runner is that fallback from the start.
    """
    from apache_beam.runners.direct.direct_runner import DirectRunner

    runner = DirectRunner()
    runner.is_interactive()
    return runner


def build_graph(p: beam.Pipeline, *, source: Any, clean: CleanConfig, handlers: dict[str, Any], sink: SinkConfig,
                progress_dir: str) -> Any:
    """Add the preprocessing steps to ``p``; returns the PCollection of written bucket numbers."""
    from pipelines.readers.common import local_path
    from pipelines.readers.source import ReadSource

    # the samples read (and media bytes that readers hold) wait in the staging folder, not in the shuffles
    # (local output only: a remote runner's workers could not read a local spool, and its shuffle does not
    # sit in memory)
    staging = local_path(sink.staging)
    read = p | "Read" >> ReadSource(source, spool=f"{staging}/read" if staging is not None else None,
                                    dedupe=clean.dedupe)
    samples = read["samples"] | "CountRead" >> beam.ParDo(CountProgress("read", progress_dir))
    n_input = samples | "CountInput" >> beam.combiners.Count.Globally()
    cleaned = samples | "Clean" >> beam.ParDo(CleanSampleFn(clean)).with_outputs(REJECTS, UNCHANGED, main="samples")
    extracted = cleaned.samples | "Extract" >> ExtractFeatures(handlers)
    landed = (
        extracted.samples
        | "Stage" >> beam.ParDo(StageSamples(sink))
        | "CountExtracted" >> beam.ParDo(CountProgress("extracted", progress_dir))
    )
    read_rejects = read["rejects"] | "CountReadRejects" >> beam.ParDo(CountProgress("read", progress_dir))
    rejects = (
        (read_rejects, cleaned[REJECTS], extracted.rejects)
        | "AllRejects" >> beam.Flatten()
        | "CountRejected" >> beam.ParDo(CountProgress("rejected", progress_dir))
    )
    unchanged = cleaned[UNCHANGED] | "CountUnchanged" >> beam.ParDo(CountProgress("unchanged", progress_dir))
    return (landed, rejects, unchanged, n_input) | "Write" >> WriteShards(sink)
