"""Feature extractors shared by the learners. Each takes the sample shape and exposes ``out_dim``.

Normalisation is LayerNorm/GroupNorm only: no running statistics, so a network is safe to vmap
over the tasks of a meta-batch (MAML) and scores never depend on what else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then Linear -> LayerNorm -> ReLU blocks, then a linear embedding of ``embed_dim``."""

    def __init__(self, sample_shape: Sequence[int], hidden: Sequence[int] = (128, 128), embed_dim: int = 64) -> None:
        super().__init__()
        dims = [math.prod(sample_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], embed_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
