import os
import sys
import time

import apache_beam as beam
import pytest
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

    def record(handler, bundle_id, transform_id, total, failed):
        first = split_rest(handler, bundle_id, transform_id, total, failed)
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


def test_a_split_answered_late_is_applied_not_taken_for_a_refusal(monkeypatch):
    """A worker slow to answer a split (stopped, swapping) still applies it and stops its bundle there: a
    split read as refused after a timeout lost the rest of that bundle (125 samples, exit 0)."""
    import threading

    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.portability.fn_api_runner.worker_handlers import ControlFuture

    monkeypatch.setattr(balanced, "SPLIT_POLL_S", 0.01)
    monkeypatch.setattr(balanced, "SPLIT_TIMEOUT_S", 0.01, raising=False)  # the old code's limit, as short

    class Slow:
        """A control connection whose worker answers each request 0.2 s late, with a split at element 7."""

        def push(self, request):
            future = ControlFuture("split-1")
            answer = beam_fn_api_pb2.InstructionResponse(
                process_bundle_split=beam_fn_api_pb2.ProcessBundleSplitResponse(channel_splits=[
                    beam_fn_api_pb2.ProcessBundleSplitResponse.ChannelSplit(transform_id="t",
                                                                            first_residual_element=7)]))
            threading.Timer(0.2, future.set, args=(answer,)).start()
            return future

    class Handler:
        control_conn = Slow()

    assert balanced.split_rest(Handler(), "bundle-1", "t", 12) == 7

    class Dead:
        def push(self, request):
            future = ControlFuture("split-2")
            threading.Timer(0.05, future.abort, args=(RuntimeError("the worker's connection closed"),)).start()
            return future

    class Gone:
        control_conn = Dead()

    with pytest.raises(RuntimeError, match="connection closed"):  # the stage fails, nothing is dropped quietly
        balanced.split_rest(Gone(), "bundle-2", "t", 12)

    class Killed:
        """A worker killed with its bundle: it answers nothing, and the bundle fails."""

        def push(self, request):
            return ControlFuture("split-3")

    class Dying:
        control_conn = Killed()

    ended = threading.Event()
    threading.Timer(0.1, ended.set).start()
    assert balanced.split_rest(Dying(), "bundle-3", "t", 12, ended.is_set) is None  # the stage fails with it
