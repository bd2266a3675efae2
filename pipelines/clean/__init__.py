"""Per-modality cleaners: pure functions from raw bytes/str to clean arrays, raising ``CleanError``.

Names are re-exported lazily so that importing the package does not pull in Pillow, soundfile or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextCleanConfig": "text",
    "clean_text": "text",
    "ImageCleanConfig": "image",
    "clean_image": "image",
    "AudioCleanConfig": "audio",
    "clean_audio": "audio",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
