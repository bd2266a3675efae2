"""Held-out split chosen by a hash of the sample id: stable across runs, seeds and dataset versions; or
by the dataset's own split, where its samples name one."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from schemas import MODALITIES
from schemas.manifest import TEST_SPLITS, TRAIN_SPLITS, VALIDATION_SPLITS, listed_splits, split_name

SPLITS = ("train", "val")
# what evaluate and generate read: a split, every sample, or (``--split-by split`` on a dataset naming both a
# validation and a test split) the test split, which training never reads, not even to evaluate
EVAL_SPLITS = (*SPLITS, "test", "all")
# what a sample's split is chosen by: its id, one modality's content, or the split its metadata names
SPLIT_BY = ("id", *MODALITIES, "split")
# the dataset's own split names (a ``split`` metadata value: imagefolders' split folders, a manifest's column)
TRAIN_NAMES = frozenset(TRAIN_SPLITS)
HELD_OUT = (*TEST_SPLITS, *VALIDATION_SPLITS)
HELD_OUT_NAMES = frozenset(HELD_OUT)


def holds_test_apart(splits: Mapping[str, int] | None) -> bool:
    """Whether a dataset's named splits (its manifest's ``splits``: landed samples per name) hold both a
    validation split and a test split. Then ``--split-by split`` holds out the validation split, evaluates
    on it while training, and keeps the test split for ``mbm evaluate --split test``; a dataset with a test
    split alone (train/ and test/ folders) holds the test split out instead."""
    names = {n for n, count in (splits or {}).items() if count}
    return bool(names & set(VALIDATION_SPLITS)) and bool(names & set(TEST_SPLITS))


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


def named_split(doc: dict[str, Any], test_apart: bool = False) -> str | None:
    """``"train"``, ``"val"`` or ``"test"`` for a sample whose metadata names its split (``train/``, ``test/``
    folders of an imagefolder, a manifest's ``split`` column): train and training train; validation, valid,
    val, dev and eval are held out, and so are test and testing, as ``"test"`` where the dataset also names a
    validation split (``test_apart``), else as ``"val"``. None for a sample without one, or another name."""
    name = split_name(doc.get("meta"))
    if name is None:
        return None
    if name in TRAIN_NAMES:
        return "train"
    if name in TEST_SPLITS:
        return "test" if test_apart else "val"
    return "val" if name in HELD_OUT_NAMES else None


def split_doc(sample_id: str, hashes: Mapping[str, str], split: Any) -> dict[str, Any]:
    """A json doc reduced to what ``sample_split`` reads of it: the id, the content hashes (``content_hashes``:
    the string values of its ``modality_hashes``) and the ``split`` value of its metadata, as the doc holds it.
    ``sample_split`` of it equals ``sample_split`` of the doc; a shard scan keeps these three."""
    return {"id": sample_id, "modality_hashes": hashes, "meta": {"split": split}}


def meta_split(doc: dict[str, Any]) -> Any:
    """The ``split`` value of a doc's metadata, as the doc holds it (None where it has none)."""
    meta = doc.get("meta")
    return meta.get("split") if isinstance(meta, dict) else None


def sample_split(doc: dict[str, Any], val_fraction: float, split_by: str = "id", test_apart: bool = False) -> str:
    """``"train"``, ``"val"`` (or with ``test_apart``, ``"test"``) for a sample's json doc: with
    ``split_by="split"`` the split its metadata names, else (and for a sample that names none) a hash of
    ``split_key``."""
    if split_by == "split" and (named := named_split(doc, test_apart)) is not None:
        return named
    return split_of(split_key(doc, split_by), val_fraction)


def empty_under_split(split: str) -> str:
    """Why ``split`` ("train", "val" or "test") holds no sample under ``--split-by split`` (none skipped), and
    what to change: a larger --val-fraction does not move samples that name their split."""
    if split == "train":
        return ("every sample names a held-out split (" + ", ".join(HELD_OUT) + ") in its metadata, and "
                "--split-by split holds those out, so none is left to train on; give --split-by id (or text, "
                "image, audio) to split the samples by hash, or add samples of the train split")
    if split == "test":
        return ("no sample the run reads names a test split (" + ", ".join(TEST_SPLITS) + ") in its metadata")
    return ("no sample names a held-out split (" + ", ".join(HELD_OUT) + ") in its metadata, and --split-by "
            "split holds out only those (and a --val-fraction of the samples naming no split); give --split-by "
            "id (or text, image, audio) to hold out a --val-fraction of the samples by hash")


def no_test_split(split_by: str, splits: Mapping[str, int]) -> str | None:
    """Why a run's data has no test split apart from its held-out one (what ``--split test`` reads), or None
    when it has one: the run split by something else than the dataset's own splits, or the dataset does not
    name both a validation and a test split (``splits``: samples per named split, the manifest's or counted
    from the shards)."""
    if split_by == "split" and holds_test_apart(splits):
        return None
    if split_by != "split":
        return (f"the run split its samples by {split_by}, so its held-out split is all it holds out; --split test "
                "needs a run trained with --split-by split on a dataset naming both a validation and a test split "
                "(give --split val for the held-out samples)")
    named = (f"samples per named split: {listed_splits(dict(splits))}" if splits else
             "it records no named split: none of its samples names one, or it was written before mbm counted them, "
             "which the next `mbm preprocess` of it does")
    return (f"the dataset does not name both a validation ({', '.join(VALIDATION_SPLITS)}) and a test "
            f"({', '.join(TEST_SPLITS)}) split ({named}), so its test samples, if any, are part of the held-out split: "
            "give --split val")
