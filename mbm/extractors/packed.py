"""Dense layers multiplied from MKL's packed copy of their weights, in float32 inference on the CPU.

``F.linear`` on the CPU calls MKL's sgemm, which copies the weight into its blocked layout at every
call (``mkl_blas_avx512_sgemm_scopy_*``: 3.4 % of a preprocessing job's CPU under perf, all of it in
MiniLM). Packed once, the products run from that layout (``torch.ops.mkl._mkl_linear``, what torch's
inductor emits for frozen CPU linears). The copy matters where the rows are few against the weight:
the text models' CPU passes of 256 tokens (MiniLM ~9 % less time per layer, a RoBERTa-base layer
~15 %, one thread); passes of thousands of rows (image and audio transformers) gain little.

A packed product is used for a shape only where it gives ``F.linear``'s result bit for bit on this
CPU, checked at the first product of each (weight shape, rows, threads) and remembered in
``PackedWeight.EXACT`` (MKL picks other kernels for a few rows: below 16 they differ in the last
bits), so features never change. Autograd, other dtypes and devices take ``F.linear``.

Under bfloat16 autocast on the CPU (``precision = "bfloat16"``) a layer multiplies from a bfloat16
copy of its weight and bias made once, not at every pass as autocast does (its cache of cast weights
goes when each pass's autocast region ends): the same product of the same values, bit for bit.
MiniLM on 256 texts, one thread: 3.1 -> 2.3 s (float32: 4.4 s). oneDNN's packed bfloat16 weights
(``torch.ops.mkldnn._linear_pointwise``) were ~20 % faster again, but with two threads they differ
from ``F.linear`` in a few elements of some shapes, too rarely for a check at the first product to see.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _mkl_linear_available() -> bool:
    try:
        return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


HAS_MKL_LINEAR = _mkl_linear_available()


def _disable() -> None:
    global HAS_MKL_LINEAR
    HAS_MKL_LINEAR = False


class PackedWeight:
    """One dense layer's packed weight; it follows the weight: one changed in place or replaced is
    packed again. Costs about the weight's size in memory, from the first product on."""

    PACK_ROWS = 256  # the rows MKL is told to expect; the layout serves any row count (checked per shape)
    EXACT: dict[tuple[int, int, int, int], bool] = {}  # (out, in, rows, threads) -> packed == F.linear

    def __init__(self) -> None:
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None  # ((data_ptr, version), packed)
        # ((the weight's and the bias's (data_ptr, version)), bfloat16 weight, bfloat16 bias)
        self._bf16: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    @staticmethod
    def _cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """A non-empty CPU product of a 2-d weight without autograd: one the copies kept here may serve."""
        return (x.device.type == "cpu" and not torch.is_grad_enabled() and weight.dim() == 2
                and x.shape[-1] == weight.shape[1] and x.numel() > 0)

    @staticmethod
    def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (HAS_MKL_LINEAR and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and PackedWeight._cpu_inference(x, weight))

    @staticmethod
    def autocast_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this product runs in bfloat16 under the CPU's autocast, without autograd."""
        return (weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and PackedWeight._cpu_inference(x, weight))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)``, from the packed weight where that is usable and exact (under
        bfloat16 autocast, from the bfloat16 copies)."""
        if self.autocast_bf16(x, weight):
            return self._linear_bf16(x, weight, bias)
        if not self.usable(x, weight):
            return F.linear(x, weight, bias)
        rows = x.numel() // x.shape[-1]
        key = (weight.shape[0], weight.shape[1], rows, torch.get_num_threads())
        exact = self.EXACT.get(key)
        if exact is False:
            return F.linear(x, weight, bias)
        of = (weight.data_ptr(), weight._version)
        try:
            if self._packed is None or self._packed[0] != of:
                self._packed = (of, torch.ops.mkl._mkl_reorder_linear_weight(weight, self.PACK_ROWS))
            out = torch.ops.mkl._mkl_linear(x, self._packed[1], weight, bias, rows)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch build whose ops differ: F.linear from now on
            _disable()
            return F.linear(x, weight, bias)
        if exact is None:
            plain = F.linear(x, weight, bias)
            self.EXACT[key] = torch.equal(out, plain)
            return plain
        return out

    def _linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Autocast's bfloat16 ``F.linear(x, weight, bias)``, bit for bit: the same product of the same
        bfloat16 values, from the copies kept here."""
        of = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version))
        if self._bf16 is None or self._bf16[0] != of:
            self._bf16 = (of, weight.detach().to(torch.bfloat16),
                          None if bias is None else bias.detach().to(torch.bfloat16))
        return F.linear(x.to(torch.bfloat16), self._bf16[1], self._bf16[2])


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.mbm_packed.linear(x, self.weight, self.bias)


def pack_linears(model: Any) -> int:
    """Make every plain ``nn.Linear`` of ``model`` (not subclasses with a forward of their own) multiply
    from its packed weight on the CPU; returns how many. Their parameters, state dict and behaviour on
    other devices, dtypes and under autograd are unchanged."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            module.mbm_packed = PackedWeight()
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    return count
