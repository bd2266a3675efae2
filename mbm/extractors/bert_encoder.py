"""The BERT encoder of ``mbm.extractors.bert`` as torch modules: transformers' ``BertModel`` forward
(sdpa attention) without transformers, bit-identical ``last_hidden_state``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# keys a BERT checkpoint may hold that the encoder does not use
UNUSED_PREFIXES = ("pooler.", "cls.")
UNUSED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")

class Output(NamedTuple):
    last_hidden_state: Any


def _weight(*shape: int) -> nn.Parameter:
    """Uninitialised: every weight is loaded from the checkpoint (nn.Linear's random initialisation of
    MiniLM's 22M weights costs ~0.1 s, and building on the meta device imports ~900 modules)."""
    return nn.Parameter(torch.empty(*shape))


class _PackedLinear:
    """MKL's packed copy of a dense layer's weight, for CPU inference in float32.

    ``F.linear`` on the CPU calls MKL's sgemm, which copies the weight into its blocked layout at
    every call (``mkl_blas_avx512_sgemm_scopy_*``, 3.4 % of a preprocessing job's CPU under perf).
    Packed once, the products run from that layout (``torch.ops.mkl._mkl_linear``, what torch's
    inductor emits for frozen CPU linears): ~9 % less time per MiniLM layer, one thread. The packed
    product is used for a shape only where it gives ``F.linear``'s result bit for bit on this CPU,
    checked at the first product of each (weight shape, rows, threads) and remembered in ``EXACT``
    (MKL picks other kernels for a few rows: below 16 they differ in the last bits), so features do
    not change. The copy follows the weight: a weight changed in place or replaced is packed again.
    """

    PACK_ROWS = 256  # the rows MKL is told to expect; the layout serves any row count (checked per shape)
    EXACT: dict[tuple[int, int, int, int], bool] = {}  # (out, in, rows, threads) -> packed == F.linear

    def __init__(self) -> None:
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None  # ((data_ptr, version), packed)

    @staticmethod
    def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (_HAS_MKL_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and x.shape[-1] == weight.shape[1] and x.numel() > 0)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        key = (weight.shape[0], weight.shape[1], rows, torch.get_num_threads())
        exact = self.EXACT.get(key)
        if exact is False:
            return F.linear(x, weight, bias)
        of = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[0] != of:
            self._packed = (of, torch.ops.mkl._mkl_reorder_linear_weight(weight, self.PACK_ROWS))
        out = torch.ops.mkl._mkl_linear(x, self._packed[1], weight, bias, rows)
        if exact is None:
            plain = F.linear(x, weight, bias)
            self.EXACT[key] = torch.equal(out, plain)
            return plain
        return out


def _mkl_linear_available() -> bool:
    try:
        return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear")
    except (AttributeError, RuntimeError):
        return False


_HAS_MKL_LINEAR = _mkl_linear_available()


class _Dense(nn.Module):
    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.weight = _weight(width_out, width_in)
        self.bias = _weight(width_out)
        self.cpu_packed = _PackedLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _PackedLinear.usable(x, self.weight):
            return self.cpu_packed(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class _Norm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = _weight(width)
        self.bias = _weight(width)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Table(nn.Module):
    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.weight = _weight(rows, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class _SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = _Dense(width, width)
        self.key = _Dense(width, width)
        self.value = _Dense(width, width)


class _Projection(nn.Module):
    """A dense layer, then the residual add and the layer norm (BertSelfOutput, BertOutput)."""

    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = _Dense(width_in, width)
        self.LayerNorm = _Norm(width, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(width)
        self.output = _Projection(width, width, eps)


class _Intermediate(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.dense = _Dense(width, inner)


class _Layer(nn.Module):
    def __init__(self, width: int, inner: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(width, eps)
        self.intermediate = _Intermediate(width, inner)
        self.output = _Projection(inner, width, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        head = width // self.heads
        proj = self.attention.self
        q, k, v = (p(x).view(batch, length, -1, head).transpose(1, 2) for p in (proj.query, proj.key, proj.value))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=head ** -0.5,
                                                  is_causal=False)
        attended = attended.transpose(1, 2).contiguous().reshape(batch, length, -1)
        x = self.attention.output(attended, x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Embeddings(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width = config["hidden_size"]
        self.word_embeddings = _Table(config["vocab_size"], width)
        self.position_embeddings = _Table(config["max_position_embeddings"], width)
        self.token_type_embeddings = _Table(config["type_vocab_size"], width)
        self.LayerNorm = _Norm(width, eps=config.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class _Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        eps = config.get("layer_norm_eps", 1e-12)
        self.layer = nn.ModuleList(
            _Layer(config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], eps)
            for _ in range(config["num_hidden_layers"]))


class BertEncoder(nn.Module):
    """BertModel's encoder path; parameter names as in its checkpoints. Built with uninitialised
    weights: ``load`` fills them from the checkpoint."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> Output:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        # Without padding the attention runs unmasked on the CPU (bit-identical there). On CUDA it is
        # always masked: asking whether any token is padding would wait for the device, and in bfloat16
        # the unmasked kernel rounds differently, so a text's features would depend on its pass-mates.
        if attention_mask is not None and (attention_mask.is_cuda or not bool(attention_mask.all())):
            batch, length = input_ids.shape  # (B, 1, T, T): query q may attend key k where k is a real token
            mask = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length).contiguous()
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return Output(x)


def checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights in a safetensors file, float32, named as ``BertEncoder`` names them."""
    from safetensors.torch import load_file

    state = {}
    for key, tensor in load_file(str(path)).items():
        key = key.removeprefix("bert.")  # BertFor* checkpoints prefix the encoder's keys
        if key.startswith(UNUSED_PREFIXES) or key in UNUSED_KEYS:
            continue
        state[key] = tensor.float() if tensor.is_floating_point() else tensor
    return state


class GraphedEncoder:
    """``BertEncoder`` on CUDA through one CUDA graph per input shape and autocast setting.

    An eager pass of MiniLM launches ~150 kernels from Python (on an H200 machine its 36 ``linear``
    calls alone took ~2 ms of host time per pass) and the GPU idled more than half the time; a graph
    replay launches them all in one call (text 6,306 -> 7,496 sentences/s with 256-row passes).
    Passes have a few fixed shapes (``text.pass_of``), so few graphs are captured, each on its first
    pass, and all share one memory pool (passes run one after another on one stream). Replays are serialised by a lock and each returns its own copy of the
    output, so threads sharing the model never read one another's passes. A capture that fails
    turns the graphs off for this model (eager passes from then on), with a warning.
    """

    def __init__(self, model: BertEncoder) -> None:
        self.model = model
        self._graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._pool: Any = None
        self._lock = threading.Lock()
        self._broken = False

    def __getattr__(self, name: str) -> Any:  # .eval(), .parameters(), ... as on the model
        return getattr(self.model, name)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> Output:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if self._broken or not input_ids.is_cuda:
            return self.model(**inputs)
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in inputs.items())), autocast)
        with self._lock:
            if key not in self._graphs:
                try:
                    self._graphs[key] = self._capture(inputs, autocast)
                except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly, as without graphs
                    logging.getLogger(__name__).warning("CUDA graph capture failed (%s: %s); running the "
                                                        "encoder eagerly", type(exc).__name__, exc)
                    self._broken = True
                    self._graphs.clear()
                    return self.model(**inputs)
            graph, static, out = self._graphs[key]
            for k, v in inputs.items():
                static[k].copy_(v, non_blocking=True)
            graph.replay()
            return Output(out.clone())

    def _capture(self, inputs: dict[str, torch.Tensor], autocast: tuple[bool, torch.dtype]) -> tuple:
        static = {k: v.clone() for k, v in inputs.items()}
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        enabled, dtype = autocast
        # autocast's cache of cast weights would live outside the graph's pool: off during capture
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up passes off the capture (kernel selection, workspaces)
                for _ in range(2):
                    self.model(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work other threads do meanwhile (another extractor) is not disturbed
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.model(**static).last_hidden_state
        return graph, static, out
