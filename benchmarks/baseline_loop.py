"""The hand-written baseline: one process, a plain PyTorch loop doing mbm's work without Beam.

Reads the job's input (a manifest, an imagefolder/audiofolder or WebDataset tars) with mbm's own
readers (``iter_source``), decodes and cleans every sample with mbm's own cleaners, runs the job's
extractors (loaded once, on the CPU, torch threads = cores) in per-modality batches of the job's
batch size (``--stock``: the default models loaded as a user's script loads them, ``stock_models``),
and writes ``json`` + one float16 ``.npy`` per modality into WebDataset tars. A sample
whose every modality fails is skipped and counted, as a careful user would. Writes ``baseline.json``
(landed, skipped, seconds per stage) next to the tars.

    .venv/bin/python benchmarks/baseline_loop.py JOB.toml --output OUT
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import stock_models

from jobs.spec import JobSpec, create_extractors, load_spec
from mbm.resources import usable_cores
from pipelines.cleaning import CleanConfig, clean_value, load_raw
from pipelines.readers.common import FirstWins
from pipelines.readers.source import SourceConfig, list_inputs, read_input
from schemas import MODALITIES, RawSample, Reject, sample_key

CHUNK = 512  # samples cleaned before extraction: big enough that most per-modality batches are full


def iter_source(config: SourceConfig) -> Iterator[RawSample | Reject]:
    """The samples and rejects mbm's Beam job reads from ``config`` (its ``ReadSource``), without Beam.

    The same inputs in the same order (``list_inputs``: one manifest, one folder, or each tar of a
    pattern), each read by mbm's reader for it; as ``ReadSource`` keeps the first sample of an id across
    all inputs, a later one (the same key in a second tar) becomes a ``read.duplicate_id`` reject here too.
    """
    seen = FirstWins()
    for item in list_inputs(config):
        for out in read_input(item, config):
            if isinstance(out, RawSample):
                out = seen.check(out.id, out.source) or out
            yield out


def clean_config(spec: JobSpec) -> CleanConfig:
    return CleanConfig(text=spec.text, image=spec.image, audio=spec.audio)


def clean_one(raw: RawSample, cfg: CleanConfig) -> dict[str, Any]:
    """Cleaned value per modality that survived (mbm's decode + cleaners); empty when none did."""
    data, _ = load_raw(raw, cfg)
    values = {}
    for m in raw.present():
        try:
            values[m] = clean_value(m, data[m], cfg)
        except Exception:  # a bad modality is dropped, like mbm does; the sample keeps the others
            continue
    return values


def load_models(spec: JobSpec, stock: bool = False) -> dict[str, tuple[Any, Any, int]]:
    """modality -> (extractor, loaded model, batch size), on the CPU; ``stock``: the default models loaded as
    a user's own script loads them (``stock_models``), mbm's classes for the rest."""
    out = {}
    for m, ex in create_extractors(spec).items():
        if stock:
            ex = stock_models.stock(spec.extract[m].name, ex) or ex
        out[m] = (ex, ex.load("cpu"), spec.extract[m].batch_size)
    return out


def featurize(values: list[dict[str, Any]], models: dict[str, tuple[Any, Any, int]],
              timings: dict[str, float] | None = None) -> list[dict[str, np.ndarray]]:
    """Features per sample: each modality's present values go through its extractor in full batches."""
    feats: list[dict[str, np.ndarray]] = [{} for _ in values]
    for m in MODALITIES:
        todo = [i for i, v in enumerate(values) if m in v]
        if not todo or m not in models:
            continue
        start = time.perf_counter()
        extractor, model, batch_size = models[m]
        for k in range(0, len(todo), batch_size):
            idx = todo[k:k + batch_size]
            for i, f in zip(idx, extractor.featurize(model, [values[i][m] for i in idx], "cpu"), strict=True):
                feats[i][m] = f
        if timings is not None:
            timings[f"extract_{m}"] += time.perf_counter() - start
    return feats


def encode(raw: RawSample, text: str | None, feats: dict[str, np.ndarray]) -> dict[str, Any]:
    """WebDataset members: ``json`` (id, label, text, modalities) and one float16 ``.npy`` per modality."""
    doc = {"id": raw.id, "label": raw.label, "text": text, "modalities": [m for m in MODALITIES if m in feats]}
    members: dict[str, Any] = {"__key__": sample_key(raw.id), "json": json.dumps(doc, ensure_ascii=False).encode()}
    for m, f in feats.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(f, dtype=np.float16), allow_pickle=False)
        members[f"{m}.npy"] = buf.getvalue()
    return members


class Shards:
    """Writes members into ``out/shard-NNNNNN.tar``, a new tar every ``per_shard`` samples."""

    def __init__(self, out: Path, per_shard: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.per_shard, self.count, self.writer = out, per_shard, 0, None

    def write(self, members: dict[str, Any]) -> None:
        import webdataset as wds

        if self.count % self.per_shard == 0:
            self.close()
            # mtime=0, as mbm's sink: the same plain ustar headers (a float mtime adds a pax header per member)
            self.writer = wds.TarWriter(str(self.out / f"shard-{self.count // self.per_shard:06d}.tar"),
                                        encoder=False, mtime=0)
        self.writer.write(members)
        self.count += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def run(spec: JobSpec, out: Path, stock: bool = False) -> dict[str, Any]:
    """The whole baseline; returns counts and seconds per stage."""
    import torch

    torch.set_num_threads(usable_cores())  # the cores mbm's workers share, as a container limits them
    timings: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    models = load_models(spec, stock)
    timings["load_models"] = time.perf_counter() - start
    cfg = clean_config(spec)
    shards = Shards(out, spec.output.samples_per_shard)
    landed = skipped = 0
    for chunk in chunks(iter_source(spec.input), CHUNK):
        t = time.perf_counter()
        kept = []
        for raw in chunk:
            values = clean_one(raw, cfg) if isinstance(raw, RawSample) else {}
            if values:
                kept.append((raw, values))
            else:
                skipped += 1
        timings["read_clean"] += time.perf_counter() - t
        feats = featurize([v for _, v in kept], models, timings)
        t = time.perf_counter()
        for (raw, values), f in zip(kept, feats, strict=True):
            if f:
                shards.write(encode(raw, values.get("text"), f))
                landed += 1
            else:
                skipped += 1
        timings["write"] += time.perf_counter() - t
    shards.close()
    return {"landed": landed, "skipped": skipped, "seconds": {k: round(v, 3) for k, v in timings.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", help="job spec (TOML); its [input], cleaning and [extract] settings are used")
    ap.add_argument("--output", required=True, help="folder for the tars and baseline.json")
    ap.add_argument("--stock", action="store_true", help="the default models as a user's own script loads them "
                    "(transformers' AutoModel, eager EfficientNet-Lite0; stock_models.py), not mbm's classes")
    args = ap.parse_args()
    spec = load_spec(args.job)
    out = Path(args.output)
    summary = run(spec, out, args.stock)
    (out / "baseline.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
