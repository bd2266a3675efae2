"""Held-out split chosen by a hash of the sample id: stable across runs, seeds and dataset versions; or
by the dataset's own split, where its samples name one."""

from __future__ import annotations

import hashlib
from typing import Any

from schemas import MODALITIES

SPLITS = ("train", "val")
EVAL_SPLITS = (*SPLITS, "all")  # what evaluate and generate read: a split, or every sample
# what a sample's split is chosen by: its id, one modality's content, or the split its metadata names
SPLIT_BY = ("id", *MODALITIES, "split")
# the dataset's own split names (a ``split`` metadata value: imagefolders' split folders, a manifest's column)
TRAIN_NAMES = frozenset({"train", "training"})
HELD_OUT = ("test", "testing", "validation", "valid", "val", "dev", "eval")
HELD_OUT_NAMES = frozenset(HELD_OUT)


def holdout_fraction(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample id."""
    digest = hashlib.sha1(b"mbm.split:" + sample_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(sample_id: str, val_fraction: float) -> str:
    """``"val"`` when the id's hash falls below ``val_fraction``, else ``"train"``."""
    return "val" if holdout_fraction(sample_id) < val_fraction else "train"


def split_key(doc: dict[str, Any], split_by: str = "id") -> str:
    """What chooses a sample's split: its id, or with ``split_by`` a modality, the content hash of that
    modality, so samples sharing an image (COCO's five captions of one picture) all fall in the same split
    and none of them is held out while another trains; a sample without the modality goes by its id."""
    if split_by != "id":
        hashes = doc.get("modality_hashes")
        if isinstance(hashes, dict) and isinstance(digest := hashes.get(split_by), str) and digest:
            return f"{split_by}:{digest}"
    return doc["id"]


def named_split(doc: dict[str, Any]) -> str | None:
    """``"train"`` or ``"val"`` for a sample whose metadata names its split (``train/``, ``test/`` folders of
    an imagefolder, a manifest's ``split`` column): train and training train; test, validation, val, dev
    and eval are held out. None for a sample without one, or with another name."""
    meta = doc.get("meta")
    value = meta.get("split") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    return "train" if name in TRAIN_NAMES else "val" if name in HELD_OUT_NAMES else None


def sample_split(doc: dict[str, Any], val_fraction: float, split_by: str = "id") -> str:
    """``"train"`` or ``"val"`` for a sample's json doc: with ``split_by="split"`` the split its metadata
    names, else (and for a sample that names none) a hash of ``split_key``."""
    if split_by == "split" and (named := named_split(doc)) is not None:
        return named
    return split_of(split_key(doc, split_by), val_fraction)


def empty_under_split(split: str) -> str:
    """Why ``split`` ("train" or "val") holds no sample under ``--split-by split`` (none skipped), and what to
    change: a larger --val-fraction does not move samples that name their split."""
    if split == "train":
        return ("every sample names a held-out split (" + ", ".join(HELD_OUT) + ") in its metadata, and "
                "--split-by split holds those out, so none is left to train on; give --split-by id (or text, "
                "image, audio) to split the samples by hash, or add samples of the train split")
    return ("no sample names a held-out split (" + ", ".join(HELD_OUT) + ") in its metadata, and --split-by "
            "split holds out only those (and a --val-fraction of the samples naming no split); give --split-by "
            "id (or text, image, audio) to hold out a --val-fraction of the samples by hash")
