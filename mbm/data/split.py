"""Held-out split chosen by a hash of the sample id: stable across runs, seeds and dataset versions."""

from __future__ import annotations

import hashlib
from typing import Any

from schemas import MODALITIES

SPLITS = ("train", "val")
EVAL_SPLITS = (*SPLITS, "all")  # what evaluate and generate read: a split, or every sample
SPLIT_BY = ("id", *MODALITIES)  # what a sample's split is chosen by: its id, or one modality's content


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
