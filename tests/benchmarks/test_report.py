import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from report import write_section  # noqa: E402


def test_write_section_replaces_its_own_section_and_keeps_the_others(tmp_path):
    doc = tmp_path / "benchmarks.md"
    write_section("## A", "first", doc)
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nfirst\n"
    write_section("## B", "bee", doc)
    write_section("## A", "second\nline", doc)
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nsecond\nline\n\n## B\n\nbee\n"
    write_section("## B", "bee 2", doc)
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nsecond\nline\n\n## B\n\nbee 2\n"
