"""Process-group setup: DDP under torchrun (gloo on CPU, NCCL on CUDA), a no-op environment otherwise."""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group, so we tear it down
    control: Any = None  # a gloo group for host-side flags (None: the default group, gloo already)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down; on gloo that joins its worker threads, so none outlives the run.

        Measured cause: a gloo worker frees a finished collective after the caller has returned from it,
        and when the work holds tensors made in Python, freeing them takes the GIL. A worker doing so as
        the interpreter shuts down is ended by CPython inside that C++ destructor, and the rank aborts with
        "terminate called without an active exception" (rank 1, 1 torchrun in 10 to 60 here on 2
        cores; its core dump: the worker in ~AsyncBarrierWork → ~AsyncAllgatherWork → a tensor's decref,
        the last checkpoint's barrier and all-gathers, the main thread in Py_FinalizeEx). The group was
        never destroyed: DDP holds it through its reducer and sits in a reference cycle, hence the
        collection first; the group's own references keep it alive until destroy_process_group drops the
        last one, where torch releases the GIL to join the workers.
        """
        if self.owns_group and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


class AnyRank:
    """Whether a flag is set on any rank, agreed a step late and without waiting.

    Each call posts this rank's flag in an all-reduce (on the host: a gloo group, also beside NCCL)
    and returns the result of the one posted at the call before, which ran meanwhile: every rank gets
    the same answer at the same call, and no call waits for the other ranks. Alone, the flag itself.
    ``finish()`` waits for the last one, once every rank has made the same calls."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self._posted: tuple[Any, torch.Tensor] | None = None

    def __call__(self, flag: bool) -> bool:
        if not self.env.distributed:
            return flag
        agreed = self.finish()
        t = torch.tensor([int(flag)], dtype=torch.int32)
        self._posted = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.env.control, async_op=True), t
        return agreed

    def finish(self) -> bool:
        if self._posted is None:
            return False
        work, t = self._posted
        self._posted = None
        work.wait()
        return bool(t.item())


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistEnv(rank=0, world=1, local_rank=0, device=dev)
    owns = False
    if not dist.is_initialized():
        # torch.distributed.nn binds ``group=group.WORLD`` as default arguments when it is imported; DDP's
        # construction imports it, and after this call that would be the world group itself, kept for the
        # life of the process: destroy_process_group could then never free the group nor join its threads
        # (see ``DistEnv.close``). Imported now, the defaults are None (the world group at call time).
        import torch.distributed.nn  # noqa: F401

        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        owns = True
    log.info("rank %d of %d on %s (%s)", rank, world, dev, dist.get_backend())
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None  # every rank calls it
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev,
                   owns_group=owns, control=control)
