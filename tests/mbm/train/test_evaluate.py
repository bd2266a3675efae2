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
    assert skip_reasons({"task.no_label": 1, "task.unknown_label": 1, "task.pair_missing": 3}) == (
        "1 sample without a label (classify needs one) (task.no_label); 1 label the run's vocabulary does not hold "
        "(task.unknown_label); 3 samples lacking one of the two retrieval modalities (task.pair_missing)")


class _Retriever(torch.nn.Module):
    """A retrieve model's interface: in-batch contrastive loss over unit embeddings (0 for one sample); each
    side's embedding is its features' sum."""

    def __init__(self):
        super().__init__()
        self.cfg = types.SimpleNamespace(task="retrieve", input_modalities=lambda: ["text", "image"],
                                         pair=("text", "image"))

    def forward(self, batch):
        za, zb = (F.normalize(batch["features"][m].float().sum(1), dim=-1) for m in ("text", "image"))
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
            yield _pairs([str(i) for i in range(start, start + n)], za[start:start + n], zb[start:start + n])
            start += n

    model, cpu = _Retriever(), torch.device("cpu")
    six = evaluate(model, batches(6), cpu)["loss"]
    with_one = evaluate(model, batches(6, 1), cpu)
    assert with_one["loss"] == pytest.approx(six) and six > 0
    assert with_one["samples"] == 7  # the lone pair still counts for recall
    assert evaluate(model, batches(1), cpu)["loss"] == 0.0  # a split of one pair: nothing better to report


def _pairs(ids, text, image):
    """A retrieve batch whose text and image features are one token each: ``text`` and ``image`` rows."""
    ones = torch.ones(len(ids), 1, dtype=torch.bool)
    return {"ids": ids, "features": {"text": text[:, None, :], "image": image[:, None, :]},
            "masks": {"text": ones, "image": ones}}


def test_retrieve_recall_counts_a_pictures_other_captions_and_its_copies_as_matches():
    """COCO-style split: five captions of each picture. Each picture's five samples carry identical image
    features, so their embeddings tie, and which copy ranks first is arbitrary: a model that matches every
    caption to its picture scored text->image recall@1 of about 1/5, and image->text counted the picture's
    other captions as misses."""
    torch.manual_seed(0)
    pictures = F.normalize(torch.randn(8, 16), dim=-1)
    image = pictures.repeat_interleave(5, dim=0)  # samples 0-4 show picture 0, ...
    text = F.normalize(image + 0.05 * torch.randn(40, 16), dim=-1)  # each caption nearest its own picture
    ids = [f"p{i // 5}-c{i % 5}" for i in range(40)]
    cpu = torch.device("cpu")
    metrics = evaluate(_Retriever(), [_pairs(ids[:24], text[:24], image[:24]), _pairs(ids[24:], text[24:], image[24:])],
                       cpu)
    assert metrics["recall@1"] == 1.0 and metrics["samples"] == 40
    shuffled = image[torch.randperm(40)]  # captions paired with random pictures: recall near chance
    assert evaluate(_Retriever(), [_pairs(ids, text, shuffled)], cpu)["recall@1"] < 0.5


def test_recall_with_groups_and_chunks_equals_the_whole_matrix():
    from mbm.model.heads import recall_at_k

    torch.manual_seed(1)
    za, zb = F.normalize(torch.randn(50, 8), dim=-1), F.normalize(torch.randn(50, 8), dim=-1)
    whole = recall_at_k(za, zb)
    assert recall_at_k(za, zb, chunk=7) == whole
    alone = torch.arange(50)
    assert recall_at_k(za, zb, groups=(alone, alone), chunk=16) == whole
    same = torch.zeros(50, dtype=torch.long)  # every row the same content: every retrieval matches
    assert recall_at_k(za, zb, ks=(1,), groups=(same, alone))["recall@1"] == 1.0


