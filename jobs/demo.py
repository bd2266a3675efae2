"""``mbm demo``: preprocess the sample dataset bundled under ``examples/sample``."""

from __future__ import annotations

from pathlib import Path

from jobs.spec import JobSpec, SpecError, load_spec

DEMO_SPEC = Path(__file__).parent / "examples" / "demo.toml"


def demo_spec(output: str, *, workers: int | None = None) -> JobSpec:
    """The demo job writing to ``output`` (relative to the current folder)."""
    if not DEMO_SPEC.is_file():
        raise SpecError(f"the demo job {DEMO_SPEC} is missing; reinstall mbm from a source checkout")
    overrides: dict = {"output": {"dir": str(Path(output).resolve())}}
    if workers:
        overrides["runner"] = {"workers": workers}
    return load_spec(DEMO_SPEC, overrides)
