"""The one interface every detector answers, learned or not: adapt to a support set, then score.

A *learner* is a plain ``nn.Module`` that also has a meta-training ``loss``. Nothing here (nor
in any detector) imports Lightning: :mod:`metaad.training.module` meta-trains a learner, and the Python
API (:mod:`metaad.api`) scores with one without it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Detector(Protocol):
    """``state = adapt(support)`` with support ``(B, K, *x)`` normal samples; then
    ``score(state, query)`` maps a query ``(B, Q, *x)`` to ``(B, Q)`` scores, higher = more anomalous.

    Export (:mod:`metaad.export`) traces ``score`` on a fitted state; a detector whose ``score`` cannot
    be traced may offer ``scoring_module(state) -> nn.Module``, one task's ``(Q, *x) -> (Q,)`` scoring.
    """

    def adapt(self, support: Tensor) -> Any: ...

    def score(self, state: Any, query: Tensor) -> Tensor: ...


class Learner(nn.Module):
    """A detector with parameters and a meta-training loss on a meta-batch of episodes.

    ``loss`` may return ``None`` for a step with nothing to optimise (a learner that only
    accumulates statistics from the episodes, such as the covariance prior).
    """

    def adapt(self, support: Tensor) -> Any:
        raise NotImplementedError

    def score(self, state: Any, query: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, episodes: Any) -> Tensor | None:
        raise NotImplementedError

    def anomaly_scores(self, support: Tensor, query: Tensor) -> Tensor:
        return self.score(self.adapt(support), query)


def anomaly_scores(detector: Detector, support: Tensor, query: Tensor) -> Tensor:
    """``score(adapt(support), query)`` for any detector."""
    return detector.score(detector.adapt(support), query)


_BLOCK = 2**24  # values of the differences a euclidean pairwise_distance forms at once


def pairwise_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """Distances between rows of ``a`` (B, Q, D) and ``b`` (B, M, D) -> (B, Q, M).

    ``euclidean`` is squared Euclidean, summed over differences (no ``|a|^2 + |b|^2 - 2ab``
    cancellation); the (B, Q, M, D) differences are formed a block of rows of ``a`` at a time, so
    large sets (10,000 support samples) need no more than ``_BLOCK`` values at once.
    ``cosine`` is 1 - cosine similarity.
    """
    if distance == "euclidean":
        per_row = a.shape[0] * b.shape[1] * a.shape[2]
        rows = max(1, _BLOCK // max(1, per_row))
        if rows >= a.shape[1]:
            return (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)
        blocks = [a[:, i : i + rows] for i in range(0, a.shape[1], rows)]
        return torch.cat([(x.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1) for x in blocks], 1)
    if distance == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - a @ b.transpose(1, 2)
    raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")


def check_distance(distance: str, setting: str = "model.distance") -> str:
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"{setting} must be 'euclidean' or 'cosine', got {distance!r}")
    return distance
