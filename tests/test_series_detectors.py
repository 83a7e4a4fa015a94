"""Series detectors: the TCN backbone with every learner (vmapped second-order MAML included), the
one-pass stream scoring against window-by-window scoring, the series baselines and learners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metaad.apps.checks import check_train_config
from metaad.data.episodes import Episode
from metaad.detectors.backbones import TCN
from metaad.detectors.base import leave_one_out_scores, score_stream, sliding_windows, windowed_stream_scores
from metaad.detectors.baselines import NearestNeighbourDistance, SupportMeanDistance
from metaad.detectors.channel_weighting import ChannelWeighting
from metaad.detectors.combination import MetaCombination, support_meta_features
from metaad.detectors.maml import MAML
from metaad.detectors.protonet import ProtoNet
from metaad.detectors.residual import ResidualLearner
from metaad.detectors.series_baselines import (
    SERIES_BASELINES,
    BaselineScores,
    KNNDistance,
    PCAReconstruction,
    RobustZScore,
)
from metaad.detectors.siamese import Siamese
from metaad.errors import ConfigError
from metaad.evaluation.metrics import episode_auroc
from tests.conftest import LEARNERS

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


STREAMING = {
    **SERIES_BASELINES,
    "knn3": lambda: KNNDistance(k=3),
    "mean_cosine": lambda: SupportMeanDistance("cosine"),
    "nn_cosine": lambda: NearestNeighbourDistance("cosine"),
}


@pytest.mark.parametrize("detector", list(STREAMING))
def test_series_baselines_stream_equals_window_by_window(detector):
    """Each baseline's one pass (convolutions, running sums, sliding max) against its own scores of
    every window cut out."""
    model = STREAMING[detector]()
    assert hasattr(model, "score_stream")
    support = series_episodes().support
    series = torch.randn(3, 120, D, generator=torch.Generator().manual_seed(4))
    series[:, 50 : 50 + W] = support[:, 1]  # a support window itself: distances of 0 from cancellation
    state = model.adapt(support)
    expected = model.score(state, sliding_windows(series, W).contiguous())
    torch.testing.assert_close(score_stream(model, state, series, W), expected)


@pytest.mark.parametrize("kernels", [0, 1, 3, 9])
def test_window_products_equal_a_convolution_across_chunks(kernels, monkeypatch):
    """Both ways (lags with diagonal sums for few kernels, overlap-save FFT for more), the products
    of every window with each episode's kernels equal a float64 convolution's, with the series cut
    into many chunks and FFT blocks (the last one running past the series)."""
    from metaad.detectors import base

    monkeypatch.setattr(base, "_PRODUCT_CHUNK", 64)
    g = torch.Generator().manual_seed(8)
    series = torch.randn(2, 1000, D, generator=g, dtype=torch.float64)
    windows = torch.randn(2, kernels, W, D, generator=g, dtype=torch.float64)
    expected = torch.zeros(2, 1000 - W + 1, kernels, dtype=torch.float64)
    if kernels:
        for i in range(2):
            expected[i] = torch.nn.functional.conv1d(series[i].T[None], windows[i].transpose(1, 2))[0].T
    products = base.window_products(series, windows)
    assert products.shape == (2, 1000 - W + 1, kernels)
    torch.testing.assert_close(products, expected, rtol=1e-12, atol=1e-11)


def test_baselines_on_equal_inputs_share_one_pass_with_a_basis_of_their_kernels(monkeypatch):
    """PCA's mean and components lie in the span of the K standardised support windows kNN uses: in
    one pass, the products are taken with K basis windows, not 1 + r + K, and every baseline's
    scores equal its own pass and its scores of every window cut out."""
    from metaad.detectors import base

    names = ["zscore", "pca", "knn", "pca_step", "mean", "nn"]
    baselines = BaselineScores(names)
    batch = synthetic_entities(2, k=6)
    series = torch.cat([batch.query[:, i] for i in range(batch.query.shape[1])], 1)  # (2, 10 W, 4)
    adapted = baselines.adapt(batch.support)
    calls = []
    window_products = base.window_products
    monkeypatch.setattr(
        base, "window_products", lambda x, k: calls.append(k.shape[1]) or window_products(x, k)
    )
    shared = baselines.score_stream(adapted, series, W)
    # pca + knn: 6 basis windows, not 1 + 5 + 6; mean + nn on the raw series: all 7 (a float32
    # support's mean is rounded off the support windows' span)
    assert sorted(calls) == [6, 7]
    expected = baselines.score(adapted, sliding_windows(series, W).contiguous())
    torch.testing.assert_close(shared, expected, rtol=1e-6, atol=1e-6)
    for i, (detector, state) in enumerate(zip(baselines.detectors, adapted[0])):
        own = score_stream(detector, state, series, W).double()
        torch.testing.assert_close(
            ((own.clamp(min=0) + baselines.eps).log() - adapted[1][:, i : i + 1]).float(), shared[..., i]
        )


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

    from metaad.apps.build import build_baselines

    cfg = compose_cfg(["backbone=tcn", "baselines=series"])
    backbone = instantiate(cfg.backbone, sample_shape=[32, 5])
    assert isinstance(backbone, TCN) and backbone(torch.randn(2, 32, 5)).shape == (2, backbone.out_dim)
    baselines = build_baselines(cfg)
    assert {"zscore", "pca", "pca_step", "knn", "zscore_signlog", "mean_euclidean"} <= set(baselines)
    assert baselines["pca_signlog"].signlog and baselines["pca_step"].unit == "step"
    subset = compose_cfg(["baselines=series_subset", "baseline_columns=[0]"])
    assert build_baselines(subset)["knn_subset"].columns == [0]
    # the telemanom experiments name their telemetry column; the datamodule never sees the setting
    smap = compose_cfg(["experiment=smap", "baselines=series_subset"])
    assert build_baselines(smap)["pca_subset"].columns == [0] and "baseline_columns" not in smap.dataset
    with pytest.raises(ConfigError, match=r"score a subset of the columns: name it with baseline_columns="):
        check_train_config(compose_cfg(["baselines=series_subset"]))


# --- learners that can learn what transfers ---------------------------------------------------
def synthetic_entities(n: int, k: int = 5, q: int = 10, seed: int = 0, d: int = 4) -> Episode:
    """Episodes of ``n`` entities: noisy sinusoids per metric in each entity's own units and offset;
    metric 3 bursts in 30% of normal windows; the anomalies are a level shift of metric 0 over the
    window's second half. A max-z baseline is misled by the bursts; what transfers between entities
    is "metric 3 bursts, metric 0 does not"."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(W, dtype=torch.float64)
    freq = 0.2 + 0.4 * torch.rand(n, 1, 1, d, generator=g, dtype=torch.float64)
    scale = 10 ** (3 * torch.rand(n, 1, 1, d, generator=g, dtype=torch.float64) - 1)
    offset = 5 * torch.randn(n, 1, 1, d, generator=g, dtype=torch.float64)

    def windows(count: int) -> torch.Tensor:
        phase = 2 * torch.pi * torch.rand(n, count, 1, d, generator=g, dtype=torch.float64)
        x = torch.sin(freq * t[:, None] + phase) + 0.3 * torch.randn(
            n, count, W, d, generator=g, dtype=torch.float64
        )
        burst = (torch.rand(n, count, generator=g) < 0.3)[..., None]
        at = torch.nn.functional.one_hot(torch.randint(0, W, (n, count), generator=g), W)
        x[..., 3] += 6 * burst * at * torch.sign(torch.randn(n, count, 1, generator=g))
        return x

    support, query = windows(k), windows(q)
    label = torch.zeros(n, q, dtype=torch.long)
    label[:, q // 2 :] = 1
    query[:, q // 2 :, W // 2 :, 0] += 2.5
    return Episode(
        (support * scale + offset).float(), (query * scale + offset).float(), label, torch.arange(n), label
    )


def series_learner(name: str):
    torch.manual_seed(0)
    backbone = TCN([W, 4], channels=8, levels=2)
    return {
        "residual": lambda: (ResidualLearner(backbone), 0.003),
        "combination": lambda: (MetaCombination(), 0.01),
        "channel_weighting": lambda: (ChannelWeighting(backbone), 0.05),
    }[name]()


@pytest.mark.parametrize("name", ["residual", "combination", "channel_weighting"])
def test_series_learner_learns_what_transfers_to_new_entities(name):
    """60 meta-training steps on episodes of some entities must raise the AUROC on 64 other
    entities well above the untrained learner's (the baselines it starts as)."""
    model, lr = series_learner(name)
    held_out = synthetic_entities(64, seed=999)

    def auroc() -> float:
        model.eval()
        with torch.no_grad():
            value = episode_auroc(model.anomaly_scores(held_out.support, held_out.query), held_out.label)
        model.train()
        return value.mean().item()

    untrained = auroc()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(60):
        optimizer.zero_grad()
        model.loss(synthetic_entities(8, seed=step)).backward()
        optimizer.step()
    trained = auroc()
    assert trained > untrained + 0.04 and trained > 0.93, f"untrained {untrained:.3f}, trained {trained:.3f}"


@pytest.mark.parametrize("name", ["residual", "combination"])
def test_untrained_residual_and_combination_are_the_mean_of_the_normalised_baselines(name):
    model, _ = series_learner(name)
    batch = synthetic_entities(3)
    with torch.no_grad():
        scores = model.anomaly_scores(batch.support, batch.query)
    baselines = BaselineScores(model.baselines.names)
    expected = baselines.score(baselines.adapt(batch.support), batch.query).mean(-1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_baseline_scores_are_normalised_by_the_support_leave_one_out():
    batch = synthetic_entities(2, k=4)
    normalised = BaselineScores(["knn", "pca"])
    got = normalised.score(normalised.adapt(batch.support), batch.query)
    for m, detector in enumerate((KNNDistance(), PCAReconstruction())):
        raw = detector.score(detector.adapt(batch.support), batch.query).double()
        loo = leave_one_out_scores(detector, batch.support).double()
        expected = (raw + 1e-8).log() - (loo.mean(1, keepdim=True) + 1e-8).log()
        torch.testing.assert_close(got[..., m], expected.float(), rtol=1e-4, atol=1e-4)
    # an entity's units and offset do not change them (the baselines standardise by the support)
    scaled = normalised.score(normalised.adapt(batch.support * 1000 + 7), batch.query * 1000 + 7)
    torch.testing.assert_close(scaled, got, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="model.detectors must name baselines among"):
        BaselineScores(["zscore", "isolation"])


def test_meta_features_ignore_units_and_offsets():
    support = synthetic_entities(3).support.double()
    features = support_meta_features(support)
    assert features.shape == (3, 13) and torch.isfinite(features).all() and features.abs().max() <= 1
    rescaled = support * torch.tensor([0.1, 50.0, 3.0, 1000.0], dtype=torch.float64) - 4.0
    torch.testing.assert_close(support_meta_features(rescaled), features)


def test_combination_select_takes_the_top_detector_at_evaluation():
    model = MetaCombination(select=True)
    batch = synthetic_entities(3)
    with torch.no_grad():
        model.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0]))
        mixed = model.adapt(batch.support)[1]
        model.eval()
        _, weights = model.adapt(batch.support)
    assert (mixed[:, 2] < 1).all() and (weights[:, 2] == 1).all() and weights.sum().item() == 3


