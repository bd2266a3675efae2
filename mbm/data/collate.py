"""Collate: a list of ``Sample`` → padded tensors and masks per modality (True = a real token).

Features stay float16, as the shards store them: half the bytes between processes and to the device.
The model casts them to its own dtype on its device (``ModalityEmbedding``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mbm.data import segments
from mbm.data.decode import InShard, Sample
from mbm.data.errors import CorruptSample
from mbm.data.source import label_key
from mbm.data.tokenizer import encode_targets, load_tokenizer, special_tokens

TASKS = ("classify", "retrieve", "generate")
IGNORE = -100  # label of a sample without one (ignored by cross-entropy)


@dataclass(frozen=True, kw_only=True)
class CollateConfig:
    feature_dims: dict[str, int]  # modalities the model reads → feature width
    max_tokens: dict[str, int] = field(default_factory=dict)  # longer sequences: text truncated, others pooled
    labels: tuple[Any, ...] = ()  # label vocabulary (classify)
    tokenizer: str | None = None  # generate: tokenizer folder (None: the text extractor's)
    max_target_len: int = 32
    with_targets: bool = False  # generate: tokenize the text


def fit_length(arr: np.ndarray, max_len: int | None, modality: str) -> np.ndarray:
    """At most ``max_len`` rows: text keeps its first tokens, image/audio are average-pooled in time (float32).

    The rows split into ``max_len`` consecutive segments (``np.linspace`` bounds) of k or k + 1 rows;
    each segment's rows are added in order in float32, then divided by its length. Adding row j of
    every segment at once is twice as fast as ``np.add.reduceat`` for short segments, with the same
    sums (reduceat sums segments of 8 rows or more pairwise).
    """
    n = arr.shape[0]
    if not max_len or n <= max_len:
        return arr
    if modality == "text":
        return arr[:max_len]
    starts = np.linspace(0, n, max_len + 1).astype(np.int64)
    first, sizes = starts[:-1], np.diff(starts)
    sums = arr[first].astype(np.float32)
    shortest = int(sizes.min())
    for j in range(1, int(sizes.max())):
        if j < shortest:
            sums += arr[first + j]
        else:  # only the segments that have a row j
            longer = sizes > j
            sums[longer] += arr[first[longer] + j]
    # float32 / float32 rounds to the same value as float64 division rounded to float32
    return np.divide(sums, sizes.astype(np.float32)[:, None], out=sums)


_ALIGN = 64  # bytes; every tensor of a packed batch starts at a multiple of this
_DTYPES = {"float16": torch.float16, "bool": torch.bool, "int64": torch.int64}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


@dataclass
class PackedBatch:
    """A collated batch as one uint8 buffer, the layout of its tensors, and its plain fields.

    DataLoader workers send batches in this form: torch moves every tensor it sends to its own
    shared-memory segment and passes each segment's file descriptor over a socket, so one buffer per
    batch costs one segment instead of one per tensor, and workers reuse their segments, which cross
    to the training process once (``mbm.data.segments``). ``unpack`` gives the batch dict, its tensors
    views of one buffer; a batch in a reused segment is copied out first and the segment handed back,
    so unpack it once.
    """

    buffer: torch.Tensor  # uint8, 1-D
    layout: tuple[tuple[str, str | None, str, tuple[int, ...], int], ...]  # (key, sub-key, dtype, shape, offset)
    extras: dict[str, Any]  # ids, texts and whatever the stream adds
    seq: int | None = None  # set: the buffer is a worker's reusable segment, released under this number
    key: segments.Key | None = None  # the worker's reusable segment the batch is (or was, once pinned) in

    @property
    def end(self) -> int:
        """Bytes of the buffer in use."""
        return max(offset + _nbytes(dtype, shape) for _, _, dtype, shape, offset in self.layout)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled by a worker: a reused segment travels with its first batch only (``mbm.data.segments``)."""
        if self.key is None:
            return PackedBatch, (self.buffer, self.layout, self.extras, self.seq)
        if segments.pool().first_send(self.key):
            return _first_in_segment, (self.key, self.buffer, self.layout, self.extras, self.seq)
        return _in_received_segment, (self.key, self.layout, self.extras, self.seq)

    def pin_memory(self) -> PackedBatch:  # called by DataLoader(pin_memory=True)
        if self.seq is None:
            return PackedBatch(self.buffer.pin_memory(), self.layout, self.extras)
        pinned = torch.empty(self.end, dtype=torch.uint8, pin_memory=True)
        return PackedBatch(segments.copy_out(self.buffer, self.end, self.seq, into=pinned), self.layout, self.extras,
                           key=self.key)

    def unpack(self) -> dict[str, Any]:
        return self.views(self.buffer if self.seq is None else segments.copy_out(self.buffer, self.end, self.seq))

    def views(self, buffer: torch.Tensor) -> dict[str, Any]:
        """The batch dict with its tensors as views of ``buffer`` (this batch's buffer or a copy of it)."""
        batch: dict[str, Any] = dict(self.extras)
        for key, sub, dtype, shape, offset in self.layout:
            tensor = buffer[offset: offset + _nbytes(dtype, shape)].view(_DTYPES[dtype]).view(shape)
            if sub is None:
                batch[key] = tensor
            else:
                batch.setdefault(key, {})[sub] = tensor
        return batch


