"""Feature extractors shared by the learners. Each takes the sample shape and exposes ``out_dim``.

Normalisation is LayerNorm, GroupNorm or the statistics of a task's own support samples: never
running statistics or the query batch's, so a network is safe to vmap over the tasks of a
meta-batch (MAML) and a query's score never depends on the other queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with its affine step done apart, so second-order MAML under ``vmap`` is exact.

    torch's batching rule for the fused affine layer-norm backward gives wrong double-backward
    gradients under ``vmap`` (pytorch/functorch#534; seen in torch 2.13); normalising without
    weight and then scaling and shifting is exact. Same parameters and state_dict keys.
    """

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, self.normalized_shape, eps=self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


class MLP(nn.Module):
    """Flatten, then Linear -> LayerNorm -> ReLU blocks, then a linear embedding of ``embed_dim``."""

    def __init__(
        self, sample_shape: Sequence[int], hidden: Sequence[int] = (128, 128), embed_dim: int = 64
    ) -> None:
        super().__init__()
        dims = [math.prod(sample_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), LayerNorm(d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], embed_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = embed_dim
        self.sample_shape = tuple(sample_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SupportNorm(nn.Module):
    """Batch normalisation with the statistics of a task's support samples only.

    OC-MAML normalises each layer with the mean and (biased) variance of the K support samples
    of the task, under the current weights, and applies them to the support and the query alike:
    no running statistics, and nothing from the query batch (not transductive). Input
    ``(T, N, C, H, W)``: ``T`` tasks of ``N`` samples whose first ``n_support`` are the support.
    Vmap-safe (plain reductions over one task's rows).
    """

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor, n_support: int) -> Tensor:
        reference = x[:, :n_support]
        mean = reference.mean((1, 3, 4), keepdim=True)
        var = (reference - mean).pow(2).mean((1, 3, 4), keepdim=True)
        y = (x - mean) / (var + self.eps).sqrt()
        return y * self.weight.view(1, 1, -1, 1, 1) + self.bias.view(1, 1, -1, 1, 1)


class Conv4(nn.Module):
    """The standard few-shot conv net (Vinyals et al. 2016; MAML; ProtoNet), flattened at the end.

    ``blocks`` x [Conv3x3(``channels``, padding 1) -> norm -> ReLU -> MaxPool2]. ``norm``:

    - ``group`` (default): GroupNorm(``norm_groups``); no batch dependence at all.
    - ``support``: :class:`SupportNorm`, OC-MAML's BatchNorm from the task's support samples.
      Call ``forward(x, n_support=K)`` with ``x`` holding a task's support first; without
      ``n_support`` every sample of ``x`` is support (e.g. the inner loop of MAML).

    Plain BatchNorm without running statistics would normalise with the statistics of whatever
    batch it sees, making a query's score depend on the other queries and on how tasks are
    batched; neither option here does. A 1x28x28 input gives a 64-d embedding (channels=64).
    """

    def __init__(
        self,
        sample_shape: Sequence[int],
        channels: int = 64,
        blocks: int = 4,
        norm_groups: int = 8,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if len(sample_shape) != 3:
            raise ValueError(
                f"backbone Conv4 needs image samples (channels, height, width), but the dataset gives "
                f"shape {tuple(sample_shape)}; use backbone=mlp for vectors"
            )
        if norm not in ("group", "support"):
            raise ValueError(f"backbone.norm must be 'group' or 'support', got {norm!r}")
        if norm == "group" and channels % norm_groups:
            raise ValueError(
                f"backbone.channels ({channels}) must be divisible by backbone.norm_groups ({norm_groups})"
            )
        c, h, w = sample_shape
        self.sample_shape = tuple(sample_shape)
        if min(h, w) < 2**blocks:
            raise ValueError(
                f"backbone Conv4: {h}x{w} images are too small for {blocks} blocks of 2x pooling"
            )
        self.norm = norm
        self.convs = nn.ModuleList(
            nn.Conv2d(c if i == 0 else channels, channels, kernel_size=3, padding=1) for i in range(blocks)
        )
        self.norms = nn.ModuleList(
            nn.GroupNorm(norm_groups, channels) if norm == "group" else SupportNorm(channels)
            for _ in range(blocks)
        )
        self.out_dim = channels * (h // 2**blocks) * (w // 2**blocks)

    @property
    def uses_support(self) -> bool:
        """Whether a query's embedding depends on its task's support (``forward(x, n_support)``)."""
        return self.norm == "support"

    def forward(self, x: Tensor, n_support: int | None = None) -> Tensor:
        """``(N, C, H, W)`` (one task) or ``(T, N, C, H, W)`` -> ``(N, D)`` or ``(T, N, D)``."""
        one_task = x.dim() == 4
        tasks = x.unsqueeze(0) if one_task else x
        t, n = tasks.shape[:2]
        k = n if n_support is None else n_support
        h = tasks.flatten(0, 1)
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h)
            h = norm(h) if self.norm == "group" else norm(h.unflatten(0, (t, n)), k).flatten(0, 1)
            h = F.max_pool2d(F.relu(h), 2)
        out = h.flatten(1).unflatten(0, (t, n))
        return out[0] if one_task else out


class TCN(nn.Module):
    """Dilated causal 1-D convolutions over a window ``(W, D)`` (steps x metrics), for series.

    ``levels`` blocks, block ``i`` a causal conv of ``kernel_size`` with dilation ``2**i`` ->
    LayerNorm over channels -> ReLU, plus a 1x1 residual. The convolutions are *valid* (no
    padding): each step's features see exactly the ``receptive_field`` steps ending at it, never
    zeros standing in for a past the window cut off. The window's embedding is a linear map of the
    mean and the last of its ``W - receptive_field + 1`` step features.

    Why valid and causal: a step's features then depend only on the series up to that step, so
    :meth:`stream` scores a whole series ``(T, D)`` in one pass (every window's embedding from one
    convolution over the series and a sliding mean), equal to embedding each window on its own.
    LayerNorm is per step: no batch statistics, safe under ``vmap`` (MAML).
    """

    def __init__(
        self,
        sample_shape: Sequence[int],
        channels: int = 32,
        levels: int = 3,
        kernel_size: int = 3,
        embed_dim: int = 32,
    ) -> None:
        super().__init__()
        if len(sample_shape) != 2:
            raise ValueError(
                f"backbone TCN needs series windows (steps, metrics), but the dataset gives shape "
                f"{tuple(sample_shape)}; use backbone=mlp for vectors"
            )
        for name, value in (("channels", channels), ("levels", levels), ("embed_dim", embed_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"backbone.{name} must be a positive integer, got {value!r}")
        if not isinstance(kernel_size, int) or kernel_size < 2:
            raise ValueError(f"backbone.kernel_size must be an integer >= 2, got {kernel_size!r}")
        window, metrics = sample_shape
        self.sample_shape = tuple(sample_shape)
        self.receptive_field = 1 + (kernel_size - 1) * (2**levels - 1)
        if self.receptive_field > window:
            raise ValueError(
                f"backbone TCN: its receptive field ({self.receptive_field} steps, from levels={levels} "
                f"and kernel_size={kernel_size}) is longer than the window ({window} steps); use fewer "
                "levels, a smaller kernel or a longer window"
            )
        self.window = window
        self.convs = nn.ModuleList(
            nn.Conv1d(metrics if i == 0 else channels, channels, kernel_size, dilation=2**i)
            for i in range(levels)
        )
        self.norms = nn.ModuleList(LayerNorm(channels) for _ in range(levels))
        self.skip = nn.Conv1d(metrics, channels, 1)
        self.out = nn.Linear(2 * channels, embed_dim)
        self.out_dim = embed_dim

    def steps(self, x: Tensor) -> Tensor:
        """Per-step features ``(N, L, D)`` -> ``(N, C, L - receptive_field + 1)``: step ``j`` of the
        output sees input steps ``j .. j + receptive_field - 1``."""
        h = x.transpose(1, 2)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = F.relu(norm(conv(h).transpose(1, 2)).transpose(1, 2))
            residual = self.skip(h) if i == 0 else h
            h = y + residual[..., residual.shape[-1] - y.shape[-1] :]
        return h

    def pooled(self, h: Tensor, span: int) -> Tensor:
        """Embeddings of every run of ``span`` step features: ``(N, C, S)`` -> ``(N, S - span + 1, E)``."""
        mean = F.avg_pool1d(h, span, stride=1) if span > 1 else h
        last = h[..., span - 1 :]
        return self.out(torch.cat([mean, last], 1).transpose(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        """Windows ``(N, W, D)`` -> embeddings ``(N, E)``."""
        span = self.window - self.receptive_field + 1
        return self.pooled(self.steps(x), span)[:, 0]

    def stream(self, series: Tensor, chunk: int | None = 65536) -> Tensor:
        """Series ``(N, T, D)`` -> the embedding of every window ``(N, T - W + 1, E)`` in one causal
        pass; window ``i`` is ``series[:, i : i + W]``, ending at step ``i + W - 1``. A series longer
        than ``chunk`` windows goes in pieces overlapping by ``W - 1`` steps (same numbers, bounded
        memory)."""
        span = self.window - self.receptive_field + 1
        n_windows = series.shape[1] - self.window + 1
        if chunk is None or n_windows <= chunk:
            return self.pooled(self.steps(series), span)
        pieces = [
            self.pooled(self.steps(series[:, start : start + chunk + self.window - 1]), span)
            for start in range(0, n_windows, chunk)
        ]
        return torch.cat(pieces, 1)
