"""The training loop: streaming batches → model → AdamW, with evaluation, metrics, checkpoints and DDP."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mbm.alloc import tune_malloc
from mbm.data.collate import batch_to
from mbm.data.feed import feed_from_env
from mbm.data.loader import PassLoader, StreamLoader
from mbm.data.source import pinned, resolve_data
from mbm.data.stream import ShardStream
from mbm.lock import FolderLock, FolderLockedError
from mbm.model.model import MultimodalModel
from mbm.resources import usable_cores
from mbm.train.build import (
    balanced_weights,
    common_pair,
    label_counts,
    model_config,
    resolved_split_by,
    stream_config,
)
from mbm.train.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    point_best,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mbm.train.config import TrainConfig
from mbm.train.distributed import AnyRank, DistEnv, init_distributed
from mbm.train.evaluate import TOP_K, autocast, evaluate
from mbm.train.plot import plot_metrics
from mbm.train.run import RunDir, append_jsonl, read_jsonl, truncate_jsonl
from mbm.train.schedule import warmup_cosine
from schemas.manifest import listed_splits

log = logging.getLogger(__name__)


class TrainingStopped(KeyboardInterrupt):
    """``fit`` stopped at the end of step ``step`` because ``request_stop`` asked it to (SIGTERM: a
    preemption, a scheduler's time limit, a pod's eviction), after checkpointing that step."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint


class _StopRequest:
    """Whether a training loop runs in this process, and whether it was asked to stop."""

    def __init__(self) -> None:
        self.loop_running = False
        self.asked = False


_STOP = _StopRequest()


def request_stop() -> bool:
    """Ask the training loop running in this process to checkpoint the step it is in, then stop with
    ``TrainingStopped``; safe to call from a signal handler. False when no loop runs (starting up, or
    done): the caller stops the process its own way."""
    if not _STOP.loop_running:
        return False
    _STOP.asked = True
    return True


def adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases, norms and the retrieval temperature do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    # On a GPU one fused kernel updates every parameter: the default (foreach) launches several per
    # group, and a small model's step is bound by kernel launches on the host.
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The checkpoint's moments and step counts under this run's lr and weight decay: its param groups
    hold the ones the run had, and a resume may change them (the lr schedule is rebuilt from them).
    The implementation is this run's too: a checkpoint written on the CPU and resumed on a GPU runs the
    fused AdamW (``load_state_dict`` takes ``fused`` from the saved groups, and moves the step counts to
    the device only for a fused group)."""
    settings = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    state = {**state, "param_groups": [{**saved, "fused": current.get("fused")} for saved, current
                                       in zip(state["param_groups"], optimizer.param_groups, strict=True)]}
    optimizer.load_state_dict(state)
    for group, current in zip(optimizer.param_groups, settings, strict=True):
        group.update(current)


MAX_AUTO_WORKERS = 8


def loader_workers(requested: int | None, device: torch.device) -> int:
    """``--workers``, or when it is not given: 0 on the CPU, where the training step already uses every
    core (2.6 % data overhead against 2.9 % with 2 workers on 2 cores, docs/benchmarks.md); on a GPU, where
    the training process must stay free to feed it, this rank's share of the cores (``LOCAL_WORLD_SIZE``
    ranks on the machine) less one for the training process, from 1 to ``MAX_AUTO_WORKERS``."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, usable_cores() // ranks_here() - 1))


def ranks_here() -> int:
    """Ranks of this run on this machine (``LOCAL_WORLD_SIZE``, as torchrun sets it; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cpu_threads() -> int | None:
    """torch threads for a CPU rank: its share of the cores this process may use (``mbm.resources``: CPU
    affinity and cgroup quota) when that is fewer than torch's own default, which counts the machine's
    cores (a 2-CPU container on a 64-core host would run 32 threads in a quota of 2); None to keep
    torch's. ``OMP_NUM_THREADS``, when set, is the user's choice and is kept."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    share = max(1, usable_cores() // ranks_here())
    return share if share < torch.get_num_threads() else None


# What _state() writes. The lr schedule is rebuilt at the step (older checkpoints also hold a "scheduler").
RESUME_KEYS = frozenset({"step", "model", "optimizer", "data", "rng"})


