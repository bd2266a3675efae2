import math

import torch
import torch.nn.functional as F

from mbm.model.heads import RetrievalHead


def test_retrieval_loss_leaves_the_same_picture_under_another_caption_out_of_the_negatives():
    torch.manual_seed(0)
    head = RetrievalHead(8, 4)
    za = F.normalize(torch.randn(4, 4), dim=-1)
    zb = F.normalize(torch.randn(4, 4), dim=-1)
    zb[1] = zb[0]  # rows 0 and 1: two captions (a side) of one picture (b side)
    ga, gb = torch.tensor([10, 11, 12, 13]), torch.tensor([20, 20, 22, 23])
    scale = math.exp(math.log(1 / 0.07))
    logits = scale * za @ zb.T
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = float("-inf")  # the other caption's pair, both ways
    target = torch.arange(4)
    want = (F.cross_entropy(masked, target) + F.cross_entropy(masked.T, target)) / 2
    got = head.loss(za, zb, (ga, gb))
    assert torch.allclose(got, want, atol=1e-5)
    plain = head.loss(za, zb)  # without groups: row 0's own picture, under row 1, counts against it
    assert torch.allclose(plain, (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2, atol=1e-5)
    assert got < plain
    unique = head.loss(za, zb, (ga, torch.tensor([20, 21, 22, 23])))  # no shared content: as without groups
    assert torch.allclose(unique, plain)


def test_class_weights_keep_their_float32_values_under_bfloat16_autocast():
    """On a GPU the classify loss runs under bfloat16 autocast: the weights rounded to the logits' bfloat16
    (0.8333 -> 0.8320) gave another loss than the CPU's float32 run."""
    from mbm.model.heads import ClassifyHead

    torch.manual_seed(0)
    head = ClassifyHead(4, 3, 0.0, class_weights=(0.8333333, 1.7, 0.61))
    logits, labels = torch.randn(64, 3), torch.randint(0, 3, (64,))
    exact = F.cross_entropy(logits.bfloat16().float(), labels, weight=torch.tensor([0.8333333, 1.7, 0.61]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.loss(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32 and torch.equal(loss, exact)
    assert torch.equal(head.loss(logits, labels), F.cross_entropy(logits, labels, weight=head.class_weight))
