"""The Hugging Face baseline: ``Dataset.from_generator(samples).map(fn, batched=True, num_proc=cores)``.

The job's input (a manifest, an imagefolder/audiofolder or WebDataset tars) is read by mbm's own readers
(``iter_source``, the samples mbm's Beam job sees) into a dataset, written to an Arrow file in the cache
as ``datasets`` does with what it loads; ``fn`` does the loop baseline's work on a batch of those
samples (mbm's cleaners, the job's extractors in per-modality batches; ``--stock``: the default models
loaded as a user's script loads them, ``stock_models``) with models loaded once per worker process and
one torch thread per worker (the best setting measured with one process per core). The mapped dataset (keys, json, feature ``.npy`` bytes) is then written to WebDataset tars. Needs the
``bench`` extra.

    .venv/bin/python benchmarks/baseline_hf.py JOB.toml --output OUT
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from baseline_loop import Shards, clean_config, clean_one, encode, featurize, iter_source, load_models

from jobs.spec import load_spec
from mbm.resources import usable_cores
from schemas import MODALITIES, RawSample

COLUMNS = ["key", "json", *(f"{m}.npy" for m in MODALITIES)]
_WORKER: dict[int, tuple[Any, Any, Any]] = {}  # pid -> (spec, clean config, models): load once per process


def _worker(job: str, stock: bool) -> tuple[Any, Any, Any]:
    pid = os.getpid()
    if pid not in _WORKER:
        import torch

        torch.set_num_threads(1)
        spec = load_spec(job)
        _WORKER[pid] = (spec, clean_config(spec), load_models(spec, stock))
    return _WORKER[pid]


def process(batch: dict[str, list], job: str, stock: bool = False) -> dict[str, list]:
    """A batch of samples (each pickled) → the rows of the samples that landed (columns ``COLUMNS``)."""
    spec, cfg, models = _worker(job, stock)
    kept = []
    for raw in map(pickle.loads, batch["sample"]):
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


def samples(job: str) -> Iterator[dict[str, bytes]]:
    """The job's samples (mbm's readers; rejects left out, as the loop skips them), one pickled
    ``RawSample`` per row.

    Arrow needs one type per column, and real inputs mix them (a label that is a number in one row
    and a string in the next, metadata nested in some rows only, media as a path in a manifest but as
    bytes in a tar): a column per field fails there, so each sample travels whole and ``process``
    unpickles it.
    """
    for raw in iter_source(load_spec(job).input):
        if isinstance(raw, RawSample):
            yield {"sample": pickle.dumps(raw)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", help="job spec (TOML); its [input], cleaning and [extract] settings are used")
    ap.add_argument("--output", required=True, help="folder for the tars and baseline.json")
    ap.add_argument("--num-proc", type=int, default=usable_cores(), help="worker processes (default: the cores "
                    "this process may use, as mbm counts them)")
    ap.add_argument("--stock", action="store_true", help="the default models as a user's own script loads them "
                    "(transformers' AutoModel, eager EfficientNet-Lite0; stock_models.py), not mbm's classes")
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
    job = str(Path(args.job).resolve())
    spec = load_spec(job)
    start = time.perf_counter()
    features = datasets.Features({"sample": datasets.Value("binary")})
    if next(samples(job), None) is None:  # datasets refuses a generator that yields nothing
        ds = datasets.Dataset.from_dict({"sample": []}, features=features)
    else:
        ds = datasets.Dataset.from_generator(samples, features=features, gen_kwargs={"job": job})
    # Rows per call: the largest per-modality batch, so every extractor gets calls as full as mbm's.
    rows_per_call = max(e.batch_size for e in spec.extract.values())
    mapped = ds.map(process, batched=True, batch_size=rows_per_call, num_proc=args.num_proc,
                    remove_columns=ds.column_names, fn_kwargs={"job": job, "stock": args.stock})
    mapped_s = time.perf_counter() - start
    shards = Shards(out, spec.output.samples_per_shard)
    for row in mapped:
        shards.write({"__key__": row["key"], **{c: row[c] for c in COLUMNS[1:] if row[c] is not None}})
    shards.close()
    summary = {"landed": len(mapped), "skipped": len(ds) - len(mapped),
               "seconds": {"map": round(mapped_s, 3), "write": round(time.perf_counter() - start - mapped_s, 3)}}
    (out / "baseline.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
