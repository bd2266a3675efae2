"""Text cleaner: strict decoding, Unicode normalization, control-character removal, length limits.

Steps, in order (each documented where a choice was made):

1. ``bytes`` are decoded as strict UTF-8. A ``str`` may carry lone surrogates U+DC80..U+DCFF (readers
   decode with ``surrogateescape``); it is re-encoded with ``surrogateescape`` and goes through the same
   rule, so an invalid byte is rejected (``text.invalid_utf8``, with its byte offset) or, with
   ``on_invalid_utf8="repair"``, re-read as cp1252 (latin-1 for the five bytes cp1252 leaves undefined).
   Any other lone surrogate (U+D800..U+DC7F, U+DD00..U+DFFF, e.g. from a JSON ``\\ud83d`` escape) cannot be
   a byte: it is rejected as ``text.invalid_unicode``, or replaced by U+FFFD when repairing.
   ``bytes`` that start with a UTF-16 or UTF-32 byte order mark (a caption file saved as "Unicode" on
   Windows) are decoded as that encoding instead; where they are not valid in it the text is rejected
   (``text.invalid_utf16`` / ``text.invalid_utf32``, with the byte offset), or the bad units become
   U+FFFD when repairing. Without a mark, UTF-16 cannot be told from other bytes and stays UTF-8's case.
2. A leading BOM is dropped; CRLF, CR, NEL (U+0085), U+2028 and U+2029 become ``\\n``, and so do the
   controls that mean a break: vertical tab (an in-cell line break from FileMaker and old Excel), form
   feed (a page break in text taken from PDFs) and the file, group and record separators (U+001C..1E).
   The unit separator (U+001F) is whitespace, like a tab.
3. Other control characters (category Cc except ``\\n`` and ``\\t``) are removed, and so are the invisible
   characters in ``INVISIBLE`` (zero-width space, word joiner, soft hyphen, BOM inside the text, ...).
   Other format characters are kept on purpose: ZWJ/ZWNJ shape Indic and Persian text and build emoji
   sequences, bidi marks order Arabic and Hebrew text, tag characters make subdivision flags.
4. Unicode normalization (``cfg.normalization``), then ``lowercase`` when asked.
5. Whitespace: single newlines are kept (line structure survives); any run of whitespace that holds a
   newline becomes one ``\\n``, any other run one space; both ends are stripped.
6. Length in code points: empty, or nothing but marks, format and private-use characters (a lone
   ZWJ, bidi marks, combining accents: the tokenizer would see no token) -> ``text.empty``, under ``min_chars`` -> ``text.too_short``, over
   ``max_chars`` -> truncated (never inside a base + combining-mark cluster or after a dangling ZWJ) or
   ``text.too_long``.
"""

from __future__ import annotations

import codecs
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass

from pipelines.errors import CleanError

log = logging.getLogger(__name__)

NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")
ON_INVALID_UTF8 = ("reject", "repair")
ON_TOO_LONG = ("truncate", "reject")

#: Invisible characters removed besides Cc: soft hyphen, Mongolian vowel separator, zero-width space,
#: word joiner, zero-width no-break space (BOM). They carry no meaning for a text encoder.
INVISIBLE = "\u00ad\u180e\u200b\u2060\ufeff"

_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x1c-\x1e\u0085\u2028\u2029]")
_DROP = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x9f" + INVISIBLE + "]")  # U+001F is left to the whitespace step
_WS_WITH_NEWLINE = re.compile(r"[^\S\n]*\n\s*")
_WS = re.compile(r"[^\S\n]+")
_ESCAPED = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ZWJ = "\u200d"


