import time

import numpy as np
import pytest

from mbm.extractors import bert, create_extractor
from mbm.extractors.text import fixed_shape_chunks, pass_of, pass_shape

SHORT = "the cat sat"
LONG = "the quick brown fox jumps over the lazy dog on the river bank hello world"


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    extractor = create_extractor("hf-text", {"path": str(tiny_bert_dir)})
    return extractor, extractor.load("cpu")


@pytest.fixture(scope="module")
def tiny_hf(tiny_bert_dir):
    """The tiny model loaded through transformers, as a folder that is not a plain BERT is."""
    extractor = create_extractor("hf-text", {"path": str(tiny_bert_dir)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bert, "load", lambda path: None)
        return extractor, extractor.load("cpu")


def test_features_cover_the_real_tokens(tiny):
    extractor, model = tiny
    texts = [SHORT, LONG, ""]
    features = extractor.featurize(model, texts, "cpu")
    expected = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    assert [f.shape for f in features] == [(n, 32) for n in expected]
    assert expected == [5, 17, 2]  # [CLS] ... [SEP]
    assert all(f.dtype == np.float16 and np.isfinite(f).all() for f in features)
    assert extractor.dim == 32


def test_features_do_not_depend_on_padding_or_batch_order(tiny):
    extractor, model = tiny
    alone = extractor.featurize(model, [SHORT], "cpu")[0]
    batched = extractor.featurize(model, [LONG, SHORT, "hello world"], "cpu")
    np.testing.assert_allclose(batched[1].astype(np.float32), alone.astype(np.float32), atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(batched[0], extractor.featurize(model, [LONG], "cpu")[0])
    assert not np.allclose(batched[0][:5], batched[1])  # different texts, different features


def test_token_budget_splits_batches_without_changing_results(tiny_bert_dir, tiny):
    extractor, model = tiny
    texts = [LONG, SHORT, "dog", LONG + " cat", "a"]
    small = create_extractor(
        "hf-text", {"path": str(tiny_bert_dir), "max_length": 20, "max_batch_tokens": 20}
    )
    for a, b in zip(
        extractor.featurize(model, texts, "cpu"), small.featurize(model, texts, "cpu"), strict=True
    ):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3, rtol=2e-3)


def test_fixed_shape_chunks_depend_only_on_each_texts_length():
    assert fixed_shape_chunks([5, 40, 3, 33], max_tokens=128, max_length=256) == [(8, 16, [0, 2]), (40, 3, [1, 3])]
    assert fixed_shape_chunks([300], max_tokens=16384, max_length=256) == [(256, 16, [0])]
    assert fixed_shape_chunks([1] * 20, max_tokens=16384, max_length=256) == [(8, 16, list(range(16))),
                                                                              (8, 16, list(range(16, 20)))]
    assert fixed_shape_chunks([17, 24, 9], max_tokens=128, max_length=256, max_rows=2) == [(16, 2, [2]),
                                                                                          (24, 2, [0, 1])]
    assert fixed_shape_chunks([20], max_tokens=4096, max_length=256, max_rows=256) == [(24, 170, [0])]


@pytest.mark.parametrize("native", [True, False])
def test_pass_keys_are_the_shapes_featurize_runs_each_text_in(tiny_bert_dir, tiny, monkeypatch, native):
    extractor, model = tiny
    if not native:  # a folder transformers loads: its tokenizer gives the keys
        monkeypatch.setattr(bert, "load_tokenizer", lambda path: None)
    small = create_extractor("hf-text", {"path": str(tiny_bert_dir), "max_length": 12, "max_batch_tokens": 48})
    key = small.pass_keys("cpu")
    texts = [SHORT, LONG, "", "dog " * 9]
    lengths = [len(model.tokenizer(t)["input_ids"]) for t in texts]
    assert lengths == [5, 17, 2, 11]
    assert [key(t) for t in texts] == [(8, 6), (12, 4), (8, 6), (12, 4)]  # (L, R), L capped at max_length
    assert [key(t) for t in texts] == [pass_of(min(n, 12), 48, 12, 32) for n in lengths]
    passes = {(length, rows) for length, rows, _ in fixed_shape_chunks([min(n, 12) for n in lengths], 48, 12, 32)}
    assert passes == {key(t) for t in texts}
    assert key(3) == (None, 1)  # featurize rejects it, in its batch
    assert create_extractor("logmel").pass_keys("cpu") is None


def test_pass_shape_is_small_on_the_cpu_and_big_on_cuda():
    assert pass_shape(16384, "cpu") == (256, 32)
    assert pass_shape(64, "cpu") == (64, 32)
    assert pass_shape(16384, "cuda") == (16384, 64)
    assert pass_shape(16384, "cuda:1") == (16384, 64)


def test_non_finite_features_are_refused_for_the_whole_call(tiny):
    import torch

    from mbm.extractors.text import TextModel

    extractor, model = tiny

    class Overflowing(torch.nn.Module):  # the tiny encoder, with inf in the features of "dog" passes
        def forward(self, input_ids, **kw):
            hidden = model.model(input_ids, **kw).last_hidden_state
            dog = model.tokenizer(["dog"])["input_ids"][0][1]
            return type(model.model(input_ids, **kw))(hidden.masked_fill((input_ids == dog)[..., None], float("inf")))

    broken = TextModel(model.tokenizer, Overflowing())
    assert len(extractor.featurize(broken, [SHORT, "hello world"], "cpu")) == 2
    with pytest.raises(ValueError, match="non-finite"):
        extractor.featurize(broken, [SHORT, "a dog", "hello world"], "cpu")
    assert extractor.featurize(model, [], "cpu") == []


def test_features_saturate_at_the_float16_range():
    import torch

    from mbm.extractors.runtime import FLOAT16_MAX, float16_on_device, to_float16_numpy

    half, finite = float16_on_device(torch.tensor([1e6, -1e6, 0.5]))
    assert half.dtype == torch.float16 and half.tolist() == [FLOAT16_MAX, -FLOAT16_MAX, 0.5] and bool(finite)
    assert not bool(float16_on_device(torch.tensor([1.0, float("nan")]))[1])
    with pytest.raises(ValueError, match="x produced non-finite"):
        to_float16_numpy(torch.tensor([float("inf")]), "x")


def test_features_are_bit_identical_whatever_the_batch(tiny):
    extractor, model = tiny
    alone = extractor.featurize(model, [SHORT], "cpu")[0]
    for batch in ([LONG, SHORT], [SHORT, LONG, LONG, "x"], ["y"] * 7 + [SHORT]):
        got = extractor.featurize(model, batch, "cpu")[batch.index(SHORT)]
        assert np.array_equal(got, alone)


def test_long_texts_are_truncated_to_max_length(tiny_bert_dir, tiny):
    _, model = tiny
    short_ctx = create_extractor("hf-text", {"path": str(tiny_bert_dir), "max_length": 8})
    assert short_ctx.featurize(model, [LONG], "cpu")[0].shape == (8, 32)


def test_non_text_input_is_rejected(tiny):
    extractor, model = tiny
    with pytest.raises(ValueError, match="input 1 must be str"):
        extractor.featurize(model, ["ok", 3], "cpu")


def test_missing_model_folder_is_actionable(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        create_extractor("hf-text", {"path": str(tmp_path)}).load("cpu")


def _mean_unit(features: np.ndarray) -> np.ndarray:
    pooled = features.astype(np.float32).mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def test_minilm_paraphrases_are_closer_than_unrelated_text():
    extractor = create_extractor("minilm")
    assert extractor.dim == 384
    start = time.perf_counter()
    model = extractor.load("cpu")
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs a song with an acoustic guitar.",
        "The quarterly tax report is due next Monday.",
    ]
    features = extractor.featurize(model, texts, "cpu")
    assert time.perf_counter() - start < 30
    assert [f.shape[1] for f in features] == [384] * 3 and all(f.dtype == np.float16 for f in features)
    a, b, c = (_mean_unit(f) for f in features)
    assert a @ b > 0.5 > a @ c
    assert a @ b - a @ c > 0.3


def test_bfloat16_precision_on_the_cpu_is_close_to_float32(tiny_bert_dir, tiny):
    extractor, model = tiny
    bf16 = create_extractor("hf-text", {"path": str(tiny_bert_dir), "precision": "bfloat16"})
    f32 = create_extractor("hf-text", {"path": str(tiny_bert_dir), "precision": "float32"})
    texts = [SHORT, LONG]
    ref = [f.astype(np.float32) for f in extractor.featurize(model, texts, "cpu")]
    np.testing.assert_array_equal(np.concatenate(f32.featurize(model, texts, "cpu")), np.concatenate(ref))
    low = bf16.featurize(model, texts, "cpu")
    assert [f.shape for f in low] == [f.shape for f in ref] and all(f.dtype == np.float16 for f in low)
    a, b = np.concatenate(ref), np.concatenate(low).astype(np.float32)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.05, rel  # computed in bfloat16 (not bit-equal), still the same features
    np.testing.assert_array_equal(np.concatenate(low), np.concatenate(bf16.featurize(model, texts, "cpu")))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_arrays_equal_the_tokenizers_own_padding(tiny_hf, side):
    import torch

    from mbm.extractors.text import padded_arrays

    _, model = tiny_hf
    tok = model.tokenizer
    old_side = tok.padding_side
    tok.padding_side = side
    try:
        encoded = tok([SHORT, LONG, "", "hello world"], truncation=True, max_length=64)
        rows = [1, 0, 3, 2, 1, 1]  # filler rows repeat one, as the passes do
        for keys in (list(encoded), ["input_ids", "attention_mask"]):
            sub = {k: encoded[k] for k in keys}
            fast = padded_arrays(tok, sub, rows, 24)
            slow = tok.pad({k: [v[i] for i in rows] for k, v in sub.items()}, padding="max_length", max_length=24,
                           return_tensors="pt")
            assert set(fast) == set(slow) == set(keys)
            for k in keys:
                assert torch.equal(torch.from_numpy(fast[k]), slow[k]), k
        assert padded_arrays(tok, {**encoded, "special_tokens_mask": encoded["input_ids"]}, rows, 24) is None
    finally:
        tok.padding_side = old_side


def test_features_are_the_same_through_the_tokenizers_padding(tiny_hf, monkeypatch):
    import mbm.extractors.text as text_module

    extractor, model = tiny_hf
    texts = [SHORT, LONG, "hello world", "the cat", LONG + " again"]
    fast = extractor.featurize(model, texts, "cpu")
    monkeypatch.setattr(text_module, "padded_arrays", lambda *a: None)
    slow = extractor.featurize(model, texts, "cpu")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_folder_without_a_tokenizer_is_refused(tiny_bert_dir, tmp_path):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, tmp_path / name)
    extractor = create_extractor("hf-text", {"path": str(tmp_path)})
    with pytest.raises(ValueError, match="holds no tokenizer .*tokenizer.save_pretrained"):
        extractor.input_spec()


