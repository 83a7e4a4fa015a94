"""Threshold rules on hand-built scores, the support normalisation, decision metrics, K=1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score

from metaad.apps.train import train
from metaad.detectors.backbones import MLP
from metaad.detectors.baselines import NearestNeighbourDistance, SupportMeanDistance
from metaad.detectors.protonet import ProtoNet
from metaad.evaluation.metrics import episode_decision_metrics
from metaad.evaluation.thresholds import (
    F1Optimal,
    Fixed,
    SupportQuantile,
    leave_one_out_scores,
    score_episodes,
    standardise,
)


def mean_f1(z: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    return float(np.mean([f1_score(y, s > t, zero_division=0) for s, y in zip(z.numpy(), labels.numpy())]))


def test_decision_metrics_match_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(40, 12, generator=gen) < 0.4).long()
    labels[:, 0], labels[:, 1] = 0, 1
    decided = torch.rand(40, 12, generator=gen) < 0.5
    decided[0] = False  # no positive decision: precision and F1 are 0, as scikit-learn's zero_division=0
    ours = episode_decision_metrics(decided, labels)
    for b in range(40):
        y, d = labels[b].numpy(), decided[b].numpy()
        assert ours["f1"][b].item() == pytest.approx(f1_score(y, d, zero_division=0))
        assert ours["precision"][b].item() == pytest.approx(precision_score(y, d, zero_division=0))
        assert ours["recall"][b].item() == pytest.approx(recall_score(y, d))
        assert ours["balanced_accuracy"][b].item() == pytest.approx(balanced_accuracy_score(y, d))


def test_standardise_uses_the_support_spread_only():
    loo = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])  # mean 2 / 20, sample sd 1 / 10
    scores = torch.tensor([[4.0, 2.0], [40.0, 0.0]])
    assert standardise(scores, loo) == pytest.approx(torch.tensor([[2.0, 0.0], [2.0, -2.0]]), abs=1e-5)
    standard = standardise(loo, loo)
    assert standard.mean(1) == pytest.approx(torch.zeros(2), abs=1e-6)
    assert standard.std(1) == pytest.approx(torch.ones(2), abs=1e-5)


def test_leave_one_out_by_hand():
    support = torch.tensor([[[0.0], [2.0], [4.0]]])
    # held out 0: mean of (2, 4) is 3, squared distance 9; held out 2: mean 2, 0; held out 4: mean 1, 9
    assert leave_one_out_scores(SupportMeanDistance("euclidean"), support).tolist() == [[9.0, 0.0, 9.0]]


@pytest.mark.parametrize(
    "detector",
    [
        SupportMeanDistance("euclidean"),
        NearestNeighbourDistance("cosine"),
        ProtoNet(MLP([6], hidden=[8], embed_dim=4)),
    ],
    ids=["mean", "nn", "protonet"],
)
def test_batched_leave_one_out_equals_adapting_on_each_subset(detector):
    torch.manual_seed(0)
    support = torch.randn(3, 5, 6)
    batched = leave_one_out_scores(detector, support)
    with torch.no_grad():
        for k in range(5):
            rest = torch.cat([support[:, :k], support[:, k + 1 :]], 1)
            alone = detector.score(detector.adapt(rest), support[:, k : k + 1])[:, 0]
            assert batched[:, k] == pytest.approx(alone, abs=1e-5)


def test_each_rule_scores_only_what_it_needs_and_no_fewer_shots_than_it_can_decide_with():
    detector, query = SupportMeanDistance(), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="at least 2 support samples"):
        leave_one_out_scores(detector, torch.randn(2, 1, 4))
    two = torch.randn(2, 2, 4)
    # K=2: a distance to the other sample, both ways: equal leave-one-out scores, no spread for a z-score
    loo = leave_one_out_scores(detector, two)
    assert loo[:, 0] == pytest.approx(loo[:, 1])
    minimum = [
        F1Optimal().min_k_shot,
        SupportQuantile(normalise="none").min_k_shot,
        Fixed(1, "none").min_k_shot,
    ]
    assert minimum == [3, 2, 1]
    assert score_episodes(detector, two, query, F1Optimal()).normalised is None
    assert "threshold.normalise=none" in F1Optimal().too_few(2)
    raw = score_episodes(detector, torch.randn(2, 1, 4), query, F1Optimal(normalise="none"))
    assert torch.equal(raw.normalised, raw.scores) and raw.support_normalised is None
    assert (
        score_episodes(detector, torch.randn(2, 1, 4), query, SupportQuantile(normalise="none")).normalised
        is None
    )
    quantile = score_episodes(detector, two, query, SupportQuantile(normalise="none"))
    assert torch.equal(quantile.support_normalised, leave_one_out_scores(detector, two))
    zscore = score_episodes(detector, torch.randn(2, 4, 4), query, Fixed(2.0))
    assert zscore.normalised.shape == (2, 3) and zscore.support_normalised.shape == (2, 4)
    assert score_episodes(detector, two, query).normalised is None  # no threshold: ranking only


def test_f1_optimal_finds_the_only_threshold_that_separates_every_episode():
    # Episode 0 separates for t in [1, 3), episode 1 for t in [2, 2.5): only the cut 2.25 is perfect.
    z = torch.tensor([[0.0, 1.0, 3.0, 4.0], [0.0, 2.0, 2.5, 5.0]])
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    rule = F1Optimal()
    rule.fit(z, labels)
    assert rule.value == pytest.approx(2.25)
    assert mean_f1(z, labels, rule.value) == 1.0
    is_anomaly, thresholds = rule.decide(z, torch.zeros(2, 3))
    assert thresholds.tolist() == [2.25, 2.25] and is_anomaly.tolist() == labels.bool().tolist()


def test_f1_optimal_is_the_exact_maximiser_of_mean_episode_f1():
    gen = torch.Generator().manual_seed(1)
    labels = (torch.rand(8, 10, generator=gen) < 0.3).long()
    labels[:, 0], labels[:, 1] = 0, 1
    z = torch.randn(8, 10, generator=gen) + 1.5 * labels  # overlapping: no perfect threshold
    z[:, 2] = z[:, 3]  # ties
    rule = F1Optimal()
    rule.fit(z, labels)
    values = z.unique()
    cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    best = max(mean_f1(z, labels, t.item()) for t in cuts)
    assert mean_f1(z, labels, rule.value) == pytest.approx(best)
    assert best < 1.0


def test_f1_optimal_refuses_nan_and_being_used_unfitted():
    rule = F1Optimal()
    with pytest.raises(RuntimeError, match="has not been fitted"):
        rule.decide(torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        rule.fit(torch.tensor([[0.0, float("nan")]]), torch.tensor([[0, 1]]))


def test_support_quantile_per_episode():
    support_z = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [-1.5, -0.5, 0.5, 1.5]])
    z = torch.tensor([[2.0, 2.1], [1.4, 1.6]])
    assert SupportQuantile(q=1.0).per_episode(support_z).tolist() == [2.0, 1.5]
    assert SupportQuantile(q=1.0, margin=1.5).per_episode(support_z).tolist() == [3.0, 2.25]
    median = SupportQuantile(q=0.5).per_episode(support_z)
    assert median.tolist() == pytest.approx(np.quantile(support_z.numpy(), 0.5, axis=1).tolist())
    quantile = SupportQuantile(q=0.8, margin=2.0).per_episode(support_z)
    assert quantile.tolist() == pytest.approx((2 * np.quantile(support_z.numpy(), 0.8, axis=1)).tolist())
    is_anomaly, _ = SupportQuantile().decide(z, support_z)
    assert is_anomaly.tolist() == [[False, True], [False, True]]  # strictly above the episode's threshold


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"q": 1.5}, "threshold.q"),
        ({"margin": 0}, "threshold.margin"),
        ({"normalise": "minmax"}, "threshold.normalise"),
    ],
)
def test_support_quantile_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SupportQuantile(**kwargs)


def test_state_is_plain_data_and_reloads_only_under_the_same_rule():
    fitted = F1Optimal()
    fitted.fit(torch.tensor([[0.0, 3.0]]), torch.tensor([[0, 1]]))
    buffer = io.BytesIO()
    torch.save({"metaad_threshold": fitted.state_dict()}, buffer)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)["metaad_threshold"]
    assert stored == {"rule": "f1_optimal", "normalise": "zscore", "value": 1.5}
    again = F1Optimal()
    assert again.load_state_dict(stored) and again.value == 1.5
    assert not Fixed(2.0).load_state_dict(stored)
    assert not F1Optimal(normalise="none").load_state_dict(stored)  # fitted on another scale
    quantile = SupportQuantile(q=0.9, margin=1.2)
    expected = {"rule": "support_quantile", "normalise": "zscore", "q": 0.9, "margin": 1.2, "value": None}
    assert quantile.state_dict() == expected
    assert not SupportQuantile(q=1.0).load_state_dict(quantile.state_dict())
    fixed = {"rule": "fixed", "normalise": "none", "value": 2.0}
    assert json.loads(json.dumps(Fixed(2.0, "none").state_dict())) == fixed


def test_too_few_shots_for_a_z_score_reports_ranking_metrics_and_says_why(tmp_path: Path):
    from tests.conftest import compose_in

    cfg = compose_in(
        tmp_path, ["dataset.k_shot=2", "threshold.normalise=zscore", "baselines=none", "logger=none"]
    )
    with pytest.warns(UserWarning, match="k_shot=2"):
        metrics = train(cfg).to_json()
    assert "auroc" in metrics["test"] and "f1" not in metrics["test"]
    assert (
        metrics["threshold"]["rule"] == "f1_optimal" and "needs at least 3" in metrics["threshold"]["skipped"]
    )


def test_raw_scores_decide_from_one_shot(tmp_path: Path):
    from tests.conftest import compose_in

    cfg = compose_in(
        tmp_path, ["dataset.k_shot=1", "threshold.normalise=none", "baselines=none", "logger=none"]
    )
    metrics = train(cfg).to_json()
    assert 0.0 < metrics["test"]["balanced_accuracy"]["mean"] <= 1.0 and "skipped" not in metrics["threshold"]
    assert metrics["threshold"]["normalise"] == "none" and metrics["threshold"]["value"] is not None


def test_threshold_logit_is_named_logit_and_decides_at_sigmoid_one_half(compose_cfg):
    """threshold=logit is OC-MAML's sigmoid(logit) > 0.5: a raw score above 0, reported as `logit`."""
    from hydra.utils import instantiate

    rule = instantiate(compose_cfg(["threshold=logit"]).threshold)
    assert rule.state_dict() == {"rule": "logit", "normalise": "none", "value": 0.0}
    scores = torch.tensor([[-0.1, 0.0, 0.2]])
    decided, _ = rule.decide(scores, None)
    assert decided.tolist() == [[False, False, True]]
