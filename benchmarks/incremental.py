"""Incremental re-run vs full run: how much a no-change and a 5 %-change re-run cost.

Builds a dataset from the bundled sample media repeated to --samples unique ids, runs
`mbm preprocess` (whole process, as a user runs it) for: the first full run, a no-change re-run,
a re-run after changing 5 % of the samples (half new captions, half replaced images), and a
`--full` recompute of the same changed data for reference. Prints a table and, with --write,
updates the section in docs/benchmarks.md.

    .venv/bin/python benchmarks/incremental.py --samples 400 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_section

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
MBM = [sys.executable, "-m", "jobs.cli"]


def build(data: Path, n: int, source: Path | None = None) -> list[dict]:
    """``n`` manifest rows under ``data``, with unique ids, cycling through a corpus's rows.

    Default corpus: the bundled sample (copied; its two deliberately bad rows left out). ``source``:
    any folder with a ``manifest.jsonl`` (mbm's columns, media paths relative to it), whose entries
    are symlinked rather than copied; ``n = 0`` takes its manifest byte for byte (malformed lines
    too), otherwise its JSON-object lines are repeated. A text repeated gets its copy number
    appended, so repeated captions are not identical.
    """
    if source is None:
        shutil.copytree(SAMPLE, data)
        base = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines() if x.strip()]
        base = [r for r in base if not r["id"].startswith("bad")]
    else:
        manifest = Path(source) / "manifest.jsonl"
        if not manifest.is_file():
            raise SystemExit(f"--source {source}: no manifest.jsonl there (mbm's manifest columns: id, text, "
                             "image, audio, label; media paths relative to the folder)")
        data.mkdir(parents=True)
        for entry in Path(source).iterdir():
            if entry.name != "manifest.jsonl":
                (data / entry.name).symlink_to(entry.resolve())
        if n == 0:  # as it is: every line, readable or not, is the pipelines' business
            shutil.copyfile(manifest, data / "manifest.jsonl")
            return []
        base = [r for r in map(_json_object, manifest.read_bytes().splitlines()) if r is not None]
        if not base:
            raise SystemExit(f"--source {source}: manifest.jsonl has no JSON-object rows")
    rows = []
    for i in range(n or len(base)):
        r = dict(base[i % len(base)])
        if i >= len(base) or source is None:
            r["id"] = f"{r.get('id', 'row')}-{i:05d}"
            if isinstance(r.get("text"), str) and r["text"]:
                r["text"] = f"{r['text']} (copy {i})"
        rows.append(r)
    write(data, rows)
    return rows


def _json_object(line: bytes) -> dict | None:
    """One manifest line as a dict, or None when it is blank, not JSON or not an object."""
    try:
        row = json.loads(line)
    except ValueError:  # also invalid UTF-8
        return None
    return row if isinstance(row, dict) else None


def write(data: Path, rows: list[dict]) -> None:
    (data / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def change(data: Path, rows: list[dict], fraction: float, seed: int = 0) -> dict[str, int]:
    """Change `fraction` of the samples: half get a new caption, half a replaced image."""
    from PIL import Image

    rng = random.Random(seed)
    k = max(2, round(len(rows) * fraction))
    texts = [r for r in rows if r.get("text")]
    images = [r for r in rows if r.get("image") and r not in texts[: k // 2]]
    for r in rng.sample(texts, k // 2):
        r["text"] += " Revised."
    for j, r in enumerate(rng.sample(images, k - k // 2)):
        src = data / r["image"]
        dst = src.with_name(f"replaced-{j}.jpg")
        Image.open(src).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst, quality=90)
        r["image"] = f"images/{dst.name}"
    write(data, rows)
    return {"captions": k // 2, "images": k - k // 2}


def run(spec: Path, *extra: str) -> dict:
    start = time.perf_counter()
    subprocess.run([*MBM, "preprocess", str(spec), "--no-progress", *extra], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((spec.parent / "out" / "report.json").read_text())
    return {"wall": wall, "report": report}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--change", type=float, default=0.05)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = build(tmp / "data", args.samples)
        spec = tmp / "job.toml"
        spec.write_text('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\nsamples_per_shard = 100\n')
        results = {"full (first run)": run(spec), "no change": run(spec)}
        changed = change(tmp / "data", rows, args.change)
        results[f"{args.change:.0%} changed"] = run(spec)
        results["--full on the changed data"] = run(spec, "--full")
    base = results["--full on the changed data"]["wall"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.samples} samples (sample media repeated, unique ids); the change: {changed['captions']} new "
        f"captions, {changed['images']} replaced images. Wall time of the whole `mbm preprocess` process "
        "(start-up and model loading included).",
        "",
        "| run | wall s | extracted samples | text / image / audio recomputed | new version | full run / this |",
        "| --- | ---: | ---: | --- | --- | ---: |",
    ]
    for name, r in results.items():
        rep = r["report"]
        by = rep.get("extracted_by_modality", {})
        lines.append(f"| {name} | {r['wall']:.1f} | {rep['counts']['extracted']} | "
                     f"{by.get('text', 0)} / {by.get('image', 0)} / {by.get('audio', 0)} | "
                     f"{'yes' if rep.get('new_version', True) else 'no'} | {base / r['wall']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("## Incremental re-runs", f"Reproduce: `.venv/bin/python benchmarks/incremental.py --samples "
                      f"{args.samples} --write`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
