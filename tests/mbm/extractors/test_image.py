import functools

import numpy as np
import pytest
import torch

from mbm.extractors import create_extractor
from mbm.extractors.torchvision_image import feature_node

RNG = np.random.default_rng(0)


def _images(n: int, size: int = 224) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def lite0():
    extractor = create_extractor("efficientnet-lite0")
    return extractor, extractor.load("cpu")


def _flower(size: int = 224) -> np.ndarray:
    """scikit-learn's sample photo of a daisy, centre-cropped and resized."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    image = datasets.load_sample_image("flower.jpg")
    h, w, _ = image.shape
    s = min(h, w)
    image = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def test_lite0_gives_49_patches_of_1280(lite0):
    extractor, model = lite0
    features = extractor.featurize(model, _images(3), "cpu")
    assert [f.shape for f in features] == [(49, 1280)] * 3
    assert all(f.dtype == np.float16 and np.isfinite(f).all() for f in features)
    assert extractor.dim == 1280 and extractor.input_spec() == {"image_size": 224}
    assert not np.array_equal(features[0], features[1])


def test_lite0_pretrained_weights_recognise_a_daisy(lite0):
    extractor, model = lite0
    pixels = extractor.preprocess([_flower()], "cpu")
    with torch.inference_mode():
        logits = model(pixels)[0]
        random_features = extractor.build().eval().extract_features(pixels)
    assert torch.isfinite(logits).all() and logits.std() > 1.0
    assert int(logits.argmax()) == 985  # ImageNet "daisy"
    assert float(logits.softmax(-1).max()) > 0.15
    pretrained = extractor.featurize(model, [_flower()], "cpu")[0].astype(np.float32)
    random = random_features[0].flatten(1).T.numpy()
    assert np.corrcoef(pretrained.ravel(), random.ravel())[0, 1] < 0.5


def test_lite0_weights_must_match_strictly(tmp_path, lite0):
    extractor, _ = lite0
    state = extractor.build().state_dict()  # the checkpoint's layout (the loaded model is folded)
    del state["_fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    bad = create_extractor("efficientnet-lite0", {"weights": str(tmp_path / "bad.pth")})
    with pytest.raises(
        ValueError, match=r"1 missing keys \['_fc.bias'\], 1 unexpected keys \['extra.weight'\]"
    ):
        bad.load("cpu")


def _zip_without_a_pickle(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")


def _cut_short(path):
    torch.save({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("write, why", [
    (lambda p: p.write_text("hello, not weights\n"), r"it starts with b'hello, not weigh'"),
    (lambda p: p.write_bytes(b""), "it is empty"),
    (_zip_without_a_pickle, "it is a zip archive without the data.pkl torch.save writes"),
    (_cut_short, "it starts like a zip archive whose directory cannot be read: cut short?"),
])
def test_a_file_that_is_no_torch_weights_is_refused_from_its_first_bytes(tmp_path, write, why):
    from mbm.extractors.image import load_state_dict_file

    path = tmp_path / "w.pth"
    write(path)
    said = (f"weights = '{path}' is not a PyTorch weights file ({why}); set weights to a state dict saved with "
            "torch.save(model.state_dict(), path)")
    for name, options in (("efficientnet-lite0", {}), ("torchvision", {"arch": "resnet18"})):
        with pytest.raises(ValueError) as err:
            create_extractor(name, {**options, "weights": str(path)}).check_files()
        assert str(err.value) == said
    with pytest.raises(ValueError) as err:  # what a worker says too, not a KeyError from torch's unpickler
        load_state_dict_file(str(path))
    assert str(err.value) == said


def test_a_weights_folder_is_refused_and_files_torch_saved_pass(tmp_path):
    with pytest.raises(ValueError, match=f"weights = '{tmp_path}' is a folder; set weights to the state dict file"):
        create_extractor("efficientnet-lite0", {"weights": str(tmp_path)}).check_files()
    state = {"w": torch.arange(3.0)}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False, pickle_protocol=4)
    for name in ("zip.pth", "legacy.pth"):
        create_extractor("efficientnet-lite0", {"weights": str(tmp_path / name)}).check_files()
    create_extractor("efficientnet-lite0").check_files()  # the shipped ImageNet weights (legacy format)


def test_hf_image_refuses_a_text_or_speech_model_folder_from_its_config(tiny_bert_dir, tiny_wav2vec2_dir, tiny_vit_dir):
    create_extractor("hf-image", {"path": str(tiny_vit_dir)}).check_files()
    for path, held in ((tiny_bert_dir, "a text model (config.json: model_type 'bert', architectures BertModel)"),
                       (tiny_wav2vec2_dir, "a speech model (config.json: model_type 'wav2vec2', architectures "
                                           "Wav2Vec2Model)")):
        extractor = create_extractor("hf-image", {"path": str(path)})
        said = (f"path = '{path}' holds {held}, not an image model; set path to the folder of a vision model "
                "(ViT, ConvNeXt, DINOv2, ...)")
        for step in (extractor.check_files, functools.partial(extractor.load, "cpu")):
            with pytest.raises(ValueError) as err:
                step()
            assert str(err.value) == said


def test_lite0_rejects_images_of_the_wrong_size(lite0):
    extractor, model = lite0
    with pytest.raises(ValueError, match=r"input 1 must be a uint8 array of shape \(224, 224, 3\)"):
        extractor.featurize(model, _images(1) + _images(1, size=200), "cpu")


def _eager(extractor, model, images):
    fused, model.mbm_fused = model.mbm_fused, None
    try:
        return extractor.featurize(model, images, "cpu")
    finally:
        model.mbm_fused = fused


def test_padded_pixels_equal_normalizing_then_padding(lite0):
    from mbm.extractors.image import _zero_pad, padded_pixels

    extractor, _ = lite0
    images = _images(3)
    for pad in [(0, 1, 0, 1), (1, 2, 1, 2), (0, 0, 2, 0)]:
        got = padded_pixels(images, 224, pad, extractor.MEAN, extractor.STD, extractor.name)
        want = _zero_pad(extractor.preprocess(images, "cpu"), pad)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
        assert got.shape == want.shape and torch.equal(got, want)
        left, right, top, bottom = pad
        inner = got[:, :, top:top + 224, left:left + 224]
        assert float(got.abs().sum()) == float(inner.abs().sum()) > 0  # zeros outside the image
    with pytest.raises(ValueError, match="input 0 must be a uint8 array"):
        padded_pixels([images[0].astype(np.float32)], 224, (0, 1, 0, 1), 127.0, 128.0, "lite0")


@pytest.mark.parametrize("size, pads", [(224, {(0, 1, 0, 1), (1, 2, 1, 2)}), (257, set())])
def test_lite0_fused_cpu_convolutions_equal_the_eager_forward(size, pads):
    extractor = create_extractor("efficientnet-lite0", {"image_size": size})
    model = extractor.load("cpu")
    plan = model.mbm_fused
    assert plan is not None and len(plan.steps) == 49
    assert sum(act == "residual" for _, _, act, _ in plan.steps) == 9  # the blocks MBConvBlock adds its input to
    # TF "same" padding of the stride-2 convolutions: asymmetric on even sizes, folded into the convolution on odd
    assert {pad for _, pad, _, _ in plan.steps if pad} == pads
    # the stride-2 depthwise convolutions' paddings move to the input of their block's 1x1 expansion,
    # which zeroes that border of its output; only the stem keeps its own padding
    moved = [(conv.kernel_size, pad) for conv, pad, _, _, border in plan.plan if border]
    assert [pad for conv, pad, _, _, border in plan.plan if pad and not border] == ([(0, 1, 0, 1)] if pads else [])
    assert len(moved) == (4 if pads else 0) and all(k == (1, 1) for k, _ in moved)
    assert plan.input_padding == ((0, 1, 0, 1) if pads else None)
    images = _images(32, size)
    fused = extractor.featurize(model, images, "cpu")
    eager = _eager(extractor, model, images)
    assert all(np.array_equal(a, b) for a, b in zip(fused, eager, strict=True))  # a full pass: bit-identical
    few = extractor.featurize(model, images[:3], "cpu")
    for a, b in zip(few, _eager(extractor, model, images[:3]), strict=True):  # other shapes: within float16 steps
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=4e-3)


def test_lite0_fused_path_only_for_the_expected_structure_and_float32(lite0, monkeypatch):
    from mbm.extractors.image import FusedConvs

    extractor, model = lite0
    assert FusedConvs.build(extractor.build().eval()) is None  # batch norms not folded
    assert FusedConvs.build(extractor.load("cpu").train()) is None
    swish = extractor.load("cpu")
    swish._blocks[3]._swish = torch.nn.SiLU()  # an activation the plan does not fuse
    assert FusedConvs.build(swish) is None
    bf16 = create_extractor("efficientnet-lite0", {"precision": "bfloat16"})

    def refuse(self, x, padded=False):
        raise AssertionError("the fused float32 path ran under precision = bfloat16")

    monkeypatch.setattr(FusedConvs, "__call__", refuse)
    assert bf16.featurize(model, _images(1), "cpu")[0].shape == (49, 1280)
    with pytest.raises(AssertionError, match="fused float32 path"):
        extractor.featurize(model, _images(1), "cpu")


def test_torchvision_resnet18_from_a_local_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18().eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pt")
    extractor = create_extractor(
        "torchvision", {"arch": "resnet18", "weights": str(tmp_path / "resnet18.pt")}
    )
    assert extractor.dim == 512
    images = _images(2)
    features = extractor.featurize(extractor.load("cpu"), images, "cpu")
    assert [f.shape for f in features] == [(49, 512)] * 2

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.inference_mode():
        fmap = torch.nn.Sequential(*list(reference.children())[:-2])(x)  # (2, 512, 7, 7)
    expected = fmap.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.stack(features).astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_torchvision_random_init_is_opt_in_and_seeded():
    with pytest.raises(ValueError, match="allow_random"):
        create_extractor("torchvision", {"arch": "resnet18"})
    images = _images(1, size=64)

    def run(seed: int) -> np.ndarray:
        opts = {"arch": "resnet18", "allow_random": True, "seed": seed, "image_size": 64}
        extractor = create_extractor("torchvision", opts)
        return extractor.featurize(extractor.load("cpu"), images, "cpu")[0]

    first = run(0)
    assert first.shape == (4, 512)
    np.testing.assert_array_equal(first, run(0))
    assert not np.allclose(first, run(1))


def test_torchvision_finds_the_feature_map_across_families():
    import torchvision

    with torch.device("meta"):
        assert feature_node(torchvision.models.mobilenet_v2(), "mobilenet_v2") == "features.18"
        assert feature_node(torchvision.models.efficientnet_b0(), "efficientnet_b0") == "features.8"
        with pytest.raises(ValueError, match="set `node`"):
            feature_node(torchvision.models.vit_b_16(), "vit_b_16")
    assert create_extractor("torchvision", {"arch": "convnext_tiny", "allow_random": True}).dim == 768
    with pytest.raises(ValueError, match="did you mean resnet18"):
        _ = create_extractor("torchvision", {"arch": "resnet19", "allow_random": True}).dim


def test_hf_image_tiny_vit_tokens_match_the_model(tiny_vit_dir):
    from transformers import ViTModel

    extractor = create_extractor("hf-image", {"path": str(tiny_vit_dir)})
    assert extractor.input_spec() == {"image_size": 32} and extractor.dim == 32
    images = _images(2, size=32)
    features = extractor.featurize(extractor.load("cpu"), images, "cpu")
    assert [f.shape for f in features] == [(17, 32)] * 2  # CLS + (32 / 8)^2 patches
    reference = ViTModel.from_pretrained(tiny_vit_dir, local_files_only=True).eval()
    pixels = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        expected = reference(pixel_values=pixels).last_hidden_state.numpy()
    np.testing.assert_allclose(np.stack(features).astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def _random_bn(bn: torch.nn.BatchNorm2d, gen: torch.Generator) -> None:
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=gen))
    bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    bn.weight.data.copy_(torch.randn(n, generator=gen))
    bn.bias.data.copy_(torch.randn(n, generator=gen))


def test_fold_batchnorm_keeps_the_function_and_removes_the_norms():
    from mbm.extractors.image import fold_batchnorm

    gen = torch.Generator().manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                              torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4))

    class Block(torch.nn.Module):  # named pair, as in EfficientNet ports, plus a static "same" padding
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=4, bias=False)
            self.conv.static_padding = torch.nn.ZeroPad2d((1, 1, 1, 1))
            self.norm = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.conv(self.conv.static_padding(x)))

    model = torch.nn.Sequential(seq, Block())
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            _random_bn(m, gen)
    model.eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        want = model(x)
        fold_batchnorm(model, (("conv", "norm"),), inplace=True)
        got = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model[1].conv.padding == (1, 1) and isinstance(model[1].conv.static_padding, torch.nn.Identity)
    assert seq[2].inplace
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_leaves_unfoldable_layers_and_refuses_training_mode():
    from mbm.extractors.image import fold_batchnorm

    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(8),
                              torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(seq)
    fold_batchnorm(seq.eval())
    assert isinstance(seq[2], torch.nn.BatchNorm2d)  # not right after a conv
    assert isinstance(seq[4], torch.nn.BatchNorm2d)  # no running statistics to fold


def test_lite0_runs_folded_and_channels_last(lite0):
    extractor, model = lite0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
