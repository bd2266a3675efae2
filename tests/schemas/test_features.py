import numpy as np
import pytest

from schemas.features import all_finite


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_finds_any_inf_or_nan(dtype):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((49, 64)).astype(dtype)
    assert all_finite(arr) and all_finite(arr[:, ::3]) and all_finite(arr[:0])
    big = np.finfo(dtype).max
    arr[0, 0], arr[-1, -1] = big, -big  # the largest finite values are finite
    assert all_finite(arr)
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        for where in ((0, 0), (17, 33), (48, 63)):
            broken = arr.copy()
            broken[where] = bad
            assert not all_finite(broken)
            assert not all_finite(broken[:, where[1]:where[1] + 1])  # a strided view


def test_float16_nan_payloads_and_subnormals():
    bits = np.array([0x7C01, 0xFE00, 0x7FFF], dtype="<u2")  # NaNs with other payloads and signs
    for b in bits:
        assert not all_finite(np.array([0, b], dtype="<u2").view(np.float16))
    assert all_finite(np.array([0x0001, 0x8001, 0x7BFF, 0xFBFF], dtype="<u2").view(np.float16))
