"""Scoring memory is bounded by a setting, not by the query size: the query goes through every
detector ``score_chunk`` samples at a time, with the scores of the whole query."""

from __future__ import annotations

import pytest
import torch

import metaad
from metaad.api import baseline_configs
from metaad.apps.build import build_learner, build_training
from metaad.detectors.base import anomaly_scores, score_in_chunks
from tests.conftest import LEARNERS

# (model, backbone, sample shape): every learner on vectors, and the image networks, whose support
# statistics (OC-MAML's BatchNorm from the support) must not turn into statistics of a query chunk
CASES = [(m, "mlp", (64,)) for m in LEARNERS] + [
    ("ocmaml", "conv4_support", (1, 28, 28)),
    ("protonet", "conv4", (1, 28, 28)),
]
FAST = {("protonet", "mlp"), ("maml", "mlp"), ("ocmaml", "conv4_support")}  # the others: -m slow


def same_scores(chunked: torch.Tensor, whole: torch.Tensor) -> None:
    """Equal up to float32 rounding: most detectors give bitwise the same scores; a batched matmul
    (MAML's vmapped network, 1-NN cosine) over fewer rows may sum in another order (5e-7 measured)."""
    torch.testing.assert_close(chunked, whole, rtol=2e-6, atol=2e-6 * whole.abs().max().item())


class Counting:
    """A detector that records how many query samples each ``score`` call got."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def adapt(self, support):
        return support.mean(1, keepdim=True)

    def score(self, state, query):
        self.calls.append(tuple(query.shape[:2]))
        return (query - state).pow(2).flatten(2).sum(-1)


def test_a_chunk_holds_at_most_score_chunk_samples_over_the_batch():
    detector, support, query = Counting(), torch.randn(4, 3, 2), torch.randn(4, 50, 2)
    whole = anomaly_scores(detector, support, query)
    detector.calls.clear()
    chunked = anomaly_scores(detector, support, query, chunk_size=40)
    assert torch.equal(whole, chunked)
    assert detector.calls == [(4, 10)] * 5  # 40 samples over 4 episodes: 10 of each episode's 50
    detector.calls.clear()
    score_in_chunks(detector, detector.adapt(support), query, chunk_size=3)  # fewer than the episodes
    assert detector.calls == [(4, 1)] * 50
    with pytest.raises(ValueError, match="score_chunk must be a positive integer or null, got 0"):
        score_in_chunks(detector, detector.adapt(support), query, chunk_size=0)


@pytest.mark.parametrize(
    ("model", "backbone", "shape"),
    [case if case[:2] in FAST else pytest.param(*case, marks=pytest.mark.slow) for case in CASES],
    ids=[f"{m}-{b}" for m, b, _ in CASES],
)
def test_every_learner_scores_a_chunked_query_as_the_whole(model, backbone, shape, compose_cfg):
    torch.manual_seed(0)
    cfg = compose_cfg(["dataset=digits", f"model={model}", f"backbone={backbone}"])
    learner = build_learner(cfg, shape).eval()
    support, query = torch.rand(3, 5, *shape), torch.rand(3, 23, *shape)
    whole = anomaly_scores(learner, support, query).detach()
    chunked = anomaly_scores(learner, support, query, chunk_size=3 * 4).detach()  # 4 + ... + 3
    assert chunked.shape == (3, 23)
    same_scores(chunked, whole)


@pytest.mark.parametrize("name", sorted(baseline_configs()))
def test_every_baseline_scores_a_chunked_query_as_the_whole(name):
    detector = metaad.baseline(name).detector
    generator = torch.Generator().manual_seed(0)
    support, query = torch.rand(2, 6, 8, generator=generator), torch.rand(2, 31, 8, generator=generator)
    same_scores(
        anomaly_scores(detector, support, query, chunk_size=10), anomaly_scores(detector, support, query)
    )


@pytest.mark.parametrize("app", ["train", "eval"])
def test_the_apps_evaluator_scores_score_chunk_samples_at_a_time(app, compose_cfg):
    overrides = ["score_chunk=7"] + (["ckpt_path=x.ckpt"] if app == "eval" else ["dataset=digits"])
    cfg = compose_cfg(overrides, config_name=app, quick=app == "train")
    if app == "eval":  # metaad-eval rebuilds the run's config from the checkpoint, with its own setting
        run_cfg = compose_cfg(["dataset=digits", "score_chunk=null"])
        module = build_training(run_cfg, (64,), cfg.score_chunk)
    else:
        module = build_training(cfg, (64,))
    assert module.evaluator.score_chunk == 7
