"""Writing a benchmark's section into docs/benchmarks.md (shared by the benchmark scripts)."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(head: str, body: str, doc: Path = DOC) -> None:
    """Replace the section titled ``head`` (up to the next ``## ``) with ``body``, or append it."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"{head}\n\n{body}\n"
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + section + ("\n" + text[end + 1:] if end != -1 else "")  # a blank line before the next
    else:
        text = text.rstrip() + "\n\n" + section
    doc.write_text(text)