@pytest.mark.parametrize("name", ["residual", "combination", "channel_weighting"])
def test_series_learners_stream_equals_window_by_window(name):
    model, _ = series_learner(name)
    batch = synthetic_entities(2)
    series = torch.cat([batch.query[:, i] for i in range(batch.query.shape[1])], 1)  # (2, 10 W, 4)
    with torch.no_grad():
        state = model.eval().adapt(batch.support)
        one_pass = score_stream(model, state, series, W)
        expected = model.score(state, sliding_windows(series, W).contiguous())
    torch.testing.assert_close(one_pass, expected, rtol=1e-4, atol=1e-4)


def test_channel_weighting_untrained_is_a_robust_z_score_and_learns_which_metric_matters():
    model, lr = series_learner("channel_weighting")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(60):
        optimizer.zero_grad()
        model.loss(synthetic_entities(8, seed=step)).backward()
        optimizer.step()
    shares = torch.softmax(model.metric_logits.detach(), 0)
    assert shares[3] < 0.1 and shares.argmax() == 0  # the bursting metric down, the shifting one up
    with pytest.raises(ValueError, match="built for 4 metrics, got 3"):
        model.adapt(torch.randn(2, 5, W, 3))


def test_score_stream_falls_back_to_windows_for_any_detector():
    from metaad.detectors.baselines import Mahalanobis

    detector = Mahalanobis()
    assert not hasattr(detector, "score_stream")
    support = series_episodes().support
    series = torch.randn(3, 70, D, generator=torch.Generator().manual_seed(5))
    state = detector.adapt(support)
    expected = detector.score(state, sliding_windows(series, W).contiguous())
    torch.testing.assert_close(score_stream(detector, state, series, W, chunk=9), expected)


