"""Using a finished run: load its model from a checkpoint, evaluate a split, generate text, predict labels,
export embeddings."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from mbm.data.collate import IGNORE, batch_to
from mbm.data.errors import skip_reasons
from mbm.data.loader import PassLoader
from mbm.data.source import DataSource, resolve_data
from mbm.data.split import no_test_split
from mbm.data.stream import ShardStream
from mbm.data.tokenizer import decode_ids, load_tokenizer, special_tokens, vocab_digest
from mbm.model.model import ModelConfig, MultimodalModel
from mbm.train.build import resolved_split_by, stream_config
from mbm.train.checkpoint import (
    BEST,
    best_checkpoint,
    checkpoint_name,
    checkpoint_settings,
    load_checkpoint,
    replace_atomic,
)
from mbm.train.config import TrainConfig, merge
from mbm.train.distributed import pick_device
from mbm.train.evaluate import autocast, empty_split, evaluate
from mbm.train.run import RunDir
from mbm.train.trainer import loader_workers

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    cfg: TrainConfig
    model: MultimodalModel
    source: DataSource
    labels: list[Any]
    step: int
    device: torch.device
    workers: int = 0  # data-loader worker processes reading the split

    def stream(self, split: str, *, decode_only: bool = False) -> PassLoader:
        """The samples of ``split`` ("train", "val", "test" or "all") in order, one pass, read by ``workers``
        processes; ``decode_only``: for predicting, samples without what training needs besides their inputs too
        (a reference text, a label, the pair's other modality), and no targets."""
        dims = {m: self.model.cfg.feature_dims[m] for m in self.model.cfg.input_modalities()}
        for m, dim in dims.items():  # a modality the data lacks is masked, as in training
            got = self.source.feature_dims.get(m)
            if got is not None and got != dim:
                raise ValueError(f"--data {self.source.spec}: {m} features are {got}-d, the run was trained on {dim}-d")
        if split == "test" and (why := no_test_split(resolved_split_by(self.cfg), self.source.splits)):
            raise ValueError(f"--split test: {why}")
        cfg = stream_config(self.cfg, self.source, self.labels, dims, split, train=False)
        if decode_only:
            cfg = replace(cfg, targets_optional=True, collate=replace(cfg.collate, with_targets=False))
        return PassLoader(ShardStream(cfg), workers=self.workers, pin_memory=self.device.type == "cuda")


def load_run(run_dir: str, *, data: str | None = None, checkpoint: str | None = None, device: str = "auto",
             workers: int | None = None, **overrides: Any) -> LoadedRun:
    """The run's model at its latest (or the given) checkpoint, and its data (or ``data``), read by ``workers``
    data-loader processes (None: 0 on the CPU, a share of the cores on a GPU, as training's default; not the
    run's own ``--workers``, which was chosen for the machine it trained on)."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    run = RunDir(run_dir)
    lost_config = not os.path.isfile(run.config_json) and run.has_checkpoints()
    saved = None if lost_config else run.config()  # a folder that is no run: says so
    path = _checkpoint_path(run, checkpoint)
    state = load_checkpoint(path)
    if saved is None:  # a run folder that lost its config.json: the settings its checkpoint holds
        settings = checkpoint_settings(state, path)
        if settings is None:
            raise ValueError(f"--run {run.root}: no config.json, and its checkpoint {path} holds no settings (saved by "
                             "an older mbm): put back the run's config.json")
        log.warning("--run %s has no config.json; its settings come from the checkpoint %s", run.root, path)
        saved = merge(settings)
    # the run's own --eval-samples capped each evaluation during training; here only the command's does
    cfg = replace(saved, **{"eval_samples": None, **{k: v for k, v in overrides.items() if v is not None}})
    if not isinstance(state.get("model_config"), dict):
        raise ValueError(f"--checkpoint {path}: holds no model_config, so the model cannot be rebuilt from it")
    model_cfg = ModelConfig.from_dict(state["model_config"])
    _check_same_run(run, path, model_cfg, cfg)
    dev = pick_device(device, 0)
    model = MultimodalModel(model_cfg).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    if model_cfg.decoder is not None:
        _check_tokenizer(cfg.tokenizer, model_cfg.decoder)
    labels = list(state.get("labels") or run.read_labels() or [])
    source = resolve_data(data or cfg.data)
    source.hold()  # mbm gc keeps the version while it is read
    pair = list(model_cfg.pair) if model_cfg.pair else cfg.pair
    return LoadedRun(cfg=replace(cfg, pair=pair), model=model, source=source, labels=labels,
                     step=int(state["step"]), device=dev, workers=loader_workers(workers, dev))


def _check_same_run(run: RunDir, path: str, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """The model comes from the checkpoint, the samples it is given (task, split, pair, tokenizer, token
    limits) from ``--run``'s config: a checkpoint of another run would be fed samples chosen for this one."""
    folder = os.path.dirname(os.path.abspath(path))
    owner = os.path.dirname(folder)
    if (os.path.basename(folder) == "checkpoints" and os.path.isfile(os.path.join(owner, "config.json"))
            and os.path.realpath(owner) != os.path.realpath(run.root)):
        raise ValueError(f"--checkpoint {path} was saved by the run {owner}, not --run {run.root}: the samples it is "
                         f"given follow the run's settings (task, split, pair, tokenizer); give --run {owner}")
    if model_cfg.task != cfg.task:
        raise ValueError(f"--checkpoint {path} holds a {model_cfg.task} model, but --run {run.root} trains "
                         f"{cfg.task}: give --run the run that saved it")


def _check_tokenizer(path: str | None, decoder: Any) -> None:
    """The tokenizer must be the one the decoder was trained with: same vocabulary size and special ids,
    and the same token for every id (runs that recorded their vocabulary's digest)."""
    tokenizer = load_tokenizer(path)
    sp = special_tokens(tokenizer)
    trained = {"vocabulary size": decoder.vocab_size, "BOS id": decoder.bos, "EOS id": decoder.eos, "PAD id": decoder.pad}
    given = {"vocabulary size": sp.vocab_size, "BOS id": sp.bos, "EOS id": sp.eos, "PAD id": sp.pad}
    differ = [f"{k} {given[k]} (the run's decoder: {v})" for k, v in trained.items() if given[k] != v]
    if not differ and decoder.vocab_digest and vocab_digest(tokenizer) != decoder.vocab_digest:
        differ = ["the same size, but other tokens for some ids"]
    if differ:
        raise ValueError(f"--tokenizer {path or 'default'} does not match the run's decoder: {', '.join(differ)}; "
                         "leave --tokenizer out to use the run's own")


def _checkpoint_path(run: RunDir, checkpoint: str | None) -> str:
    if checkpoint is None:
        path = run.latest()
        if path is None:
            raise ValueError(f"--run {run.root}: no checkpoint yet")
        return path
    if checkpoint == BEST:
        path = best_checkpoint(run.checkpoints)
        if path is None:
            raise ValueError(f"--checkpoint best: {run.root} has no best checkpoint: it has not been evaluated on its "
                             "held-out split since its first checkpoint, or was trained before mbm kept one; give "
                             "a step, or leave --checkpoint out for the latest")
        return path
    if checkpoint.isdigit():
        checkpoint = os.path.join(run.checkpoints, checkpoint_name(int(checkpoint)))
    if not os.path.isfile(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint}: no such checkpoint")
    return checkpoint


def evaluate_run(loaded: LoadedRun, split: str = "val", per_class: bool = False) -> dict[str, Any]:
    """The run's metrics on a split of its (or another) dataset; ``skipped``: the samples of the split left
    out, by reason (no label, a label the run does not know, ...), also said in a warning. ``per_class``
    (classify): each label's support, precision, recall and F1, as ``per_class`` (a list in the run's label
    order, each with its ``label``)."""
    if per_class and loaded.model.cfg.task != "classify":
        raise ValueError(f"--per-class: this run was trained for {loaded.model.cfg.task}; per-class metrics are "
                         "classify's")
    with loaded.stream(split) as stream:
        metrics = {"step": loaded.step, "split": split,
                   **evaluate(loaded.model, stream, loaded.device, classes=per_class)}
    if per_class:
        by_index = metrics.pop("per_class")
        metrics["per_class"] = [{"label": loaded.labels[c], **by_index[c]} for c in sorted(by_index)]
    skipped = dict(stream.skipped())
    if skipped:
        log.warning("evaluation left out %s", skip_reasons(skipped, loaded.model.cfg.input_modalities(),
                                                            loaded.model.cfg.task))
        metrics["skipped"] = skipped
    return metrics


def generate_run(loaded: LoadedRun, *, split: str = "val", limit: int = 5, beam: int = 1,
                 max_new: int | None = None) -> list[dict[str, str]]:
    """Generated text next to the reference text (empty where a sample has none: the samples to caption)
    for the first ``limit`` samples of a split ("all": every sample)."""
    with contextlib.closing(_generated(loaded, split, beam, max_new)) as rows:  # its workers stop at the limit
        return list(itertools.islice(rows, limit))


def _generated(loaded: LoadedRun, split: str, beam: int, max_new: int | None) -> Iterator[dict[str, str]]:
    """``id``, ``generated`` and ``reference`` of each sample of a split, in the stream's order; read to its
    end, what it could not use is said (``_said_what_was_left_out``)."""
    if loaded.model.cfg.task != "generate":
        raise ValueError(f"--run: this run was trained for {loaded.model.cfg.task}, not generate")
    longest = loaded.model.cfg.decoder.max_len - 1  # positions the decoder learned, less the BOS token
    if max_new is not None and max_new > longest:
        raise ValueError(f"--max-new-tokens {max_new}: the run's decoder writes at most {longest} tokens (its "
                         f"--max-target-len {longest + 1}, less the start token); leave it out, or give at most "
                         f"{longest}")
    tok = load_tokenizer(loaded.cfg.tokenizer)
    seen = 0
    with loaded.stream(split, decode_only=True) as stream:  # workers stopped however the caller stops reading
        for batch in stream:
            ids = loaded.model.generate(batch_to(batch, loaded.device), beam=beam, max_new=max_new)
            for sid, ref, gen in zip(batch["ids"], batch["texts"], ids, strict=True):
                yield {"id": sid, "generated": decode_ids(tok, gen), "reference": ref or ""}
                seen += 1
        _said_what_was_left_out(stream, seen, split, loaded, "generate")


def predict_run(loaded: LoadedRun, *, split: str = "all", top_k: int = 3, beam: int = 1,
                max_new: int | None = None) -> Iterator[dict[str, Any]]:
    """One row per sample of a split ("all": every sample), in the stream's order, samples without a label or
    reference text included: for classify ``id``, ``label`` (the sample's, where the run knows it; else None),
    ``predicted``, its ``probability`` and the ``top`` ``top_k`` labels with theirs; for generate ``id``,
    ``generated`` and ``reference``. A retrieve run's outputs are embeddings: ``embed_run``."""
    task = loaded.model.cfg.task
    if task == "retrieve":
        raise ValueError("a retrieve run predicts embeddings: give --output DIR, where they are written as .npy files")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if task == "generate":
        yield from _generated(loaded, split, beam, max_new)
        return
    k = min(top_k, len(loaded.labels))
    model = loaded.model.eval()
    seen = 0
    with loaded.stream(split, decode_only=True) as stream:
        for batch in stream:
            # grad mode off for the batch's forward pass only: a generator's ``with`` would stay open while the
            # caller holds a row, and switch autograd off in the caller's code too
            with torch.no_grad():
                with autocast(loaded.device):
                    logits = model(batch_to(batch, loaded.device))["logits"]
                probs, top = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
            for sid, truth, p_row, i_row in zip(batch["ids"], batch["labels"].tolist(), probs.tolist(),
                                                top.tolist(), strict=True):
                yield {"id": sid, "label": None if truth == IGNORE else loaded.labels[truth],
                       "predicted": loaded.labels[i_row[0]], "probability": p_row[0],
                       "top": [{"label": loaded.labels[i], "probability": q} for i, q in zip(i_row, p_row, strict=True)]}
                seen += 1
        _said_what_was_left_out(stream, seen, split, loaded, "predict")


def embed_run(loaded: LoadedRun, out_dir: str, *, split: str = "all") -> dict[str, Any]:
    """A retrieve run's unit embeddings of a split's samples ("all": every sample), for each modality of its
    pair the samples that have it: ``OUT/{modality}.npy`` (float32, one row a sample) and
    ``OUT/{modality}.ids.jsonl`` (their ids in row order, one JSON string a line), and ``OUT/embeddings.json``
    saying what they are. Returns that description."""
    cfg = loaded.model.cfg
    if cfg.task != "retrieve":
        raise ValueError(f"--output DIR holds a retrieve run's embeddings; this run was trained for {cfg.task}: leave "
                         "--output out, or give it a file, for its predictions")
    assert cfg.pair is not None
    stream = loaded.stream(split, decode_only=True)
    order = list(stream.cfg.collate.feature_dims)  # the columns of a batch's ``present``: the pair's modalities
    os.makedirs(out_dir, exist_ok=True)
    model = loaded.model.eval()
    seen = 0
    with contextlib.ExitStack() as files:
        files.enter_context(stream)
        # rows and ids go to temporary files as they come (memory stays one batch), made .npy at the end
        rows = {m: files.enter_context(_RowsFile(os.path.join(out_dir, f"{m}.npy"), cfg.embed_dim)) for m in cfg.pair}
        with torch.no_grad():
            for batch in stream:
                on_device = batch_to(batch, loaded.device)
                present = batch["present"]
                for m in cfg.pair:
                    has = present[:, order.index(m)]
                    if not bool(has.any()):
                        continue
                    with autocast(loaded.device):
                        z = model.unit_embeddings(on_device, m)
                    rows[m].add(z.float()[has.to(z.device)].cpu().numpy(),
                                [sid for sid, h in zip(batch["ids"], has.tolist(), strict=True) if h])
                seen += len(batch["ids"])
        _said_what_was_left_out(stream, seen, split, loaded, "predict")
        for m in cfg.pair:
            rows[m].finish(os.path.join(out_dir, f"{m}.ids.jsonl"))
    info = {"run": loaded.cfg.out, "step": loaded.step, "data": loaded.source.spec, "split": split,
            "pair": list(cfg.pair), "dim": cfg.embed_dim, "normalized": True,
            "counts": {m: rows[m].count for m in cfg.pair},
            "files": {m: {"embeddings": f"{m}.npy", "ids": f"{m}.ids.jsonl"} for m in cfg.pair}}
    replace_atomic(os.path.join(out_dir, "embeddings.json"),
                  lambda f: f.write((json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
    return info


def _said_what_was_left_out(stream: PassLoader, seen: int, split: str, loaded: LoadedRun, command: str) -> None:
    """Raise when a split, read to its end, gave no sample; else warn of what it held that ``command`` could
    not use."""
    task, reads = loaded.model.cfg.task, loaded.model.cfg.input_modalities()
    if not seen:
        raise ValueError(empty_split(task, stream.skipped(), split, reads, stream.cfg.split_by))
    skipped = dict(stream.skipped())
    if skipped:
        log.warning("%s left out %s", command, skip_reasons(skipped, reads, task))


class _RowsFile:
    """float32 rows of one width and their ids, written to temporary files as they come; ``finish`` makes them
    a ``.npy`` and a JSON-lines file of ids (ASCII: an id's other characters and lone surrogates escaped)."""

    def __init__(self, path: str, width: int) -> None:
        self.path, self.width, self.count = path, width, 0
        self._rows = open(f"{path}.rows.tmp-{os.getpid()}", "w+b")
        self._ids = open(f"{path}.ids.tmp-{os.getpid()}", "w+b")

    def add(self, rows: np.ndarray, ids: list[str]) -> None:
        assert rows.shape == (len(ids), self.width)
        self._rows.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self._ids.write("".join(json.dumps(i) + "\n" for i in ids).encode("ascii"))
        self.count += len(ids)

    def finish(self, ids_path: str) -> None:
        import shutil

        def write_npy(f: Any) -> None:
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.count, self.width)}
            np.lib.format.write_array_header_1_0(f, header)
            self._rows.seek(0)
            shutil.copyfileobj(self._rows, f, 1 << 20)

        def write_ids(f: Any) -> None:
            self._ids.seek(0)
            shutil.copyfileobj(self._ids, f, 1 << 20)

        replace_atomic(self.path, write_npy)
        replace_atomic(ids_path, write_ids)

    def __enter__(self) -> _RowsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in (self._rows, self._ids):
            f.close()
            with contextlib.suppress(OSError):
                os.remove(f.name)