def test_a_speech_or_image_model_folder_with_a_vocabulary_is_refused(tiny_bert_dir, tiny_wav2vec2_dir,
                                                                      tiny_vit_dir, tmp_path):
    import shutil

    create_extractor("hf-text", {"path": str(tiny_bert_dir)}).check_files()
    for source, held in ((tiny_wav2vec2_dir, "a speech model (config.json: model_type 'wav2vec2'"),
                         (tiny_vit_dir, "an image model (config.json: model_type 'vit'")):
        folder = tmp_path / source.name
        shutil.copytree(source, folder)
        (folder / "vocab.json").write_text('{"<pad>": 0, "a": 1}')  # a CTC tokenizer passes the tokenizer check
        extractor = create_extractor("hf-text", {"path": str(folder)})
        extractor.input_spec()
        with pytest.raises(ValueError) as err:
            extractor.check_files()
        assert str(err.value).startswith(f"path = '{folder}' holds {held}")
        assert str(err.value).endswith("not a text model; set path to the folder of a text encoder with its "
                                       "tokenizer (BERT, RoBERTa, MiniLM, ...)")


def test_max_length_leaves_room_for_one_token_beside_the_special_ones():
    from mbm.extractors.text import MiniLMConfig

    assert MiniLMConfig(max_length=3).max_length == 3  # [CLS] word [SEP]
    with pytest.raises(ValueError) as err:
        MiniLMConfig(max_length=1)
    assert str(err.value) == ("MiniLMConfig.max_length must be >= 3: the tokenizer adds its own tokens around each "
                              "text ([CLS] and [SEP] for BERT), and at least one token of the text must fit beside "
                              "them, got 1")


def test_gpt2_style_configs_give_their_width():
    from mbm.extractors.text import hidden_size

    assert hidden_size({"model_type": "gpt2", "n_embd": 48, "n_positions": 64}, "gpt2-folder") == 48
