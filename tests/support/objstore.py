"""An object store in memory for Beam's FileSystems (scheme ``mbmstore://``), with the semantics of GCS, S3
and Azure Blob Storage that local folders do not have:

- keys are exact strings (``a//b`` is not ``a/b``) and there are no folders: ``exists`` is true for objects
  only, never for a prefix;
- an object written through ``create`` appears whole when its writer closes;
- ``delete`` of a path ending in ``/`` deletes everything under that prefix, of any other path that one
  object; a missing object is no error, except with ``MODE = "azure"`` (Azure's 404 comes back);
- ``rename`` is a copy and a delete, and overwrites its destination; ``mkdirs`` does nothing.

Importing the module registers the scheme; ``clear()`` empties the store.
"""

from __future__ import annotations

import io
import time

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata, FileSystem

PREFIX = "mbmstore://"
OBJECTS: dict[str, tuple[bytes, float]] = {}  # key -> (bytes, update time)
MODE = "gcs"


def clear() -> None:
    global MODE
    OBJECTS.clear()
    MODE = "gcs"


def put(path: str, data: bytes, age: float = 3600.0) -> None:
    """An object updated ``age`` seconds ago."""
    OBJECTS[path] = (data, time.time() - age)


def keys(prefix: str = PREFIX) -> list[str]:
    return sorted(k for k in OBJECTS if k.startswith(prefix))


class _Upload(io.BytesIO):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def close(self) -> None:
        if not self.closed:
            OBJECTS[self._path] = (self.getvalue(), time.time())
        super().close()


class MemoryStore(FileSystem):
    @classmethod
    def scheme(cls) -> str:
        return "mbmstore"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path[len(PREFIX):].rpartition("/")
        return PREFIX + head, tail

    def mkdirs(self, path):
        """Nothing to make: an object store has no folders (GCS's and S3's mkdirs do nothing either)."""

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for k, (data, t) in sorted(OBJECTS.items()):
            if k.startswith(dir_or_prefix):
                yield FileMetadata(k, len(data), t)

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return _Upload(path)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        if path not in OBJECTS:
            raise BeamIOError("Open failed", {path: FileNotFoundError(f"No such object: {path}")})
        return io.BytesIO(OBJECTS[path][0])

    def copy(self, source_file_names, destination_file_names):
        for s, d in zip(source_file_names, destination_file_names, strict=True):
            OBJECTS[d] = (OBJECTS[s][0], time.time())

    def rename(self, source_file_names, destination_file_names):
        missing = {(s, d): FileNotFoundError(s) for s, d in zip(source_file_names, destination_file_names,
                                                                 strict=True) if s not in OBJECTS}
        if missing:
            raise BeamIOError("Rename operation failed", missing)
        for s, d in zip(source_file_names, destination_file_names, strict=True):
            OBJECTS[d] = (OBJECTS.pop(s)[0], time.time())

    def exists(self, path):
        return path in OBJECTS

    def size(self, path):
        return len(OBJECTS[path][0])

    def last_updated(self, path):
        return OBJECTS[path][1]

    def checksum(self, path):
        return str(hash(OBJECTS[path][0]))

    def metadata(self, path):
        data, t = OBJECTS[path]
        return FileMetadata(path, len(data), t)

    def delete(self, paths):
        errors = {}
        for p in paths:
            if p.endswith("/"):
                for k in [k for k in OBJECTS if k.startswith(p)]:
                    del OBJECTS[k]
            elif p in OBJECTS:
                del OBJECTS[p]
            elif MODE == "azure":
                errors[p] = BeamIOError(f"404 {p}")
        if errors:
            raise BeamIOError("Delete operation failed", errors)

    def report_lineage(self, path, lineage):
        """No lineage to report for a store in memory."""