@dataclass(kw_only=True)
class TextCleanConfig:
    """How text is decoded, normalized and length-limited."""

    normalization: str = "NFKC"  # NFC | NFKC | NFD | NFKD | none
    on_invalid_utf8: str = "reject"  # reject | repair
    min_chars: int = 1  # after cleaning; shorter -> text.empty / text.too_short
    max_chars: int = 20000
    on_too_long: str = "truncate"  # truncate | reject
    lowercase: bool = False

    def __post_init__(self) -> None:
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("on_invalid_utf8", self.on_invalid_utf8, ON_INVALID_UTF8)
        _check_choice("on_too_long", self.on_too_long, ON_TOO_LONG)
        for name in ("min_chars", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TextCleanConfig.{name} must be an integer >= 0, got {value!r}")
        if self.max_chars < max(self.min_chars, 1):
            raise ValueError(
                f"TextCleanConfig.max_chars must be >= 1 and >= min_chars ({self.min_chars}), got {self.max_chars}"
            )
        if not isinstance(self.lowercase, bool):
            raise ValueError(f"TextCleanConfig.lowercase must be true or false, got {self.lowercase!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"TextCleanConfig.{name} must be one of {', '.join(allowed)}; got {value!r}")


def _cp1252_fallback(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler: re-read undecodable UTF-8 bytes one by one as cp1252 (else latin-1)."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    bad = err.object[err.start : err.end]
    return "".join(_byte_as_cp1252(b) for b in bad), err.end


def _byte_as_cp1252(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81 0x8d 0x8f 0x90 0x9d: latin-1 C1 control, dropped later
        return chr(b)


codecs.register_error("mbm.cp1252", _cp1252_fallback)


def clean_text(raw: str | bytes, cfg: TextCleanConfig) -> str:
    """Decode, normalize and length-check one text; bad input raises ``CleanError`` (``text.*``)."""
    text = _decode(raw, cfg.on_invalid_utf8 == "repair")
    text = text.removeprefix("\ufeff")
    text = _LINE_BREAKS.sub("\n", text)
    text = _DROP.sub("", text)
    text = _normalize(text, cfg.normalization)
    if cfg.lowercase:
        text = _normalize(text.lower(), cfg.normalization)
    text = _WS.sub(" ", _WS_WITH_NEWLINE.sub("\n", text)).strip()
    return _limit_length(text, cfg)


def _decode(raw: str | bytes, repair: bool) -> str:
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if isinstance(raw, str):
        if not _SURROGATE.search(raw):
            return raw
        if _SURROGATE.search(_ESCAPED.sub("", raw)):
            return _reject_or_replace_surrogates(raw, repair)
        raw = raw.encode("utf-8", "surrogateescape")
    elif not isinstance(raw, bytes):
        raise TypeError(f"clean_text takes str or bytes, got {type(raw).__name__}")
    else:
        encoding = wide_encoding(raw)
        if encoding is not None:
            return _decode_wide(raw, encoding, repair)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if repair:
            log.debug("repairing invalid UTF-8 at byte %d as cp1252", e.start)
            return raw.decode("utf-8", "mbm.cp1252")
        raise CleanError(
            "text.invalid_utf8",
            f"invalid UTF-8 at byte offset {e.start}: {raw[e.start : e.start + 4]!r} ({e.reason})",
        ) from None


# Byte order marks of the wide Unicode encodings, UTF-32's first (its little-endian mark starts with UTF-16's)
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
              (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def wide_encoding(head: bytes) -> str | None:
    """``"utf-16"`` or ``"utf-32"`` when ``head`` starts with that encoding's byte order mark, else None."""
    return next((encoding for bom, encoding in _WIDE_BOMS if head.startswith(bom)), None)


def _decode_wide(raw: bytes, encoding: str, repair: bool) -> str:
    """``raw`` in the UTF-16 or UTF-32 its byte order mark names (Python's codecs read the mark and drop it)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        if repair:
            log.debug("repairing invalid %s at byte %d", encoding, e.start)
            return raw.decode(encoding, "replace")
        raise CleanError(
            f"text.invalid_{encoding.replace('-', '')}",
            f"invalid {encoding.upper()} (byte order mark at its start) at byte offset {e.start}: "
            f"{raw[e.start : e.start + 4]!r} ({e.reason})",
        ) from None


def _reject_or_replace_surrogates(text: str, repair: bool) -> str:
    """Surrogates that are not escaped bytes: from a JSON ``\\udXXX`` escape, never valid text."""
    if not repair:
        m = next(m for m in _SURROGATE.finditer(text) if not _ESCAPED.fullmatch(m.group()))
        raise CleanError(
            "text.invalid_unicode", f"lone surrogate U+{ord(m.group()):04X} at character {m.start()}"
        )
    raw = _SURROGATE.sub(lambda m: m.group() if _ESCAPED.fullmatch(m.group()) else "\ufffd", text)
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "mbm.cp1252")


def _normalize(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


# Letters and symbols that show nothing: Hangul fillers, the Braille blank, and U+FFFD (what a repair
# leaves of bytes that were not text). A text of only these has no token worth a feature.
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800\ufffd")


def _limit_length(text: str, cfg: TextCleanConfig) -> str:
    n = len(text)
    if n == 0 and cfg.min_chars > 0:
        raise CleanError("text.empty", "no text left after cleaning")
    if cfg.min_chars > 0 and not any(unicodedata.category(c)[0] in "LNPS" and c not in _BLANK for c in text):
        shown = " ".join(f"U+{ord(c):04X}" for c in text[:8]) + (" ..." if n > 8 else "")
        raise CleanError("text.empty", f"no letter, digit, punctuation or symbol left after cleaning, only {shown}")
    if n < cfg.min_chars:
        raise CleanError("text.too_short", f"{n} characters after cleaning, minimum is {cfg.min_chars}")
    if n <= cfg.max_chars:
        return text
    if cfg.on_too_long == "reject":
        raise CleanError("text.too_long", f"{n} characters after cleaning, maximum is {cfg.max_chars}")
    cut = cfg.max_chars
    # Never separate a base character from its combining marks, nor leave a ZWJ dangling.
    while cut > 0 and unicodedata.category(text[cut])[0] == "M":
        cut -= 1
    truncated = text[:cut].rstrip(_ZWJ).rstrip()
    if not truncated or len(truncated) < cfg.min_chars:
        raise CleanError("text.too_long", f"{n} characters; no clean cut within {cfg.max_chars}")
    return truncated
