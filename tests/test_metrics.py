"""Per-episode AUROC / AUPR on raw scores, and their summary over episodes."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from metaad.evaluation.metrics import EpisodeMetrics, episode_auroc, episode_average_precision, summarize


def test_auroc_by_hand():
    scores = torch.tensor([[0.1, 0.4, 0.35, 0.8], [1.0, 1.0, 2.0, 0.0]])
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    # episode 0: anomaly 0.35 beats 0.1 only, 0.8 beats both -> 3/4
    # episode 1: anomaly 1.0 ties 1.0 (1/2) and beats 0.0; 2.0 beats both -> 3.5/4
    assert episode_auroc(scores, labels).tolist() == [0.75, 0.875]


def test_metrics_match_scikit_learn_with_ties_and_unbounded_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (50, 20), generator=gen).float() * 1e4  # ties, far outside [0, 1]
    labels = (torch.rand(50, 20, generator=gen) < 0.4).long()
    labels[:, 0], labels[:, 1] = 0, 1
    auroc, ap = episode_auroc(scores, labels), episode_average_precision(scores, labels)
    for b in range(50):
        assert auroc[b].item() == pytest.approx(roc_auc_score(labels[b], scores[b]), abs=1e-6)
        assert ap[b].item() == pytest.approx(average_precision_score(labels[b], scores[b]), abs=1e-6)


def test_metrics_are_per_episode_not_pooled():
    # Each episode is ranked perfectly, but on scales that would interleave if pooled.
    scores = torch.tensor([[0.0, 1.0], [100.0, 101.0]])
    labels = torch.tensor([[0, 1], [0, 1]])
    metrics = EpisodeMetrics()
    metrics.update(scores, labels)
    assert metrics.compute()["auroc"].mean == 1.0
    pooled = roc_auc_score(labels.flatten(), scores.flatten())
    assert pooled < 1.0


def test_summary_mean_and_confidence_interval():
    summary = summarize(torch.tensor([0.5, 0.7, 0.9, 0.7]))
    sd = torch.tensor([0.5, 0.7, 0.9, 0.7]).std().item()
    assert summary.mean == pytest.approx(0.7)
    assert summary.ci95 == pytest.approx(1.96 * sd / math.sqrt(4))
    assert summary.n_episodes == 4


def test_auroc_from_ranks_equals_the_pairwise_definition_with_ties_and_one_class_episodes():
    """The rank form (O(Q) memory, for 4,000-sample queries) gives exactly what the (B, Q, Q)
    pairwise count gave, ties counted half, and 0 for an episode of one class."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 30), generator=generator).float()  # many ties
    labels = torch.randint(0, 2, (40, 30), generator=generator)
    labels[0], labels[1] = 0, 1
    pos, neg = labels.bool(), ~labels.bool()
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    pairs = pos.unsqueeze(2) & neg.unsqueeze(1)
    pairwise = (wins * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    assert torch.equal(episode_auroc(scores, labels), pairwise)
    big = torch.randn(2, 4000, generator=generator)
    big_labels = (torch.arange(4000) % 2).expand(2, 4000)
    for b in range(2):
        expected = roc_auc_score(big_labels[b], big[b])
        assert episode_auroc(big, big_labels)[b].item() == pytest.approx(expected, abs=1e-6)
