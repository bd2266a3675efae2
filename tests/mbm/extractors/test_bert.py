"""BERT encoders without transformers: the same features as transformers' BertModel, and a fallback to
transformers for every folder that is not exactly such a model."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mbm.extractors import bert, create_extractor
from mbm.extractors.text import minilm_path

TEXTS = ["the cat sat on the mat", "", "hello world " * 80, "Ünïcödé 日本語 and emoji 🐶", "quick brown fox",
         "the dog", "a river bank full of money and the lazy fox jumps over it"]


def _through_transformers(monkeypatch, extractor):
    monkeypatch.setattr(bert, "load", lambda path: None)
    model = extractor.load("cpu")
    monkeypatch.undo()
    return model


def _same_features(monkeypatch, path, texts, **config):
    extractor = create_extractor("hf-text", {"path": str(path), **config})
    native = extractor.load("cpu")
    assert isinstance(native.tokenizer, bert.WordPieceTokenizer)
    reference = _through_transformers(monkeypatch, extractor)
    assert not isinstance(reference.tokenizer, bert.WordPieceTokenizer)
    assert native.tokenizer(texts, truncation=True, max_length=extractor.config.max_length) == {
        k: v for k, v in reference.tokenizer(texts, truncation=True, max_length=extractor.config.max_length).items()}
    got = extractor.featurize(native, texts, "cpu")
    want = extractor.featurize(reference, texts, "cpu")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    return got


def test_tiny_bert_features_are_bit_identical_to_transformers(tiny_bert_dir, monkeypatch):
    assert bert.plain_bert(str(tiny_bert_dir)) is None
    got = _same_features(monkeypatch, tiny_bert_dir, TEXTS, max_length=24)
    assert [len(f) for f in got][:3] == [8, 2, 24]  # [CLS] ... [SEP], truncated at max_length


def test_minilm_features_are_bit_identical_to_transformers(monkeypatch):
    """The default model: the tokenizer.json it ships truncates at 128 and pads, which must not apply."""
    assert bert.plain_bert(minilm_path()) is None
    texts = TEXTS + [f"caption number {i} of a photo with {i % 7} dogs" for i in range(40)]
    got = _same_features(monkeypatch, minilm_path(), texts)
    assert len(got[2]) == 162  # 160 word pieces and the special tokens, beyond tokenizer.json's own 128 cap
    assert {f.shape[1] for f in got} == {384}


def test_a_bert_for_masked_lm_checkpoint_is_read_as_its_encoder(tiny_bert_dir, tmp_path, monkeypatch):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "mlm"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.manual_seed(1)
    BertForMaskedLM(BertConfig.from_pretrained(folder)).save_pretrained(folder)  # keys "bert.*" and "cls.*"
    assert bert.load(str(folder)) is not None
    _same_features(monkeypatch, folder, TEXTS[:4])


def _variant(tmp_path, tiny_bert_dir, name, config=None, tokenizer_config=None, tokenizer=None, remove=()):
    """A copy of the tiny BERT with keys of its config.json / tokenizer_config.json set, and sections of
    its tokenizer.json updated (``tokenizer``: section -> keys to set)."""
    folder = tmp_path / name
    shutil.copytree(tiny_bert_dir, folder)
    for file, change in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if change:
            values = json.loads((folder / file).read_text())
            values.update(change)
            (folder / file).write_text(json.dumps(values))
    if tokenizer:
        spec = json.loads((folder / "tokenizer.json").read_text())
        for section, keys in tokenizer.items():
            spec[section].update(keys)
        (folder / "tokenizer.json").write_text(json.dumps(spec))
    for file in remove:
        (folder / file).unlink()
    return folder


@pytest.mark.parametrize("name, change, reason", [
    ("relative", {"config": {"position_embedding_type": "relative_key"}}, "position_embedding_type"),
    ("act", {"config": {"hidden_act": "gelu_new"}}, "hidden_act"),
    ("decoder", {"config": {"is_decoder": True}}, "decoder"),
    ("roberta", {"config": {"model_type": "roberta"}}, "model_type"),
    ("cased", {"tokenizer_config": {"do_lower_case": False}}, "do_lower_case"),
    ("cls", {"tokenizer_config": {"cls_token": "[MASK]"}}, "[CLS]"),
    ("notok", {"remove": ["tokenizer.json"]}, "tokenizer.json"),
    ("eager", {"config": {"_attn_implementation": "eager"}}, "attention implementation"),
    ("padleft", {"tokenizer_config": {"padding_side": "left"}}, "padding_side"),
    ("split", {"tokenizer_config": {"split_special_tokens": True}}, "split_special_tokens"),
    ("unk", {"tokenizer_config": {"unk_token": "[MASK]"}}, "WordPiece settings"),
    ("chars", {"tokenizer": {"model": {"max_input_chars_per_word": 3}}}, "WordPiece settings"),
    ("prefix", {"tokenizer": {"model": {"continuing_subword_prefix": "@@"}}}, "WordPiece settings"),
    ("clean", {"tokenizer": {"normalizer": {"clean_text": False}}}, "clean text"),
    ("whitespace", {"tokenizer": {"pre_tokenizer": {"type": "Whitespace"}}}, "pre-tokenizer"),
])
def test_other_folders_load_through_transformers(tiny_bert_dir, tmp_path, name, change, reason):
    folder = _variant(tmp_path, tiny_bert_dir, name, **change)
    assert reason in bert.plain_bert(str(folder))
    assert bert.load(str(folder)) is None
    if name != "roberta":  # the others still load, through transformers
        extractor = create_extractor("hf-text", {"path": str(folder)})
        model = extractor.load("cpu")
        assert not isinstance(model.tokenizer, bert.WordPieceTokenizer)
        assert extractor.preload_modules()[0] == "transformers"
        assert len(extractor.featurize(model, ["the cat"], "cpu")[0]) >= 2


def test_weights_that_do_not_fit_the_encoder_load_through_transformers(tiny_bert_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    extra = _variant(tmp_path, tiny_bert_dir, "extra")
    state = load_file(str(extra / "model.safetensors"))
    save_file({**state, "encoder.layer.1.output.dense.bias": torch.zeros(32)}, str(extra / "model.safetensors"))
    missing = _variant(tmp_path, tiny_bert_dir, "missing")
    save_file({k: v for k, v in state.items() if "intermediate" not in k}, str(missing / "model.safetensors"))
    damaged = _variant(tmp_path, tiny_bert_dir, "damaged")
    (damaged / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    for folder in (extra, missing, damaged):
        assert bert.plain_bert(str(folder)) is None  # the folder looks right; its weights decide
        assert bert.load(str(folder)) is None


def test_the_default_text_model_loads_without_importing_transformers():
    code = (
        "import sys\n"
        "from mbm.extractors import create_extractor\n"
        "ex = create_extractor('minilm', {})\n"
        "model = ex.load('cpu')\n"
        "print(len(ex.featurize(model, ['a photo of a dog'], 'cpu')[0]))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
        "print(ex.preload_modules())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["7", "[]", "['mbm.extractors.bert_encoder', 'safetensors.torch', 'tokenizers']"]


def test_mbm_native_bert_0_loads_through_transformers(tiny_bert_dir, monkeypatch):
    monkeypatch.setenv("MBM_NATIVE_BERT", "0")
    assert "MBM_NATIVE_BERT" in bert.plain_bert(str(tiny_bert_dir))
    extractor = create_extractor("hf-text", {"path": str(tiny_bert_dir)})
    assert not isinstance(extractor.load("cpu").tokenizer, bert.WordPieceTokenizer)
    assert extractor.preload_modules()[0] == "transformers"


def test_the_graphed_encoder_runs_eagerly_off_cuda(tiny_bert_dir):
    import torch

    from mbm.extractors.bert_encoder import GraphedEncoder

    _, model = bert.load(str(tiny_bert_dir))
    graphed = GraphedEncoder(model)
    ids = torch.tensor([[2, 7, 9, 3], [2, 8, 3, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        assert torch.equal(graphed(ids, attention_mask=mask).last_hidden_state,
                           model(ids, attention_mask=mask).last_hidden_state)
    assert graphed._graphs == {} and graphed.training is False  # nothing captured; attributes are the model's


cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_cuda_graphs_give_the_eager_features_and_each_text_its_own(tiny_bert_dir, precision):
    import threading

    from mbm.extractors import create_extractor
    from mbm.extractors.text import TextModel

    extractor = create_extractor("hf-text", {"path": str(tiny_bert_dir), "precision": precision})
    model = extractor.load("cuda")
    texts = [f"word {i} " * (1 + i % 23) for i in range(300)]
    graphed = extractor.featurize(model, texts, "cuda")
    eager = extractor.featurize(TextModel(model.tokenizer, model.model.model), texts, "cuda")
    assert all(np.array_equal(a, b) for a, b in zip(graphed, eager, strict=True))
    assert len(model.model._graphs) > 1  # one per pass shape and precision
    alone = [extractor.featurize(model, [t], "cuda")[0] for t in texts[:40]]  # other pass-mates: the same bits
    assert all(np.array_equal(a, b) for a, b in zip(alone, graphed, strict=False))
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = extractor.featurize(model, texts[i::4], "cuda")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):  # threads sharing the model read only their own passes
        assert all(np.array_equal(a, b) for a, b in zip(results[i], graphed[i::4], strict=True))


def test_packed_cpu_products_give_the_plain_products_bit_for_bit(monkeypatch):
    """The encoder's CPU float32 products from MKL's packed weights equal F.linear's for every pass shape
    (a few rows, where MKL picks other kernels, fall back to F.linear), follow a weight changed in place,
    and stay out of autograd and autocast."""
    import torch

    from mbm.extractors import packed

    _, model = bert.load(minilm_path())
    torch.manual_seed(0)
    shapes = [(1, 3), (2, 5), (32, 8), (16, 16), (10, 24), (1, 200)]
    inputs = [(torch.randint(1000, 20000, s), torch.ones(s, dtype=torch.long)) for s in shapes]
    for _, mask in inputs[2:]:
        mask[1:, -3:] = 0

    has_mkl = packed.HAS_MKL_LINEAR

    def hidden(use: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(packed, "HAS_MKL_LINEAR", use and has_mkl)
        with torch.inference_mode():
            return [model(ids, mask).last_hidden_state for ids, mask in inputs]

    packed.PackedWeight.EXACT.clear()
    for a, b in zip(hidden(True), hidden(False), strict=True):
        assert torch.equal(a, b)
    if not has_mkl:
        pytest.skip("torch without MKL: every product is F.linear's")
    exact = packed.PackedWeight.EXACT
    threads = torch.get_num_threads()
    assert exact[(384, 384, 256, threads)] and exact[(1536, 384, 240, threads)] and exact[(384, 1536, 200, threads)]
    assert (384, 384, 3, threads) in exact  # checked, and F.linear's result returned either way
    dense = model.encoder.layer[0].intermediate.dense
    assert dense.cpu_packed._packed is not None

    with torch.no_grad():  # in place (load_state_dict does the same): packed again from the new values
        dense.weight.mul_(0.5)
    before = dense.cpu_packed._packed
    for a, b in zip(hidden(True), hidden(False), strict=True):
        assert torch.equal(a, b)
    assert dense.cpu_packed._packed is not before
    monkeypatch.setattr(packed, "HAS_MKL_LINEAR", True)
    x = torch.randn(4, 64, 384, requires_grad=True)
    dense(x).sum().backward()  # with autograd on: F.linear, which has a gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense(torch.randn(4, 64, 384)).dtype == torch.bfloat16  # autocast's bfloat16 product, not packed
