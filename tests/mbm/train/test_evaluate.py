import types

import pytest
import torch
import torch.nn.functional as F

from mbm.data.errors import skip_reasons
from mbm.train.evaluate import empty_split, evaluate


def test_an_empty_split_is_named_and_the_advice_fits_it():
    assert empty_split("classify", {}).startswith("the held-out split is empty")
    assert "--val-fraction" in empty_split("classify", {})
    train = empty_split("classify", {}, "train")
    assert train.startswith("the train split is empty") and "--val-fraction" not in train
    skipped = empty_split("classify", {"task.no_label": 3}, "train")
    assert skipped == ("the train split has no sample the classify task can use: "
                       "skipped 3 samples without a label (classify needs one) (task.no_label)")


def test_samples_without_a_modality_the_model_reads_are_named_with_those_modalities():
    counts = {"task.no_used_modality": 65, "task.no_text": 2}
    assert skip_reasons(counts) == ("65 samples with none of the modalities this model reads (task.no_used_modality); "
                                    "2 samples without text (generate predicts the text) (task.no_text)")
    assert skip_reasons({"task.no_used_modality": 4}, ["image"], "classify") == (
        "4 samples with none of the modalities this model reads (image) (task.no_used_modality)")
    text_only = empty_split("generate", {"task.no_used_modality": 65}, "val", ["image", "audio"])
    assert text_only == ("the held-out split has no sample the generate task can use: skipped 65 samples with none "
                         "of the modalities this model reads (image, audio): generate predicts a sample's text from "
                         "these, so it needs samples that have them (task.no_used_modality)")
    assert skip_reasons({"npy.bad": 1, "task.no_label": 2}) == (  # a data reason's code says what it is
        "1 npy.bad; 2 samples without a label (classify needs one) (task.no_label)")


class _Retriever(torch.nn.Module):
    """A retrieve model's interface: in-batch contrastive loss over unit embeddings (0 for one sample)."""

    def __init__(self):
        super().__init__()
        self.cfg = types.SimpleNamespace(task="retrieve", input_modalities=lambda: ["text", "image"])

    def forward(self, batch):
        za, zb = batch["za"], batch["zb"]
        logits = za @ zb.T / 0.1
        target = torch.arange(len(za))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss, "za": za, "zb": zb}


def test_a_retrieve_splits_last_batch_of_one_sample_does_not_pull_its_loss_to_zero():
    """A split of 7 pairs in batches of 6 and 1 reported the 6's loss times 6/7: the lone pair's contrastive
    loss is 0 whatever the model, so the held-out loss depended on the split's size modulo the batch size."""
    torch.manual_seed(0)
    za, zb = F.normalize(torch.randn(7, 4), dim=-1), F.normalize(torch.randn(7, 4), dim=-1)

    def batches(*sizes):
        start = 0
        for n in sizes:
            yield {"ids": [str(i) for i in range(start, start + n)], "za": za[start:start + n], "zb": zb[start:start + n]}
            start += n

    model, cpu = _Retriever(), torch.device("cpu")
    six = evaluate(model, batches(6), cpu)["loss"]
    with_one = evaluate(model, batches(6, 1), cpu)
    assert with_one["loss"] == pytest.approx(six) and six > 0
    assert with_one["samples"] == 7  # the lone pair still counts for recall
    assert evaluate(model, batches(1), cpu)["loss"] == 0.0  # a split of one pair: nothing better to report
