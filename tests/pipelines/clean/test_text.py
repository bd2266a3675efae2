from __future__ import annotations

import unicodedata

import pytest

from pipelines.clean.text import TextCleanConfig, clean_text
from pipelines.errors import CleanError

CFG = TextCleanConfig()


def reason(raw, cfg: TextCleanConfig = CFG) -> CleanError:
    with pytest.raises(CleanError) as info:
        clean_text(raw, cfg)
    return info.value


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"normalization": "NFX"}, "normalization"),
        ({"on_invalid_utf8": "ignore"}, "on_invalid_utf8"),
        ({"on_too_long": "drop"}, "on_too_long"),
        ({"min_chars": -1}, "min_chars"),
        ({"max_chars": 0}, "max_chars"),
        ({"min_chars": 10, "max_chars": 5}, "max_chars"),
        ({"lowercase": "yes"}, "lowercase"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TextCleanConfig(**kwargs)


def test_config_lists_allowed_values_and_round_trips():
    with pytest.raises(ValueError, match="NFC, NFKC, NFD, NFKD, none"):
        TextCleanConfig(normalization="nfkc")
    cfg = TextCleanConfig(normalization="NFC", max_chars=10, lowercase=True)
    assert cfg.to_dict()["normalization"] == "NFC"
    assert TextCleanConfig(**cfg.to_dict()) == cfg


# --- decoding -------------------------------------------------------------------------------------


def test_bytes_and_str_give_the_same_text():
    assert clean_text("héllo wörld", CFG) == clean_text("héllo wörld".encode(), CFG) == "héllo wörld"
    assert clean_text(bytearray(b"abc"), CFG) == "abc"


def test_latin1_bytes_are_rejected_with_byte_offset():
    err = reason("café au lait".encode("latin-1"))
    assert err.reason == "text.invalid_utf8"
    assert "byte offset 3" in err.detail


def test_latin1_bytes_are_repaired_as_cp1252():
    repair = TextCleanConfig(on_invalid_utf8="repair")
    assert clean_text("café".encode("latin-1"), repair) == "café"
    assert clean_text(b"\x93quoted\x94 \x80 5", repair) == "\u201cquoted\u201d \u20ac 5"
    # valid UTF-8 next to a stray latin-1 byte: only the invalid byte is re-read
    assert clean_text("naïve ".encode() + b"caf\xe9", repair) == "naïve café"


def test_surrogateescaped_str_follows_the_bytes_rule():
    escaped = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert escaped == "caf\udce9"
    err = reason(escaped)
    assert err.reason == "text.invalid_utf8" and "byte offset 3" in err.detail
    assert clean_text(escaped, TextCleanConfig(on_invalid_utf8="repair")) == "café"


def test_surrogate_that_is_no_escaped_byte_is_invalid_unicode():
    err = reason("emoji half \ud83d here")
    assert err.reason == "text.invalid_unicode" and "U+D83D" in err.detail
    assert clean_text("a\ud83db", TextCleanConfig(on_invalid_utf8="repair")) == "a\ufffdb"


def test_wrong_type_is_a_programming_error():
    with pytest.raises(TypeError):
        clean_text(None, CFG)  # type: ignore[arg-type]


# --- cleaning -------------------------------------------------------------------------------------


def test_bom_and_crlf():
    assert (
        clean_text(b"\xef\xbb\xbfline one\r\nline two\rline three\r\n", CFG)
        == "line one\nline two\nline three"
    )


def test_control_and_invisible_characters_are_removed():
    raw = "a\x00b\x07c\x1bd\x7fe\x9ff g\u200bh\u2060i\u00adj\ufeffk"
    assert clean_text(raw, CFG) == "abcdef ghijk"


@pytest.mark.parametrize("raw, expected", [
    ("end of page one.\fPage two", "end of page one.\nPage two"),  # a PDF page break
    ("first line\x0bsecond line", "first line\nsecond line"),  # an in-cell line break (FileMaker, old Excel)
    ("a\x1cb\x1dc\x1ed", "a\nb\nc\nd"),  # file, group and record separators
    ("a\x1fb", "a b"),  # the unit separator
])
def test_controls_that_separate_words_are_breaks_not_deleted(raw, expected):
    assert clean_text(raw, CFG) == expected


def test_whitespace_collapses_but_single_newlines_stay():
    assert clean_text("  a \t b\u3000c \n\n\n  d  \u2028 e  ", CFG) == "a b c\nd\ne"


@pytest.mark.parametrize(
    "text",
    [
        "机器学习是人工智能的一个分支。",
        "日本語のテキスト、カタカナとひらがな",
        "한국어 문장입니다",
        "مرحبا بالعالم، هذا نص عربي",
        "שלום עולם",
        "नमस्ते दुनिया, क्षत्रिय",
        "میخواهم",  # Persian with ZWNJ
        "family 👨\u200d👩\u200d👧 thumbs 👍🏽 flag 🇯🇵 heart ❤\ufe0f",
        "Ελληνικά και кириллица",
    ],
)
def test_every_script_survives(text):
    for form in ("NFC", "NFKC"):
        assert clean_text(text, TextCleanConfig(normalization=form)) == unicodedata.normalize(form, text)


@pytest.mark.parametrize(
    "form, raw, expected",
    [
        ("NFKC", "ﬁne Ｆｕｌｌ ①", "fine Full 1"),
        ("NFC", "ﬁne", "ﬁne"),
        ("NFC", "e\u0301", "\u00e9"),
        ("NFD", "\u00e9", "e\u0301"),
        ("NFKD", "ﬁ\u00e9", "fie\u0301"),
        ("none", "e\u0301ﬁ", "e\u0301ﬁ"),
    ],
)
def test_normalization_forms(form, raw, expected):
    assert clean_text(raw, TextCleanConfig(normalization=form)) == expected


def test_lowercase():
    assert clean_text("Ünïcode ÀB", TextCleanConfig(lowercase=True)) == "ünïcode àb"


# --- length ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", b"", "   \n\t ", "\x00\x01\u200b", b"\xef\xbb\xbf"])
def test_nothing_left_is_text_empty(raw):
    assert reason(raw).reason == "text.empty"


@pytest.mark.parametrize("raw", ["\u200d", "\u200e\u200f", "\ufe0f", "\U000e0041\U000e0042", "\ue000\ue001",
                                 "\u0301\u0302", "\ufffd\ufffd", "\u3164", "\u2800 \u2800"])
def test_only_marks_format_or_private_use_characters_is_text_empty(raw):
    error = reason(raw)
    assert error.reason == "text.empty" and "U+" in error.detail


@pytest.mark.parametrize("raw", ["\u200dx", ".", "\U0001f600", "\u0661", "e\u0301"])
def test_one_letter_digit_punctuation_or_symbol_is_enough(raw):
    assert clean_text(raw, CFG) == unicodedata.normalize("NFKC", raw)


def test_min_chars():
    assert reason("abc", TextCleanConfig(min_chars=5)).reason == "text.too_short"
    assert clean_text("abcde", TextCleanConfig(min_chars=5)) == "abcde"
    assert clean_text("", TextCleanConfig(min_chars=0)) == ""


def test_too_long_is_truncated_or_rejected():
    assert clean_text("abcdefgh", TextCleanConfig(max_chars=5)) == "abcde"
    assert clean_text("abcd efgh", TextCleanConfig(max_chars=5)) == "abcd"
    err = reason("abcdefgh", TextCleanConfig(max_chars=5, on_too_long="reject"))
    assert err.reason == "text.too_long" and "8 characters" in err.detail


def test_truncation_keeps_combining_marks_with_their_base():
    cfg = TextCleanConfig(max_chars=5, normalization="none")
    assert clean_text("abcde\u0301f", cfg) == "abcd"
    assert clean_text("ab👨\u200d👩", TextCleanConfig(max_chars=4)) == "ab👨"
    # Devanagari: the vowel sign (a mark) at the cut goes together with its consonant
    assert clean_text("नमस्ते", TextCleanConfig(max_chars=5)) == "नमस्"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_bytes_with_a_utf16_or_utf32_byte_order_mark_are_read_in_that_encoding(codec):
    text = "Größe\r\n👩\u200d👩\u200d👧 שלום"
    raw = text.encode(codec) if codec in ("utf-16", "utf-32") else "\ufeff".encode(codec) + text.encode(codec)
    for mode in ("reject", "repair"):
        assert clean_text(raw, TextCleanConfig(on_invalid_utf8=mode)) == "Größe\n👩\u200d👩\u200d👧 שלום"


@pytest.mark.parametrize(("raw", "reason", "offset", "repaired"), [
    (b"\xff\xfeh\x00\x3d\xd8i\x00", "text.invalid_utf16", 4, "h\ufffdi"),  # half a surrogate pair
    (b"\xff\xfeh\x00A", "text.invalid_utf16", 4, "h\ufffd"),  # an odd byte at the end
    (b"\xff\xfe\x00\x00h\x00\x00\x00\x00\x00\x11\x00", "text.invalid_utf32", 8, "h\ufffd"),  # beyond U+10FFFF
])
def test_invalid_utf16_or_utf32_is_rejected_with_its_offset_or_repaired(raw, reason, offset, repaired):
    with pytest.raises(CleanError) as e:
        clean_text(raw, TextCleanConfig())
    assert e.value.reason == reason and f"at byte offset {offset}:" in e.value.detail
    assert clean_text(raw, TextCleanConfig(on_invalid_utf8="repair")) == repaired


def test_utf16_without_a_byte_order_mark_stays_a_utf8_question():
    raw = "héllo".encode("utf-16-le")  # no mark: nothing tells it from other bytes
    with pytest.raises(CleanError) as e:
        clean_text(raw, TextCleanConfig())
    assert e.value.reason == "text.invalid_utf8"