def test_chance_at_5_counts_a_pictures_other_captions_as_recall_does():
    """Five captions of each of 8 pictures: a caption's random top 5 holds one of its picture's 5 samples with
    1 - C(35, 5) / C(40, 5) = 0.507, the chance recall@5 is to be read against; it said 5 / 40 = 0.125, so a
    model at chance looked 4 times better than chance."""
    from math import comb

    torch.manual_seed(0)
    image = F.normalize(torch.randn(8, 16), dim=-1).repeat_interleave(5, dim=0)
    text = F.normalize(torch.randn(40, 16), dim=-1)  # every caption its own text
    ids = [f"p{i // 5}-c{i % 5}" for i in range(40)]
    metrics = evaluate(_Retriever(), [_pairs(ids, text, image)], torch.device("cpu"))
    assert metrics["chance@5"] == pytest.approx(1 - comb(35, 5) / comb(40, 5))
    distinct = F.normalize(torch.randn(40, 16), dim=-1)  # 40 pictures: k / n as before
    assert evaluate(_Retriever(), [_pairs(ids, text, distinct)], torch.device("cpu"))["chance@5"] == pytest.approx(5 / 40)


def test_chance_at_k_matches_a_count_over_every_ranking():
    """Exact on a case small enough to enumerate: 4 rows, rows 0 and 1 share their image, k = 2."""
    from itertools import permutations

    from mbm.model.heads import chance_at_k

    ga, gb = torch.arange(4), torch.tensor([0, 0, 1, 2])
    matches = [{0, 1}, {0, 1}, {2}, {3}]
    orders = list(permutations(range(4)))
    expected = sum(any(j in matches[q] for j in order[:2]) for q in range(4) for order in orders) / (4 * len(orders))
    assert chance_at_k(2, (ga, gb)) == pytest.approx(expected) == pytest.approx((5 / 6 + 5 / 6 + 1 / 2 + 1 / 2) / 4)
    assert chance_at_k(9, (ga, gb)) == 1.0  # k past the rows: every ranking holds the match


