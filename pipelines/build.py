"""The preprocessing pipeline: read → clean → extract → write shards, as one Beam graph."""

from __future__ import annotations

import logging
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cleaning import REJECTS, CleanConfig, CleanSampleFn
from pipelines.extract import ExtractFeatures
from pipelines.progress import CountProgress
from pipelines.sink import SinkConfig, WriteShards

log = logging.getLogger(__name__)


def pipeline_options(runner: str, workers: int, extra: list[str]) -> PipelineOptions:
    """Beam options for ``runner``; local runners get one worker process per requested core."""
    args = [f"--runner={runner}"]
    if runner in ("FnApiRunner", "DirectRunner"):
        args.append(f"--direct_num_workers={workers}")
        args.append("--direct_running_mode=" + ("multi_processing" if workers > 1 else "in_memory"))
    return PipelineOptions(args + list(extra))


def make_runner(name: str):
    """The runner object; local runners are named explicitly so Beam never tries to download Prism."""
    if name == "FnApiRunner":
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    if name == "DirectRunner":
        from apache_beam.runners.direct.direct_runner import DirectRunner

        return DirectRunner()
    return name


def build_graph(p: beam.Pipeline, *, source: Any, clean: CleanConfig, handlers: dict[str, Any], sink: SinkConfig,
                progress_dir: str) -> Any:
    """Add the preprocessing steps to ``p``; returns the PCollection of written bucket numbers."""
    from pipelines.readers.source import ReadSource

    read = p | "Read" >> ReadSource(source)
    samples = read["samples"] | "CountRead" >> beam.ParDo(CountProgress("read", progress_dir))
    n_input = samples | "CountInput" >> beam.combiners.Count.Globally()
    cleaned = samples | "Clean" >> beam.ParDo(CleanSampleFn(clean)).with_outputs(REJECTS, main="samples")
    extracted = cleaned.samples | "Extract" >> ExtractFeatures(handlers)
    landed = extracted.samples | "CountExtracted" >> beam.ParDo(CountProgress("extracted", progress_dir))
    rejects = (
        (read["rejects"], cleaned[REJECTS], extracted.rejects)
        | "AllRejects" >> beam.Flatten()
        | "CountRejected" >> beam.ParDo(CountProgress("rejected", progress_dir))
    )
    return (landed, rejects, n_input) | "Write" >> WriteShards(sink)
