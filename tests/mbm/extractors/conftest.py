"""Tiny randomly initialised HF models saved to disk, shared by the extractor tests."""

from __future__ import annotations

import json

import pytest

WORDS = "the a cat dog sat on mat hello world quick brown fox jumps over lazy river bank money".split()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 1-layer, 32-wide BERT and its WordPiece tokenizer, saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=len(WORDS) + 5,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A 1-layer ViT on 32x32 images (8x8 patches -> 16 + CLS tokens) with a mean=std=0.5 processor config."""
    import torch
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("tiny_vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(path)
    spec = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session")
def tiny_wav2vec2_dir(tmp_path_factory):
    """A 1-layer wav2vec2 with a layer-norm front end (kernels 10, 3; strides 5, 2) and a normalizing processor."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    path = tmp_path_factory.mktemp("tiny_wav2vec2")
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000, "do_normalize": True}))
    return path
