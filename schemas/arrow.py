"""Arrow schemas of the Parquet files mbm writes."""

from __future__ import annotations

import pyarrow as pa

INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("modalities", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("modality_hashes", pa.string(), nullable=False),
        pa.field("media_stats", pa.string()),  # null in rows without local media files, and in older indexes
    ],
    metadata={"mbm.table": "index"},
)


def index_table(rows: list[dict]) -> pa.Table:
    """Rows (``IndexRow.to_dict()``) as a table with ``INDEX_SCHEMA``."""
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
