"""Held-out split chosen by a hash of the sample id: stable across runs, seeds and dataset versions."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val")
EVAL_SPLITS = (*SPLITS, "all")  # what evaluate and generate read: a split, or every sample


def holdout_fraction(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample id."""
    digest = hashlib.sha1(b"mbm.split:" + sample_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(sample_id: str, val_fraction: float) -> str:
    """``"val"`` when the id's hash falls below ``val_fraction``, else ``"train"``."""
    return "val" if holdout_fraction(sample_id) < val_fraction else "train"
