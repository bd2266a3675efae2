"""The Hugging Face baseline: ``Dataset.from_list(rows).map(fn, batched=True, num_proc=cores)``.

``fn`` does the loop baseline's work on a batch of manifest rows (mbm's readers and cleaners, the
job's extractors in per-modality batches) with models loaded once per worker process and one torch
thread per worker (the best setting measured with one process per core). The mapped dataset (keys,
json, feature ``.npy`` bytes) is then written to WebDataset tars. Needs the ``bench`` extra.

    .venv/bin/python benchmarks/baseline_hf.py JOB.toml --output OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from baseline_loop import Shards, clean_config, clean_one, encode, featurize, load_models

from jobs.spec import load_spec
from pipelines.errors import CleanError
from pipelines.readers.common import folder_of, normalize_id
from pipelines.readers.manifest import row_sample
from pipelines.readers.rows import format_of, iter_rows
from schemas import MODALITIES, Reject

COLUMNS = ["key", "json", *(f"{m}.npy" for m in MODALITIES)]
_WORKER: dict[int, tuple[Any, Any, Any]] = {}  # pid -> (spec, clean config, models): load once per process


def _worker(job: str) -> tuple[Any, Any, Any]:
    pid = os.getpid()
    if pid not in _WORKER:
        import torch

        torch.set_num_threads(1)
        spec = load_spec(job)
        _WORKER[pid] = (spec, clean_config(spec), load_models(spec))
    return _WORKER[pid]


def process(batch: dict[str, list], job: str, base: str) -> dict[str, list]:
    """A batch of manifest rows (each a JSON string) → the rows of the samples that landed (columns ``COLUMNS``)."""
    spec, cfg, models = _worker(job)
    rows = [json.loads(row) for row in batch["row"]]
    kept = []
    for n, row in enumerate(rows):
        try:
            raw = row_sample(normalize_id(row.get("id"), f"row {n}"), row, f"row {n}", base,
                             spec.input.allow_outside)
        except CleanError:
            continue
        values = clean_one(raw, cfg)
        if values:
            kept.append((raw, values))
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for (raw, values), feats in zip(kept, featurize([v for _, v in kept], models), strict=True):
        if not feats:
            continue
        members = encode(raw, values.get("text"), feats)
        out["key"].append(members.pop("__key__"))
        for c in COLUMNS[1:]:
            out[c].append(members.get(c))
    return out


def read_rows(manifest: str, allow_outside: bool) -> list[dict[str, str]]:
    """The manifest's readable rows for ``Dataset.from_list``, each as one JSON string; of several valid
    rows with one id only the first (as mbm and the loop keep it).

    Arrow needs one type per column, and real manifests mix them (a label that is a number in one row
    and a string in the next, metadata nested in some rows only): ``from_list`` on the plain dicts
    fails there, so each row travels as JSON and ``process`` parses it.
    """
    base, seen, rows = folder_of(manifest), set(), []
    for item in iter_rows(manifest, format_of(manifest), Path(manifest).name):
        if isinstance(item, Reject):
            continue
        try:
            sample_id = normalize_id(item[1].get("id"), "")
            row_sample(sample_id, item[1], "", base, allow_outside)
        except CleanError:
            sample_id = None  # process() skips it; it does not count as the id's first row
        if sample_id is not None and sample_id in seen:
            continue
        seen.add(sample_id)
        rows.append({"row": json.dumps(item[1])})  # ASCII: undecodable bytes stay as escaped surrogates
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", help="job spec (TOML); its [input] manifest, cleaning and [extract] settings are used")
    ap.add_argument("--output", required=True, help="folder for the tars and baseline.json")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(out / ".hf-cache")  # any Arrow files map writes land here, not in ~/.cache
    try:
        import datasets
    except ImportError:
        print("baseline_hf: Hugging Face `datasets` is not installed; run "
              "`.venv/bin/pip install -e '.[dev,bench]'`", file=sys.stderr)
        return 3
    datasets.disable_progress_bars()
    spec = load_spec(args.job)
    manifest = spec.input.manifest
    start = time.perf_counter()
    rows = read_rows(manifest, spec.input.allow_outside)
    ds = datasets.Dataset.from_list(rows)
    # Rows per call: the largest per-modality batch, so every extractor gets calls as full as mbm's.
    rows_per_call = max(e.batch_size for e in spec.extract.values())
    mapped = ds.map(process, batched=True, batch_size=rows_per_call, num_proc=args.num_proc,
                    remove_columns=ds.column_names,
                    fn_kwargs={"job": str(Path(args.job).resolve()), "base": folder_of(manifest)})
    mapped_s = time.perf_counter() - start
    shards = Shards(out, spec.output.samples_per_shard)
    for row in mapped:
        shards.write({"__key__": row["key"], **{c: row[c] for c in COLUMNS[1:] if row[c] is not None}})
    shards.close()
    summary = {"landed": len(mapped), "skipped": len(rows) - len(mapped),
               "seconds": {"map": round(mapped_s, 3), "write": round(time.perf_counter() - start - mapped_s, 3)}}
    (out / "baseline.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
