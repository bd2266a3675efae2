import pytest
import torch

from mbm.model import FUSIONS, DecoderConfig, ModelConfig, MultimodalModel, TransformerConfig, recall_at_k

DIMS = {"text": 6, "image": 5, "audio": 3}
SMALL = TransformerConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


def make_batch(B=4, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or {"text": [3, 1, 0, 2], "image": [4, 0, 2, 4], "audio": [0, 5, 5, 1]}
    feats, masks = {}, {}
    for m, dim in DIMS.items():
        T = max(max(lengths[m]), 1)
        masks[m] = torch.arange(T)[None, :] < torch.tensor(lengths[m])[:, None]  # (B, T)
        feats[m] = torch.randn(B, T, dim, generator=g) * masks[m][..., None]
    return {"features": feats, "masks": masks, "labels": torch.tensor([0, 1, 2, -100]), "ids": list("abcd"),
            "target_ids": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 3, 0, 0], [2, 8, 9, 3]]),
            "target_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()}


def model(task, fusion, **kw):
    torch.manual_seed(0)
    extra = {"classify": {"num_labels": 3}, "retrieve": {"pair": ("text", "image"), "embed_dim": 8},
             "generate": {"decoder": DecoderConfig(vocab_size=12, bos=2, eos=3, pad=0, max_len=8, n_layers=1)}}
    return MultimodalModel(ModelConfig(task=task, feature_dims=DIMS, fusion=fusion, transformer=SMALL,
                                       max_len=16, **extra[task], **kw))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fused_shapes_and_no_nan_with_missing_modalities(fusion):
    m = model("classify", fusion)
    batch = make_batch()
    fused = m.fuse(batch, ["text", "image", "audio"])
    assert fused.pooled.shape == (4, 16)
    assert fused.tokens.shape[:2] == fused.mask.shape and fused.tokens.shape[0] == 4
    assert torch.isfinite(fused.tokens).all()
    assert m(batch)["logits"].shape == (4, 3)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_parameter_gets_a_finite_gradient(fusion):
    m = model("classify", fusion)
    batch = make_batch(lengths={"text": [3, 1, 2, 2], "image": [4, 1, 2, 4], "audio": [2, 5, 5, 1]})
    m(batch)["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.startswith("embed.proj.audio"))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padding_content_does_not_change_outputs(fusion):
    m = model("classify", fusion).eval()
    batch = make_batch()
    noisy = make_batch()
    for k in DIMS:  # garbage in padded positions and in missing modalities
        noisy["features"][k] = torch.where(batch["masks"][k][..., None], batch["features"][k], torch.full_like(batch["features"][k], 7.0))
    torch.testing.assert_close(m(batch)["logits"], m(noisy)["logits"])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_missing_modality_is_not_the_same_as_a_present_one(fusion):
    m = model("classify", fusion).eval()
    batch = make_batch()
    dropped = make_batch()
    dropped["masks"]["image"] = torch.zeros_like(dropped["masks"]["image"])
    dropped["features"]["image"] = torch.zeros_like(dropped["features"]["image"])
    assert not torch.allclose(m(batch)["logits"][0], m(dropped)["logits"][0])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_retrieve_embeds_each_modality_alone(fusion):
    m = model("retrieve", fusion)
    out = m(make_batch(lengths={"text": [3, 1, 2, 2], "image": [4, 1, 2, 4], "audio": [0, 0, 0, 0]}))
    assert out["za"].shape == out["zb"].shape == (4, 8)
    torch.testing.assert_close(out["za"].norm(dim=-1), torch.ones(4))
    out["loss"].backward()
    assert m.embed.proj["audio"][1].weight.grad is None  # audio takes no part in text↔image retrieval


def test_recall_at_k_counts_matches_in_the_top_k():
    z = torch.eye(4)
    assert recall_at_k(z, z)["recall@1"] == 1.0
    shuffled = z[[1, 0, 3, 2]]
    r = recall_at_k(z, shuffled, ks=(1, 2))
    assert r["recall@1"] == 0.0


@pytest.mark.parametrize("fusion", FUSIONS)
def test_generate_loss_and_decoding(fusion):
    m = model("generate", fusion)
    batch = make_batch(lengths={"text": [3, 1, 2, 2], "image": [4, 0, 2, 4], "audio": [0, 5, 5, 1]})
    loss = m(batch)["loss"]
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert m.embed.proj["text"][1].weight.grad is None  # the caption's own features are not an input
    m.eval()
    greedy = m.generate(batch, beam=1, max_new=5)
    beams = m.generate(batch, beam=3, max_new=5)
    assert len(greedy) == len(beams) == 4
    assert all(len(s) <= 5 and all(0 <= t < 12 and t != 3 for t in s) for s in greedy + beams)


def test_decoder_is_causal():
    m = model("generate", "concat").eval()
    batch = make_batch()
    fused = m.fuse(batch, ["image", "audio"])
    ids = torch.tensor([[2, 5, 6, 7]])
    other = torch.tensor([[2, 5, 9, 9]])
    ones = torch.ones_like(ids, dtype=torch.bool)
    a = m.head(ids, ones, fused.tokens[:1], fused.mask[:1])
    b = m.head(other, ones, fused.tokens[:1], fused.mask[:1])
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2:], b[:, 2:])


def test_greedy_equals_beam_of_one():
    m = model("generate", "concat").eval()
    batch = make_batch()
    assert m.generate(batch, beam=1, max_new=6) == m.head.greedy(*_memory(m, batch), max_new=6)


def _memory(m, batch):
    fused = m.fuse(batch, ["image", "audio"])
    return fused.tokens, fused.mask


def test_config_round_trip_and_validation():
    cfg = model("generate", "gated").cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="--fusion"):
        ModelConfig(task="classify", feature_dims=DIMS, fusion="sum", num_labels=3)
    with pytest.raises(ValueError, match="--pair"):
        ModelConfig(task="retrieve", feature_dims={"text": 3}, pair=("text", "image"))
    with pytest.raises(ValueError, match="--d-model"):
        TransformerConfig(d_model=10, n_heads=3)


def test_beam_search_weighs_unfinished_beams_against_an_early_end():
    """Beam 2 returned an empty text where greedy (beam 1) wrote "a a", more likely by far: a hypothesis that
    ended at the first step was the only finished one when the steps ran out, and the beams still open were
    not compared with it."""
    import torch.nn.functional as F

    from mbm.model.decoder import TextDecoder

    pad, bos, eos, a, b = range(5)

    class Table(TextDecoder):  # next-token probabilities fixed by the last token
        def forward(self, ids, mask, memory, memory_mask):
            probs = {bos: [0, 0, 0.35, 0.6, 0.05], a: [0, 0, 0.01, 0.98, 0.01], b: [0, 0, 0.5, 0.25, 0.25]}
            rows = torch.tensor([probs[int(t)] for t in ids[:, -1]]) + 1e-9
            return F.pad(rows.log()[:, None, :], (0, 0, ids.shape[1] - 1, 0))  # (K, L, V)

    head = Table(DecoderConfig(vocab_size=5, bos=bos, eos=eos, pad=pad, max_len=3, n_layers=1),
                 TransformerConfig(d_model=8, n_layers=1, n_heads=2))
    memory, mask = torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool)
    assert head.beam_search(memory, mask, beam=1) == [[a, a]]
    assert head.beam_search(memory, mask, beam=2) == [[a, a]]  # log(0.6 * 0.98) / 2 beats log(0.35) / 1
