"""Record types that flow through a preprocessing job.

raw source ─► RawSample ─► CleanSample (+ features) ─► shard sample / IndexRow
                  └──────────────► Reject (sample id, stage, reason) ─► IndexRow(status="rejected")
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MODALITIES: tuple[str, ...] = ("text", "image", "audio")

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


# Between a shard and the key of the sample whose features a ``CleanSample.reused`` entry copies, when it is
# not the sample's own. Shards are mbm's own names and keys tar- and dot-safe: neither holds a newline.
OTHER_KEY = "\n"


def sample_key(sample_id: str) -> str:
    """WebDataset ``__key__`` for a sample id: the id itself when it is tar- and dot-safe, else a hash.

    WebDataset splits a member name at its first dot and treats ``/`` as a folder, so ids such as
    ``img/001.jpg`` cannot be keys. Hashed keys start with ``h-`` and plain ids never do, so the two
    spaces cannot collide.
    """
    if _SAFE_KEY.match(sample_id) and not sample_id.startswith("h-"):
        return sample_id
    return "h-" + hashlib.sha1(sample_id.encode("utf-8", "surrogatepass")).hexdigest()


def escape_undecodable(value: str) -> str:
    """``value`` with what UTF-8 cannot hold written as escapes: a byte that was not valid UTF-8 (which
    readers keep as a ``surrogateescape`` surrogate) as ``\\xNN``, any other lone surrogate as ``\\uNNNN``.

    Ids, labels, metadata and messages go into JSON, Parquet and tar names, which refuse lone
    surrogates; escaped, a Latin-1 file name or label stays readable, and distinct from other such
    names, instead of failing the job (it can meet an id that spells the escape out literally, which
    then counts as a repeated id). Text cells are not passed through here: the text cleaner rejects or
    repairs them.
    """
    if value.isascii() or _encodable(value):
        return value
    out = []
    for ch in value:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_nested(value: Any) -> Any:
    """``escape_undecodable`` applied to every string (dict keys included) inside lists and dicts."""
    if isinstance(value, str):
        return escape_undecodable(value)
    if isinstance(value, dict):
        return {escape_nested(k): escape_nested(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_nested(v) for v in value]
    return value


@dataclass(frozen=True)
class Media:
    """Raw media: a path or URI that Beam's FileSystems can open, the ``size`` bytes at ``offset`` of
    one (a member of an uncompressed tar, read when the sample is cleaned, so that no media bytes go
    through the job's shuffles), or bytes already in hand."""

    uri: str | None = None
    data: bytes | None = None
    name: str = ""  # file name as the source gave it, for messages and format hints only
    offset: int | None = None  # with ``uri`` and ``size``: where in that file the media's bytes start
    size: int | None = None
    # a remote object's size and update time as its folder's listing gave them (``pipelines.media.remote_stamp``)
    stamp: str | None = None

    def __post_init__(self) -> None:
        if self.uri is None and self.data is None:
            raise ValueError("Media needs a uri or data")
        if (self.offset is None) != (self.size is None) or (self.offset is not None and self.uri is None):
            raise ValueError("Media: offset and size go together, with a uri")
        if self.offset is not None and (self.offset < 0 or self.size < 0):
            raise ValueError(f"Media: offset and size must be >= 0, got {self.offset} and {self.size}")

    def describe(self) -> str:
        if self.offset is not None:
            return self.name or f"<{self.size} bytes>"
        return self.uri or self.name or f"<{len(self.data or b'')} bytes>"


@dataclass
class RawSample:
    """One input sample as a reader found it; nothing decoded or checked yet.

    ``text`` is ``bytes`` when it came from a file (decoded strictly by the text cleaner) and ``str``
    when it came from a JSON/CSV/Parquet cell; readers decode manifest lines with ``surrogateescape``
    so invalid UTF-8 survives as lone surrogates for the text cleaner to reject or repair.
    """

    id: str
    text: str | bytes | None = None
    image: Media | None = None
    audio: Media | None = None
    label: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "manifest.jsonl:12", "shard-0001.tar:000123", ...

    def __post_init__(self) -> None:
        self.id = escape_undecodable(self.id) if isinstance(self.id, str) else self.id
        self.label = escape_nested(self.label)
        self.meta = escape_nested(self.meta)
        self.source = escape_undecodable(self.source)

    def present(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]


@dataclass
class CleanSample:
    """A sample after cleaning (and, once extracted, with features). Arrays are numpy.

    image: uint8 (H, W, 3) RGB sized for the image extractor; audio: float32 (n,) mono at
    ``sample_rate``; features[modality]: float16 (n, dim). ``dropped`` maps a modality that was
    present in the input but rejected to ``"stage: reason"``.
    """

    id: str
    key: str
    label: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    image: Any = None
    audio: Any = None
    sample_rate: int | None = None
    features: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    content_hash: str = ""
    modality_hashes: dict[str, str] = field(default_factory=dict)
    # modality -> what identified its media file on disk as read (path, size, times, inode) with its cleaning
    # settings, hashed: a re-run that finds the same key takes the modality's hash without reading the file
    media_keys: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    source: str = ""
    # Incremental runs: modality -> shard (relative path) of the previous version holding features that
    # are still valid (same content hash and extractor fingerprint); the sink copies them byte for byte.
    # Another sample's features (the same picture under a new caption): the shard, OTHER_KEY, that sample's key.
    reused: dict[str, str] = field(default_factory=dict)
    plan: str = "new"  # new | changed (relative to the previous version)

    def present(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self, m) is not None]

    def computed(self) -> list[str]:
        """Modalities whose features were extracted in this run (not reused)."""
        return [m for m in MODALITIES if m in self.features and m not in self.reused]

    def with_(self, **changes: Any) -> CleanSample:
        return replace(self, **changes)

    def shard_json(self, schema_version: int) -> dict[str, Any]:
        """The ``json`` member of the shard sample."""
        return {
            "id": self.id,
            "label": self.label,
            "text": self.text,
            "modalities": [m for m in MODALITIES if m in self.features],
            "content_hash": self.content_hash,
            "modality_hashes": self.modality_hashes,
            "fingerprint": self.fingerprints,
            "dropped": self.dropped,
            "meta": self.meta,
            "schema_version": schema_version,
        }


@dataclass(frozen=True)
class Reject:
    """A sample (or a part of the input that could not become one) that did not land, and why.

    ``stage`` is where it failed (``read``, ``clean.text``, ``clean.image``, ``clean.audio``,
    ``extract.<modality>``, ``clean``); ``reason`` a stable code (``image.truncated``) that reports
    group by; ``detail`` the human message. Lines too broken to carry an id use their ``source``.
    """

    id: str
    stage: str
    reason: str
    detail: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("id", "detail", "source"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, escape_undecodable(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reject:
        return cls(**d)


@dataclass(frozen=True)
class IndexRow:
    """One row of ``index/*.parquet``: every input sample has one, landed or not."""

    id: str
    key: str
    shard: str | None  # path relative to the dataset folder; None when rejected
    content_hash: str
    fingerprint: str  # JSON of {modality: extractor fingerprint}
    status: str  # "ok" | "rejected"
    stage: str  # where it was rejected, or where a modality was dropped ("" when clean)
    reason: str  # reason code(s), "; "-joined when several modalities were dropped
    detail: str
    modalities: str  # comma-joined modalities with features
    label: str | None
    source: str
    version: int  # the dataset version that last wrote this sample's features (or rejected it)
    modality_hashes: str = "{}"  # JSON {modality: content hash of raw bytes + cleaning settings}
    media_stats: str | None = None  # JSON {modality: media key} of the local media files read (CleanSample.media_keys)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
