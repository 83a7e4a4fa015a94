"""The learners under one interface: Siamese scoring and loss, every model config end to end through
Hydra, and every learner actually learning a task it can learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.data import DataLoader

from metaad.apps.build import build_learner
from metaad.apps.train import train
from metaad.data import Episode, EpisodeDataset, collate_episodes, split_tasks
from metaad.data.sources import digits
from metaad.detectors.siamese import Siamese
from metaad.evaluation.metrics import episode_auroc
from tests.conftest import LEARNERS


class Flat(nn.Module):
    """The identity embedding, so distances in the test are distances in input space."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def siamese(**kwargs) -> Siamese:
    return Siamese(Flat(2), **kwargs)


SUPPORT = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
QUERY = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]])


@pytest.mark.parametrize(
    ("aggregation", "reduce"),
    [
        ("min", lambda d: d.min(-1).values),
        ("mean", lambda d: d.mean(-1)),
        ("knn", lambda d: d.sort(-1).values[..., :2].mean(-1)),
    ],
)
def test_siamese_scores_aggregate_distances_to_the_support(aggregation, reduce) -> None:
    model = siamese(aggregation=aggregation, k=2)
    expected = reduce(torch.cdist(QUERY, SUPPORT))
    torch.testing.assert_close(model.anomaly_scores(SUPPORT, QUERY), expected)


def test_siamese_cosine_distance_and_too_many_neighbours() -> None:
    scores = siamese(distance="cosine", aggregation="mean").anomaly_scores(SUPPORT[:, 1:], QUERY[:, 1:])
    # [1, 1] is at 45 degrees to [1, 0] and [0, 2] and aligned with [3, 3]; [-2, 0] is opposite
    # [1, 0], orthogonal to [0, 2] and at 135 degrees to [3, 3].
    c = 2**-0.5
    torch.testing.assert_close(scores, torch.tensor([[(2 * (1 - c) + 0) / 3, (2 + 1 + (1 + c)) / 3]]))
    with pytest.raises(ValueError, match="model.k=5"):
        siamese(aggregation="knn", k=5).anomaly_scores(SUPPORT, QUERY)


def test_siamese_learned_distance_is_symmetric_and_non_negative() -> None:
    torch.manual_seed(0)
    model = siamese(distance="learned", head_hidden=8)
    a, b = torch.randn(2, 5, 2), torch.randn(2, 7, 2)
    d = model.pair_distance(a, b)
    assert d.shape == (2, 5, 7) and (d >= 0).all()
    torch.testing.assert_close(d, model.pair_distance(b, a).transpose(1, 2))


def test_siamese_contrastive_loss_matches_its_definition_pair_by_pair() -> None:
    model = siamese(margin=2.0)
    support, query = SUPPORT[:, :2], QUERY
    label = torch.tensor([[0, 1, 1]])
    batch = Episode(support, query, label, torch.zeros(1), torch.zeros(1, 3))
    points = torch.cat([support, query], 1)[0]
    normal = [True, True, True, False, False]
    pull, push = [], []
    for i in range(5):
        for j in range(i + 1, 5):
            d = (points[i] - points[j]).norm()
            if normal[i] and normal[j]:
                pull.append(d**2)
            elif normal[i] != normal[j]:
                push.append(torch.relu(2.0 - d) ** 2)
    expected = 0.5 * (torch.stack(pull).mean() + torch.stack(push).mean())
    torch.testing.assert_close(model.loss(batch), expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"distance": "manhattan"}, "model.distance"),
        ({"aggregation": "max"}, "model.aggregation"),
        ({"k": 0}, "model.k"),
        ({"margin": 0.0}, "model.margin"),
    ],
)
def test_siamese_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        siamese(**kwargs)


# --- every learner end to end through Hydra ------------------------------------------------------
# One fast representative (MAML: it adapts with gradients inside Lightning's no_grad evaluation).
@pytest.mark.parametrize(
    "model", [m if m == "maml" else pytest.param(m, marks=pytest.mark.slow) for m in LEARNERS]
)
def test_learner_runs_end_to_end_and_writes_metrics(model: str, compose_cfg) -> None:
    cfg = compose_cfg([f"model={model}", "backbone.hidden=[32]", "backbone.embed_dim=16"])
    metrics = train(cfg).to_json()
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["model"] == model and on_disk["test"]["auroc"]["n_episodes"] == 40
    assert on_disk["test"]["auroc"]["mean"] > 0.5, "a learner on digits ranks anomalies above chance"
    assert on_disk["test"] == json.loads(json.dumps(metrics["test"]))
    assert on_disk["baselines"]


# --- every learner learns ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_class_episodes() -> tuple[EpisodeDataset, Episode]:
    """Episodes of the training digits 0-5: fresh ones to train on, 120 fixed ones to score."""
    pool = split_tasks(digits(), train_tasks=None, val_tasks=[6, 7, 8, 9], test_tasks=[6, 7, 8, 9])["train"]
    shape = dict(k_shot=5, n_query=20, anomaly_ratio=0.5)
    training = EpisodeDataset(pool, "train", n_episodes=8 * 60, seed=1, **shape)
    fixed = EpisodeDataset(pool, "val", n_episodes=120, seed=2, **shape)
    return training, next(iter(DataLoader(fixed, batch_size=120, collate_fn=collate_episodes)))


# fomaml and ocmaml differ from maml only in flags the gradient tests check (tests/test_maml.py).
# Learners that start as strong no-learning detectors are checked to beat that start elsewhere: the
# covariance prior (Mahalanobis) in tests/test_covariance.py; the residual learner, the detector
# combination and the channel weighting (the series baselines) in tests/test_series_detectors.py; the
# patch adapter (patch kNN) in tests/test_patch_detectors.py.
STARTS_AS_A_BASELINE = {"covariance", "residual", "combination", "channel_weighting", "patch_adapter"}


@pytest.mark.parametrize(
    "model_name",
    [
        pytest.param(m, marks=pytest.mark.slow) if m in ("fomaml", "ocmaml") else m
        for m in LEARNERS
        if m not in STARTS_AS_A_BASELINE
    ],
)
def test_learner_trained_briefly_beats_itself_untrained(
    model_name: str, train_class_episodes, compose_cfg
) -> None:
    """60 meta-training steps (small network, Adam at lr 1e-3) on digits 0-5 must raise the AUROC
    on held-out episodes of those digits well above the untrained network's: fails if learning is
    broken."""
    training, fixed = train_class_episodes
    torch.manual_seed(0)
    small = ["backbone.hidden=[32]", "backbone.embed_dim=16", "model.optimizer.lr=0.001"]
    cfg = compose_cfg([f"model={model_name}", *small])
    model = build_learner(cfg, (64,))

    def auroc() -> float:
        model.eval()
        with torch.no_grad():
            value = episode_auroc(model.anomaly_scores(fixed.support, fixed.query), fixed.label).mean().item()
        model.train()
        return value

    untrained = auroc()
    optimizer = instantiate(cfg.model.optimizer)(model.parameters())
    for batch in DataLoader(training, batch_size=8, collate_fn=collate_episodes):
        optimizer.zero_grad()
        loss = model.loss(batch)
        if loss is not None:  # a learner that only gathers statistics (the covariance prior)
            loss.backward()
            optimizer.step()
    trained = auroc()
    assert trained > untrained + 0.05 and trained > 0.85, f"untrained {untrained:.3f}, trained {trained:.3f}"
