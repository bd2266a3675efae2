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
