import io
import json

import numpy as np
import pytest

from mbm.data.decode import decode_sample
from mbm.data.errors import CorruptSample


def raw_with(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    doc = {"id": "s1", "modalities": ["image"], "label": "cat"}
    return {"__key__": "k1", "json": json.dumps(doc).encode(), "image.npy": buf.getvalue()}


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_features_are_corrupt(dtype, bad):
    arr = np.ones((3, 4), dtype)
    arr[2, 1] = bad
    with pytest.raises(CorruptSample) as exn:
        decode_sample(raw_with(arr))
    assert exn.value.reason == "npy.nonfinite"


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4"])
def test_finite_extremes_pass_as_float16(dtype):
    # largest finite float16, smallest subnormal, negative zero: none may be taken for inf/NaN
    values = np.array([[65504.0, -65504.0, 6e-8, -0.0]], dtype)
    features = decode_sample(raw_with(values)).features["image"]
    assert features.dtype == np.float16
    np.testing.assert_array_equal(features, values.astype(np.float16))
