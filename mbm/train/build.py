"""From settings and a dataset to the pieces of a run: model config, collate and stream configs."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from mbm.data.collate import CollateConfig
from mbm.data.decode import decode_sample
from mbm.data.errors import CorruptSample, SkipLog
from mbm.data.shards import iter_tar
from mbm.data.source import DataSource, label_key
from mbm.data.split import holds_test_apart
from mbm.data.stream import ShardStream, StreamConfig
from mbm.data.tokenizer import load_tokenizer, special_tokens, vocab_digest
from mbm.model.decoder import DecoderConfig
from mbm.model.model import ModelConfig
from mbm.model.transformer import TransformerConfig
from mbm.train.config import TrainConfig


def common_pair(source: DataSource, limit: int = 1000) -> list[str]:
    """The two modalities present together most often among the first ``limit`` samples."""
    counts: Counter[tuple[str, str]] = Counter()
    seen = 0
    for path in source.shards:
        try:
            for raw in iter_tar(path):
                try:
                    mods = [m for m in decode_sample(raw).features if m in source.feature_dims]
                except CorruptSample:
                    continue
                counts.update((a, b) for i, a in enumerate(mods) for b in mods[i + 1:])
                seen += 1
                if seen >= limit:
                    break
        except Exception:  # noqa: BLE001 - a corrupt shard is reported when training reads it
            continue
        if seen >= limit:
            break
    if not counts:
        raise ValueError(f"--pair: no sample of {source.spec} has two modalities; retrieve needs pairs")
    return list(counts.most_common(1)[0][0])


def resolved_split_by(cfg: TrainConfig) -> str:
    """``--split-by``, with ``auto`` as what it stands for: for retrieve, the pair's modality that is not text
    (the first of a pair without text), so that one image's or clip's captions never fall on both sides of
    the held-out split; else id."""
    if cfg.split_by != "auto":
        return cfg.split_by
    if cfg.task != "retrieve" or not cfg.pair:
        return "id"
    return next((m for m in cfg.pair if m != "text"), cfg.pair[0])


def label_counts(cfg: TrainConfig, source: DataSource, labels: list[Any]) -> list[int]:
    """Samples per label (in ``labels`` order) of the training split, as training selects them, from the
    shards' json (no array is decoded)."""
    stream = stream_config(cfg, source, labels, dict(source.feature_dims), "train", train=False)
    stream = replace(stream, batch_size=1024, max_samples=None)
    index = {label_key(v): i for i, v in enumerate(labels)}
    counts = [0] * len(labels)
    for batch in ShardStream(stream).raw_batches(SkipLog(quiet=True)):
        for s in batch:
            counts[index[label_key(s.label)]] += 1
    return counts


def balanced_weights(counts: list[int]) -> tuple[float, ...]:
    """``n / (k * n_label)`` for each label of the ``k`` the training split holds (scikit-learn's
    "balanced"), 1 for a label it lacks (its loss never counts in training)."""
    present = [n for n in counts if n]
    total, k = sum(present), len(present)
    return tuple(round(total / (k * n), 6) if n else 1.0 for n in counts)


def model_config(cfg: TrainConfig, source: DataSource, labels: list[Any],
                 class_weights: tuple[float, ...] | None = None) -> ModelConfig:
    """The model a run with these settings trains on this dataset."""
    decoder = None
    if cfg.task == "generate":
        tokenizer = load_tokenizer(cfg.tokenizer)
        sp = special_tokens(tokenizer)
        decoder = DecoderConfig(vocab_size=sp.vocab_size, bos=sp.bos, eos=sp.eos, pad=sp.pad,
                                max_len=cfg.max_target_len, n_layers=cfg.decoder_layers,
                                vocab_digest=vocab_digest(tokenizer))
    return ModelConfig(
        task=cfg.task, feature_dims=dict(source.feature_dims), fusion=cfg.fusion,
        transformer=TransformerConfig(d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                                      mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout),
        positional=cfg.positional, max_len=max(cfg.max_tokens.values()) + 1, num_labels=len(labels),
        class_weights=class_weights,
        pair=tuple(cfg.pair) if cfg.pair else None, embed_dim=cfg.embed_dim, decoder=decoder)


def stream_config(cfg: TrainConfig, source: DataSource, labels: list[Any], dims: dict[str, int],
                  split: str, *, train: bool) -> StreamConfig:
    """A split's stream: shuffled full batches for training; every sample in order for evaluation. With
    ``--split-by split`` on a dataset naming both a validation and a test split, the test split is kept apart:
    neither trained on nor evaluated while training, read only as ``split="test"``."""
    collate = CollateConfig(feature_dims=dims, max_tokens=dict(cfg.max_tokens), labels=tuple(labels),
                            tokenizer=cfg.tokenizer, max_target_len=cfg.max_target_len,
                            with_targets=cfg.task == "generate")
    split_by = resolved_split_by(cfg)
    return StreamConfig(shards=tuple(source.shards), collate=collate, task=cfg.task, split=split,
                        val_fraction=cfg.val_fraction, pair=tuple(cfg.pair) if cfg.pair else None,
                        split_by=split_by, test_apart=split_by == "split" and holds_test_apart(source.splits),
                        batch_size=cfg.batch_size, shuffle=train, shuffle_buffer=cfg.shuffle_buffer,
                        drop_last=train, seed=cfg.seed, max_samples=None if train else cfg.eval_samples)
