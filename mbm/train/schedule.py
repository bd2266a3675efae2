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


def warmup_cosine(optimizer: Optimizer, warmup: int, horizon: int, min_ratio: float) -> LambdaLR:
    """A LambdaLR whose state holds only the step count, so a resumed run may change the horizon."""
    def factor(step: int) -> float:  # a plain function: LambdaLR does not save it in state_dict()
        return warmup_cosine_factor(step, warmup, horizon, min_ratio)

    return LambdaLR(optimizer, factor)
