"""BERT encoders (all-MiniLM-L6-v2, the default text model, is one) run without transformers.

Importing transformers and its BERT modules takes about 2.5 s of CPU in every process that loads a
text model: the Beam workers' fork server, where the second core idles meanwhile, or each worker of
a plain script. ``load`` runs the same model from the folder's ``model.safetensors`` and
``tokenizer.json`` with torch and the ``tokenizers`` library alone, in about a tenth of that.

The forward pass is the operations of transformers' ``BertModel`` with its default (sdpa)
attention, in the same order on the same shapes: embeddings summed word + token type, then
position, each layer's separate query/key/value projections, a boolean key-padding mask (none when
no token is padding), exact GELU, residual adds inside the layer norms. The features are
bit-identical to ``AutoModel``'s ``last_hidden_state`` (tested), so a dataset extracted either way
holds the same bytes. The pooler is not computed: nothing reads it.

``plain_bert(path)`` says whether a folder is such a model. A folder that is not (another
architecture, relative positions, a decoder, another activation or attention implementation, no
safetensors weights or no tokenizer.json, a tokenizer.json other than the one transformers'
BertTokenizer rebuilds from tokenizer_config.json, or settings there that change its output) loads
through transformers as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
# tokenizer_config.json keys of BertTokenizer and the BertNormalizer fields they set (with their defaults)
NORMALIZER_KEYS = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                   "tokenize_chinese_chars": ("handle_chinese_chars", True)}
# tokenizer_config.json settings that change what transformers' tokenizer does, at the values that do not
TOKENIZER_SETTINGS = {"padding_side": "right", "truncation_side": "right", "split_special_tokens": False,
                      "do_basic_tokenize": True, "never_split": None, "add_special_tokens": True}
SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]"}
WORDPIECE = {"continuing_subword_prefix": "##", "max_input_chars_per_word": 100}  # as BertTokenizer builds it


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def plain_bert(path: str) -> str | None:
    """None when the folder at ``path`` holds a BERT encoder that ``load`` runs exactly as transformers
    would; otherwise why not (for the log)."""
    if os.environ.get("MBM_NATIVE_BERT", "1") == "0":
        return "turned off by MBM_NATIVE_BERT=0"
    folder = Path(path)
    config = _json(folder / "config.json")
    checks = [
        (config.get("model_type") == "bert", f"model_type is {config.get('model_type')!r}, not 'bert'"),
        (not config.get("is_decoder") and not config.get("add_cross_attention"), "a decoder"),
        (config.get("position_embedding_type", "absolute") == "absolute",
         f"position_embedding_type {config.get('position_embedding_type')!r}"),
        (config.get("hidden_act", "gelu") == "gelu", f"hidden_act {config.get('hidden_act')!r}"),
        (not config.get("chunk_size_feed_forward"), "chunked feed-forward"),
        (config.get("_attn_implementation", config.get("attn_implementation")) in (None, "sdpa"),
         "an attention implementation other than sdpa"),
        (all(isinstance(config.get(k), int) and config[k] > 0 for k in
             ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
              "vocab_size", "max_position_embeddings", "type_vocab_size")), "config.json lacks a size"),
        ((folder / WEIGHTS).is_file(), f"no {WEIGHTS}"),
        ((folder / TOKENIZER).is_file(), f"no {TOKENIZER}"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    if config["hidden_size"] % config["num_attention_heads"]:
        return "hidden_size is not a multiple of num_attention_heads"
    return _tokenizer_mismatch(folder)


def _tokenizer_mismatch(folder: Path) -> str | None:
    """Why tokenizer.json may not be what transformers builds for this folder (None: it is).

    transformers' BertTokenizer rebuilds the tokenizer from tokenizer_config.json's settings: a
    BertNormalizer (clean_text on, the case, accent and Chinese-character flags of the settings), the
    BERT pre-tokenizer, a WordPiece model with "##" continuations, 100-character words and the
    settings' unknown token, [CLS] text [SEP] around a text, right padding and truncation. tokenizer.json
    must hold exactly that, and the settings ask nothing else of the tokenizer.
    """
    settings = _json(folder / "tokenizer_config.json")
    if settings.get("tokenizer_class") not in (None, "BertTokenizer", "BertTokenizerFast"):
        return f"tokenizer_class {settings.get('tokenizer_class')!r}"
    for key, default in TOKENIZER_SETTINGS.items():
        if settings.get(key, default) != default:
            return f"tokenizer_config.json sets {key} = {settings[key]!r}"
    spec = _json(folder / TOKENIZER)
    normalizer = spec.get("normalizer") or {}
    model = spec.get("model") or {}
    if normalizer.get("type") != "BertNormalizer" or model.get("type") != "WordPiece":
        return "tokenizer.json is not a BERT WordPiece tokenizer"
    if (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
        return "tokenizer.json's pre-tokenizer is not BERT's"
    expected_model = {**WORDPIECE, "unk_token": _token(settings, "unk_token")}
    if any(model.get(key) != value for key, value in expected_model.items()):
        return "tokenizer.json's WordPiece settings are not BertTokenizer's"
    if normalizer.get("clean_text") is not True:
        return "tokenizer.json does not clean text as BertTokenizer does"
    for key, (field, default) in NORMALIZER_KEYS.items():
        if normalizer.get(field) != settings.get(key, default):
            return f"tokenizer_config.json {key} disagrees with tokenizer.json"
    if _template(spec.get("post_processor") or {}) != [_token(settings, "cls_token"), "A", _token(settings, "sep_token")]:
        return "tokenizer.json does not wrap a text in the [CLS] and [SEP] tokens tokenizer_config.json names"
    return None


def _token(settings: dict[str, Any], key: str) -> Any:
    """A special token as tokenizer_config.json names it (a string or an AddedToken dict), with BERT's default."""
    value = settings.get(key, SPECIAL_TOKENS[key])
    return value.get("content") if isinstance(value, dict) else value


