"""Named extractors: `@register_extractor` adds a class, `create_extractor` builds one from options."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from mbm.extractors.base import MODALITIES, Extractor, ExtractorConfig

DEFAULTS: dict[str, str] = {"text": "minilm", "image": "efficientnet-lite0", "audio": "logmel"}

_REGISTRY: dict[str, type[Extractor]] = {}

E = TypeVar("E", bound=type[Extractor])


def register_extractor(cls: E) -> E:
    """Class decorator: make an Extractor subclass available under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if getattr(cls, "modality", None) not in MODALITIES:
        raise ValueError(
            f"{cls.__name__}.modality must be one of {MODALITIES}, got {getattr(cls, 'modality', None)!r}"
        )
    config_type = getattr(cls, "config_type", None)
    if not (isinstance(config_type, type) and issubclass(config_type, ExtractorConfig)):
        raise ValueError(f"{cls.__name__}.config_type must be an ExtractorConfig dataclass")
    previous = _REGISTRY.get(name)
    # The same class re-registered (a module imported twice) replaces itself; a different one is a clash.
    if previous is not None and (previous.__module__, previous.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(
            f"extractor name {name!r} is already registered by {previous.__module__}.{previous.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Registered extractor names, sorted."""
    return sorted(_REGISTRY)


def get_extractor_class(name: str) -> type[Extractor]:
    """The class registered under `name`; ValueError listing the names when unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown extractor {name!r}; available: {', '.join(available())}") from None


def create_extractor(name: str, options: dict[str, Any] | None = None) -> Extractor:
    """Build the extractor `name` with its config built from `options` (validated)."""
    cls = get_extractor_class(name)
    options = dict(options or {})
    valid = [f.name for f in dataclasses.fields(cls.config_type) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for extractor {name!r}; valid options: {', '.join(valid)}"
        )
    return cls(cls.config_type(**options))
