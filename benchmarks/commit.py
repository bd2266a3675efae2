"""The commit of a big job on its own: time and peak memory of turning N staged index rows into a version.

``mbm preprocess`` ends with the commit in the driver (``pipelines.commit.commit``): it reads every
bucket's sidecar (the index rows of its samples), plans the new version against the previous one, and
writes the index. Its memory grows with the number of samples, unlike the workers', so a job of
millions of samples meets it. This benchmark stages, for each --rows count, sidecars of 1000 rows each
as the writing stage leaves them (rows shaped like real ones: ids, 64-hex content hashes, per-modality
hash JSON, a fingerprint; one in 20 a reject; empty tars) and runs in a child process: a first commit
(every row new), then a re-run's commit where 95 % of the rows are unchanged and 5 % re-extracted into a
new shard (copy-on-write of the touched shards). Reports seconds and the child's peak RSS above what it
held before the commit, and the growth of that peak when the rows grow 4x.

    .venv/bin/python benchmarks/commit.py --rows 100000,400000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PER_BUCKET = 1000
FINGERPRINT = json.dumps({m: f"{m}-extractor-" + "0" * 40 for m in ("text", "image", "audio")}, sort_keys=True)


def row(i: int, shard: str | None) -> dict:
    """An index row like the writing stage's (``IndexRow.to_dict()``); every 20th a read-stage reject."""
    hashes = json.dumps({m: f"{i * 7 + k:064x}" for k, m in enumerate(("text", "image"))}, sort_keys=True)
    rejected = i % 20 == 19
    return {
        "id": f"sample-{i:09d}", "key": f"{i:040x}", "shard": None if rejected else shard,
        "content_hash": "" if rejected else f"{i:064x}", "fingerprint": "{}" if rejected else FINGERPRINT,
        "status": "rejected" if rejected else "ok", "stage": "clean.image" if rejected else "",
        "reason": "image.truncated" if rejected else "", "detail": "image file is truncated" if rejected else "",
        "modalities": "" if rejected else "text,image", "label": None if rejected else f"class-{i % 10}",
        "source": f"manifest.jsonl:{i + 1}", "version": 0, "modality_hashes": "{}" if rejected else hashes,
    }


def empty_tar(path: Path, keys: list[str] = ()) -> None:
    """A tar where a shard should be, with an empty ``KEY.json`` member for each of ``keys`` (the commit renames
    new shards, and copies the members of the samples a touched shard keeps, checking that all are there)."""
    with tarfile.open(path, "w") as t:
        for key in keys:
            t.addfile(tarfile.TarInfo(f"{key}.json"))


def stage(staging: Path, buckets: list[tuple[list[dict], list[dict]]]) -> None:
    """Sidecars ``parts/bNNNNN.json`` (new rows, unchanged rows) and an empty tar for each new shard."""
    (staging / "parts").mkdir(parents=True)
    (staging / "shards").mkdir()
    for b, (rows, same) in enumerate(buckets):
        shards = sorted({r["shard"] for r in rows if r["shard"]})
        for rel in shards:
            empty_tar(staging / rel)
        sidecar = {
            "bucket": b, "rows": rows, "same": same, "labels": sorted({r["label"] for r in rows if r["label"]}),
            "shards": [{"path": rel, "samples": sum(r["shard"] == rel for r in rows), "bytes": 0, "part": 0}
                       for rel in shards],
            "extracted": {"samples": sum(r["status"] == "ok" for r in rows), "text": 0, "image": 0, "audio": 0},
        }
        (staging / "parts" / f"b{b:05d}.json").write_text(json.dumps(sidecar, sort_keys=True))


def peak_rss_kib() -> int:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, not carried over from the
    process that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def timed_commit(out: Path, staging: Path) -> dict:
    """Commit ``staging`` into ``out`` here (a child process: its peak RSS is the commit's)."""
    from pipelines.commit import commit

    before = peak_rss_kib()
    start = time.perf_counter()
    result = commit(str(out), str(staging), job_toml="", clock=time.time, started=time.time(),
                    fingerprints={}, feature_dims={})
    peak = peak_rss_kib()
    return {"seconds": time.perf_counter() - start, "peak_mib": peak / 1024, "above_mib": (peak - before) / 1024,
            "planned": result.report["planned"]}


def stage_first(out: Path, n: int) -> Path:
    """A first run's staging: ``n`` new rows, a shard per bucket."""
    buckets = [([row(i, f"shards/b{b // PER_BUCKET:05d}-000.tar") for i in range(b, min(n, b + PER_BUCKET))], [])
               for b in range(0, n, PER_BUCKET)]
    stage(out / ".staging" / "run1", buckets)
    return out / ".staging" / "run1"


def stage_rerun(out: Path) -> Path:
    """A re-run's staging after the first commit: one in 20 landed rows re-extracted into a new shard, the
    other landed rows unchanged, the rejects rejected again."""
    import pyarrow.parquet as pq

    from pipelines.commit import current_manifest

    manifest = current_manifest(str(out))
    index = pq.read_table(out / manifest.index).to_pylist()
    for shard in manifest.shards:  # the copy-on-write of the touched shards reads them
        empty_tar(out / shard, [r["key"] for r in index if r["shard"] == shard])
    changed = [{**r, "shard": "shards/b00000-000.tar"} for i, r in enumerate(index) if i % 20 == 0 and r["shard"]]
    same = [{**r, "label_value": r["label"]} for i, r in enumerate(index) if i % 20 and r["shard"]]
    rejects = [r for r in index if not r["shard"]]
    buckets = [(changed + rejects, same[:PER_BUCKET])]
    buckets += [([], same[k:k + PER_BUCKET]) for k in range(PER_BUCKET, len(same), PER_BUCKET)]
    stage(out / ".staging" / "run2", buckets)
    return out / ".staging" / "run2"


def run_child(out: Path, staging: Path) -> dict:
    cmd = [sys.executable, __file__, "--commit", str(staging), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="100000,400000",
                    help="comma-separated row counts (default 100000,400000: 1x and 4x)")
    ap.add_argument("--commit", type=Path, help=argparse.SUPPRESS)  # the child: commit this staging folder
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.commit is not None:
        print(json.dumps(timed_commit(args.out, args.commit)))
        return 0
    try:
        counts = [int(x) for x in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be comma-separated whole numbers, got {args.rows!r}")
    if not counts or min(counts) < PER_BUCKET:
        ap.error(f"--rows: each count must be at least {PER_BUCKET}")
    print("| rows | first commit s | peak RSS MiB (above start) | re-run commit s | peak RSS MiB (above start) | planned |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    results = []
    with tempfile.TemporaryDirectory(prefix="mbm-bench-commit-") as tmp:
        for n in counts:
            out = Path(tmp) / f"rows-{n}"
            f = run_child(out, stage_first(out, n))
            s = run_child(out, stage_rerun(out))
            results.append({"rows": n, "first": f, "second": s})
            print(f"| {n:,} | {f['seconds']:.1f} | {f['peak_mib']:.0f} ({f['above_mib']:+.0f}) | {s['seconds']:.1f} | "
                  f"{s['peak_mib']:.0f} ({s['above_mib']:+.0f}) | {s['planned']} |", flush=True)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"\npeak RSS, {b['rows'] / a['rows']:.0f}x the rows: first commit "
              f"{b['first']['peak_mib'] / a['first']['peak_mib']:.2f}x, re-run {b['second']['peak_mib'] / a['second']['peak_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
