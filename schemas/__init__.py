"""The contract between mbm's producer (pipelines) and its consumers (trainer, plain webdataset readers).

Nothing here imports torch or Beam; numpy and pyarrow only where a schema needs them.
"""

from schemas.manifest import DatasetManifest
from schemas.records import (
    MODALITIES,
    CleanSample,
    IndexRow,
    Media,
    RawSample,
    Reject,
    sample_key,
)
from schemas.version import SCHEMA_VERSION

__all__ = [
    "MODALITIES",
    "SCHEMA_VERSION",
    "CleanSample",
    "DatasetManifest",
    "IndexRow",
    "Media",
    "RawSample",
    "Reject",
    "sample_key",
]
