"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio`` of the peak."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup: int, horizon: int, min_ratio: float) -> float:
    """LR multiplier after ``step`` optimizer steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup: int, horizon: int, min_ratio: float, *, done: int = 0) -> LambdaLR:
    """A LambdaLR peaking at the lr the optimizer's groups hold now, after ``done`` optimizer steps.

    A resumed run builds it anew at its step instead of loading the checkpoint's scheduler state,
    which holds the old run's peak lr (``base_lrs``): so the lr at step k is the one a fresh run with
    the current --lr, warmup and horizon has at step k.
    """
    def factor(step: int) -> float:  # a plain function: LambdaLR does not save it in state_dict()
        return warmup_cosine_factor(step, warmup, horizon, min_ratio)

    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the peak; LambdaLR reads it as each group's base lr
    return LambdaLR(optimizer, factor, last_epoch=done - 1)  # its first step() evaluates the schedule at ``done``
