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

from mbm.extractors.packed import PackedWeight

# keys a BERT checkpoint may hold that the encoder does not use
UNUSED_PREFIXES = ("pooler.", "cls.")
UNUSED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")

class Output(NamedTuple):
    last_hidden_state: Any


def _weight(*shape: int) -> nn.Parameter:
    """Uninitialised: every weight is loaded from the checkpoint (nn.Linear's random initialisation of
    MiniLM's 22M weights costs ~0.1 s, and building on the meta device imports ~900 modules)."""
    return nn.Parameter(torch.empty(*shape))


class _Dense(nn.Module):
    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.weight = _weight(width_out, width_in)
        self.bias = _weight(width_out)
        self.cpu_packed = PackedWeight()  # on the CPU in float32 inference: MKL's packed products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_packed.linear(x, self.weight, self.bias)


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
        # streams, captures and replays are the current device's: a model on cuda:1 while cuda:0 is current
        # captured an empty graph (the passes ran on the other device) and replayed nothing, with a warning only
        with self._lock, torch.cuda.device(input_ids.device):
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
