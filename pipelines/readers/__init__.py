"""Input readers: manifest (JSONL/JSON/CSV/TSV/Parquet), HF imagefolder/audiofolder, WebDataset tars.

The ``iter_*`` functions are plain generators of ``RawSample`` / ``Reject`` in source order; ``ReadSource``
runs them in Beam, one input file per element, and keeps the first sample of each id across all inputs.
"""

from pipelines.readers.folder import iter_folder
from pipelines.readers.manifest import iter_manifest
from pipelines.readers.source import ReadSource, SourceConfig, list_inputs
from pipelines.readers.wds import iter_tar

__all__ = ["ReadSource", "SourceConfig", "iter_folder", "iter_manifest", "iter_tar", "list_inputs"]
