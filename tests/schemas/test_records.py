import pytest

from schemas import RawSample, Reject
from schemas.records import escape_nested, escape_undecodable


@pytest.mark.parametrize(("raw", "escaped"), [
    ("plain", "plain"),
    ("café ✓ 😀", "café ✓ 😀"),  # valid text is untouched
    ("caf\udce9", "caf\\xe9"),  # a byte that was not UTF-8 (surrogateescape) reads as its byte
    ("x\ud83dy", "x\\ud83dy"),  # any other lone surrogate
    ("\udc80\udcff", "\\x80\\xff"),
])
def test_escape_undecodable(raw, escaped):
    assert escape_undecodable(raw) == escaped
    escaped.encode("utf-8")


def test_escape_nested_reaches_keys_lists_and_leaves_other_types():
    value = {"k\udce9": ["v\udce9", 3, None, {"n": 1.5}], "ok": True}
    assert escape_nested(value) == {"k\\xe9": ["v\\xe9", 3, None, {"n": 1.5}], "ok": True}


def test_raw_samples_and_rejects_hold_only_encodable_ids_and_messages():
    sample = RawSample(id="caf\udce9", text="caf\udce9", label="\udce8", meta={"u": "\udce9"}, source="m.csv:\udce9")
    assert (sample.id, sample.label, sample.meta, sample.source) == ("caf\\xe9", "\\xe8", {"u": "\\xe9"}, "m.csv:\\xe9")
    assert sample.text == "caf\udce9"  # the text cleaner decides: reject or repair
    reject = Reject(id="a\udce9", stage="read", reason="read.bad_type", detail="d \udce9", source="s\udce9")
    assert (reject.id, reject.detail, reject.source) == ("a\\xe9", "d \\xe9", "s\\xe9")