class Trainer:
    """One run: ``Trainer(cfg, env).fit()``; rank 0 writes the run folder."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, *, progress: bool | None = None) -> None:
        self._fitting = False  # fit is running: held-out workers stay between evaluations
        self.env, self.progress, self.run = env, progress, RunDir(cfg.out)
        # MBM_LOADER_FEED=registered: batches go to the GPU straight from the workers' segments (mbm.data.feed)
        feed = feed_from_env(os.environ.get("MBM_LOADER_FEED"))
        # Every step allocates and frees tens of MB of activations (and a batch buffer): keep them in
        # the heap rather than fault fresh pages in each step (5-7 % faster CPU steps, docs/benchmarks.md).
        tune_malloc()
        resume_from, resume_state = self._resume_point() if cfg.resume else (None, None)
        if not cfg.resume and self.run.has_checkpoints():
            raise ValueError(f"--out {cfg.out} already holds a run; pass --resume to continue it or pick another --out")
        if cfg.resume and resume_from is None:
            log.warning("--resume: no checkpoint in %s yet, starting from step 0", cfg.out)
        self.source = resolve_data(cfg.data)
        self.source.hold()  # mbm gc keeps the version while the run reads it
        if (data := pinned(cfg.data, self.source.version, self.source.shards)) != cfg.data:
            # The run trains on this version from start to end (a resume included), whatever
            # `mbm preprocess` adds to the folder meanwhile; the config records it pinned.
            log.info("--data %s: training on %s", cfg.data, data)
            cfg = replace(cfg, data=data)
        if cfg.task == "retrieve" and not cfg.pair:
            cfg = replace(cfg, pair=common_pair(self.source))
        cfg = replace(cfg, split_by=resolved_split_by(cfg))  # the config records what auto chose
        self.cfg = cfg
        self.labels = (self.run.read_labels() if resume_from else None) or list(self.source.labels)
        torch.manual_seed(cfg.seed)
        if cfg.best_metric == f"top{TOP_K}_accuracy" and len(self.labels) <= TOP_K:
            raise ValueError(f"--best-by {cfg.best_metric}: the dataset has {len(self.labels)} labels, and with "
                             f"{TOP_K} or fewer every label is among the top {TOP_K}; give --best-by accuracy")
        weights = None
        if cfg.class_weights == "balanced":
            counts = label_counts(cfg, self.source, self.labels)
            weights = balanced_weights(counts)
            if env.is_main:
                log.info("--class-weights balanced: training samples per label %s; loss weights %s",
                         dict(zip(map(str, self.labels), counts, strict=True)),
                         dict(zip(map(str, self.labels), weights, strict=True)))
        self.model = MultimodalModel(model_config(cfg, self.source, self.labels, weights)).to(env.device)
        dims = {m: self.source.feature_dims[m] for m in self.model.cfg.input_modalities()}
        self.train_stream = stream_config(cfg, self.source, self.labels, dims, "train", train=True)
        self.val_stream = stream_config(cfg, self.source, self.labels, dims, "val", train=False)
        if self.val_stream.test_apart and env.is_main:
            log.info("--split-by split: the dataset names a validation and a test split (samples: %s); evaluating "
                     "on the validation split, the test split kept apart (mbm evaluate --split test)",
                     listed_splits(self.source.splits))
        # Retrieval never reads the third modality and generate never reads text: their embeddings take no
        # part in a step, which DDP must look for (a walk over the autograd graph at every step). Classify
        # reads every modality at every step, a batch without one included (one masked padding step of it).
        ids = [env.device.index] if env.device.type == "cuda" else None
        self.ddp = (DDP(self.model, device_ids=ids, find_unused_parameters=cfg.task != "classify")
                    if env.distributed else self.model)
        self.optimizer = adamw(self.model, cfg)
        workers = loader_workers(cfg.workers, env.device)
        cuda = env.device.type == "cuda"
        registered = feed == "registered" and cuda
        self.loader = StreamLoader(ShardStream(self.train_stream, rank=env.rank, world=env.world), workers=workers,
                                   pin_memory=cuda, feed_device=env.device if registered else None)
        # held-out passes, each rank reading its share of the split, by as many workers of their own, which
        # stay between evaluations: on a GPU a pass read in the training process would leave it waiting
        self.val_loader = PassLoader(ShardStream(self.val_stream, rank=env.rank, world=env.world), workers=workers,
                                     pin_memory=cuda)
        cores = usable_cores()
        threads = cpu_threads() if env.device.type == "cpu" else None
        if threads is not None:
            log.info("training on the CPU with %d torch threads: this rank's share of the %d cores it may use",
                     threads, cores)
            torch.set_num_threads(threads)
        if env.device.type == "cpu" and workers and torch.get_num_threads() + workers > cores:
            # Measured on 2 cores: data overhead 2.9 % of a step with 2 workers, 2.6 % with --workers 0
            # (4.2 % and 1.7 % before the workers remembered their scans; docs/benchmarks.md).
            log.info("--workers %d: training on the CPU with %d torch threads on %d cores, loader workers "
                     "take cores from every step; --workers 0 may be as fast here", workers,
                     torch.get_num_threads(), cores)
        elif cfg.workers is None and workers:
            log.info("%d data-loader workers per rank (--workers sets another number)", workers)
        self.step = 0
        self._unlogged: list[float] = []  # this rank's losses since the last train record
        self.training = False  # whether a step was taken (a failure before one is a refused start)
        if resume_from:
            self._restore(resume_state)
            log.info("resumed %s at step %d (data %s)", resume_from, self.step, self.loader.state_dict())
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.horizon, cfg.min_lr_ratio,
                                       done=self.step)
        if env.is_main:
            self.run.write_config(cfg)
            self.run.write_labels(self.labels)
            for path in (self.run.metrics, *(self.run.samples_log(r) for r in range(env.world))):
                # from a checkpoint: what came after it is redone; from nothing: everything is
                truncate_jsonl(path, self.step if resume_from else -1)
            if os.path.isfile(self.run.plot):  # drawn from records cut back just now (a run killed after them)
                if resume_from:
                    plot_metrics(read_jsonl(self.run.metrics), self.run.plot)
                else:
                    os.remove(self.run.plot)
            self.best, self.stale = self._best_so_far()
            point_best(self.run.checkpoints, self.best[0] if self.best else None)
        env.barrier()
        # every rank compares its evaluations (the same on each) with rank 0's best
        self.best, self.stale = env.gather((self.best, self.stale) if env.is_main else None)[0]

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume_point(self) -> tuple[str | None, dict[str, Any] | None]:
        """The newest checkpoint that loads; one that does not (cut short by a full disk, a bad copy)
        is reported and the one before it is used."""
        for path in self.run.candidates():
            try:
                state = load_checkpoint(path)
                missing = sorted(RESUME_KEYS - set(state))
                if missing:
                    raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}; is it a training checkpoint?")
                return path, state
            except ValueError as e:
                log.warning("--resume: %s; trying the checkpoint before it", e)
        if self.run.has_checkpoints():
            raise ValueError(f"--resume: no checkpoint in {self.run.checkpoints} can be read")
        return None, None

    def _state(self) -> dict[str, Any]:
        rngs = self.env.gather(rng_state())  # per rank: dropout draws differ with each rank's batches
        data = self.env.gather(self.loader.state_dict())  # per rank: one that dropped a batch is ahead of the others
        # per rank: the losses of the steps since the last train record, which the next one's loss_avg includes
        unlogged = self.env.gather(list(self._unlogged))
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "data": data, "rng": rngs, "world_size": self.env.world, "model_config": self.model.cfg.to_dict(),
                "labels": self.labels, "unlogged_losses": unlogged,
                "config": json.loads(self.cfg.to_json())}  # plain values: what a run folder without config.json goes by

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exn:
            raise ValueError(f"--resume: the checkpoint does not fit the model these settings and this --data "
                             f"build (changed --d-model/--layers/--fusion or feature dims?): {exn}") from exn
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.loader.load_state_dict(self._loader_state(state["data"]))
        set_rng_state(state["rng"][self.env.rank])
        self.step = int(state["step"])
        unlogged = state.get("unlogged_losses")  # older checkpoints: none
        if isinstance(unlogged, list) and len(unlogged) == self.env.world:
            self._unlogged = [float(v) for v in unlogged[self.env.rank]]

    def _loader_state(self, data: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's loader state; older checkpoints hold rank 0's alone. From another world size, rank 0's
        (its ``world_size`` makes ``load_state_dict`` refuse it, naming the change)."""
        if isinstance(data, dict):
            if self.env.world > 1 and self.env.is_main:
                log.warning("the checkpoint holds rank 0's data position only (written before each rank's was "
                            "saved): every rank resumes there, which repeats or skips batches on a rank that "
                            "had dropped a different number of all-corrupt batches")
            return data
        return data[self.env.rank] if len(data) == self.env.world else data[0]

    def save(self, best: bool = False) -> None:
        state = self._state()
        if self.env.is_main:
            save_checkpoint(self.run.checkpoints, self.step, state, self.cfg.keep_checkpoints, best=best)
        self.env.barrier()

    # -- the best checkpoint ----------------------------------------------------------------------
    def _best_so_far(self) -> tuple[tuple[int, float, tuple[float, ...]] | None, int]:
        """(step, value, score) of the best held-out evaluation up to this step whose checkpoint is still there,
        from the run's metrics (a resumed run goes on comparing with it; one resumed from an older checkpoint
        than the newest forgets what came after it), and how many evaluations came after it (``--patience``)."""
        kept = set(list_checkpoints(self.run.checkpoints))
        best, evaluated = None, []
        for r in read_jsonl(self.run.metrics):
            if r.get("split") != "val" or not 0 < r.get("step", 0) <= self.step:
                continue
            evaluated.append(r["step"])
            score = self._score(r)
            if r["step"] in kept and score is not None and (best is None or score > best[2]):
                best = (r["step"], float(r[self.cfg.best_metric]), score)
        return best, sum(step > best[0] for step in evaluated) if best else 0

    def _score(self, record: dict[str, Any]) -> tuple[float, ...] | None:
        """How good a held-out evaluation is by ``--best-by``, higher better: the metric (the loss negated),
        then for a metric other than the loss, the lower loss (a tie in accuracy goes to the surer model);
        None without a finite value."""
        value, loss = record.get(self.cfg.best_metric), record.get("loss")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        if self.cfg.best_metric == "loss":
            return (-float(value),)
        return (float(value), -float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else -math.inf)

    def _patience_spent(self) -> bool:
        return self.cfg.patience is not None and self.best is not None and self.stale >= self.cfg.patience

    def _stopped_early(self) -> str:
        assert self.best is not None
        return (f"no held-out {self.cfg.best_metric} better than step {self.best[0]}'s {self.best[1]:.4g} in "
                f"{self.stale} evaluation(s) (--patience {self.cfg.patience})")

    def _improves(self, record: dict[str, Any]) -> bool:
        """Whether this held-out evaluation is the run's best so far (``--best-by``); every rank agrees."""
        score = self._score(record)
        better = score is not None and (self.best is None or score > self.best[2])
        return self.env.mean(1.0 if better else 0.0) > 0 if self.env.distributed else better

    # -- steps ------------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, list[str]]:
        """One optimizer step over ``accum_steps`` batches; returns the mean loss (a 0-d tensor on the
        device, so that the step does not wait for the device) and the sample ids."""
        self.ddp.train()
        total: torch.Tensor | None = None
        ids: list[str] = []
        for i in range(self.cfg.accum_steps):
            batch = batch_to(next(batches), self.env.device)
            ids.extend(batch["ids"])
            last = i == self.cfg.accum_steps - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.ddp.no_sync()
            with sync:
                with autocast(self.env.device):
                    loss = self.ddp(batch)["loss"] / self.cfg.accum_steps
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        assert total is not None  # accum_steps >= 1
        return total, ids

    def _checked_loss(self, step: int, loss: torch.Tensor) -> float:
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(self._diverged(f"the training loss is {value} at step {step}"))
        return value

    def _diverged(self, what: str) -> str:
        return (f"{what}: training diverged. Lower --lr (now {self.cfg.lr:g}), raise --warmup-steps or keep "
                "--grad-clip on, and start again with another --out (this run's latest checkpoint may already hold "
                "the diverged weights)")

    def _check_weights(self) -> None:
        """Before a checkpoint: the last step's loss was computed before its update, which may have made the
        weights NaN or infinite (a huge --lr); no later loss shows it when that step is the run's last."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise ValueError(self._diverged(f"the weights are NaN or infinite at step {self.step}"))

    def validate(self) -> dict[str, float]:
        """Each rank evaluates its share of the held-out split, and every rank gets the metrics of the whole
        split from all ranks' sums. The pass's loader workers stay for the next evaluation while ``fit`` runs;
        called on its own, its workers stop when it returns."""
        try:
            return evaluate(self.model, self.val_loader, self.env.device,
                            gather=self.env.gather if self.env.distributed else None)
        finally:
            if not self._fitting:
                self.val_loader.close()

    def close(self) -> None:
        """Stop the held-out loader's workers, which stay between passes (the training loader's stop with the
        iterator of its batches). ``fit`` calls it as it returns; a later evaluation starts new ones."""
        self.val_loader.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            append_jsonl(self.run.metrics, record)

    def fit(self) -> dict[str, Any]:
        """Train until ``--steps`` (or ``--stop-at``, or ``--patience`` spent); returns the last train and val
        records, then ``stopped_early`` (step, why) where patience ended the run, and ``best`` (the best held-out
        evaluation's step, metric value and checkpoint)."""
        cfg, env = self.cfg, self.env
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        if self.step >= end:
            log.warning("the run is already at step %d (--steps %d%s): nothing to train; raise --steps to go on",
                        self.step, cfg.steps, f", --stop-at {cfg.stop_at}" if cfg.stop_at else "")
            return {}
        if self._patience_spent():
            log.warning("the run stopped early at step %d: %s; raise --patience, or leave it out, to go on",
                        self.step, self._stopped_early())
            return {}
        batches = iter(self.loader)
        last: dict[str, Any] = {}
        bar = tqdm(total=end, initial=self.step, disable=True if not env.is_main or self.progress is False else None,
                   unit="step", dynamic_ncols=True)
        self._fitting = True
        try:
            if self.step == 0 and end > 0:  # the untrained baseline, so every curve has its starting point
                self._log({"step": 0, "split": "val", **self.validate()})
            t0, seen, losses = time.perf_counter(), 0, self._unlogged
            pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not read yet
            _STOP.loop_running, _STOP.asked = True, False
            stop_asked = AnyRank(env)
            while self.step < end:
                loss_t, ids = self.train_step(batches)
                self.training = True  # a step was taken: a failure now is no refused start, the folder stays
                pending.append((self.step, loss_t))
                logs = self.step % cfg.log_every == 0 or self.step in (1, cfg.steps)
                evals = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                # Asked to stop (SIGTERM): every rank agrees at the same step (a step after the ask), and
                # that step is checkpointed.
                stop = stop_asked(_STOP.asked)
                saves = self.step % cfg.checkpoint_interval == 0 or self.step == end or stop
                # A step's loss is read once the next step is queued (the device has finished it meanwhile),
                # so the host never waits for the device between steps; all of them before a log, an
                # evaluation or a checkpoint, so a diverged run never saves its weights.
                ready, pending = (pending, []) if logs or evals or saves else (pending[:-1], pending[-1:])
                for step, value in ready:
                    losses.append(self._checked_loss(step, value))
                seen += len(ids)
                if cfg.log_samples:
                    append_jsonl(self.run.samples_log(env.rank), {"step": self.step, "epoch": self.loader.epoch,
                                                                  "ids": ids})
                if logs:
                    rate = env.mean(seen / max(time.perf_counter() - t0, 1e-9)) * env.world
                    last["train"] = {"step": self.step, "split": "train", "loss": env.mean(losses[-1]),
                                     "loss_avg": env.mean(sum(losses) / len(losses)),
                                     "lr": self.scheduler.get_last_lr()[0], "samples_per_s": round(rate, 2),
                                     "epoch": self.loader.epoch, "skipped": self.loader.skipped}
                    self._log(last["train"])
                    bar.set_postfix(loss=f"{last['train']['loss']:.4f}", samples_s=f"{rate:.0f}")
                    t0, seen = time.perf_counter(), 0
                    losses.clear()
                if evals:
                    last["val"] = {"step": self.step, "split": "val", **self.validate()}
                    if not math.isfinite(last["val"]["loss"]):
                        raise ValueError(self._diverged(f"the held-out loss is {last['val']['loss']} at step {self.step}"))
                    self._log(last["val"])
                    if env.is_main:
                        plot_metrics(read_jsonl(self.run.metrics), self.run.plot)
                best = evals and self._improves(last["val"])
                if best:
                    self.stale = 0
                elif evals and self.best is not None:
                    self.stale += 1
                early = evals and self._patience_spent()
                if saves or best or early:
                    self._check_weights()
                    self.save(best=best)
                if best and (score := self._score(last["val"])) is not None:
                    self.best = (self.step, float(last["val"][cfg.best_metric]), score)
                if early:
                    if env.is_main:
                        log.info("stopping early at step %d of %d: %s", self.step, end, self._stopped_early())
                    last["stopped_early"] = {"step": self.step, "of": end, "why": self._stopped_early()}
                    bar.update(1)
                    break
                bar.update(1)
                if stop:
                    stop_asked.finish()
                    bar.close()
                    raise TrainingStopped(self.step, self.run.latest())
            stop_asked.finish()  # every rank posted as many: none is left in flight
            bar.close()
            if self.best is not None:
                path = os.path.join(self.run.checkpoints, checkpoint_name(self.best[0]))
                if env.is_main:
                    log.info("best held-out %s: %.4g at step %d, %s (mbm evaluate --checkpoint best)",
                             cfg.best_metric, self.best[1], self.best[0], path)
                # what `mbm train` prints last: the run's best evaluation and where its checkpoint is
                last["best"] = {"step": self.best[0], "best_by": cfg.best_metric, "value": self.best[1],
                                "checkpoint": path}
            return last
        finally:
            _STOP.loop_running = False
            self._fitting = False
            self.close()


def train(cfg: TrainConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured, alone or as one rank under torchrun."""
    env = init_distributed(cfg.device)
    fresh = not os.path.exists(cfg.out)
    # the folders above --out that this run creates (nest/x for --out nest/x/run), removed with it
    absent = []
    for folder in map(str, Path(os.path.abspath(cfg.out)).parents):
        if os.path.exists(folder):
            break
        absent.append(folder)
    trainer: Trainer | None = None
    try:
        # One training per run folder: rank 0 holds the lock (a second job's checkpoints and metrics
        # would interleave with this one's); the OS releases it when the process ends, however it ends.
        held = contextlib.ExitStack()
        if env.is_main:
            try:
                held.enter_context(FolderLock(cfg.out))
            except OSError as e:  # a read-only file system, a folder of another user's
                raise ValueError(f"--out {cfg.out} cannot be created or locked ({e}); give --out a folder this "
                                 "user can write") from None
        with held:
            if env.is_main:
                for path in RunDir(cfg.out).remove_partial_files():
                    log.warning("removed %s, left half-written by a run that was killed", path)
            trainer = Trainer(cfg, env, progress=progress)
            return trainer.fit()
    except FolderLockedError as e:
        raise ValueError(f"--out {cfg.out}: {e}") from None
    except Exception as e:
        # A new run refused before its first step (bad data, a setting; its config and labels may be
        # written) has nothing to keep: its folder goes, so that the fixed command, --resume included,
        # starts afresh. One that failed later (diverged, out of memory) keeps its metrics; a folder left
        # holding only the lock goes.
        if fresh and env.is_main and os.path.isdir(cfg.out):
            refused = (isinstance(e, ValueError) and not (trainer is not None and trainer.training)
                       and not RunDir(cfg.out).has_checkpoints())
            if refused or set(os.listdir(cfg.out)) <= {".lock"}:
                shutil.rmtree(cfg.out, ignore_errors=True)
                for folder in absent:  # innermost first; one that something else wrote into stays
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)
        raise
    finally:
        env.close()
