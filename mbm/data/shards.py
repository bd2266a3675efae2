"""Reading WebDataset shards as raw samples ({"__key__", "json": bytes, "text.npy": bytes, ...})."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from webdataset.tariterators import base_plus_ext

from mbm.data.errors import SkipLog


def iter_tar(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar in file order; raises on a corrupt or truncated tar (the partial sample is lost)."""
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current: dict[str, Any] | None = None
        for info in tar:
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None or ext is None or info.name.startswith("__"):
                continue
            data = tar.extractfile(info).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": path}
            current[ext.lower()] = data
        _check_end(f, tar)
        if current is not None:
            yield current


def _check_end(f, tar: tarfile.TarFile) -> None:
    """Refuse a tar cut at a member boundary: tarfile reads it as complete, but the end-of-archive blocks are gone."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return  # compressed: offsets are not file positions, and gzip/bz2 detect truncation themselves
    f.seek(tar.offset)
    tail = f.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise tarfile.ReadError(f"no end-of-archive marker after offset {tar.offset}: truncated")


def read_shards(paths: Iterable[str], skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Raw samples of the given shards in order; a corrupt shard yields what precedes the damage, then is skipped."""
    for path in paths:
        try:
            yield from iter_tar(path)
        except Exception as exn:  # noqa: BLE001 - any failure to read a shard is a data error, not ours
            skips.skip("shard.corrupt", f"{path}: {type(exn).__name__}: {exn}")
