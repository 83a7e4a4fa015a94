"""Series detectors: the TCN backbone with every learner (vmapped second-order MAML included), the
one-pass stream scoring against window-by-window scoring, the series baselines and learners."""

from __future__ import annotations

import pytest
import torch

from metaad.data.episodes import Episode
from metaad.detectors.backbones import TCN
from metaad.detectors.base import score_stream, sliding_windows, windowed_stream_scores
from metaad.detectors.maml import MAML
from metaad.detectors.protonet import ProtoNet
from metaad.detectors.siamese import Siamese

W, D = 16, 3


def tcn(**kwargs) -> TCN:
    torch.manual_seed(0)
    return TCN([W, D], **({"channels": 8, "levels": 2, "kernel_size": 3, "embed_dim": 6} | kwargs))


def series_episodes(b: int = 3, k: int = 4, q: int = 6, seed: int = 0, dtype=torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(b, k, W, D, generator=g, dtype=dtype)
    query = torch.randn(b, q, W, D, generator=g, dtype=dtype)
    query[:, 1::2, -3:] += 4.0  # a spike at the end of every other query window
    label = torch.tensor([[0, 1] * (q // 2)] * b)
    return Episode(support, query, label, torch.arange(b), label)


def test_tcn_is_causal_and_sees_exactly_its_receptive_field():
    net = tcn()
    assert net.receptive_field == 1 + 2 * (1 + 2)
    x = torch.randn(2, 40, D)
    h = net.steps(x)
    assert h.shape == (2, 8, 40 - net.receptive_field + 1)
    later = x.clone()
    later[:, 30:] += 5.0  # the future of step 29 changes
    torch.testing.assert_close(
        net.steps(later)[..., : 30 - net.receptive_field + 1], h[..., : 30 - net.receptive_field + 1]
    )
    assert not torch.allclose(
        net.steps(later)[..., 30 - net.receptive_field + 1], h[..., 30 - net.receptive_field + 1]
    )
    earlier = x.clone()
    earlier[:, :10] += 5.0  # steps before a window never reach its embedding
    windows = sliding_windows(x, W)
    torch.testing.assert_close(net(sliding_windows(earlier, W)[:, 10]), net(windows[:, 10]))


def test_tcn_refuses_what_it_cannot_embed():
    with pytest.raises(ValueError, match=r"shape \(64,\); use backbone=mlp"):
        TCN([64])
    with pytest.raises(ValueError, match="receptive field \\(31 steps.*longer than the window \\(16"):
        TCN([W, D], levels=4, kernel_size=3)
    with pytest.raises(ValueError, match="backbone.kernel_size"):
        TCN([W, D], kernel_size=1)


def learners() -> dict:
    return {
        "protonet": lambda: ProtoNet(tcn()),
        "siamese_knn": lambda: Siamese(tcn(), aggregation="knn", k=2, distance="euclidean"),
        "siamese_learned": lambda: Siamese(tcn(), distance="learned", head_hidden=8),
        "maml": lambda: MAML(tcn(), inner_steps=2, inner_lr=0.1).eval(),
    }


@pytest.mark.parametrize("name", list(learners()))
def test_one_pass_stream_equals_window_by_window(name):
    model = learners()[name]()
    batch = series_episodes()
    series = torch.randn(3, 200, D, generator=torch.Generator().manual_seed(3))
    series[1, 120:125] += 6.0
    with torch.no_grad():
        state = model.adapt(batch.support)
        one_pass = score_stream(model, state, series, W)
        by_window = windowed_stream_scores(model, state, series, W, chunk=37)
        # and each window as a query of its own episode, the way an episode scores it
        direct = model.score(state, sliding_windows(series, W).contiguous())
    assert one_pass.shape == (3, 200 - W + 1)
    torch.testing.assert_close(one_pass, by_window, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_pass, direct, rtol=1e-5, atol=1e-5)


def test_stream_in_pieces_equals_one_piece():
    net = tcn()
    series = torch.randn(2, 500, D)
    torch.testing.assert_close(net.stream(series, chunk=64), net.stream(series, chunk=None))


def test_score_stream_refuses_a_series_shorter_than_a_window():
    model = ProtoNet(tcn())
    state = model.adapt(series_episodes().support)
    with pytest.raises(ValueError, match="fewer than one window of 16"):
        score_stream(model, state, torch.randn(3, 10, D), W)


def test_maml_on_tcn_vmapped_second_order_equals_a_loop():
    """In float64, so a wrong batching rule under vmap (double backward of conv and layer norm)
    cannot hide in noise."""
    grads = []
    for vectorize in (True, False):
        model = MAML(tcn(), inner_steps=2, inner_lr=0.1, vectorize=vectorize).double()
        model.loss(series_episodes(dtype=torch.float64)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-11, msg=name)
        assert grad.abs().sum() > 0, name


def test_maml_second_order_through_tcn_differs_from_first_order():
    got = []
    for first_order in (False, True):
        model = MAML(tcn(), inner_steps=1, inner_lr=0.3, first_order=first_order).double()
        model.loss(series_episodes(dtype=torch.float64)).backward()
        got.append(model.net.body.convs[0].weight.grad.clone())
    assert not torch.allclose(*got)
