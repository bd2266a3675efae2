"""Streaming data: dataset versions and shard patterns → deterministic, resumable, rank-split batches."""

from mbm.data.collate import IGNORE, TASKS, CollateConfig, batch_to, collate
from mbm.data.decode import Sample, decode_sample
from mbm.data.errors import CorruptSample, SkipLog
from mbm.data.loader import StreamLoader
from mbm.data.source import DataSource, label_key, resolve_data
from mbm.data.split import split_of
from mbm.data.stream import ShardStream, StreamConfig

__all__ = [
    "IGNORE",
    "TASKS",
    "CollateConfig",
    "CorruptSample",
    "DataSource",
    "Sample",
    "ShardStream",
    "SkipLog",
    "StreamConfig",
    "StreamLoader",
    "batch_to",
    "collate",
    "decode_sample",
    "label_key",
    "resolve_data",
    "split_of",
]
