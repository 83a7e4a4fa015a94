"""The covariance-prior learner: its Woodbury scoring against a direct solve, the empirical-Bayes
prior on tasks that share a covariance (where it must beat support-only Mahalanobis at K=2),
checkpoints, bad settings, and a run through Hydra on a small folder of task files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from metaad.apps.train import train
from metaad.data import Episode, EpisodeDataset, LabelledData, collate_episodes, split_tasks
from metaad.detectors.baselines import Mahalanobis
from metaad.detectors.covariance import CovariancePrior
from metaad.evaluation.metrics import episode_auroc

DIM = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batched solves: with several threads on a busy machine OpenMP waits dominate (30x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def learner(**kwargs) -> CovariancePrior:
    return CovariancePrior(**kwargs)


def shared_covariance() -> np.ndarray:
    """A covariance with variances from 10 down to 0.001 along random directions."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    return (basis * np.geomspace(10, 1e-3, DIM)) @ basis.T


def gaussian_tasks(n_tasks: int = 12) -> LabelledData:
    """Tasks with their own means and one shared covariance; anomalies are shifted by a random vector
    of norm 1.5, small beside the normals' spread (trace 40) but large in the low-variance directions."""
    rng = np.random.default_rng(1)
    covariance = shared_covariance()
    xs, tasks, anomalous = [], [], []
    for t in range(n_tasks):
        mean = rng.normal(scale=3.0, size=DIM)
        normals = rng.multivariate_normal(mean, covariance, size=60)
        shifts = rng.normal(size=(30, DIM))
        shifts *= 1.5 / np.linalg.norm(shifts, axis=1, keepdims=True)
        anomalies = rng.multivariate_normal(mean, covariance, size=30) + shifts
        xs += [normals, anomalies]
        tasks += [str(t)] * 90
        anomalous += [False] * 60 + [True] * 30
    return LabelledData(np.concatenate(xs).astype(np.float32), np.array(tasks), np.array(anomalous))


