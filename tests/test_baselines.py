"""The no-learning baselines against scikit-learn fitted by hand, their K edge cases and configs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import IsolationForest as SkForest
from sklearn.neighbors import LocalOutlierFactor as SkLOF
from sklearn.svm import OneClassSVM as SkSVM

from metaad.detectors.baselines import (
    IsolationForest,
    LocalOutlierFactor,
    Mahalanobis,
    NearestNeighbourDistance,
    OneClassSVM,
    SupportMeanDistance,
)
from metaad.evaluation.metrics import episode_auroc


def _episodes(b: int, k: int, q: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2.0, d)  # anisotropic, so Mahalanobis differs from Euclidean
    return torch.randn(b, k, d, generator=g) * scale, torch.randn(b, q, d, generator=g) * scale


def _scores(detector, support, query):
    return detector.score(detector.adapt(support), query)


def test_support_mean_and_nearest_neighbour_by_hand():
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    query = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]])
    torch.testing.assert_close(
        _scores(SupportMeanDistance("euclidean"), support, query), torch.tensor([[0.0, 2.0, 10.0]])
    )
    torch.testing.assert_close(
        _scores(NearestNeighbourDistance("euclidean"), support, query), torch.tensor([[1.0, 1.0, 9.0]])
    )
    cosine = _scores(NearestNeighbourDistance("cosine"), support[:, 1:], query)  # support is the +x axis
    torch.testing.assert_close(cosine, torch.tensor([[0.0, 1 - 2 / 5**0.5, 1.0]]))


@pytest.mark.parametrize("k, d", [(30, 5), (6, 20), (3, 100)])
def test_mahalanobis_equals_sklearns_ledoit_wolf(k, d):
    support, query = _episodes(4, k, 9, d)
    ours = _scores(Mahalanobis(), support.double(), query.double())
    expected = [
        LedoitWolf().fit(s.numpy()).mahalanobis(q.numpy()) for s, q in zip(support.double(), query.double())
    ]
    np.testing.assert_allclose(ours.numpy(), np.stack(expected), rtol=1e-4)
    # float32 in, float32 out, same numbers: the work is done in float64
    np.testing.assert_allclose(_scores(Mahalanobis(), support, query).numpy(), np.stack(expected), rtol=1e-4)


def test_mahalanobis_small_k():
    support, query = _episodes(3, 1, 5, 10)
    # K = 1: no covariance to estimate, the squared Euclidean distance to the one sample
    torch.testing.assert_close(
        _scores(Mahalanobis(), support, query), _scores(SupportMeanDistance("euclidean"), support, query)
    )
    # K = 2: Ledoit-Wolf's shrinkage is 0, so only the ridge keeps the covariance invertible; still a ranking
    support, query = _episodes(3, 2, 5, 10)
    scores = _scores(Mahalanobis(), support, query)
    assert torch.isfinite(scores).all() and (scores > 0).all()


def test_mahalanobis_separates_what_euclidean_cannot():
    """Normal data varies a lot along x, barely along y: a step in y, inside x's range, is the anomaly."""
    g = torch.Generator().manual_seed(1)
    support = torch.randn(20, 20, 2, generator=g) * torch.tensor([3.0, 0.1])
    normal = torch.randn(20, 10, 2, generator=g) * torch.tensor([3.0, 0.1])
    anomaly = torch.randn(20, 10, 2, generator=g) * torch.tensor([0.1, 0.1]) + torch.tensor([0.0, 2.0])
    query, label = torch.cat([normal, anomaly], 1), torch.cat([torch.zeros(20, 10), torch.ones(20, 10)], 1)
    maha = episode_auroc(_scores(Mahalanobis(), support, query), label).mean()
    euclid = episode_auroc(_scores(SupportMeanDistance("euclidean"), support, query), label).mean()
    assert maha > 0.9 and euclid < 0.7


@pytest.mark.parametrize(
    "ours, reference",
    [
        (
            IsolationForest(n_estimators=50, random_state=3),
            lambda k: SkForest(n_estimators=50, random_state=3),
        ),
        (OneClassSVM(nu=0.3), lambda k: SkSVM(nu=0.3, gamma="scale")),
        (LocalOutlierFactor(n_neighbors=20), lambda k: SkLOF(n_neighbors=k - 1, novelty=True)),
        (LocalOutlierFactor(n_neighbors=3), lambda k: SkLOF(n_neighbors=3, novelty=True)),
    ],
)
def test_sklearn_detectors_are_fitted_on_each_support_set(ours, reference):
    support, query = _episodes(3, 8, 6, 5)
    scores = _scores(ours, support, query)
    assert scores.shape == (3, 6) and scores.dtype == torch.float32
    for s, q, got in zip(support.double().numpy(), query.double().numpy(), scores):
        expected = -reference(len(s)).fit(s).score_samples(q)  # higher = more anomalous
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_scores(ours, support, query), scores)  # deterministic


@pytest.mark.parametrize("detector, k, least", [(IsolationForest(), 2, 3), (LocalOutlierFactor(), 1, 2)])
def test_too_few_shots_give_constant_scores_with_a_warning(detector, k, least):
    support, query = _episodes(2, k, 6, 4)
    with pytest.warns(UserWarning, match=f"needs at least {least} support samples, got {k}:"):
        scores = _scores(detector, support, query)
    assert (scores == 0).all()
    assert episode_auroc(scores, torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)).eq(0.5).all()


def test_isolation_forest_needs_three_shots_because_sklearns_is_constant_below():
    support, query = _episodes(1, 2, 6, 4)
    assert (
        np.unique(SkForest(random_state=0).fit(support[0].numpy()).score_samples(query[0].numpy())).size == 1
    )
    support, query = _episodes(1, 3, 6, 4)
    assert _scores(IsolationForest(), support, query).unique().numel() > 1


def test_one_class_svm_works_from_one_shot():
    support, query = _episodes(2, 1, 6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = _scores(OneClassSVM(), support, query)
    # one support sample: scores rank queries by distance to it (the RBF kernel is monotone)
    distance = _scores(SupportMeanDistance("euclidean"), support, query)
    assert (scores.argsort(1) == distance.argsort(1)).all()


def test_every_configured_baseline_detects_an_easy_shift(compose_cfg):
    cfg = compose_cfg(["baselines=all"])
    detectors = {name: instantiate(conf) for name, conf in cfg.baselines.items()}
    assert set(detectors) == {
        "mean_euclidean", "mean_cosine", "nn_euclidean", "nn_cosine", "mahalanobis",
        "isolation_forest", "ocsvm", "lof",
    }  # fmt: skip
    support, normal = _episodes(4, 10, 10, 6)
    _, anomaly = _episodes(4, 1, 10, 6, seed=1)
    # normals around one direction, anomalies around an orthogonal one: every distance sees it
    centre = torch.tensor([6.0, 0.0, 6.0, 0.0, 6.0, 0.0])
    support, query = support + centre, torch.cat([normal + centre, anomaly + centre.roll(1)], 1)
    label = torch.cat([torch.zeros(4, 10), torch.ones(4, 10)], 1)
    for name, detector in detectors.items():
        assert episode_auroc(_scores(detector, support, query), label).mean() > 0.9, name


def test_default_baselines_are_the_fast_torch_ones(compose_cfg):
    cfg = compose_cfg([])
    assert all(
        not conf._target_.split(".")[-1].startswith(("Isolation", "OneClass", "Local"))
        for conf in cfg.baselines.values()
    )
    assert len(cfg.baselines) == 5
