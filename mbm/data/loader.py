"""``StreamLoader``: endless batches over epochs, with a state for exact mid-epoch resumption.

The state is (epoch, batches consumed in that epoch). It counts batches handed to the caller, not
batches prefetched by data-loader workers, so a checkpoint taken after an optimizer step records
exactly what was trained on. Resuming replays the epoch's deterministic order and skips the
consumed batches before decoding them (shards are re-read, samples are not re-trained on).

Skip counters come in two kinds: the stream's (corrupt shards and docs, task misfits), which every
worker sees alike, and decode counters (corrupt arrays), which only the worker that owns a batch
sees. ``skipped`` adds the latest stream counters to the sum of each worker's latest decode counters,
so it is the same for any number of workers. A resumed stream scans the consumed batches again (so
its stream counters are whole) but does not decode them: the state carries the epoch's decode
counters so far, and ``skipped`` continues from them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Generator, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from mbm.alloc import release_free_heap
from mbm.data import segments
from mbm.data.collate import PackedBatch
from mbm.data.errors import SkipLog, skip_reasons
from mbm.data.feed import RegisteredFeed
from mbm.data.scan import index_shards
from mbm.data.split import empty_under_split
from mbm.data.stream import ShardStream

log = logging.getLogger(__name__)


# Data-loader workers run at this niceness (MBM_LOADER_NICE; 0 keeps the parent's). The training
# process drives the step and every op waits for its slowest thread, while a worker that falls
# behind is covered by the prefetched batches, so the workers yield the CPU to it. Measured on a
# 2-core CPU machine training with 2 workers (benchmarks/stream_train.py pairs, 3 runs each): with
# workers started anew every epoch, 15 % data overhead at niceness 0 and 10.5 % at 19; with the
# lighter, persistent workers of now, 4.2 % and 3.9 %, within the runs' noise.
DEFAULT_NICE = 19


def loader_nice(value: str | None) -> int:
    """The niceness ``MBM_LOADER_NICE`` names (``DEFAULT_NICE`` when unset); a clear error for anything
    but a whole number."""
    if value is None or not value.strip():
        return DEFAULT_NICE
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"MBM_LOADER_NICE={value!r}: give the loader workers' niceness as a whole number "
                         f"(0 keeps the training process's priority; {DEFAULT_NICE} is the default)") from None


# seconds a loader worker goes on serving batches after a SIGTERM, unless its loader or its parent ends first
WORKER_GRACE_S = 10.0


def _start_worker(nice: int, _worker_id: int) -> None:
    """A loader worker's set-up: its niceness, and its SIGTERM handling.

    torchrun, Slurm and ``timeout`` send SIGTERM to the whole process group, the workers too. torch's own
    handler ends a worker on a SIGTERM its parent did not send, by the signal, and the training process
    then fails wherever it is (in a checkpoint's write, too) with "DataLoader worker is killed by
    signal: Terminated", where it should finish its step (which may take one more batch) and checkpoint
    it. Here a worker goes on for ``WORKER_GRACE_S`` seconds, then exits with status 0, which torch does
    not take for a failure; its loader's shutdown or its parent's end ends it sooner. Ignoring the signal
    outright would hang a process that exits with a loader still open: Python's exit terminates daemonic
    children with SIGTERM and waits for them, and a worker that sees its parent waiting so leaves at once.
    """
    signal.signal(signal.SIGTERM, _leave_soon)
    if nice:
        with contextlib.suppress(OSError):  # not permitted here: run at the parent's priority
            os.nice(nice)


def _leave_soon(_signum: int, _frame: Any) -> None:
    """A loader worker's SIGTERM handler (``_start_worker``): exit with status 0 once the parent has
    ended, is waiting for its children to end (Python's exit terminating a loader left open), or
    ``WORKER_GRACE_S`` have passed, whichever comes first."""
    parent = os.getppid()

    def leave() -> None:
        deadline = time.monotonic() + WORKER_GRACE_S
        while time.monotonic() < deadline and os.getppid() == parent and not _waits_for_children(parent):
            time.sleep(0.05)
        os._exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one countdown is enough
    threading.Thread(target=leave, name="mbm-loader-worker-leave", daemon=True).start()


def _waits_for_children(pid: int) -> bool:
    """Whether process ``pid`` is waiting for a child to end (Linux; False where that cannot be read)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "do_wait"
    except OSError:
        return False


def _unpacked(batches: Iterable[Any], workers: set[int], feed: RegisteredFeed | None = None) -> Iterator[dict[str, Any]]:
    """Batch dicts from what DataLoader workers send (``PackedBatch``es), noting in ``workers`` the
    pids of those whose reused segments this process keeps (``mbm.data.segments``); with a ``feed``,
    on its device."""
    for batch in batches:
        if isinstance(batch, PackedBatch):
            if batch.key is not None:
                workers.add(batch.key[0])
            batch = batch.unpack() if feed is None else feed(batch)
        yield batch


class _PositionedStream(IterableDataset):
    """``stream`` at the (epoch, skipped batches) in a shared tensor: persistent DataLoader workers,
    forked once, read the position each time the loader starts an epoch."""

    def __init__(self, stream: ShardStream, *, release: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.release = release  # each worker lets go of its segments once its pass is done

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = (int(v) for v in self.position)
        batches = iter(self.stream.at(epoch, skip))
        return self._then_released(batches) if self.release else batches

    @staticmethod
    def _then_released(batches: Iterator[Any]) -> Iterator[Any]:
        yield from batches
        segments.drop_pool()  # the training process has received every batch of the pass by now or will


MAX_EMPTY_EPOCHS = 8  # epochs in a row without a batch after which the data is taken to give none
SHM = "/dev/shm"


def out_of_shared_memory(error: BaseException) -> bool:
    """Whether a DataLoader error says a worker could not have shared memory for a batch: /dev/shm is
    full (Docker gives a container 64 MB of it unless told otherwise). torch allocates a segment with
    ``posix_fallocate``, which fails with ENOSPC; a page that could not be had on write kills the worker
    with SIGBUS instead."""
    text = str(error)
    return ("unable to allocate shared memory" in text
            or ("shared memory" in text and "No space left on device" in text)
            or "killed by signal: Bus error" in text)


def shm_room(path: str = SHM) -> str:
    """"/dev/shm: 64 MiB, 3 MiB free", or what is known of it."""
    try:
        st = os.statvfs(path)
    except OSError:
        return f"{path}: not readable"
    return f"{path}: {st.f_blocks * st.f_frsize >> 20} MiB, {st.f_bavail * st.f_frsize >> 20} MiB free"


class StreamLoader:
    """Iterate forever; ``state_dict()``/``load_state_dict()`` save and restore the position."""

    def __init__(self, stream: ShardStream, *, workers: int = 0, pin_memory: bool = False,
                 feed_device: torch.device | None = None, release_segments: bool = False) -> None:
        """``pin_memory``: workers' batches go through page-locked memory (DataLoader's pin thread);
        ``feed_device``: a CUDA device that batches are copied to straight from the workers' segments
        instead (``mbm.data.feed``; workers > 0 only); ``release_segments``: the workers' shared memory is
        let go of after each ``one_pass`` (held-out passes: their workers idle between evaluations, and
        their segments would stay in /dev/shm beside the training loader's)."""
        if workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        if feed_device is not None and torch.device(feed_device).type != "cuda":
            raise ValueError(f"feed_device must be a CUDA device, got {feed_device}")
        self.stream = stream
        self.workers = workers
        self.feed_device = torch.device(feed_device) if feed_device is not None and workers else None
        self.pin_memory = pin_memory and self.feed_device is None
        self.nice = loader_nice(os.environ.get("MBM_LOADER_NICE")) if workers else 0
        self.release_segments = release_segments
        self._feed: RegisteredFeed | None = None
        self.epoch = 0
        self.batch = 0  # batches consumed in ``epoch``
        self.samples = 0  # samples consumed in ``epoch``
        self._missing_at_start: set[str] | None = None  # shards already missing at the first epoch
        self.skipped: dict[str, int] = {}  # counters of the current epoch's stream so far
        self._decode_skips: dict[int, dict[str, int]] = {}  # worker → its latest decode counters
        self._decoded_before: dict[str, int] = {}  # decode counters of the epoch's batches before this pass
        self._positioned: _PositionedStream | None = None
        self._loader: DataLoader | None = None  # its workers live from the first epoch until iteration stops
        self._senders: set[int] = set()  # pids of the workers whose segments this process keeps

    def state_dict(self) -> dict[str, Any]:
        cfg = self.stream.cfg
        return {"epoch": self.epoch, "batch": self.batch, "samples": self.samples, "seed": cfg.seed,
                "batch_size": cfg.batch_size, "world_size": self.stream.world,
                "decode_skipped": dict(sorted(self._decode_total().items()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batches ``state`` had consumed; refuse a state from another layout."""
        cfg = self.stream.cfg
        mine = {"seed": cfg.seed, "batch_size": cfg.batch_size, "world_size": self.stream.world}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            changed = ", ".join(f"{k} {theirs[k]} → {mine[k]}" for k in mine if theirs[k] != mine[k])
            how = (f"; resume with {theirs['world_size']} process{'es' if theirs['world_size'] != 1 else ''} "
                   f"(torchrun --nproc_per_node {theirs['world_size']} ...): each rank's share of the data follows "
                   "the number of ranks" if theirs["world_size"] != mine["world_size"] and theirs["world_size"] else "")
            raise ValueError(f"cannot resume the data stream exactly: {changed} changed since the checkpoint{how}")
        self.epoch, self.batch, self.samples = int(state["epoch"]), int(state["batch"]), int(state["samples"])
        self._decoded_before = {k: int(v) for k, v in state.get("decode_skipped", {}).items()}  # older states: none

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        if self.workers == 0:
            return self.stream.at(self.epoch, self.batch).batches(markers=True)
        if self._loader is None:
            # Workers persist across epochs: no fork of the training process per epoch, and they keep
            # their shared-memory segments. A private generator keeps worker seeding from drawing on
            # the global torch RNG (resumption).
            # The workers are forked at the first batch: freed heap kept for reuse (``mbm.alloc``) must
            # not be shared with them, or it is copied as the training process writes it again.
            release_free_heap()
            # Each worker would scan every shard in its first pass: scan those not kept yet once, in parallel.
            shards = self.stream.cfg.shards
            index_shards(shards, self.workers, start=len(shards) * self.stream.rank // self.stream.world)
            self._positioned = _PositionedStream(self.stream, release=self.release_segments)
            gen = torch.Generator().manual_seed(self.stream.cfg.seed)
            self._loader = DataLoader(self._positioned, batch_size=None, num_workers=self.workers, generator=gen,
                                      pin_memory=self.pin_memory, persistent_workers=True,
                                      worker_init_fn=functools.partial(_start_worker, self.nice))
        assert self._positioned is not None
        self._positioned.position[0], self._positioned.position[1] = self.epoch, self.batch
        if self.feed_device is not None and self._feed is None:
            self._feed = RegisteredFeed(self.feed_device)
        return _unpacked(self._loader, self._senders, self._feed)

    def close(self) -> None:
        """Stop the data-loader workers (iteration starts new ones)."""
        if self._feed is not None:
            self._feed.close()  # its copies done and segments unlocked before they are let go of
            self._feed = None
        self._loader = self._positioned = None  # the DataLoader's iterator shuts its workers down when freed
        segments.forget(self._senders)
        self._senders.clear()

    def _without_workers(self) -> None:
        """Stop the workers and load the batches in this process from now on (the same batches in the
        same order: the stream does not depend on the worker count)."""
        log.warning("the %d data-loader worker(s) ran out of shared memory (%s): going on with --workers 0, the "
                    "same batches loaded in this process. Each worker keeps up to %d batches there; to keep "
                    "workers, give %s more room (docker run --shm-size=2g; in Kubernetes an emptyDir with medium "
                    "Memory mounted at %s) or lower --workers or --batch-size", self.workers, shm_room(),
                    segments.SLOTS, SHM, SHM)
        self.close()
        self.workers = 0
        self.feed_device = None

    def decode_skipped(self) -> dict[str, int]:
        """Of ``skipped``, the samples whose arrays were corrupt: counted by the process that decoded them, so
        a rank counts those of its own share only (the rest, the stream's, every rank sees alike)."""
        return dict(sorted(self._decode_total().items()))

    def _decode_total(self) -> Counter[str]:
        """Decode counters of the epoch's consumed batches."""
        total = Counter(self._decoded_before)
        for counts in self._decode_skips.values():
            total.update(counts)
        return total

    def _count_skips(self, skipped: dict[str, Any]) -> None:
        self._decode_skips[int(skipped["worker"])] = skipped["decode"]
        self.skipped = dict(sorted((Counter(skipped["stream"]) + self._decode_total()).items()))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._epochs()
        finally:  # closed or dropped mid-way: stop the workers
            self.close()

    def _check_shards(self) -> None:
        """Shards that were there when the run started must stay: one deleted under a running training
        (``mbm gc`` of the version it reads) would change the data from one epoch to the next."""
        missing = {p for p in self.stream.cfg.shards if not os.path.exists(p)}
        if self._missing_at_start is None:
            self._missing_at_start = missing
            return
        gone = sorted(missing - self._missing_at_start)
        if gone:
            raise ValueError(f"{len(gone)} shard(s) of the training data disappeared during the run, e.g. {gone[0]} "
                             "(a `mbm gc` of the version this run reads?); keep the version until the run ends")

    def _epochs(self) -> Iterator[dict[str, Any]]:
        empty = 0  # epochs in a row that gave no batch
        while True:
            start = self.batch
            produced = yield from self._rest_of_epoch()
            if produced == 0 and start == 0:
                # The first epoch, or many in a row: the data gives nothing. A later epoch alone: its
                # shuffle put every usable sample of this rank into dropped batches; the next one differs.
                empty += 1
                if self.epoch == 0 or empty >= MAX_EMPTY_EPOCHS:
                    raise ValueError(self._no_batch())
                log.warning("epoch %d gave this rank no batch (skipped %s); going on with the next epoch",
                            self.epoch, self.skipped)
            elif produced:
                empty = 0
            if self.skipped:
                log.info("epoch %d: skipped %s", self.epoch, self.skipped)
            self.epoch += 1
            self._restart_epoch()

    def _restart_epoch(self) -> None:
        self.batch = 0
        self.samples = 0
        self.skipped, self._decoded_before, self._decode_skips = {}, {}, {}

    def _rest_of_epoch(self) -> Generator[dict[str, Any], None, int]:
        """The batches of epoch ``self.epoch`` from batch ``self.batch`` on; returns how many it yielded."""
        self._check_shards()
        produced = 0
        while True:
            # The workers of this pass count from zero; the consumed batches' counters stay (a pass that
            # starts mid-epoch: after a resume, or after an earlier pass was closed).
            self._decoded_before, self._decode_skips = dict(self._decode_total()), {}
            try:
                for batch in self._epoch_batches():
                    self._count_skips(batch.pop("skipped"))
                    if "end" in batch:  # a worker's last counters, after its last batch
                        continue
                    self.batch += 1  # a dropped batch (all its samples corrupt) counts as consumed too
                    if "dropped" in batch:
                        continue
                    produced += 1
                    self.samples += len(batch["ids"])
                    yield batch
                return produced
            except RuntimeError as e:
                if not self.workers or not out_of_shared_memory(e):
                    raise
                self._without_workers()  # this epoch again from the batch it had reached: the same batches, here

    def one_pass(self) -> Iterator[dict[str, Any]]:
        """Epoch ``self.epoch``'s batches from its start, once (an evaluation over a held-out split); then
        ``skipped`` holds what the pass left out, and the workers stay for the next pass. A pass given up
        half-way stops them (the next one starts new ones)."""
        self._restart_epoch()
        finished = False
        try:
            yield from self._rest_of_epoch()
            finished = True
        finally:
            if not finished:
                self.close()
        if self.release_segments and self._senders:  # every batch copied out: the workers let go of theirs too
            segments.forget(self._senders)
            self._senders.clear()

    def _no_batch(self) -> str:
        """Why an epoch gave no batch, naming what was skipped. Workers send their counters with batches
        only, so the stream is scanned again here (every rank's samples, arrays not decoded)."""
        cfg = self.stream.cfg
        skips = SkipLog(quiet=True)
        whole = ShardStream(replace(cfg, batch_size=1, drop_last=False), epoch=self.epoch)
        usable = sum(1 for _ in whole.raw_batches(skips))
        counts = dict(sorted((skips.counts + self._decode_total()).items()))
        skipped = ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "nothing"
        split = f"the {cfg.split} split"
        if self.batch:  # batches came, and every one was dropped
            return (f"{split} yields no batch: every sample in this rank's batches has corrupt arrays "
                    f"(skipped {skipped})")
        if usable == 0 and not counts:  # nothing skipped: no sample falls in the split
            why = (empty_under_split(cfg.split) if cfg.split_by == "split" and cfg.split != "all" else
                   "no readable sample falls in it; check that the dataset's shards exist and hold samples")
            return f"{split} is empty: {why}"
        if usable == 0:
            reasons = skip_reasons(counts, cfg.collate.feature_dims, cfg.task) or "nothing"
            return f"{split} has no sample the {cfg.task} task can use (skipped {reasons})"
        return (f"{split} yields no batch of {cfg.batch_size} on {self.stream.world} rank(s): {usable} usable "
                f"sample(s) (skipped {skipped}); lower --batch-size or add data")


class PassLoader:
    """Whole passes over a held-out stream, one per iteration, in the stream's order (the same for any worker
    count), its arrays read and decoded by ``workers`` processes that stay from one pass to the next (their
    scans of the shards with them; their shared memory is let go of after each pass). Reads like a
    ``ShardStream`` where evaluation looks: ``cfg``, and ``skipped()`` after a pass. Without workers the pass
    runs in this process."""

    def __init__(self, stream: ShardStream, *, workers: int = 0, pin_memory: bool = False) -> None:
        self.loader = StreamLoader(stream, workers=workers, pin_memory=pin_memory, release_segments=True)

    @property
    def cfg(self) -> Any:
        return self.loader.stream.cfg

    @property
    def workers(self) -> int:
        return self.loader.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.loader.one_pass()

    def skipped(self) -> dict[str, int]:
        """What the last pass left out, by reason."""
        return dict(self.loader.skipped)

    def decode_skipped(self) -> dict[str, int]:
        """Of that, the samples whose arrays were corrupt (``StreamLoader.decode_skipped``)."""
        return self.loader.decode_skipped()

    def close(self) -> None:
        """Stop the workers (the next pass starts new ones)."""
        self.loader.close()

    def __enter__(self) -> PassLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