# --- every learner on series windows, with every backbone that takes them ---------------------
BACKBONE_CONFIGS = sorted((Path(__file__).parents[1] / "conf" / "backbone").glob("*.yaml"))
BACKBONES = [p.stem for p in BACKBONE_CONFIGS]
# conf/backbone also holds the frozen pretrained image extractors (the feature step before the patch
# detectors): they take no sample_shape and are never a learner's trainable network
EXTRACTORS = {p.stem for p in BACKBONE_CONFIGS if "metaad.detectors.extractors." in p.read_text()}
NOT_A_LEARNER_BACKBONE = pytest.mark.skip(
    reason="a frozen pretrained image feature extractor (metaad.detectors.extractors), not a learner backbone"
)


# Every learner with the temporal backbone in the fast suite; the other backbones under `slow`.
@pytest.mark.parametrize(
    "backbone",
    [
        b
        if b == "tcn"
        else pytest.param(b, marks=NOT_A_LEARNER_BACKBONE if b in EXTRACTORS else pytest.mark.slow)
        for b in BACKBONES
    ],
)
@pytest.mark.parametrize("model", LEARNERS)
def test_every_learner_trains_scores_and_streams_on_series_windows(model, backbone, compose_cfg):
    """Found by config: a learner or backbone added as one file + one config is checked here too.
    A backbone that cannot embed a window (W, D) must say so; any other must train, score and
    stream with every learner, the one pass equal to scoring window by window."""
    from hydra.utils import instantiate

    from metaad.apps.build import build_learner

    cfg = compose_cfg([f"model={model}", f"backbone={backbone}"])
    try:
        instantiate(cfg.backbone, sample_shape=[W, D])
    except Exception as error:  # Hydra wraps the backbone's ValueError
        assert f"gives shape {(W, D)}" in str(error), error
        return
    torch.manual_seed(0)
    learner = build_learner(cfg, (W, D))
    batch = series_episodes()
    loss = learner.loss(batch)
    if loss is not None:
        loss.backward()
        assert torch.isfinite(loss)
    learner.eval()
    series = torch.randn(3, 60, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        state = learner.adapt(batch.support)
        scores = learner.score(state, batch.query)
        one_pass = score_stream(learner, state, series, W)
        by_window = learner.score(state, sliding_windows(series, W).contiguous())
    assert scores.shape == (3, 6) and torch.isfinite(scores).all()
    torch.testing.assert_close(one_pass, by_window, rtol=1e-4, atol=1e-4)


def test_siamese_streams_a_long_series_in_pieces():
    model = Siamese(tcn(), aggregation="knn", k=2, distance="euclidean")
    state = model.adapt(series_episodes(b=1).support)
    series = torch.randn(1, 4096 + 300, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        one_pass = score_stream(model, state, series, W)
        by_window = windowed_stream_scores(model, state, series, W, chunk=1000)
    torch.testing.assert_close(one_pass, by_window, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["residual", "combination", "channel_weighting"])
def test_series_learners_take_vectors_and_images_too(name, compose_cfg):
    """They are configs like any other learner: on digits-like vectors and on images (each sample
    one step of all its values) they train and score."""
    from metaad.apps.build import build_learner

    for backbone, shape in (("mlp", (64,)), ("conv4", (1, 16, 16))):
        cfg = compose_cfg([f"model={name}", f"backbone={backbone}"])
        learner = build_learner(cfg, shape)
        g = torch.Generator().manual_seed(0)
        support, query = torch.rand(2, 4, *shape, generator=g), torch.rand(2, 6, *shape, generator=g)
        label = torch.tensor([[0, 1] * 3] * 2)
        learner.loss(Episode(support, query, label, torch.arange(2), label)).backward()
        scores = learner.eval().anomaly_scores(support, query)
        assert scores.shape == (2, 6) and torch.isfinite(scores).all()
