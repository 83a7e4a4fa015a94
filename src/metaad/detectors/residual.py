"""Residual learner: the baselines' judgement plus a learned correction from the window itself.

On series, no-learning detectors fitted on the K support windows (PCA reconstruction, kNN,
robust z-scores) were what a learned embedding alone failed to beat. This learner starts *as*
those baselines and learns only what they miss::

    score(q) = w . n(q) + head([n(q), e(q) - p, |e(q) - p|^2 / E])

``n(q)`` the baselines' scores normalised by the support's leave-one-out scores
(:class:`~metaad.detectors.series_baselines.BaselineScores`), ``e`` the backbone's embedding,
``p`` the support prototype (its mean embedding). ``w`` starts at ``1 / M`` and the head's last
layer at zero, so the untrained learner is the mean of the normalised baselines; meta-training
(pairwise ranking loss, every anomaly above every normal of an episode) moves it only as far as
other entities' episodes support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, embed_tasks, ranking_loss, sliding_windows
from metaad.detectors.series_baselines import BaselineScores


class ResidualLearner(Learner):
    def __init__(
        self,
        backbone: nn.Module,
        detectors: Sequence[str] = ("zscore", "pca", "knn"),
        hidden: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"model.hidden must be a positive integer, got {hidden!r}")
        self.backbone = backbone
        self.baselines = BaselineScores(list(detectors))
        m, e = len(self.baselines.names), backbone.out_dim
        self.weights = nn.Parameter(torch.full((m,), 1.0 / m))
        self.head = nn.Sequential(nn.Linear(m + e + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def embed(self, x: Tensor) -> Tensor:
        """(B, N, *x) -> (B, N, E)."""
        return embed_tasks(self.backbone, x)

    def adapt(self, support: Tensor) -> tuple[Any, Tensor]:
        return self.baselines.adapt(support), self.embed(support).mean(1, keepdim=True)

    def _combine(self, normalised: Tensor, embedded: Tensor, prototype: Tensor) -> Tensor:
        offset = embedded - prototype
        distance = offset.pow(2).mean(-1, keepdim=True)
        correction = self.head(torch.cat([normalised, offset, distance], -1)).squeeze(-1)
        return normalised @ self.weights + correction

    def score(self, state: tuple[Any, Tensor], query: Tensor) -> Tensor:
        adapted, prototype = state
        return self._combine(self.baselines.score(adapted, query), self.embed(query), prototype)

    def score_stream(self, state: tuple[Any, Tensor], series: Tensor, window: int) -> Tensor:
        """Every window of ``series`` (B, T, D): baselines and (a streaming) backbone in one pass each."""
        adapted, prototype = state
        normalised = self.baselines.score_stream(adapted, series, window)
        if hasattr(self.backbone, "stream") and self.backbone.window == window:
            embedded = self.backbone.stream(series)
        else:
            windows = sliding_windows(series, window)
            embedded = torch.cat(
                [self.embed(windows[:, i : i + 4096].contiguous()) for i in range(0, windows.shape[1], 4096)],
                1,
            )
        return self._combine(normalised, embedded, prototype)

    def loss(self, batch: Episode) -> Tensor:
        return ranking_loss(self.anomaly_scores(batch.support, batch.query), batch.label)
