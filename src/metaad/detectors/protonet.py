"""Prototypical learner: the anomaly score is the distance of a query to the support prototype.

Two meta-training losses, same one-class scoring at test time:

- ``one_class`` (default): within each episode, a pairwise logistic loss pushes every anomaly's
  distance above every normal's, ``softplus((d_normal - d_anomaly) / T)``, a smooth surrogate of
  1 - AUROC, the metric we report.
- ``nway``: standard N-way ProtoNet classification. The prototypes are those of the distinct
  normal tasks in the meta-batch; each query sample of one of those tasks is classified by a
  softmax over negative distances / T. Often transfers better to unseen tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import (
    Learner,
    check_distance,
    embed_tasks,
    pairwise_distance,
    ranking_loss,
    windowed_stream_scores,
)


class ProtoNet(Learner):
    def __init__(
        self,
        backbone: nn.Module,
        distance: str = "euclidean",
        loss: str = "one_class",
        temperature: float = 1.0,
        learn_temperature: bool = True,
    ) -> None:
        super().__init__()
        if loss not in ("one_class", "nway"):
            raise ValueError(f"model.loss must be 'one_class' or 'nway', got {loss!r}")
        self.backbone, self.distance, self.loss_kind = backbone, check_distance(distance), loss
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=learn_temperature
        )

    def embed(self, x: Tensor) -> Tensor:
        """(B, N, *x) -> (B, N, D)."""
        return embed_tasks(self.backbone, x)

    def adapt(self, support: Tensor) -> Tensor:
        return self.embed(support).mean(1, keepdim=True)  # (B, 1, D) prototype

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(self.embed(query), state, self.distance).squeeze(-1)

    def score_stream(self, state: Tensor, series: Tensor, window: int) -> Tensor:
        """Every window of ``series`` (B, T, D) in one causal pass when the backbone can stream."""
        if not hasattr(self.backbone, "stream") or self.backbone.window != window:
            return windowed_stream_scores(self, state, series, window)
        return pairwise_distance(self.backbone.stream(series), state, self.distance).squeeze(-1)

    def loss(self, batch: Episode) -> Tensor:
        if self.loss_kind == "nway" and batch.task.unique().numel() > 1:
            return self._nway_loss(batch)
        return self._one_class_loss(batch)

    def _one_class_loss(self, batch: Episode) -> Tensor:
        scores = self.anomaly_scores(batch.support, batch.query) / self.log_temperature.exp()
        return ranking_loss(scores, batch.label)

    def _nway_loss(self, batch: Episode) -> Tensor:
        tasks, episode_class = batch.task.unique(return_inverse=True)  # (N,), (B,)
        support = self.embed(batch.support)  # (B, K, D)
        sums = torch.zeros(len(tasks), support.shape[-1], device=support.device, dtype=support.dtype)
        sums.index_add_(0, episode_class, support.sum(1))
        counts = torch.bincount(episode_class, minlength=len(tasks)).to(support.dtype) * support.shape[1]
        prototypes = sums / counts.unsqueeze(1)  # (N, D)
        # Queries whose source task has a prototype here, labelled by that prototype's index.
        match = batch.query_task.unsqueeze(-1) == tasks  # (B, Q, N)
        keep = match.any(-1)
        query = self.embed(batch.query)[keep]  # (M, D)
        target = match[keep].float().argmax(-1)
        logits = -pairwise_distance(query.unsqueeze(0), prototypes.unsqueeze(0), self.distance)[0]
        return F.cross_entropy(logits / self.log_temperature.exp(), target)
