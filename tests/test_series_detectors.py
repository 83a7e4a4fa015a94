"""Series detectors: the TCN backbone with every learner (vmapped second-order MAML included), the
one-pass stream scoring against window-by-window scoring, the series baselines and learners."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaad.data.episodes import Episode
from metaad.detectors.backbones import TCN
from metaad.detectors.base import score_stream, sliding_windows, windowed_stream_scores
from metaad.detectors.maml import MAML
from metaad.detectors.protonet import ProtoNet
from metaad.detectors.series_baselines import SERIES_BASELINES, KNNDistance, PCAReconstruction, RobustZScore
from metaad.detectors.siamese import Siamese
from metaad.metrics import episode_auroc

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


# --- the series baselines ---------------------------------------------------------------------
def test_robust_zscore_by_hand():
    # one metric varying (median 2, MAD 1), one constant at 5 over the support
    steps = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [2.0, 5.0], [10.0, 5.0], [0.0, 5.0]])
    support = steps.view(1, 2, 3, 2)  # K=2 windows of W=3 steps
    query = torch.tensor([[[[2.0, 5.0], [4.0, 5.0], [2.0, 5.0]], [[2.0, 5.0], [2.0, 5.5], [2.0, 5.0]]]])
    detector = RobustZScore()
    scores = detector.score(detector.adapt(support), query)
    # |4 - 2| / 1.4826; the constant metric off by 0.5 in its own units
    torch.testing.assert_close(scores, torch.tensor([[2 / 1.4826, 0.5]]))
    ignoring = RobustZScore(ignore_constant=True)
    torch.testing.assert_close(
        ignoring.score(ignoring.adapt(support), query), torch.tensor([[2 / 1.4826, 0.0]])
    )
    mean = RobustZScore(reduce="mean")
    torch.testing.assert_close(
        mean.score(mean.adapt(support), query), torch.tensor([[2 / 1.4826 / 6, 0.5 / 6]])
    )


def test_input_variants_choose_columns_and_sign_log():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(2, 5, 8, 4, generator=g), torch.randn(2, 7, 8, 4, generator=g)
    query[:, :, :, 2] += 100.0  # only column 2 is off
    on_column_0 = RobustZScore(columns=[0])
    assert (on_column_0.score(on_column_0.adapt(support), query) < 10).all()
    assert (RobustZScore().score(RobustZScore().adapt(support), query) > 10).all()
    x = torch.tensor([-100.0, -1.0, 0.0, 1.0, 1e6])
    torch.testing.assert_close(
        RobustZScore(signlog=True).prepare(x.view(1, 1, 1, 5))[0, 0, 0],
        (torch.sign(x) * torch.log1p(x.abs())).double(),
    )
    with pytest.raises(ValueError, match="name a column beyond the 4"):
        RobustZScore(columns=[4]).adapt(support)
    with pytest.raises(ValueError, match="baseline columns must be null"):
        RobustZScore(columns=[])


@pytest.mark.parametrize("detector", ["zscore", "zscore_mean", "pca", "pca_step", "knn"])
def test_series_baselines_stream_equals_window_by_window(detector):
    model = SERIES_BASELINES[detector]()
    support = series_episodes().support
    series = torch.randn(3, 120, D, generator=torch.Generator().manual_seed(4))
    state = model.adapt(support)
    expected = model.score(state, sliding_windows(series, W).contiguous())
    torch.testing.assert_close(score_stream(model, state, series, W), expected)


@pytest.mark.parametrize("unit", ["window", "step"])
def test_pca_reconstruction_equals_sklearn(unit):
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(1)
    support = torch.randn(2, 12, 4, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2])
    query = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64)
    ours = PCAReconstruction(n_components=2, unit=unit)
    got = ours.score(ours.adapt(support), query)
    for b in range(2):
        steps = support[b].reshape(-1, 3)
        centre, scale = steps.mean(0), steps.std(0, unbiased=False)
        z_support, z_query = (support[b] - centre) / scale, (query[b] - centre) / scale
        rows = z_support.reshape(12, -1) if unit == "window" else z_support.reshape(-1, 3)
        queries = z_query.reshape(5, -1) if unit == "window" else z_query.reshape(-1, 3)
        pca = PCA(n_components=2).fit(rows.numpy())
        error = ((queries.numpy() - pca.inverse_transform(pca.transform(queries.numpy()))) ** 2).sum(-1)
        expected = error if unit == "window" else error.reshape(5, 4).max(-1)
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-8)


def test_pca_keeps_the_fraction_of_variance_asked_for():
    # support windows spread along 2 directions with variances 9 and 1 (90% / 10%), nothing else;
    # both mix metrics 0 and 1 equally, so standardising the metrics keeps the split
    g = torch.Generator().manual_seed(2)
    coefficients = torch.randn(1, 200, 2, generator=g, dtype=torch.float64)
    coefficients = (
        (coefficients - coefficients.mean(1)) / coefficients.std(1, unbiased=False) * torch.tensor([3.0, 1.0])
    )
    direction = torch.zeros(2, 6, dtype=torch.float64)
    direction[0, :2] = torch.tensor([1.0, 1.0]) / 2**0.5
    direction[1, :2] = torch.tensor([1.0, -1.0]) / 2**0.5
    support = (coefficients @ direction).view(1, 200, 1, 6)
    assert int((PCAReconstruction(n_components=0.85).adapt(support).components.abs().sum(-1) > 0).sum()) == 1
    assert int((PCAReconstruction(n_components=0.95).adapt(support).components.abs().sum(-1) > 0).sum()) == 2


def test_knn_is_the_mean_distance_to_the_k_nearest_standardised_windows():
    g = torch.Generator().manual_seed(3)
    support, query = torch.randn(1, 6, 4, 2, generator=g), torch.randn(1, 3, 4, 2, generator=g)
    steps = support[0].reshape(-1, 2)
    centre, scale = steps.mean(0), steps.std(0, unbiased=False)
    s, q = ((support[0] - centre) / scale).flatten(1), ((query[0] - centre) / scale).flatten(1)
    expected = torch.cdist(q.double(), s.double()).sort(-1).values[:, :3].mean(-1).float()
    model = KNNDistance(k=3)
    torch.testing.assert_close(model.score(model.adapt(support), query)[0], expected)
    # k beyond K: all of them
    torch.testing.assert_close(
        KNNDistance(k=50).score(KNNDistance(k=50).adapt(support), query)[0],
        torch.cdist(q.double(), s.double()).mean(-1).float(),
    )


def test_series_baselines_find_injected_anomalies_and_take_vectors():
    batch = series_episodes(k=8, q=20)
    for name, make in SERIES_BASELINES.items():
        model = make()
        auroc = episode_auroc(model.score(model.adapt(batch.support), batch.query), batch.label).mean()
        assert auroc > 0.9, name
        vectors = model.score(model.adapt(batch.support[:, :, 0]), batch.query[:, :, 0])
        assert vectors.shape == (3, 20) and torch.isfinite(vectors).all(), name


# --- configs ----------------------------------------------------------------------------------
def test_series_configs_build_what_they_name(compose_cfg):
    from hydra.utils import instantiate

    from metaad.build import build_baselines

    cfg = compose_cfg(["backbone=tcn", "baselines=series"])
    backbone = instantiate(cfg.backbone, sample_shape=[32, 5])
    assert isinstance(backbone, TCN) and backbone(torch.randn(2, 32, 5)).shape == (2, backbone.out_dim)
    baselines = build_baselines(cfg)
    assert {"zscore", "pca", "pca_step", "knn", "zscore_signlog", "mean_euclidean"} <= set(baselines)
    assert baselines["pca_signlog"].signlog and baselines["pca_step"].unit == "step"
    subset = compose_cfg(["baselines=series_subset", "+dataset.baseline_columns=[0]"])
    assert build_baselines(subset)["knn_subset"].columns == [0]
