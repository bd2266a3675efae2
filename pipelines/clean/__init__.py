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

#: A cleaner's revision goes up when its output changes for some input, so that an incremental run
#: cleans and extracts again what an earlier version cleaned differently (it is part of each
#: modality's content hash; at 1, the default, the hash is what it was before revisions existed).
#: text 2: vertical tab, form feed and the U+001C..1F separators are breaks or spaces, no longer deleted.
#: image 2: a crop resamples only the region it keeps (the same pixels up to rounding).
#: text 3: bytes that start with a UTF-16 or UTF-32 byte order mark are read in that encoding (they
#: were invalid UTF-8: rejected, or repaired as cp1252 into mojibake).
#: audio 2: resampling convolves 2-second pieces (``clean.audio._polyphase``): the same sums, for some
#: clips added in another order (a float32 rounding step apart).
REVISIONS = {"text": 3, "image": 2, "audio": 2}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
