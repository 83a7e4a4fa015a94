"""Per-episode ranking and decision metrics, and their summary over episodes.

Scores of different episodes are not on one scale, so ranking metrics are computed within each
episode on raw scores (no sigmoid, no pooling) and then averaged, with a normal-approximation
95% CI. Decision metrics (F1, precision, recall, balanced accuracy) take the yes/no decisions a
threshold made (see ``metaad.evaluation.thresholds``) and are averaged over episodes the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from metaad.evaluation.results import Summary


def episode_auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """AUROC of each episode: P(anomaly scores above normal) with ties counted half. (B, Q) -> (B,).

    From the ranks (Mann-Whitney U, tied scores sharing their mean rank), in O(Q log Q) time and
    O(Q) memory: the pairwise form took (B, Q, Q) tensors, gigabytes for 4,000-sample queries.
    An episode without anomalies or without normals gets 0.
    """
    b, q = scores.shape
    order = scores.argsort(dim=1, stable=True)
    ordered = scores.gather(1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.cumsum(1) - 1  # index of each sorted score's run of ties
    position = torch.arange(q, dtype=torch.float64).expand(b, q)
    first = torch.zeros(b, q, dtype=torch.float64).scatter_reduce(
        1, run, position, "amin", include_self=False
    )
    last = torch.zeros(b, q, dtype=torch.float64).scatter_reduce(1, run, position, "amax", include_self=False)
    mean_rank = ((first + last) / 2 + 1).gather(1, run)  # 1-based, ties share their mean
    ranks = torch.empty_like(mean_rank).scatter_(1, order, mean_rank)
    pos = labels.bool()
    n_pos = pos.sum(1).double()
    n_neg = q - n_pos
    u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
    return torch.where(n_pos * n_neg > 0, u / (n_pos * n_neg).clamp(min=1), 0.0).to(scores.dtype)


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


def decision_metrics(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, Tensor]:
    """F1, precision, recall and balanced accuracy from confusion counts of any (matching) shape.

    Precision with no positive decision is 0 (scikit-learn's ``zero_division=0``); so is F1 with
    neither a true anomaly nor a false alarm.
    """
    tp, fp, fn, tn = (t.double() for t in (tp, fp, fn, tn))
    recall = tp / (tp + fn).clamp(min=1)
    specificity = tn / (tn + fp).clamp(min=1)
    return {
        "f1": 2 * tp / (2 * tp + fp + fn).clamp(min=1),
        "precision": tp / (tp + fp).clamp(min=1),
        "recall": recall,
        "balanced_accuracy": (recall + specificity) / 2,
    }


def episode_decision_metrics(is_anomaly: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Decision metrics of each episode. (B, Q) decisions and labels -> name: (B,)."""
    predicted, actual = is_anomaly.bool(), labels.bool()
    return decision_metrics(
        (predicted & actual).sum(1),
        (predicted & ~actual).sum(1),
        (~predicted & actual).sum(1),
        (~predicted & ~actual).sum(1),
    )


def summarize(values: Tensor, groups: Tensor | None = None) -> Summary:
    """Mean and 95% CI half-width over episodes, or over ``groups``.

    ``groups`` (one key per episode, e.g. its entity): episodes of one group are averaged first and
    the CI is taken over the group means (``n_groups`` of them). Draws of one entity are not
    independent evidence, so a CI over entities x draws would pseudo-replicate and be too narrow.
    """
    values = values.double().flatten()
    n_episodes = values.numel()
    n_groups = None
    if groups is not None:
        groups = groups.flatten()
        if groups.numel() != n_episodes:
            raise ValueError(f"summarize: {groups.numel()} group keys for {n_episodes} episode values")
        _, inverse = groups.unique(return_inverse=True)
        counts = torch.bincount(inverse).double()
        values = torch.zeros_like(counts).index_add_(0, inverse, values) / counts
        n_groups = values.numel()
    n = values.numel()
    sd = values.std(unbiased=True).item() if n > 1 else float("nan")
    return Summary(values.mean().item(), 1.96 * sd / math.sqrt(n), n_episodes, n_groups)


class EpisodeMetrics:
    """Collects per-episode metric values of one detector over an evaluation loop.

    ``update`` adds the ranking metrics of a batch of episodes; ``add_decisions`` the decision
    metrics, once a threshold has made its decisions.
    """

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = defaultdict(list)

    def update(self, scores: Tensor, labels: Tensor) -> None:
        scores, labels = scores.detach().float().cpu(), labels.cpu()
        self.values["auroc"].append(episode_auroc(scores, labels))
        self.values["aupr"].append(episode_average_precision(scores, labels))

    def add_decisions(self, is_anomaly: Tensor, labels: Tensor) -> None:
        for name, values in episode_decision_metrics(is_anomaly.cpu(), labels.cpu()).items():
            self.values[name].append(values)

    def per_episode(self) -> dict[str, Tensor]:
        return {name: torch.cat(chunks) for name, chunks in self.values.items()}

    def compute(self, groups: Tensor | None = None) -> dict[str, Summary]:
        """Each metric's summary; with ``groups`` (E,) episodes are averaged within a group first.
        Episodes where a metric is undefined (NaN: a pixel metric without a defect pixel) are left
        out of that metric's summary; one defined nowhere is not reported."""
        summaries = {}
        for name, values in self.per_episode().items():
            defined = ~torch.isnan(values)
            if defined.all():
                summaries[name] = summarize(values, groups)
            elif defined.any():
                summaries[name] = summarize(values[defined], None if groups is None else groups[defined])
        return summaries