def _template(processor: dict[str, Any]) -> list[Any]:
    """What a tokenizer.json post-processor puts around a single text: [cls, "A", sep] for BERT's."""
    if processor.get("type") == "BertProcessing":
        return [(processor.get("cls") or [None])[0], "A", (processor.get("sep") or [None])[0]]
    if processor.get("type") != "TemplateProcessing":
        return []
    parts = []
    for piece in processor.get("single") or []:
        kind, value = next(iter(piece.items())) if isinstance(piece, dict) and piece else (None, {})
        parts.append(value.get("id") if kind in ("SpecialToken", "Sequence") and isinstance(value, dict) else None)
    return parts


class WordPieceTokenizer:
    """The calls mbm makes of a transformers tokenizer, over a ``tokenizers.Tokenizer``:
    ``tok(texts, truncation=True, max_length=N)`` gives input_ids, token_type_ids and attention_mask
    as lists per text (flat lists for one str), special tokens added, no padding."""

    padding_side = "right"
    pad_token_type_id = 0

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()  # tokenizer.json may carry padding and truncation settings of its own
        self._tok.no_truncation()
        self._max_length: int | None = None
        settings = _json(path.parent / "tokenizer_config.json")
        pad = settings.get("pad_token", "[PAD]")
        self.pad_token = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = self._tok.token_to_id(self.pad_token) if isinstance(self.pad_token, str) else None

    def __call__(self, texts: list[str] | str, truncation: bool = False, max_length: int | None = None) -> dict[str, list]:
        if isinstance(texts, str):  # one text: flat lists, as transformers gives
            return {k: v[0] for k, v in self([texts], truncation, max_length).items()}
        limit = max_length if truncation else None
        if limit != self._max_length:
            if limit is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(limit)
            self._max_length = limit
        encodings = self._tok.encode_batch(list(texts))
        return {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                "attention_mask": [e.attention_mask for e in encodings]}


def load_tokenizer(path: str) -> WordPieceTokenizer | None:
    """The tokenizer ``load`` gives for the folder at ``path``, without the weights; None when
    ``plain_bert`` refuses the folder or its tokenizer has no pad token."""
    if plain_bert(path) is not None:
        return None
    tokenizer = WordPieceTokenizer(Path(path) / TOKENIZER)
    return tokenizer if tokenizer.pad_token_id is not None else None


def load(path: str) -> tuple[WordPieceTokenizer, Any] | None:
    """(tokenizer, float32 model in eval mode on the CPU) for the BERT folder at ``path``; None when
    ``plain_bert`` refuses it or its weights are not exactly the encoder's (missing or unknown keys,
    other shapes), which transformers then loads."""
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        return None
    from mbm.extractors.bert_encoder import BertEncoder, checkpoint

    folder = Path(path)
    model = BertEncoder(_json(folder / "config.json"))
    try:
        state = checkpoint(folder / WEIGHTS)
        model.load_state_dict(state, strict=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign checkpoint: transformers loads it, or says what is wrong
        return None
    return tokenizer, model.eval()
