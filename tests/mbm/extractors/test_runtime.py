import contextlib
import logging

import pytest
import torch

from mbm.extractors import runtime
from mbm.extractors.runtime import autocast

# Building a CUDA autocast context on a machine without CUDA warns that it is disabled; only its settings are checked.
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")


@pytest.mark.parametrize(("device", "precision"), [("cpu", "auto"), ("cpu", "float32"), ("cuda", "float32"),
                                                   ("cuda:1", "float32")])
def test_float32_runs_without_autocast(device, precision):
    assert isinstance(autocast(device, precision), contextlib.nullcontext)


@pytest.mark.parametrize(("device", "kind"), [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda")])
def test_bfloat16_autocasts_on_every_device(device, kind):
    ctx = autocast(device, "bfloat16")
    assert isinstance(ctx, torch.autocast) and ctx.device == kind and ctx.fast_dtype == torch.bfloat16


def test_auto_is_bfloat16_on_cuda_only():
    ctx = autocast("cuda", "auto")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    with autocast("cpu", "bfloat16"):
        assert torch.is_autocast_enabled("cpu")
        out = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert out.dtype == torch.bfloat16


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "float16")


def test_bfloat16_on_a_cpu_without_bf16_dot_products_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    runtime._check_cpu_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="mbm.extractors.runtime"):
        autocast("cpu", "bfloat16")
        autocast("cpu", "bfloat16")
    assert [r.getMessage().count("emulated") for r in caplog.records] == [1]


@pytest.mark.parametrize(("values", "finite"), [
    ([1.0, -2.0, 0.5], True), ([3e38, -3e38], True), ([1.0, float("nan"), 2.0], False), ([float("nan")], False),
    ([1.0, float("inf")], False), ([float("-inf"), 0.0], False), ([], True)])
def test_float16_on_device_says_whether_every_value_is_finite(values, finite):
    tensor = torch.tensor(values, dtype=torch.float32)
    half, ok = runtime.float16_on_device(tensor.reshape(1, -1).expand(3, -1))
    assert ok.dtype == torch.bool and ok.shape == () and bool(ok) == finite
    assert half.dtype == torch.float16 and half.shape == (3, len(values))
    assert bool(ok) == bool(torch.isfinite(tensor).all())
    if finite:  # saturated at float16's range, not inf
        assert torch.isfinite(half).all()