def test_balanced_accuracy_and_macro_f1_say_what_accuracy_hides_on_uneven_classes():
    from collections import Counter

    from mbm.train.evaluate import class_balanced

    truth, guess = [0, 0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 0, 0]
    got = class_balanced(Counter(truth), Counter(guess), Counter(t for t, g in zip(truth, guess, strict=True) if t == g))
    assert got["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    assert got["macro_f1"] == pytest.approx((6 / 9 + 2 / 4 + 0) / 3)  # class 2: never predicted, F1 0
    # always the majority class: accuracy 0.9, balanced accuracy 0.5
    majority = class_balanced(Counter({0: 9, 1: 1}), Counter({0: 10}), Counter({0: 9}))
    assert majority == {"balanced_accuracy": 0.5, "macro_f1": pytest.approx((18 / 19 + 0) / 2)}


class _Classifier(torch.nn.Module):
    """A classify model's interface whose prediction is the batch's ``guess`` (IGNORE labels: no target)."""

    def __init__(self):
        super().__init__()
        self.cfg = types.SimpleNamespace(task="classify", input_modalities=lambda: ["text"], pair=None, num_labels=3)

    def forward(self, batch):
        logits = batch["logits"] if "logits" in batch else F.one_hot(batch["guess"], 3).float() * 5
        return {"loss": F.cross_entropy(logits, batch["labels"], ignore_index=-100), "logits": logits}


def test_evaluate_reports_the_class_balanced_metrics_over_the_labelled_samples():
    truth = torch.tensor([0, 0, -100, 0, 0, 1, 1, 2])
    guess = torch.tensor([0, 0, 2, 0, 1, 1, 0, 0])  # the unlabelled sample's guess counts nowhere
    batches = [{"labels": truth[:3], "guess": guess[:3]}, {"labels": truth[3:], "guess": guess[3:]}]
    metrics = evaluate(_Classifier(), batches, torch.device("cpu"))
    assert metrics["samples"] == 7 and metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    assert metrics["macro_f1"] == pytest.approx((6 / 9 + 2 / 4 + 0) / 3)
    assert metrics["majority_rate"] == pytest.approx(4 / 7)
    assert "top5_accuracy" not in metrics  # three labels: the top five hold every one


def test_over_more_than_five_labels_top5_accuracy_counts_a_label_among_the_five_likeliest():
    model = _Classifier()
    model.cfg.num_labels = 7
    order = [6, 5, 4, 3, 2, 1, 0]  # logits: class 0 likeliest, class 6 least
    logits = torch.tensor([order, order, order, order], dtype=torch.float32)
    labels = torch.tensor([0, 4, 5, -100])  # ranks 1, 5 and 6; the unlabelled sample counts nowhere
    metrics = evaluate(model, [{"labels": labels, "logits": logits}], torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["top5_accuracy"] == pytest.approx(2 / 3)


class _Share(list):
    """A rank's share of a split's batches, with the skip counts a PassLoader keeps."""

    def __init__(self, batches, skipped, decoded):
        super().__init__(batches)
        self._skipped, self._decoded = skipped, decoded

    def skipped(self):
        return dict(self._skipped)

    def decode_skipped(self):
        return dict(self._decoded)


def test_ranks_evaluating_shares_of_a_split_get_the_metrics_of_the_whole_split(caplog):
    """Each rank reads its share of the held-out split; the ranks' tallies, gathered, give every rank the
    metrics one process gets from the whole split, and what was left out counted once."""
    import logging

    from mbm.train.evaluate import tally

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    truth = torch.tensor([0, 0, -100, 0, 0, 1, 1, 2, 2, 1, 6, 5, 4])
    logits = torch.randn(13, 7)
    model = _Classifier()
    model.cfg.num_labels = 7  # top5_accuracy too
    batches = [{"labels": truth[i:i + 3], "logits": logits[i:i + 3]} for i in range(0, 13, 3)]
    whole = evaluate(model, batches, cpu, classes=True)
    # rank 0 read batches 0 and 2, rank 1 batches 1 and 3; the stream's skips (a bad json) both saw, the
    # corrupt arrays only the rank that decoded them
    shares = [_Share(batches[0::2], {"json.bad": 1, "npy.bad": 2}, {"npy.bad": 2}),
              _Share(batches[1::2], {"json.bad": 1, "npy.nonfinite": 1}, {"npy.nonfinite": 1})]

    def gather_for(rank):
        def gather(mine):
            assert not mine.za and mine.skipped == shares[rank].decode_skipped()
            others = [tally(model, shares[r], cpu) for r in range(2)]
            for r in range(2):
                others[r].skipped = type(mine.skipped)(shares[r].decode_skipped())
            others[rank] = mine
            return others
        return gather

    for rank in range(2):
        with caplog.at_level(logging.INFO, logger="mbm.train.evaluate"):
            caplog.clear()
            got = evaluate(model, shares[rank], cpu, classes=True, gather=gather_for(rank))
        assert got.pop("per_class") == whole["per_class"]  # from counts: exact
        assert got == pytest.approx({k: v for k, v in whole.items() if k != "per_class"})
        assert got["samples"] == 12 and "top5_accuracy" in got
        assert "left out 1 json.bad; 2 npy.bad; 1 npy.nonfinite" in caplog.text

    torch.manual_seed(0)  # retrieve: recall over every rank's embeddings, samples sharing a picture matched
    image = F.normalize(torch.randn(6, 16), dim=-1).repeat_interleave(3, dim=0)
    text = F.normalize(image + 0.3 * torch.randn(18, 16), dim=-1)
    ids = [f"p{i // 3}-c{i % 3}" for i in range(18)]
    pairs = [_pairs(ids[i:i + 4], text[i:i + 4], image[i:i + 4]) for i in range(0, 18, 4)]  # the last of 2
    whole = evaluate(_Retriever(), pairs, cpu)
    halves = [pairs[0::2], pairs[1::2]]
    parts = [tally(_Retriever(), h, cpu).portable() for h in halves]
    got = evaluate(_Retriever(), halves[0], cpu, gather=lambda mine: [mine, parts[1]])
    for key in ("recall@1", "recall@5", "recall@10", "chance@5", "samples"):
        assert got[key] == whole[key], key