def _first_in_segment(key: segments.Key, buffer: torch.Tensor, *rest: Any) -> PackedBatch:
    segments.receive(key, buffer)
    return PackedBatch(buffer, *rest, key=key)


def _in_received_segment(key: segments.Key, *rest: Any) -> PackedBatch:
    return PackedBatch(segments.received(key), *rest, key=key)


class _Layout:
    """Offsets of a batch's tensors in one buffer; ``views`` gives numpy views to fill."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str | None, str, tuple[int, ...], int]] = []
        self.size = segments.HEADER  # a reused segment's header; unused in other buffers

    def add(self, key: str, sub: str | None, dtype: str, shape: tuple[int, ...]) -> None:
        self.entries.append((key, sub, dtype, shape, self.size))
        self.size += -(-_nbytes(dtype, shape) // _ALIGN) * _ALIGN

    def allocate(self, shared: bool) -> tuple[torch.Tensor, int | None, segments.Key | None]:
        """A uint8 buffer (not initialized: ``pack_collate`` writes every byte of every tensor), the sequence
        number its segment is released under and the segment's key; ``shared``: a segment of this process's
        pool (``mbm.data.segments``)."""
        if shared:
            return segments.pool().take(self.size)
        return torch.from_numpy(np.empty(self.size, np.uint8)), None, None

    def views(self, buffer: torch.Tensor) -> dict[tuple[str, str | None], np.ndarray]:
        raw = buffer.numpy()
        out = {}
        for key, sub, dtype, shape, offset in self.entries:
            out[key, sub] = raw[offset: offset + _nbytes(dtype, shape)].view(dtype).reshape(shape)
        return out


def pad_into(x: np.ndarray, mask: np.ndarray, arrays: list[np.ndarray | InShard | None]) -> None:
    """Fill the uninitialized (B, T, dim) ``x`` and (B, T) ``mask``: each array in its row (an ``InShard``
    read from its shard into place), zeros after it (a whole row of zeros for None), its tokens True in
    ``mask``. Zeroing only the padding instead of the whole buffer saves a pass over it (0.17 ms for a
    batch of 32 images' 49 x 1280 float16 patches)."""
    steps = x.shape[1]
    lengths = np.zeros(len(arrays), np.int64)
    for i, a in enumerate(arrays):
        n = 0 if a is None else a.shape[0]
        if n:
            if isinstance(a, InShard):
                a.read_into(x[i, :n])
            else:
                x[i, :n] = a
            lengths[i] = n
        if n < steps:
            x[i, n:] = 0
    np.less(np.arange(steps), lengths[:, None], out=mask)


def _fitted(a: np.ndarray | InShard | None, max_len: int | None, modality: str) -> np.ndarray | InShard | None:
    """``fit_length`` of a decoded array; an ``InShard`` (whose rows all fit) and None as they are."""
    return a if a is None or isinstance(a, InShard) else fit_length(a, max_len, modality)


def pack_collate(samples: list[Sample], cfg: CollateConfig, *, shared: bool = False) -> PackedBatch:
    """The batch of ``samples`` in one buffer (``shared``: a shared-memory one, for a DataLoader worker to send).

    Features are float16 (B, T_m, dim) per modality, zero-padded, with (B, T_m) masks (True = a real
    token; a modality absent from the whole batch gets one masked slot); pooled features (``max_tokens``)
    are averaged in float32, then stored as float16. ``present`` (B, M) says which modalities each
    sample has, ``labels`` (B,) the label index (``IGNORE`` for none or unknown), ``content`` (B,) per modality
    an id of its input's content (``content_id``: retrieve's loss does not count the same picture under
    another caption as a negative); generate adds
    ``target_ids``/``target_mask`` (B, L). Raises ``CorruptSample`` when an ``InShard`` array turns out
    cut short or not finite as it is read into place (``ShardStream.batches`` then packs the batch again).
    """
    n = len(samples)
    fitted = {m: [_fitted(s.features.get(m), cfg.max_tokens.get(m), m) for s in samples] for m in cfg.feature_dims}
    layout = _Layout()
    for m, dim in cfg.feature_dims.items():
        steps = max([a.shape[0] for a in fitted[m] if a is not None], default=1)
        layout.add("features", m, "float16", (n, steps, dim))
        layout.add("masks", m, "bool", (n, steps))
    layout.add("present", None, "bool", (n, len(cfg.feature_dims)))
    layout.add("labels", None, "int64", (n,))
    for m in cfg.feature_dims:
        layout.add("content", m, "int64", (n,))
    seqs: list[list[int]] = []
    if cfg.with_targets:
        tok = load_tokenizer(cfg.tokenizer)
        seqs = encode_targets(tok, [s.text or "" for s in samples], cfg.max_target_len)
        longest = max(len(s) for s in seqs)
        layout.add("target_ids", None, "int64", (n, longest))
        layout.add("target_mask", None, "bool", (n, longest))
    buffer, seq, key = layout.allocate(shared)
    views = layout.views(buffer)
    try:
        for m in cfg.feature_dims:
            pad_into(views["features", m], views["masks", m], fitted[m])
    except CorruptSample:  # an array read into place: the caller decodes the batch again, whole
        if seq is not None:
            segments.release(buffer, seq)
        raise
    views["present", None][:] = [[m in s.features for m in cfg.feature_dims] for s in samples]
    index = {label_key(v): i for i, v in enumerate(cfg.labels)}
    views["labels", None][:] = [index.get(label_key(s.label), IGNORE) if s.label is not None else IGNORE
                                for s in samples]
    for j, m in enumerate(cfg.feature_dims):
        views["content", m][:] = [content_id(s.content.get(m), i * len(cfg.feature_dims) + j)
                                  for i, s in enumerate(samples)]
    if cfg.with_targets:
        ids, mask = views["target_ids", None], views["target_mask", None]
        ids[:] = special_tokens(tok).pad
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        np.less(np.arange(mask.shape[1]), np.array([len(s) for s in seqs])[:, None], out=mask)
    extras = {"ids": [s.id for s in samples], "texts": [s.text for s in samples]}
    return PackedBatch(buffer, tuple(layout.entries), extras, seq, key)


def content_id(digest: str | None, slot: int) -> int:
    """A batch's ``content`` value: 60 bits of a content hash (equal for the same input: the same picture
    under two captions), or for a sample without one a negative number of its own (``slot``), equal to none.
    A hash that is not hex (a doc written by other tools) gives 56 bits of a digest of its text."""
    if not digest:
        return -1 - slot
    try:
        return int(digest[:15], 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(digest.encode("utf-8", "surrogatepass"), digest_size=7).digest(), "big")


def collate(samples: list[Sample], cfg: CollateConfig) -> dict[str, Any]:
    """A batch dict: ids, texts, features/masks per modality, present (B, M), labels (B,), targets for generate
    (see ``pack_collate``); its tensors share one buffer."""
    return pack_collate(samples, cfg).unpack()


def map_tensors(batch: dict[str, Any], fn: Callable[[torch.Tensor], Any]) -> dict[str, Any]:
    """The batch with ``fn`` applied to every tensor (also inside dicts); other values as they are."""
    def apply(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, dict):
            return {k: apply(x) for k, x in v.items()}
        return v
    return {k: apply(v) for k, v in batch.items()}


def batch_to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with every tensor (also inside dicts) on ``device``."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))
