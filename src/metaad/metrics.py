"""Per-episode ranking metrics and their summary over episodes.

Scores of different episodes are not on one scale, so metrics are computed within each episode
on raw scores (no sigmoid, no pooling) and then averaged, with a normal-approximation 95% CI.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor


def episode_auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """AUROC of each episode: P(anomaly scores above normal) with ties counted half. (B, Q) -> (B,)."""
    pos, neg = labels.bool(), ~labels.bool()
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # [b, i, j] = s_i - s_j
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    pairs = pos.unsqueeze(2) & neg.unsqueeze(1)
    return (wins * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


def episode_average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision (area under the PR curve, step-wise, as scikit-learn) per episode. (B, Q) -> (B,)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    s = scores.gather(1, order)
    y = labels.gather(1, order).float()
    tp, fp = y.cumsum(1), (1 - y).cumsum(1)
    # Only the last position of each run of tied scores is a threshold.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:, :-1] = s[:, :-1] != s[:, 1:]
    recall = tp / y.sum(1, keepdim=True).clamp(min=1)
    precision = tp / (tp + fp)
    prev_recall = torch.cummax(torch.where(last, recall, torch.zeros_like(recall)), dim=1).values
    prev_recall = torch.cat([torch.zeros_like(recall[:, :1]), prev_recall[:, :-1]], dim=1)
    return (last * (recall - prev_recall) * precision).sum(1)


def summarize(values: Tensor) -> dict[str, float]:
    """Mean and 95% CI half-width (1.96 sd / sqrt(n)) over episodes."""
    values = values.double().flatten()
    n = values.numel()
    sd = values.std(unbiased=True).item() if n > 1 else float("nan")
    return {"mean": values.mean().item(), "ci95": 1.96 * sd / math.sqrt(n), "n_episodes": n}


class EpisodeMetrics:
    """Collects per-episode metric values of one detector over an evaluation loop."""

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = defaultdict(list)

    def update(self, scores: Tensor, labels: Tensor) -> None:
        scores, labels = scores.detach().float().cpu(), labels.cpu()
        self.values["auroc"].append(episode_auroc(scores, labels))
        self.values["aupr"].append(episode_average_precision(scores, labels))

    def per_episode(self) -> dict[str, Tensor]:
        return {name: torch.cat(chunks) for name, chunks in self.values.items()}

    def compute(self) -> dict[str, dict[str, float]]:
        return {name: summarize(values) for name, values in self.per_episode().items()}
