"""No-learning detectors, scored on the very same episodes as every learner.

They answer the same ``adapt`` / ``score`` interface as the learners (see ``metaad.detector``),
work in input space on flattened samples, and have no parameters and no loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairwise_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """Distances between rows of ``a`` (B, Q, D) and ``b`` (B, M, D) -> (B, Q, M).

    ``euclidean`` is squared Euclidean; ``cosine`` is 1 - cosine similarity.
    """
    if distance == "euclidean":
        return (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)
    if distance == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - a @ b.transpose(1, 2)
    raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")


class SupportMeanDistance:
    """Distance of each query to the mean of the support samples, in raw input space."""

    def __init__(self, distance: str = "euclidean") -> None:
        pairwise_distance(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), distance)  # validate early
        self.distance = distance

    def adapt(self, support: Tensor) -> Tensor:
        return support.flatten(2).mean(1, keepdim=True)

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(query.flatten(2), state, self.distance).squeeze(-1)


class NearestNeighbourDistance:
    """Distance of each query to its nearest support sample (1-NN), in raw input space."""

    def __init__(self, distance: str = "euclidean") -> None:
        pairwise_distance(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), distance)
        self.distance = distance

    def adapt(self, support: Tensor) -> Tensor:
        return support.flatten(2)

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(query.flatten(2), state, self.distance).min(-1).values
