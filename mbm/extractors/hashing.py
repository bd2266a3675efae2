"""Content hash of weight files and folders, cached in-process by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_CHUNK = 1 << 20
_lock = threading.Lock()
_cache: dict[tuple, str] = {}


def _skipped(rel: Path) -> bool:
    """Metadata that does not change what the weights compute (READMEs, dotfiles, bytecode)."""
    return any(
        part.startswith(".") or part == "__pycache__" for part in rel.parts
    ) or rel.name.upper().startswith("README")


def _listing(root: Path) -> list[tuple[str, Path]]:
    if root.is_file():
        return [("", root)]
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    return sorted((rel, p) for rel, p in files if not _skipped(Path(rel)))


def weights_sha256(path: str | Path) -> str:
    """sha256 hex of a weight file's bytes, or of a folder's files (sorted by relative name, names included)."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"weights path does not exist: {root}")
    listing = _listing(root)
    if not listing:
        raise ValueError(f"weights folder holds no files: {root}")
    key = (str(root.resolve()), tuple((rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in listing))
    with _lock:
        if key in _cache:
            return _cache[key]
    digest = hashlib.sha256()
    for rel, file in listing:
        if rel:  # a single file hashes to exactly its bytes (same as `sha256sum`)
            digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")  # names that are not UTF-8 too
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        _cache[key] = value
    return value
