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


def cores_description() -> str:
    """"N cores", or "N cores, K of them usable here" where CPU affinity or a cgroup quota limits this
    process (``mbm.resources``): what mbm's workers and the baselines' threads are sized by."""
    import os

    from mbm.resources import usable_cores

    total, usable = os.cpu_count() or 1, usable_cores()
    return f"{total} cores" if usable >= total else f"{total} cores, {usable} of them usable here"


def cpu_description() -> str:
    """The CPU's model name and widest vector extensions, from /proc/cpuinfo ("Intel(R) Xeon(R)
    Processor; AVX-512, AMX"): the figures of the models' arithmetic depend on them more than on the name."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return model
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    extras = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")) if flag in flags]
    return "; ".join([model, ", ".join(x for x in [isa, *extras] if x)]) if isa else model