def trained_on_gaussian_tasks(k_shot: int = 2, **kwargs) -> tuple[CovariancePrior, Episode]:
    """A learner meta-trained on 8 tasks (40 meta-batches of 8) and 100 fixed episodes of 4 others."""
    pools = split_tasks(gaussian_tasks(), None, ["8", "9"], ["10", "11"])
    shape = dict(k_shot=k_shot, n_query=20, anomaly_ratio=0.5, seed=0)
    training = EpisodeDataset(pools["train"], "train", n_episodes=8 * 40, **shape)
    test = next(
        iter(
            DataLoader(
                EpisodeDataset(pools["test"], "test", n_episodes=100, **shape),
                batch_size=100,
                collate_fn=collate_episodes,
            )
        )
    )
    torch.manual_seed(0)
    model = learner(**kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for batch in DataLoader(training, batch_size=8, collate_fn=collate_episodes):
        optimizer.zero_grad()
        loss = model.loss(batch)  # takes the batch into the prior first
        assert (loss is None) == (not model.learn)
        if loss is not None:
            loss.backward()
            optimizer.step()
    return model, test


def auroc(detector, episodes: Episode) -> float:
    with torch.no_grad():
        scores = detector.score(detector.adapt(episodes.support), episodes.query)
    return episode_auroc(scores, episodes.label).mean().item()


def direct_scores(model: CovariancePrior, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The definition, with a D x D solve: Sigma = S_K + strength tau ((1 - g) P + g I)."""
    x, q = support.double(), query.double()
    mean = x.mean(1, keepdim=True)
    deviations = x - mean
    support_cov = deviations.transpose(1, 2) @ deviations / (x.shape[1] - 1)
    tau = support_cov.diagonal(dim1=1, dim2=2).sum(-1) / DIM
    g, strength = model.isotropy.double(), model.strength.double()
    prior = model.prior()
    prior = torch.eye(DIM, dtype=torch.float64) if prior is None else prior
    sigma = support_cov + strength * tau[:, None, None] * (
        (1 - g) * prior + g * torch.eye(DIM, dtype=torch.float64)
    )
    r = q - mean
    return (r * torch.linalg.solve(sigma, r.transpose(1, 2)).transpose(1, 2)).sum(-1) / DIM


def test_scores_are_the_mahalanobis_distance_under_the_shrunk_covariance() -> None:
    torch.manual_seed(0)
    model = learner(isotropy=0.3, strength=0.5)
    support, query = torch.randn(3, 4, DIM), torch.randn(3, 7, DIM)
    torch.testing.assert_close(
        model.anomaly_scores(support, query).double(), direct_scores(model, support, query)
    )
    # Once a prior is estimated the metric is no longer isotropic; still the same definition.
    x = torch.from_numpy(gaussian_tasks(2).x[:80]).reshape(4, 20, DIM)
    label = torch.zeros(4, 16, dtype=torch.long)
    model.update_prior(Episode(x[:, :4], x[:, 4:], label, torch.tensor([0, 1, 0, 1]), label))
    assert model.prior_count.tolist() == [2.0, 2.0]
    torch.testing.assert_close(model.prior().trace(), torch.tensor(DIM, dtype=torch.float64))
    torch.testing.assert_close(
        model.anomaly_scores(support, query).double(), direct_scores(model, support, query)
    )


def test_one_shot_and_constant_supports_give_finite_scores() -> None:
    model = learner()
    query = torch.randn(2, 5, DIM)
    for support in (torch.randn(2, 1, DIM), torch.ones(2, 3, DIM)):
        scores = model.anomaly_scores(support, query)
        assert scores.shape == (2, 5) and torch.isfinite(scores).all()


def test_meta_fitted_prior_beats_support_only_mahalanobis_at_two_shots() -> None:
    """Tasks share their covariance: the prior estimated on training tasks must recover it (up to
    scale) and, at K=2, rank a shift hidden in low-variance directions far better than Ledoit-Wolf
    on the two support samples can."""
    model, test = trained_on_gaussian_tasks()
    truth = torch.from_numpy(shared_covariance())
    truth = truth * DIM / truth.trace()
    assert ((model.prior() - truth).norm() / truth.norm()).item() < 0.25
    learned, support_only = auroc(model, test), auroc(Mahalanobis(), test)
    assert learned > support_only + 0.3 and learned > 0.95, f"learner {learned:.3f}, LW {support_only:.3f}"


def test_ranking_loss_learns_to_trust_a_prior_that_is_right() -> None:
    """With one covariance shared by every task the cross-fitted prior is right: the ranking loss
    must lower the isotropy (weight on the identity) from its start at 0.5, which pays."""
    model, test = trained_on_gaussian_tasks(k_shot=4)
    fixed, _ = trained_on_gaussian_tasks(k_shot=4, learn_isotropy=False)
    assert model.isotropy.item() < 0.1 and fixed.isotropy.item() == pytest.approx(0.5)
    assert auroc(model, test) > auroc(fixed, test) + 0.2


def test_loss_scores_each_episode_with_the_other_half_of_the_tasks() -> None:
    """Cross-fitting: episodes of even tasks only fill half 0, and are scored with half 1, still
    empty (the identity, where the isotropy has no effect): no gradient reaches it. Evaluation
    uses the estimate."""
    x = torch.from_numpy(gaussian_tasks(2).x[:80]).reshape(4, 20, DIM)
    label = torch.tensor([[0] * 10 + [1] * 6] * 4)
    batch = Episode(x[:, :4], x[:, 4:], label, torch.tensor([0, 2, 4, 6]), label)
    model = learner()
    model.loss(batch).backward()
    assert model.prior_count.tolist() == [4.0, 0.0]
    assert model.isotropy_logit.grad.abs().item() < 1e-6 and model.log_temperature.grad.abs().item() > 0
    assert model.prior() is not None and model.prior((1,)) is None


def test_likelihood_loss_trains_without_anomaly_labels() -> None:
    model, test = trained_on_gaussian_tasks(loss="likelihood", learn_strength=True)
    assert model.isotropy.item() < 0.3 and auroc(model, test) > 0.75


def test_checkpoint_restores_the_prior_into_a_fresh_learner() -> None:
    model, test = trained_on_gaussian_tasks(k_shot=2, learn_isotropy=False)
    fresh = learner(learn_isotropy=False)
    fresh.load_state_dict(model.state_dict())
    assert fresh.prior_sum.shape == (2, DIM, DIM)
    torch.testing.assert_close(
        fresh.anomaly_scores(test.support, test.query), model.anomaly_scores(test.support, test.query)
    )
    with pytest.raises(ValueError, match="8 features but the prior was estimated on 16"):
        fresh.anomaly_scores(torch.randn(1, 2, 8), torch.randn(1, 3, 8))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"loss": "hinge"}, "model.loss"),
        ({"isotropy": 1.0}, "model.isotropy"),
        ({"strength": 0.0}, "model.strength"),
        ({"temperature": -1.0}, "model.temperature"),
        ({"refresh": -0.1}, "model.refresh"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        learner(**kwargs)


def test_covariance_learner_through_hydra_on_task_files(compose_cfg, tmp_path: Path) -> None:
    """metaad-train model=covariance dataset=mvtec, on a folder of five synthetic task files."""
    data = gaussian_tasks(5)
    folder = tmp_path / "tasks"
    folder.mkdir()
    for t in data.task_names:
        rows = data.task == t
        np.savez(folder / f"task{t}.npz", X=data.x[rows], y=data.anomalous[rows].astype(np.int64))
    overrides = [f"dataset.source.root={folder}", "dataset.test_tasks=[task0]", "dataset.val_tasks=[task1]"]
    cfg = compose_cfg(["model=covariance", "dataset=mvtec", "dataset.k_shot=2", *overrides])
    metrics = train(cfg).to_json()
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["model"] == "covariance" and on_disk["test"]["auroc"]["n_episodes"] == 40
    assert metrics["test"]["auroc"]["mean"] > metrics["baselines"]["mahalanobis"]["auroc"]["mean"] + 0.1
