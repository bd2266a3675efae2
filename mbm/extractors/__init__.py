"""Feature extractors: frozen encoders, registered by name, run by the pipeline through a Beam ModelHandler.

Importing this package is cheap: torch, transformers and Beam load only when a model is used.
"""

from typing import Any

from mbm.extractors import (  # noqa: F401  (importing registers the built-ins)
    audio,
    hf_audio,
    hf_image,
    image,
    text,
    torchvision_image,
)
from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.registry import (
    DEFAULTS,
    available,
    create_extractor,
    get_extractor_class,
    register_extractor,
)

__all__ = [
    "DEFAULTS",
    "Extractor",
    "ExtractorConfig",
    "ExtractorHandler",
    "available",
    "create_extractor",
    "get_extractor_class",
    "register_extractor",
]


def __getattr__(name: str) -> Any:
    if name == "ExtractorHandler":  # Beam is heavy; import it only for whoever runs a pipeline
        from mbm.extractors.handler import ExtractorHandler

        return ExtractorHandler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
