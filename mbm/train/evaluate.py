"""Held-out evaluation: loss and the task's metric over one pass of a split."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mbm.data.collate import IGNORE, batch_to
from mbm.data.errors import skip_reasons
from mbm.data.split import empty_under_split
from mbm.model.heads import chance_at_k, recall_at_k
from mbm.model.model import MultimodalModel

log = logging.getLogger(__name__)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def empty_split(task: str, skipped: dict[str, int], split: str = "val", reads: Iterable[str] = (),
                split_by: str = "id") -> str:
    """Why a pass over ``split`` found nothing to evaluate, from what the stream skipped (``reads``: the
    modalities the model reads) and what chose the split (``split_by``)."""
    name = "the held-out split" if split == "val" else f"the {split} split"
    if skipped:
        return f"{name} has no sample the {task} task can use: skipped {skip_reasons(skipped, reads, task)}"
    if split_by == "split" and split != "all":
        return f"{name} is empty: {empty_under_split(split)}"
    advice = "train with a larger --val-fraction, or check" if split == "val" else "check"
    return f"{name} is empty: no readable sample falls in it; {advice} that the dataset's shards exist and hold samples"


TOP_K = 5  # classify over more labels than this also reports top5_accuracy


def class_balanced(truth: Counter[int], predicted: Counter[int], right: Counter[int]) -> dict[str, float]:
    """What accuracy hides on classes of very different sizes: ``balanced_accuracy``, the mean over the
    split's classes of the share of each one's samples predicted right (its recall; a model that always says
    the majority class gets 1 / classes), and ``macro_f1``, the mean F1 over the classes that are a sample's
    label or a prediction (as scikit-learn's ``f1_score(average="macro")``). From samples per true class,
    predictions per class and right predictions per class."""
    recall = [right[c] / n for c, n in truth.items()]
    f1 = [2 * right[c] / (truth[c] + predicted[c]) for c in set(truth) | set(predicted)]
    return {"balanced_accuracy": sum(recall) / len(recall), "macro_f1": sum(f1) / len(f1)}


def per_class(truth: Counter[int], predicted: Counter[int], right: Counter[int]) -> dict[int, dict[str, float]]:
    """For each class that is a sample's label or a prediction: its samples (``support``), ``precision``,
    ``recall`` and ``f1`` (0 where undefined: a class never predicted has precision 0, as scikit-learn's
    ``zero_division=0``)."""
    out = {}
    for c in sorted(set(truth) | set(predicted)):
        out[c] = {"support": truth[c], "precision": right[c] / predicted[c] if predicted[c] else 0.0,
                  "recall": right[c] / truth[c] if truth[c] else 0.0,
                  "f1": 2 * right[c] / (truth[c] + predicted[c])}
    return out


@dataclass
class Tally:
    """The sums a pass over a split leaves, from which its metrics follow; tallies of disjoint shares of a
    split add up to the tally of the whole (``merged``)."""

    loss_sum: float = 0.0
    weight: int = 0  # samples (classify, retrieve) or target tokens (generate) the loss is averaged over
    alone: tuple[float, int] = (0.0, 0)  # retrieve: (loss sum, samples) of batches of one sample, whose loss is 0
    correct: int = 0
    correct_top: int = 0  # classify with more than TOP_K labels: samples whose label is among the TOP_K likeliest
    truth: Counter[int] = field(default_factory=Counter)  # classify: samples per true class,
    predicted: Counter[int] = field(default_factory=Counter)  # predictions per class
    right: Counter[int] = field(default_factory=Counter)  # and right predictions per class
    za: list[torch.Tensor] = field(default_factory=list)  # retrieve: unit embeddings of both sides, batch by batch
    zb: list[torch.Tensor] = field(default_factory=list)
    contents: dict[str, list[bytes]] = field(default_factory=dict)  # retrieve: each sample's content digest per side
    # the corrupt arrays this share's reader found, by reason (gathered ranks: the stream's other skips every
    # rank sees alike, and ``evaluate`` counts them once)
    skipped: Counter[str] = field(default_factory=Counter)

    def portable(self) -> Tally:
        """This tally with its embeddings joined and on the CPU, to send to other ranks."""
        za, zb = ([torch.cat(z).cpu()] if z else [] for z in (self.za, self.zb))
        return replace(self, za=za, zb=zb)


def merged(tallies: list[Tally]) -> Tally:
    """One tally of the shares of a split that ``tallies`` counted, in their order."""
    out = Tally(contents={m: [] for m in tallies[0].contents})
    for t in tallies:
        out.loss_sum += t.loss_sum
        out.weight += t.weight
        out.alone = out.alone[0] + t.alone[0], out.alone[1] + t.alone[1]
        out.correct += t.correct
        out.correct_top += t.correct_top
        for mine, theirs in ((out.truth, t.truth), (out.predicted, t.predicted), (out.right, t.right)):
            mine.update(theirs)
        out.za += t.za
        out.zb += t.zb
        for m, keys in t.contents.items():
            out.contents[m] += keys
    return out


@torch.no_grad()
def tally(model: MultimodalModel, batches: Iterable[dict[str, Any]], device: torch.device) -> Tally:
    """One pass of ``model`` over ``batches``: the sums its metrics follow from."""
    was_training = model.training
    model.eval()
    task = model.cfg.task
    t = Tally(contents={m: [] for m in (model.cfg.pair or ())})
    for batch in batches:
        if task == "retrieve":
            for m, keys in t.contents.items():
                keys += content_keys(batch, m)
        batch = batch_to(batch, device)
        with autocast(device):
            out = model(batch)
        if task == "classify":
            labels = batch["labels"]
            kept = labels != IGNORE
            n = int(kept.sum())
            truth, guess = labels[kept], out["logits"].argmax(-1)[kept]
            t.correct += int((guess == truth).sum())
            if model.cfg.num_labels > TOP_K:
                top = out["logits"][kept].topk(TOP_K, dim=-1).indices
                t.correct_top += int((top == truth[:, None]).any(-1).sum())
            t.truth.update(truth.tolist())
            t.predicted.update(guess.tolist())
            t.right.update(truth[guess == truth].tolist())
        elif task == "retrieve":
            n = len(batch["ids"])
            t.za.append(out["za"].float())
            t.zb.append(out["zb"].float())
            if n == 1:  # no other sample to tell it from: its loss is 0 whatever the model (a split's last batch)
                t.alone = t.alone[0] + float(out["loss"]), t.alone[1] + 1
                continue
        else:
            n = int(batch["target_mask"][:, 1:].sum())
        t.loss_sum += float(out["loss"]) * n
        t.weight += n
    model.train(was_training)
    return t


def evaluate(model: MultimodalModel, batches: Iterable[dict[str, Any]], device: torch.device,
             classes: bool = False, gather: Callable[[Any], list[Any]] | None = None) -> dict[str, Any]:
    """{"loss", "samples", and accuracy/balanced_accuracy/macro_f1/majority_rate, top5_accuracy over more than
    five labels (classify), recall@k/chance@5 (retrieve)}.

    ``batches`` may be a ``ShardStream`` or a ``PassLoader``: when nothing usable comes out, its skip counts say
    why. ``classes`` (classify): also ``per_class``, each class's support, precision, recall and F1 by label
    index. ``gather`` (ranks that each read a share of the split: ``DistEnv.gather``): every rank's tally, so
    that each gets the metrics of the whole split."""
    t = tally(model, batches, device)
    skipped = Counter(getattr(batches, "skipped", dict)())
    if gather is not None:
        # what the stream left out every rank saw alike (each scans every sample); corrupt arrays only the
        # rank that decoded them
        decoded = Counter(getattr(batches, "decode_skipped", dict)())
        t = replace(t.portable(), skipped=decoded)
        tallies = gather(t)
        t = merged(tallies)
        skipped = (skipped - decoded) + sum((x.skipped for x in tallies), Counter())
    task = model.cfg.task
    loss_sum, weight = t.loss_sum, t.weight
    if weight == 0 and t.alone[1]:  # a split of one sample: nothing better to report
        loss_sum, weight = t.alone
    skipped = dict(sorted(skipped.items()))
    if weight == 0:
        cfg = getattr(batches, "cfg", None)
        raise ValueError(empty_split(task, skipped, getattr(cfg, "split", "val"), model.cfg.input_modalities(),
                                     getattr(cfg, "split_by", "id")))
    if skipped:
        log.info("evaluation left out %s", skip_reasons(skipped, model.cfg.input_modalities(), task))
    metrics = {"loss": loss_sum / weight}
    if task == "classify":
        metrics.update(accuracy=t.correct / weight, **class_balanced(t.truth, t.predicted, t.right),
                       majority_rate=max(t.truth.values()) / weight, samples=weight)
        if model.cfg.num_labels > TOP_K:
            metrics[f"top{TOP_K}_accuracy"] = t.correct_top / weight
        if classes:  # by label index
            metrics["per_class"] = per_class(t.truth, t.predicted, t.right)
    elif task == "retrieve":
        a, b = torch.cat([z.to(device) for z in t.za]), torch.cat([z.to(device) for z in t.zb])
        groups = tuple(group_ids(keys) for keys in t.contents.values())
        metrics.update(recall_at_k(a, b, groups=groups), samples=len(a))
        metrics["chance@5"] = chance_at_k(5, groups)  # a picture's other captions count as matches here too
    else:
        metrics.update(tokens=weight)
    return metrics


def content_keys(batch: dict[str, Any], modality: str) -> list[bytes]:
    """A digest of each sample's input features of ``modality`` (before the batch moves to a device): mbm
    writes bit-identical features for identical media, so samples sharing a picture, a clip or a caption
    have equal digests."""
    feats, masks = batch["features"][modality].cpu(), batch["masks"][modality].cpu()
    return [hashlib.blake2b(feats[i][masks[i]].numpy().tobytes(), digest_size=16).digest() for i in range(len(feats))]


def group_ids(keys: list[bytes]) -> torch.Tensor:
    """Equal keys → equal ids, numbered in order of first appearance."""
    ids: dict[bytes, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)
