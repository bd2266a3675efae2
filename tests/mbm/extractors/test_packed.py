"""Dense layers from MKL's packed weights on the CPU: the same results as F.linear, bit for bit."""

import pytest
import torch
from torch import nn

from mbm.extractors import packed

pytestmark = pytest.mark.skipif(not packed.HAS_MKL_LINEAR, reason="torch without MKL: every product is F.linear's")


class _Scaled(nn.Linear):  # a subclass with a forward of its own: left as it is
    def forward(self, x):
        return 2 * super().forward(x)


def _roberta():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=80)
    return RobertaModel(config).eval()


def test_a_transformers_model_gives_the_same_hidden_states_from_packed_weights(monkeypatch):
    model = _roberta()
    keys = list(model.state_dict())
    torch.manual_seed(1)
    inputs = [torch.randint(5, 300, shape) for shape in ((1, 4), (32, 8), (16, 16), (3, 64), (2, 5))]
    with torch.inference_mode():
        want = [model(ids).last_hidden_state for ids in inputs]
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert packed.pack_linears(model) == linears > 0
    assert list(model.state_dict()) == keys  # nothing added to the checkpoint
    packed.PackedWeight.EXACT.clear()
    with torch.inference_mode():
        for _ in range(2):  # the first product of each shape is checked, the second comes from the packed weight
            for ids, w in zip(inputs, want, strict=True):
                assert torch.equal(model(ids).last_hidden_state, w)
    threads = torch.get_num_threads()
    assert packed.PackedWeight.EXACT[(64, 64, 256, threads)] and packed.PackedWeight.EXACT[(96, 64, 192, threads)]
    used = [m for m in model.modules() if type(m) is nn.Linear]
    assert all(m.mbm_packed._packed is not None for m in used)
    calls = []
    mkl_linear = torch.ops.mkl._mkl_linear
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", lambda *a: calls.append(a[-1]) or mkl_linear(*a))
    with torch.inference_mode():
        model(inputs[1])
    assert calls == [256] * (linears - 1) + [32]  # every dense layer from its packed weight; the pooler's on 32 rows
    out = model(inputs[1]).last_hidden_state  # autograd on: F.linear
    out.sum().backward()
    assert model.encoder.layer[0].intermediate.dense.weight.grad is not None


def test_only_plain_linears_are_packed_and_bias_free_ones_work():
    model = nn.Sequential(nn.Linear(40, 30, bias=False), _Scaled(30, 20), nn.Linear(20, 10))
    assert packed.pack_linears(model) == 2 and not hasattr(model[1], "mbm_packed")
    x = torch.randn(64, 40)
    with torch.no_grad():
        want = model[2](model[1](x @ model[0].weight.T))
        for _ in range(2):
            assert torch.equal(model(x), want)
        model[0].weight.mul_(-1)  # in place: packed again from the new values
        assert torch.equal(model(x), model[2](model[1](x @ model[0].weight.T)))
        assert torch.equal(model.double()(x.double()), model[2](model[1](x.double() @ model[0].weight.T)))


def test_the_hf_text_extractor_packs_a_transformers_model_on_the_cpu(tmp_path, monkeypatch):
    from mbm.extractors import bert, create_extractor

    folder = tmp_path / "roberta"
    _roberta().save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(_tokenizer_dir(tmp_path))).save_pretrained(folder)
    extractor = create_extractor("hf-text", {"path": str(folder), "max_length": 64})
    assert bert.load(str(folder)) is None  # not a plain BERT: transformers loads it
    model = extractor.load("cpu")
    assert any(hasattr(m, "mbm_packed") for m in model.model.modules())
    texts = ["the cat sat on the mat", "a dog", "the dog " * 20]
    got = extractor.featurize(model, texts, "cpu")
    monkeypatch.setattr(packed, "HAS_MKL_LINEAR", False)
    want = extractor.featurize(model, texts, "cpu")
    for a, b in zip(got, want, strict=True):
        assert a.tobytes() == b.tobytes()


def _tokenizer_dir(tmp_path):
    """A byte-level BPE tokenizer over a tiny vocabulary, saved as RoBERTa's."""
    import json

    from transformers import RobertaTokenizer

    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "Ġ", *words,
                                         *(f"Ġ{w}" for w in words)])}
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return folder


def test_a_torch_build_whose_packed_ops_fail_falls_back_to_f_linear(monkeypatch):
    def broken(*args):
        raise RuntimeError("mkl_linear: not supported")

    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", broken)
    monkeypatch.setattr(packed, "HAS_MKL_LINEAR", True)
    layer = nn.Linear(64, 32)
    packed.pack_linears(layer)
    x = torch.randn(256, 64)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.equal(layer(x), want)
        assert not packed.HAS_MKL_LINEAR  # no packed product is tried again
        assert torch.equal(layer(x), want)


def _plain_linear_forward(module):
    return lambda x: torch.nn.functional.linear(x, module.weight, module.bias)


def test_under_bfloat16_autocast_the_kept_bfloat16_copies_give_autocasts_products_bit_for_bit():
    model = _roberta()
    torch.manual_seed(2)
    inputs = [torch.randint(5, 300, shape) for shape in ((1, 4), (32, 8), (16, 16), (3, 64))]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = [model(ids).last_hidden_state for ids in inputs]
    packed.pack_linears(model)
    dense = model.encoder.layer[0].intermediate.dense
    with torch.inference_mode():
        for _ in range(2):  # autocast entered per pass, as the extractors do: the copies outlive it
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = [model(ids).last_hidden_state for ids in inputs]
            for a, b in zip(got, want, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b)
        kept = dense.mbm_packed._bf16[1]
        assert kept.dtype == torch.bfloat16 and torch.equal(kept, dense.weight.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(inputs[1])
        assert dense.mbm_packed._bf16[1] is kept  # made once, not per pass
        assert dense.mbm_packed._packed is None  # no float32 product ran
        x = torch.randn(2, 7, 64)
        with torch.no_grad():
            dense.bias.add_(1.0)  # in place: copied again from the new values
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(dense(x), _plain_linear_forward(dense)(x))
        assert dense.mbm_packed._bf16[1] is not kept
        with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype: autocast's own product
            assert dense(x).dtype == torch.float16
        assert torch.equal(dense(x), _plain_linear_forward(dense)(x))  # float32 again without autocast
    x = torch.randn(2, 7, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autograd on: autocast's F.linear, which has a gradient
        dense(x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and dense.weight.grad is not None
