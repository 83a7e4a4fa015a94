"""Feature extractors shared by the learners. Each takes the sample shape and exposes ``out_dim``.

Normalisation is LayerNorm/GroupNorm only: no running statistics, so a network is safe to vmap
over the tasks of a meta-batch (MAML) and scores never depend on what else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Conv4(nn.Module):
    """The standard few-shot conv net (Vinyals et al. 2016; MAML; ProtoNet), flattened at the end.

    ``blocks`` x [Conv3x3(``channels``, padding 1) -> GroupNorm -> ReLU -> MaxPool2]. GroupNorm
    stands in for the usual BatchNorm: BatchNorm without running statistics would still normalise
    with the statistics of the batch, making a query's score depend on the other queries
    (transductive) and on how tasks are batched; GroupNorm has no batch dependence and is vmap-safe.
    A 1x28x28 input gives a 64-d embedding, 3x84x84 a 1,600-d one.
    """

    def __init__(
        self, sample_shape: Sequence[int], channels: int = 64, blocks: int = 4, norm_groups: int = 8
    ) -> None:
        super().__init__()
        if len(sample_shape) != 3:
            raise ValueError(
                f"backbone Conv4 needs image samples (channels, height, width), but the dataset gives "
                f"shape {tuple(sample_shape)}; use backbone=mlp for vectors"
            )
        if channels % norm_groups:
            raise ValueError(
                f"backbone.channels ({channels}) must be divisible by backbone.norm_groups ({norm_groups})"
            )
        c, h, w = sample_shape
        if min(h, w) < 2**blocks:
            raise ValueError(
                f"backbone Conv4: {h}x{w} images are too small for {blocks} blocks of 2x pooling"
            )
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += [
                nn.Conv2d(c if i == 0 else channels, channels, kernel_size=3, padding=1),
                nn.GroupNorm(norm_groups, channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            h, w = h // 2, w // 2
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = channels * h * w

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
