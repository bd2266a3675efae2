"""The cleaning stage: one RawSample in, a CleanSample or a Reject out.

Each present modality goes through its cleaner; a modality that fails is dropped with its reason,
and a sample that keeps none is rejected. Content hashes are taken here, from the raw bytes and the
cleaning settings, so the incremental planner can tell what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.errors import CleanError
from pipelines.media import read_media
from schemas import CleanSample, RawSample, Reject, sample_key

log = logging.getLogger(__name__)

REJECTS = "rejects"


@dataclass(frozen=True, kw_only=True)
class CleanConfig:
    """The three cleaners' settings, as one picklable value."""

    text: Any  # pipelines.clean.text.TextCleanConfig
    image: Any  # pipelines.clean.image.ImageCleanConfig
    audio: Any  # pipelines.clean.audio.AudioCleanConfig

    def for_modality(self, modality: str) -> Any:
        return getattr(self, modality)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _config_bytes(cfg: Any) -> bytes:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()


def _text_bytes(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (e.g. JSON "\ud83d")
        return text.encode("utf-8", "surrogatepass")


def clean_modality(raw: RawSample, modality: str, cfg: CleanConfig) -> tuple[Any, str]:
    """Clean one modality of ``raw``: (cleaned value, content hash). Raises CleanError on bad data."""
    from pipelines.clean.audio import clean_audio
    from pipelines.clean.image import clean_image
    from pipelines.clean.text import clean_text

    mcfg = cfg.for_modality(modality)
    if modality == "text":
        data = _text_bytes(raw.text)
        return clean_text(raw.text, mcfg), _digest(b"text", data, _config_bytes(mcfg))
    media = getattr(raw, modality)
    data = read_media(media, mcfg.max_bytes)
    cleaner = clean_image if modality == "image" else clean_audio
    return cleaner(data, mcfg), _digest(modality.encode(), data, _config_bytes(mcfg))


def clean_sample(raw: RawSample, cfg: CleanConfig) -> CleanSample | Reject:
    """Clean every present modality of ``raw``; reject it when none survives."""
    values: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    dropped: dict[str, str] = {}
    failures: list[tuple[str, CleanError]] = []
    for modality in raw.present():
        try:
            values[modality], hashes[modality] = clean_modality(raw, modality, cfg)
        except CleanError as e:
            failures.append((modality, e))
        except Exception as e:  # a cleaner bug or an exotic decoder failure must not kill the job
            log.debug("unexpected error cleaning %s of %s", modality, raw.id, exc_info=True)
            failures.append((modality, CleanError(f"{modality}.error", f"{type(e).__name__}: {e}")))
    for modality, e in failures:
        dropped[modality] = f"clean.{modality}: {e.reason}: {e.detail}"
    if not values:
        if not failures:
            return Reject(id=raw.id, stage="read", reason="read.no_modality", detail="no text, image or audio",
                          source=raw.source)
        stage = f"clean.{failures[0][0]}" if len(failures) == 1 else "clean"
        return Reject(
            id=raw.id,
            stage=stage,
            reason="; ".join(e.reason for _, e in failures),
            detail="; ".join(f"{m}: {e.detail}" for m, e in failures),
            source=raw.source,
        )
    label_bytes = json.dumps(raw.label, sort_keys=True, default=str).encode()
    meta_bytes = json.dumps(raw.meta, sort_keys=True, default=str).encode()
    content = _digest(*(f"{m}={hashes[m]}".encode() for m in sorted(hashes)), label_bytes, meta_bytes)
    return CleanSample(
        id=raw.id,
        key=sample_key(raw.id),
        label=raw.label,
        meta=raw.meta,
        text=values.get("text"),
        image=values.get("image"),
        audio=values.get("audio"),
        sample_rate=cfg.audio.sample_rate if "audio" in values else None,
        dropped=dropped,
        content_hash=content,
        modality_hashes=hashes,
        source=raw.source,
    )


class CleanSampleFn(beam.DoFn):
    """Beam stage around ``clean_sample``: main output CleanSample, tagged output ``rejects``."""

    def __init__(self, cfg: CleanConfig) -> None:
        self._cfg = cfg
        self._ok = Metrics.counter("mbm", "cleaned")
        self._rejected = Metrics.counter("mbm", "rejected_clean")
        self._dropped = Metrics.counter("mbm", "modalities_dropped")

    def process(self, raw: RawSample):
        out = clean_sample(raw, self._cfg)
        if isinstance(out, Reject):
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(REJECTS, out)
            return
        self._ok.inc()
        if out.dropped:
            self._dropped.inc(len(out.dropped))
        yield out
