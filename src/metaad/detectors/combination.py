"""Meta-learned detector combination, in the spirit of MetaOD (Zhao et al., NeurIPS 2021).

Which no-learning detector suits a new entity depends on the entity (smooth or bursty metrics,
many constant ones, strongly correlated ones, how spread its support windows are); MetaOD learns,
across training datasets, a map from a dataset's *meta-features* to the detector to use. Here the
"dataset" is an episode's support, and the map gives soft weights over the baselines' normalised
scores (:class:`~metaad.detectors.series_baselines.BaselineScores`)::

    weights = softmax(net(meta_features(support)) / T),   score(q) = weights . n(q)

trained end to end by the pairwise ranking loss on training entities' episodes (MetaOD fits a
performance matrix and regresses it; ranking the queries directly optimises the metric we
report). The net's last layer starts at zero: the untrained learner is the plain mean of the
normalised baselines. ``select``: at evaluation, use only the top-weighted detector (MetaOD's
hard choice) instead of the mixture.

Meta-features (all from the K support windows; bounded, and unchanged by a metric's units and
offset): over metrics, mean and sd of being sparse (MAD 0, sd not), lag-1 autocorrelation,
roughness (mean |step| / sd), skewness and (log) kurtosis; the share of constant metrics; the
mean |correlation| between metrics; the spread of the support windows around their mean relative
to the within-window spread; and, per baseline, the mean and sd of its normalised leave-one-out
scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, ranking_loss
from metaad.detectors.series_baselines import BaselineScores, as_windows, median

N_SUPPORT_FEATURES = 13


def support_meta_features(support: Tensor) -> Tensor:
    """Meta-features of each episode's support ``(B, K, *x)`` (see ``as_windows``) -> ``(B, 13)``."""
    x = as_windows(support).double()
    steps = x.flatten(1, 2)  # (B, K*W, D)
    mean, sd = steps.mean(1), steps.std(1, unbiased=False)
    constant = sd <= 1e-12 * (1 + mean.abs())
    safe = torch.where(constant, torch.ones_like(sd), sd)
    z = (x - mean[:, None, None]) / safe[:, None, None]  # (B, K, W, D)
    zs = z.flatten(1, 2)
    live = (~constant).double()
    n_live = live.sum(1).clamp(min=1)

    def over_metrics(values: Tensor) -> tuple[Tensor, Tensor]:
        m = (values * live).sum(1) / n_live
        return m, (((values - m[:, None]) ** 2 * live).sum(1) / n_live).sqrt()

    w = x.shape[2]
    if w > 1:
        autocorrelation = (z[:, :, 1:] * z[:, :, :-1]).mean((1, 2))
        roughness = (z[:, :, 1:] - z[:, :, :-1]).abs().mean((1, 2))
    else:
        autocorrelation = roughness = torch.zeros_like(sd)
    skew = zs.pow(3).mean(1).clamp(-10, 10) / 10
    kurtosis = zs.pow(4).mean(1).clamp(min=1e-6).log() / 5
    centre = median(steps, 1, keepdim=True)
    sparse = ((median((steps - centre).abs(), 1) <= 1e-12 * (1 + mean.abs())) & ~constant).double()
    correlation = (zs.transpose(1, 2) @ zs) / zs.shape[1]  # (B, D, D)
    pair = live.unsqueeze(2) * live.unsqueeze(1) * (1 - torch.eye(live.shape[1], dtype=live.dtype))
    mean_corr = (correlation.abs() * pair).sum((1, 2)) / pair.sum((1, 2)).clamp(min=1)
    windows = z.flatten(2)  # (B, K, W*D)
    between = (windows - windows.mean(1, keepdim=True)).pow(2).mean((1, 2))
    within = (z - z.mean(2, keepdim=True)).pow(2).mean((1, 2, 3))
    spread = (between.clamp(min=1e-12) / within.clamp(min=1e-12)).log().tanh()
    features = [
        *over_metrics(sparse),
        *over_metrics(autocorrelation),
        *over_metrics(roughness.tanh()),
        *over_metrics(skew),
        *over_metrics(kurtosis.tanh()),
        constant.double().mean(1),
        mean_corr,
        spread,
    ]
    return torch.stack(features, 1)


class MetaCombination(Learner):
    def __init__(
        self,
        backbone: nn.Module | None = None,
        detectors: Sequence[str] = ("zscore", "zscore_mean", "pca", "pca_step", "knn", "mean"),
        hidden: int = 32,
        temperature: float = 1.0,
        select: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"model.hidden must be a positive integer, got {hidden!r}")
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature!r}")
        self.baselines = BaselineScores(list(detectors))
        m = len(self.baselines.names)
        self.net = nn.Sequential(
            nn.Linear(N_SUPPORT_FEATURES + 2 * m, hidden), nn.Tanh(), nn.Linear(hidden, m)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.temperature, self.select = temperature, bool(select)

    def meta_features(self, support: Tensor, loo: Tensor) -> Tensor:
        """Support meta-features and, per baseline, the mean and sd of its normalised leave-one-out
        scores ``loo`` (B, K, M) -> (B, 13 + 2M)."""
        spread = loo.std(1, unbiased=False) if loo.shape[1] > 1 else torch.zeros_like(loo[:, 0])
        return torch.cat([support_meta_features(support), loo.mean(1).tanh(), spread.tanh()], 1)

    def weights(self, support: Tensor, loo: Tensor) -> Tensor:
        """Each episode's weights over the baselines (B, M), summing to 1."""
        logits = self.net(self.meta_features(support, loo).to(self.net[0].weight.dtype))
        weights = torch.softmax(logits / self.temperature, -1)
        if self.select and not self.training:
            weights = nn.functional.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
        return weights

    def adapt(self, support: Tensor) -> tuple[Any, Tensor]:
        adapted = self.baselines.adapt(support)
        return adapted, self.weights(support, adapted[2])

    def score(self, state: tuple[Any, Tensor], query: Tensor) -> Tensor:
        adapted, weights = state
        return (self.baselines.score(adapted, query) * weights.unsqueeze(1).to(query.dtype)).sum(-1)

    def score_stream(self, state: tuple[Any, Tensor], series: Tensor, window: int) -> Tensor:
        """Every window of ``series`` (B, T, D), each baseline in one pass where it can."""
        adapted, weights = state
        return (self.baselines.score_stream(adapted, series, window) * weights.unsqueeze(1)).sum(-1)

    def loss(self, batch: Episode) -> Tensor:
        return ranking_loss(self.anomaly_scores(batch.support, batch.query), batch.label)
