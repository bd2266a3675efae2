"""Beam's FnApiRunner with parallel stages whose idle workers take over half of a busy one's rest.

Beam's ``ParallelBundleManager`` cuts a stage's input into one bundle per worker up front. When the
samples' costs differ (long audio next to short, 500-token texts next to 10-token captions, or an
input whose order puts the heavy samples on one side of that cut), one worker finishes long before
the other and its core idles. Measured on a 2-core machine on an audiofolder of 240 clips (3-60 s)
with transcripts of 5-700 words: the two workers got 18.6 and 12.0 s of CPU, and the job ran its
last 5.5 s on one core.

``BalancedBundleManager`` starts the same bundles, one per worker. When a worker's bundle is done
while another's still runs, it asks that bundle to stop halfway through what it has not read yet
(a channel split: Beam's ``ProcessBundleSplitRequest``, what Dataflow's work rebalancing sends) and
runs the rest as a new bundle of its own, which can be split in turn. A stage whose workers end
together runs exactly as before; every split costs one more bundle end (``FillBatches`` flushes
the partial forward passes it holds), paid by a core that would otherwise idle. Output, metrics and
errors are those of the bundles Beam's own ``BundleManager`` runs; the runner never sees the splits,
so it schedules no residual twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apache_beam.metrics import monitoring_infos
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner

log = logging.getLogger(__name__)

MIN_SPLIT_ELEMENTS = 2  # a bundle of fewer unread elements is left to finish
SPLIT_POLL_S = 1.0  # how often a split waiting for its answer wakes (a worker answers every request, however late)


@dataclass
class _Running:
    """A bundle in flight that an idle worker may split."""

    handler: Any
    payload: list[bytes]  # the encoded elements sent
    elements: list[Any] | None = None  # decoded, once a split needs them
    bundle_id: str | None = None  # known once its input is sent
    done: bool = False
    failed: bool = False  # the bundle ended in an error (its worker died): the stage fails with it
    splitting: bool = False  # a split request is out; one at a time
    splits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _OneWorker:
    """A stage's ``BundleContextManager`` seen with one of its worker handlers: a ``BundleManager``
    built on it sends every bundle to that worker."""

    def __init__(self, context: Any, handler: Any) -> None:
        self._context = context
        self.worker_handlers = [handler]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _TrackedBundleManager(fn_runner.BundleManager):
    """``BundleManager`` that records its bundle's id when it sends the input, so it can be split."""

    def __init__(self, running: _Running, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._running = running

    def _send_input_to_worker(self, process_bundle_id, read_transform_id, byte_streams):
        super()._send_input_to_worker(process_bundle_id, read_transform_id, byte_streams)
        with self._running.lock:
            self._running.bundle_id = process_bundle_id


def split_rest(handler: Any, bundle_id: str, transform_id: str, total: int,
               failed: Callable[[], bool] = lambda: False) -> int | None:
    """Ask a running bundle to stop halfway through the elements it has not read; the index of
    the first element it will not process, or None when it would not split (done, or too far), or when
    the bundle failed before its worker answered (``failed``: the stage fails with that bundle's error)."""
    request = beam_fn_api_pb2.InstructionRequest(
        process_bundle_split=beam_fn_api_pb2.ProcessBundleSplitRequest(
            instruction_id=bundle_id,
            desired_splits={transform_id: beam_fn_api_pb2.ProcessBundleSplitRequest.DesiredSplit(
                fraction_of_remainder=0.5, estimated_input_elements=total)}))
    for pause in (0.0, 0.05, 0.1):  # the bundle may not have registered yet
        time.sleep(pause)
        response = _answer(handler.control_conn.push(request), failed)
        if response is None:
            return None
        if "Unknown process bundle" not in response.error:
            break
    if response.error or response.process_bundle_split.primary_roots or response.process_bundle_split.residual_roots:
        return None  # unknown or finished bundle; or a split inside an element, which no mbm stage makes
    for channel in response.process_bundle_split.channel_splits:
        if channel.transform_id == transform_id:
            return channel.first_residual_element
    return None


def _answer(future: Any, failed: Callable[[], bool]) -> Any | None:
    """The worker's answer to a split request, however long it takes; None once the bundle has failed
    without one (a killed worker answers nothing, and the stage fails with its bundle's error). A worker
    that is only slow to answer (swapping, stopped, in a long call holding the GIL) still applies the
    split when it gets to it and stops its bundle there: reading no answer as a refusal lost the rest of
    that bundle (125 samples of a job whose worker was stopped for 30 s, exit 0). Its bundle may even
    end before the answer arrives, so only a failed bundle ends the wait. A connection that closes raises."""
    while True:
        try:
            return future.get(timeout=SPLIT_POLL_S)
        except AssertionError:  # Beam's ControlFuture asserts on a wait that ends without an answer
            if failed():
                return None
            log.debug("split request %s: no answer yet", getattr(future, "instruction_id", "?"))


class BalancedBundleManager(fn_runner.ParallelBundleManager):
    """``ParallelBundleManager`` whose idle workers split a busy worker's bundle (module doc)."""

    def process_bundle(self, inputs, expected_outputs, fired_timers, expected_output_timers, dry_run=False):
        handlers = list(self.bundle_context_manager.worker_handlers)[:self._num_workers]
        if len(inputs) != 1 or len(handlers) < 2 or any(fired_timers.values()) or expected_output_timers:
            return super().process_bundle(inputs, expected_outputs, fired_timers, expected_output_timers, dry_run)
        (transform_id, buffer), = inputs.items()
        coder = self.bundle_context_manager.get_input_coder_impl(transform_id)
        parts = [(list(part), None) for part in buffer.partition(len(handlers))]
        lock = threading.Lock()
        running: list[_Running] = []
        results: list[Any] = []
        errors: list[BaseException] = []

        def run(handler: Any, payload: list[bytes], elements: list[Any] | None) -> None:
            job = _Running(handler, payload, elements)
            with lock:
                running.append(job)
            manager = _TrackedBundleManager(job, _OneWorker(self.bundle_context_manager, handler),
                                            self._progress_frequency, cache_token_generator=self._cache_token_generator)
            try:
                result = manager.process_bundle({transform_id: payload}, expected_outputs, {},
                                                expected_output_timers, dry_run)
            except BaseException:
                job.failed = True
                raise
            finally:
                with job.lock:
                    job.done = True
                with lock:
                    running.remove(job)
            with lock:
                results.append(result)

        def steal() -> tuple[list[bytes], list[Any]] | None:
            """Half of the unread rest of another worker's bundle (encoded, decoded), or None."""
            with lock:
                candidates = [] if errors else sorted(running, key=lambda j: j.splits)
            for job in candidates:
                with job.lock:  # not held during the request: the owner marks its job done meanwhile
                    if job.done or job.splitting or job.bundle_id is None:
                        continue
                    if job.elements is None:
                        job.elements = list(coder.decode_all(b"".join(job.payload)))
                    if len(job.elements) < MIN_SPLIT_ELEMENTS:
                        continue
                    job.splitting = True
                try:
                    first = split_rest(job.handler, job.bundle_id, transform_id, len(job.elements),
                                       lambda job=job: job.failed or bool(errors))
                    if first is None or first >= len(job.elements):
                        continue
                    # the worker accepted: it stops before element ``first`` even if its bundle has ended since
                    rest, job.elements = job.elements[first:], job.elements[:first]
                    job.splits += 1
                finally:
                    job.splitting = False
                log.debug("split %s at element %d: %d elements move to another worker", job.bundle_id, first, len(rest))
                return [coder.encode_all(rest)], rest
            return None

        def work(handler: Any, part: tuple[list[bytes], list[Any] | None] | None) -> None:
            try:
                while part is not None:
                    run(handler, *part)
                    part = steal()
            except BaseException as e:  # noqa: BLE001 - re-raised in the runner's thread
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=work, args=(h, part), name=f"mbm-bundles-{i}", daemon=True)
                   for i, (h, part) in enumerate(zip(handlers, parts, strict=True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        merged = None
        for result, _ in results:  # no split results: the splits were run here
            if merged is None:
                merged = result
                continue
            merged = beam_fn_api_pb2.InstructionResponse(
                process_bundle=beam_fn_api_pb2.ProcessBundleResponse(
                    monitoring_infos=monitoring_infos.consolidate(
                        list(result.process_bundle.monitoring_infos) + list(merged.process_bundle.monitoring_infos)),
                    residual_roots=list(merged.process_bundle.residual_roots)
                    + list(result.process_bundle.residual_roots)),
                error=result.error or merged.error)
        assert merged is not None
        return merged, []


class BalancedFnApiRunner(fn_runner.FnApiRunner):
    """``FnApiRunner`` whose parallel stages use ``BalancedBundleManager``."""

    def _get_bundle_manager(self, bundle_context_manager):
        manager = super()._get_bundle_manager(bundle_context_manager)
        if type(manager) is fn_runner.ParallelBundleManager:
            return BalancedBundleManager(bundle_context_manager, self._progress_frequency,
                                         cache_token_generator=manager._cache_token_generator)
        return manager
