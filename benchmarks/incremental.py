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
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import cores_description, write_section

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
MBM = [sys.executable, "-m", "jobs.cli"]


def build(data: Path, n: int, source: Path | None = None) -> list[dict]:
    """``n`` manifest rows under ``data``, with unique ids, cycling through a corpus's rows.

    Default corpus: the bundled sample (copied; its two deliberately bad rows left out). ``source``:
    a manifest (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, mbm's columns, media paths
    relative to it) or a folder holding one named ``manifest.*``; the folder's other entries are
    symlinked rather than copied. ``n = 0`` takes the manifest byte for byte (malformed lines too),
    otherwise its readable rows (read by mbm's own reader) are repeated into ``manifest.jsonl``. A
    text repeated gets its copy number appended, so repeated captions are not identical.
    """
    if source is None:
        shutil.copytree(SAMPLE, data)
        base = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines() if x.strip()]
        base = [r for r in base if not r["id"].startswith("bad")]
    else:
        manifest = source_manifest(Path(source))
        data.mkdir(parents=True)
        for entry in manifest.parent.iterdir():
            # the media are linked; not the manifest, nor another named manifest.* (the copy written
            # below would go through that link into the user's own file)
            if entry != manifest and not entry.name.lower().startswith("manifest."):
                (data / entry.name).symlink_to(entry.resolve())
        if n == 0:  # as it is: every line, readable or not, is the pipelines' business
            shutil.copyfile(manifest, data / manifest_name(manifest))
            return []
        try:
            base = source_rows(manifest)
        except CellsNotJson:
            if manifest.suffix != ".parquet":
                raise
            repeat_parquet(manifest, data / "manifest.parquet", n)  # media bytes in its cells
            return []
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


def is_manifest(path: Path) -> bool:
    """A file named ``manifest.*`` in a format mbm reads (any compression mbm reads too)."""
    from pipelines.readers.rows import format_of

    return path.name.lower().startswith("manifest.") and format_of(path.name) is not None and path.is_file()


def manifest_name(manifest: Path) -> str:
    """``manifest.<format>[.<compression>]`` for a copy of ``manifest`` (``train.v2.jsonl.gz`` ->
    ``manifest.jsonl.gz``), which mbm reads as the original."""
    from pipelines.readers.rows import format_of

    name = manifest.name.lower()
    compression = next((c for c in (".gz", ".bz2", ".zst", ".zstd", ".deflate", ".xz", ".lzma") if name.endswith(c)), "")
    return f"manifest.{format_of(manifest.name)}{compression}"


def source_manifest(source: Path) -> Path:
    """The manifest ``--source`` names: the file itself, or the one ``manifest.*`` in the folder."""
    if source.is_file():
        return source
    found = [p for p in sorted(source.glob("*")) if is_manifest(p)]
    if len(found) != 1:
        raise SystemExit(f"--source {source}: expected one manifest.jsonl/.csv/.tsv/.parquet there, found "
                         f"{[p.name for p in found] or 'none'} (mbm's columns: id, text, image, audio, label; "
                         "media paths relative to the folder)")
    return found[0]


class CellsNotJson(SystemExit):
    """A manifest whose cells are not JSON values (bytes: images as ``datasets`` exports them)."""


def repeat_parquet(manifest: Path, dest: Path, n: int) -> None:
    """A Parquet manifest's rows repeated to ``n`` into ``dest``, as ``build`` repeats rows (a copy's id gets
    its row number appended, its text the copy number) but in Arrow, so cells that are not JSON values
    (image or audio bytes) are copied as they are; one copy of the table in memory at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(manifest)
    if "id" not in table.column_names or not table.num_rows:
        raise SystemExit(f"--source {manifest}: needs rows and an id column to be repeated with unique ids; use "
                         "--samples 0 to run it as it is")
    table = table.set_column(table.column_names.index("id"), "id", pc.cast(table.column("id"), pa.string()))
    with pq.ParquetWriter(dest, table.schema) as writer:
        for start in range(0, n, table.num_rows):
            part = table.slice(0, min(table.num_rows, n - start))
            if start:
                ids = [f"{x if x is not None else 'row'}-{start + j:05d}" for j, x in enumerate(part.column("id").to_pylist())]
                part = part.set_column(part.column_names.index("id"), "id", pa.array(ids, pa.string()))
                if "text" in part.column_names and pa.types.is_string(part.schema.field("text").type):
                    texts = [f"{x} (copy {start + j})" if x else x for j, x in enumerate(part.column("text").to_pylist())]
                    part = part.set_column(part.column_names.index("text"), part.schema.field("text"), pa.array(texts, pa.string()))
            writer.write_table(part)


def source_rows(manifest: Path) -> list[dict]:
    """The manifest's readable rows as JSON objects (mbm's reader: any format it takes)."""
    if manifest.suffix == ".jsonl":
        rows = [r for r in map(_json_object, manifest.read_bytes().splitlines()) if r is not None]
    else:
        from pipelines.readers.rows import format_of, iter_rows

        fmt = format_of(str(manifest))
        if fmt is None:
            raise SystemExit(f"--source {manifest}: not a manifest format mbm reads")
        rows = [item[1] for item in iter_rows(str(manifest), fmt, manifest.name) if isinstance(item, tuple)]
        try:
            json.dumps(rows)
        except (TypeError, ValueError):
            raise CellsNotJson(f"--source {manifest}: cells that are not JSON values (embedded image bytes?) cannot "
                               "be repeated in a JSON manifest; use --samples 0 to run it as it is, or give it "
                               "as Parquet") from None
    if not rows:
        raise SystemExit(f"--source {manifest}: no readable rows")
    return rows


def manifest_of(data: Path) -> str:
    """The name of the manifest ``build`` wrote into ``data``."""
    (name,) = [p.name for p in sorted(data.glob("*")) if is_manifest(p)]  # build links no other
    return name


def _json_object(line: bytes) -> dict | None:
    """One manifest line as a dict, or None when it is blank, not JSON or not an object."""
    try:
        row = json.loads(line)
    except ValueError:  # also invalid UTF-8
        return None
    return row if isinstance(row, dict) else None


def write(data: Path, rows: list[dict]) -> None:
    (data / "manifest.jsonl").unlink(missing_ok=True)  # never through a link into a source folder
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
    """One ``mbm preprocess`` process: wall seconds and the report of the folder it wrote (the spec's
    ``out``, or ``--output`` among ``extra``)."""
    start = time.perf_counter()
    subprocess.run([*MBM, "preprocess", str(spec), "--no-progress", *extra], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    out = Path(extra[extra.index("--output") + 1]) if "--output" in extra else spec.parent / "out"
    return {"wall": wall, "report": json.loads((out / "report.json").read_text())}


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
        # dedupe off: the sample media repeat, and each copy is extracted as the figures have always counted
        spec.write_text('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\nsamples_per_shard = 100\n'
                        "[runner]\ndedupe = false\n")
        results = {"full (first run)": run(spec), "no change": run(spec)}
        changed = change(tmp / "data", rows, args.change)
        results[f"{args.change:.0%} changed"] = run(spec)
        results["--full on the changed data"] = run(spec, "--full")
    base = results["--full on the changed data"]["wall"]
    lines = [
        f"Machine: {platform.machine()}, {cores_description()}, Python {platform.python_version()}; "
        f"{args.samples} samples (sample media repeated, unique ids; `[runner] dedupe = false`, each copy extracted); "
        f"the change: {changed['captions']} new "
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
