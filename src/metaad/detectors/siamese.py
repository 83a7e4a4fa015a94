"""Siamese learner: a shared encoder trained with a contrastive loss on pairs drawn from episodes.

Within an episode, support and query samples form pairs: two normals are *similar*, a normal
and an anomaly *dissimilar* (two anomalies may come from different sources and are not paired).
The contrastive loss (Hadsell et al., 2006) pulls similar pairs together, ``d^2``, and pushes
dissimilar ones beyond ``margin``, ``max(0, margin - d)^2``, the two kinds weighted equally.

A query is scored by its distances to the support samples, aggregated by ``min`` (nearest
neighbour), ``mean``, or ``knn`` (mean of the ``k`` nearest). The distance is Euclidean or cosine
in the embedding, or ``learned``: a small pair head on ``(|a - b|, a * b)``, symmetric in the pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, embed_tasks, pairwise_distance, windowed_stream_scores

DISTANCES = ("euclidean", "cosine", "learned")
AGGREGATIONS = ("min", "mean", "knn")


class Siamese(Learner):
    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        margin: float = 1.0,
        aggregation: str = "min",
        k: int = 3,
        head_hidden: int = 64,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"model.distance must be one of {DISTANCES}, got {distance!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"model.aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"model.k must be a positive integer, got {k!r}")
        if not margin > 0:
            raise ValueError(f"model.margin must be positive, got {margin!r}")
        self.backbone, self.distance, self.margin = backbone, distance, margin
        self.aggregation, self.k = aggregation, k
        dim = backbone.out_dim
        self.pair_head = (
            nn.Sequential(nn.Linear(2 * dim, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))
            if distance == "learned"
            else None
        )

    def embed(self, x: Tensor) -> Tensor:
        """(B, N, *x) -> (B, N, D)."""
        return embed_tasks(self.backbone, x)

    def pair_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Distances between embeddings ``a`` (B, N, D) and ``b`` (B, M, D) -> (B, N, M), all >= 0."""
        if self.pair_head is not None:
            a, b = a.unsqueeze(2), b.unsqueeze(1)
            pair = torch.cat([(a - b).abs(), a * b], dim=-1)
            return F.softplus(self.pair_head(pair).squeeze(-1))
        d = pairwise_distance(a, b, self.distance)
        # Euclidean: the true (not squared) distance, which the margin is measured in.
        return d.clamp(min=1e-12).sqrt() if self.distance == "euclidean" else d

    def adapt(self, support: Tensor) -> Tensor:
        return self.embed(support)  # (B, K, D): every support sample is kept

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return self._aggregate(self.pair_distance(self.embed(query), state))

    def score_stream(self, state: Tensor, series: Tensor, window: int) -> Tensor:
        """Every window of ``series`` (B, T, D) in one causal pass when the backbone can stream."""
        if not hasattr(self.backbone, "stream") or self.backbone.window != window:
            return windowed_stream_scores(self, state, series, window)
        embedded = self.backbone.stream(series)
        # distances in pieces: a (B, windows, K, E) pair tensor of a long series would not fit
        pieces = [
            self._aggregate(self.pair_distance(embedded[:, i : i + 4096], state))
            for i in range(0, embedded.shape[1], 4096)
        ]
        return torch.cat(pieces, 1)

    def _aggregate(self, d: Tensor) -> Tensor:
        """Distances to the support (B, Q, K) -> scores (B, Q)."""
        if self.aggregation == "min":
            return d.min(-1).values
        if self.aggregation == "mean":
            return d.mean(-1)
        if self.k > d.shape[-1]:
            raise ValueError(
                f"model.k={self.k} nearest neighbours, but the support set has only {d.shape[-1]}"
            )
        return d.topk(self.k, dim=-1, largest=False).values.mean(-1)

    def loss(self, batch: Episode) -> Tensor:
        x = torch.cat([batch.support, batch.query], dim=1)  # (B, K + Q, *x)
        support_normal = batch.label.new_ones(batch.support.shape[:2], dtype=torch.bool)
        normal = torch.cat([support_normal, ~batch.label.bool()], dim=1)
        e = self.embed(x)
        d = self.pair_distance(e, e)  # (B, N, N)
        upper = torch.ones_like(d, dtype=torch.bool).triu(1)
        similar = normal.unsqueeze(2) & normal.unsqueeze(1) & upper
        dissimilar = (normal.unsqueeze(2) ^ normal.unsqueeze(1)) & upper
        pull = (d.pow(2) * similar).sum() / similar.sum()
        push = (F.relu(self.margin - d).pow(2) * dissimilar).sum() / dissimilar.sum()
        return 0.5 * (pull + push)
