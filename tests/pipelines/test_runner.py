import os
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.environments import SubprocessSDKEnvironment

from pipelines import runner as balanced


class _OneSlowWorker(beam.DoFn):
    """The first worker process to set up is slow (0.2 s per element), the other fast."""

    def __init__(self, marker: str) -> None:
        self._marker = marker

    def setup(self) -> None:
        try:
            os.close(os.open(self._marker, os.O_CREAT | os.O_EXCL))
            self._slow = True
        except FileExistsError:
            self._slow = False

    def process(self, x):
        time.sleep(0.2 if self._slow else 0.005)
        yield x, self._slow


def test_an_idle_worker_takes_over_half_of_a_busy_workers_rest(tmp_path, monkeypatch):
    splits = []
    split_rest = balanced.split_rest

    def record(handler, bundle_id, transform_id, total):
        first = split_rest(handler, bundle_id, transform_id, total)
        splits.append((total, first))
        return first

    monkeypatch.setattr(balanced, "split_rest", record)
    command = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
    runner = balanced.BalancedFnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))
    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=in_memory"])
    with beam.Pipeline(runner=runner, options=options) as p:
        out = p | beam.Create(list(range(40))) | beam.Reshuffle() | beam.ParDo(_OneSlowWorker(str(tmp_path / "m")))
        assert_that(out | beam.Map(lambda kv: kv[0]), equal_to(list(range(40))))  # each element once
        slow = out | beam.Filter(lambda kv: kv[1]) | beam.combiners.Count.Globally()
        # Beam's cut gives the slow worker ~20 elements; split after split, it keeps far fewer
        assert_that(slow, lambda counts: _fewer_than(counts, 12), label="slow")
    done = [(total, first) for total, first in splits if first is not None]
    assert done and all(0 < first < total for total, first in done)


def _fewer_than(counts, n):
    assert len(counts) == 1 and counts[0] < n, counts


def test_a_failing_bundle_fails_the_stage_with_its_error(tmp_path):
    import pytest

    def boom(x):
        if x == 7:
            raise ValueError("element 7 is bad")
        return x

    command = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
    runner = balanced.BalancedFnApiRunner(default_environment=SubprocessSDKEnvironment.from_command_string(command))
    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=in_memory"])
    with pytest.raises(Exception, match="element 7 is bad"):
        with beam.Pipeline(runner=runner, options=options) as p:
            _ = p | beam.Create(list(range(20))) | beam.Reshuffle() | beam.Map(boom)
