"""Scoring a live series: a series checkpoint trained here on a small fleet with a header, then
``metaad.load(ckpt).fit(history).decision_function(series)`` and ``metaad-score history= series=``
checked against score_stream on the same windows scaled by the same support statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

import metaad
from metaad import checkpoint as ckpt
from metaad.apps.score import score
from metaad.data import DataError
from metaad.data.episodes import scale_by_support
from metaad.data.preprocessing import Preprocessing
from metaad.detectors.base import score_stream
from tests.conftest import compose_in
from tests.test_series_sources import write

SOURCE = ["cpu", "mem", "disk", "net"]  # the files' columns
FEATURES = ["disk", "cpu", "net"]  # the ones the source selects, in this order
WINDOW, STRIDE, K = 8, 4, 3
ROWS = ["step", "score", "normalised_score", "is_anomaly"]


def entity_series(seed: int, steps: int, spike: int | None = None) -> np.ndarray:
    """Per-metric offsets and scales that differ between entities (what support scaling removes)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    base = np.stack([np.sin(t / (3 + j)) for j in range(len(SOURCE))], axis=1)
    x = base * (1 + seed % 3) + rng.normal(0, 0.1, base.shape) + 10 * seed
    if spike is not None:
        x[spike : spike + 5] += 8.0
    return x


def train_fleet(root: Path, suffix: str, header: list[str] | None, *overrides: str) -> Path:
    """A quick series checkpoint (ProtoNet, K=3 windows of 8 at stride 4) on a 6-entity fleet."""
    from metaad.apps.train import train

    for e in range(6):
        write(root / "fleet" / "train" / f"m{e}{suffix}", entity_series(e, 80), header)
        write(root / "fleet" / "test" / f"m{e}{suffix}", entity_series(e + 10, 120, spike=30), header)
        labels = np.zeros(120)
        labels[30:35] = labels[90:95] = 1
        write(root / "fleet" / "test_label" / f"m{e}.txt", labels)
    settings = [
        "dataset=series_folders",
        f"dataset.source.root={root / 'fleet'}",
        f"dataset.source.window={WINDOW}",
        f"dataset.source.stride={STRIDE}",
        "dataset.n_folds=3",
        f"dataset.k_shot={K}",
        "dataset.n_query=8",
        "threshold=support_quantile",
        "logger=none",
    ]
    cfg = compose_in(root / "train", [*settings, *overrides])
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Support scaling, features chosen by name from CSV files with a header."""
    root = tmp_path_factory.mktemp("live")
    return root, train_fleet(root, ".csv", SOURCE, f"dataset.source.features=[{','.join(FEATURES)}]")


@pytest.fixture
def history_and_series():
    return entity_series(21, 60), entity_series(22, 50, spike=30)


def frame(x: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(x, columns=SOURCE)


def test_the_preprocessing_travels_in_the_checkpoint(trained):
    stored = ckpt.load(trained[1]).preprocessing
    preprocessing = Preprocessing.from_dict(stored)
    assert preprocessing.is_series and preprocessing.window == WINDOW and preprocessing.stride == STRIDE
    assert preprocessing.columns == tuple(FEATURES) and preprocessing.source_columns == tuple(SOURCE)
    assert preprocessing.scaling == "support" and preprocessing.sample_shape == (WINDOW, len(FEATURES))
    assert Preprocessing.from_dict(preprocessing.to_dict()) == preprocessing
    assert Preprocessing.from_dict({"sample_shape": [3]}).is_series is False  # an older checkpoint


def test_scores_per_step_equal_score_stream_on_the_same_scaled_windows(trained, history_and_series):
    history, series = history_and_series
    detector = metaad.load(trained[1]).fit(frame(history))
    scores = detector.decision_function(frame(series))
    steps = detector.scored_steps(len(series))
    assert scores.shape == (len(series) - WINDOW + 1,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(steps, np.arange(WINDOW - 1, len(series)))

    # the expected: the last K history windows at the stride, the source's columns, support scaling
    chosen = [SOURCE.index(c) for c in FEATURES]
    h, s = history[:, chosen].astype(np.float32), series[:, chosen].astype(np.float32)
    starts = [len(h) - WINDOW - STRIDE * i for i in range(K - 1, -1, -1)]
    support = np.stack([h[a : a + WINDOW] for a in starts])
    support, scaled = scale_by_support(support, s)
    learner = detector.detector
    with torch.no_grad():
        state = learner.adapt(torch.from_numpy(support)[None])
        expected = score_stream(learner, state, torch.from_numpy(scaled)[None], WINDOW)[0]
        # entry i is the window ending at step i + W - 1, scored as an episode query
        windows = torch.from_numpy(np.stack([scaled[i - WINDOW + 1 : i + 1] for i in steps]))[None]
        as_queries = learner.score(state, windows)[0]
    np.testing.assert_allclose(scores, expected.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores, as_queries.double().numpy(), rtol=1e-5, atol=1e-6)
    # the spike (steps 30-34) scores above the normal steps before it
    assert scores[steps >= 30][:5].min() > scores[steps < 30].max()

    # an array (the source's columns in order) gives the same; decisions at the stored threshold
    by_position = metaad.load(trained[1]).fit(history)
    np.testing.assert_array_equal(by_position.decision_function(series), scores)
    decisions = detector.predict(frame(series))
    assert decisions.shape == scores.shape and set(np.unique(decisions)) <= {0, 1}
    np.testing.assert_array_equal(
        decisions, (detector.normalised_scores(frame(series)) > detector.threshold_).astype(int)
    )


def test_scaling_statistics_come_from_the_history_only(trained, history_and_series):
    history, series = history_and_series
    detector = metaad.load(trained[1]).fit(history)
    mean = detector.series_mean_.copy()
    detector.decision_function(series * 100)  # scoring never moves the scale
    np.testing.assert_array_equal(detector.series_mean_, mean)
    refit = metaad.load(trained[1]).fit(history + 5.0)
    np.testing.assert_allclose(refit.series_mean_, mean + 5.0, rtol=1e-5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda h, s: (h, s[: WINDOW - 1]), "fewer than one window of 8"),
        (lambda h, s: (h[: WINDOW + (K - 1) * STRIDE - 1], s), "needs at least 16 steps"),
        (lambda h, s: (frame(h).drop(columns=["disk"]), s), "missing ['disk']"),
        (lambda h, s: (frame(h).rename(columns={"mem": "memory"}), s), "unknown ['memory']"),
        (lambda h, s: (h, s[:, :3]), "expected a (steps, 4) series"),
        (lambda h, s: (h, np.where(np.arange(len(s))[:, None] == 3, np.nan, s)), "hold NaN"),
    ],
)
def test_bad_series_are_refused_with_one_message(trained, history_and_series, make, message):
    history, series = make(*history_and_series)
    with pytest.raises(DataError, match=None) as error:
        metaad.load(trained[1]).fit(history).decision_function(series)
    assert message in str(error.value)


def run_score(tmp_path: Path, ckpt_path: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose_in(
        tmp_path / "score", [f"ckpt_path={ckpt_path}", *overrides], config_name="score", quick=False
    )
    try:
        return score(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("kind", ["csv", "npy.gz", "npz"])
def test_metaad_score_writes_one_row_per_step(trained, history_and_series, tmp_path, kind):
    history, series = history_and_series
    files = {}
    for role, x in (("history", history), ("series", series)):
        path = tmp_path / f"{role}.{kind}"
        if kind == "csv":
            frame(x).to_csv(path, index=False)
        elif kind == "npz":
            np.savez(path, X=x)
        else:
            write(path, x)
        files[role] = path
    output = tmp_path / "out" / "steps.csv"
    table = run_score(tmp_path, trained[1], *(f"{r}={p}" for r, p in files.items()), f"output={output}")
    on_disk = pd.read_csv(output)
    assert list(on_disk.columns) == ROWS and len(on_disk) == len(series)
    detector = metaad.load(trained[1]).fit(frame(history))
    scored = on_disk.iloc[WINDOW - 1 :]
    np.testing.assert_array_equal(on_disk["step"], np.arange(len(series)))
    assert on_disk.iloc[: WINDOW - 1][["score", "normalised_score", "is_anomaly"]].isna().all().all()
    np.testing.assert_allclose(scored["score"], detector.decision_function(frame(series)), rtol=1e-6)
    np.testing.assert_array_equal(scored["is_anomaly"].astype(int), detector.predict(frame(series)))
    pd.testing.assert_frame_equal(table, on_disk, check_dtype=False)
    # a previous table is replaced; an input never
    run_score(tmp_path, trained[1], *(f"{r}={p}" for r, p in files.items()), f"output={output}")
    if kind == "csv":
        inputs = [f"{r}={p}" for r, p in files.items()]
        with pytest.raises(DataError, match="is one of the inputs"):
            run_score(tmp_path, trained[1], *inputs, f"output={files['history']}")
        # a file that is not a scores table is never replaced
        mine = tmp_path / "mine.csv"
        mine.write_text("a,b\n1,2\n")
        with pytest.raises(DataError, match="is not a scores table"):
            run_score(tmp_path, trained[1], *inputs, f"output={mine}")
        assert mine.read_text() == "a,b\n1,2\n"


def test_metaad_score_refuses_the_wrong_pair_of_inputs(trained, quick_run, history_and_series, tmp_path):
    history, series = history_and_series
    h, s = tmp_path / "h.csv", tmp_path / "s.csv"
    frame(history).to_csv(h, index=False)
    frame(series).to_csv(s, index=False)
    with pytest.raises(DataError, match="a series model: give history=<file> and series=<file>"):
        run_score(tmp_path, trained[1], f"support={h}", f"query={s}")
    with pytest.raises(DataError, match="scores samples: give support=<file> and query=<file>"):
        run_score(tmp_path, quick_run[2], f"history={h}", f"series={s}")


def test_a_series_model_is_not_exported_as_a_sample_scorer(trained, history_and_series, tmp_path):
    from metaad.export import ExportError

    detector = metaad.load(trained[1]).fit(history_and_series[0])
    with pytest.raises(ExportError, match="is a series model"):
        detector.export(tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_a_model_of_columns_by_index_without_scaling(tmp_path_factory, history_and_series):
    """Headerless .npy files (columns are positions), features [2, 0], dataset.scaling=none."""
    root = tmp_path_factory.mktemp("by_index")
    path = train_fleet(root, ".npy", None, "dataset.source.features=[2,0]", "dataset.scaling=none")
    preprocessing = Preprocessing.from_dict(ckpt.load(path).preprocessing)
    assert preprocessing.columns == ("2", "0") and preprocessing.source_columns == ("0", "1", "2", "3")
    assert preprocessing.scaling == "none"
    history, series = history_and_series
    detector = metaad.load(path).fit(history)
    assert detector.series_mean_ is None
    learner = detector.detector
    h, s = history[:, [2, 0]].astype(np.float32), series[:, [2, 0]].astype(np.float32)
    support = np.stack([h[a : a + WINDOW] for a in (len(h) - WINDOW - STRIDE * i for i in (2, 1, 0))])
    with torch.no_grad():
        state = learner.adapt(torch.from_numpy(support)[None])
        expected = score_stream(learner, state, torch.from_numpy(s)[None], WINDOW)[0]
    np.testing.assert_allclose(detector.decision_function(series), expected.double().numpy(), rtol=1e-6)
    with pytest.raises(DataError, match=r"unknown \['cpu'"):  # a frame is matched by the positions' names
        detector.decision_function(frame(series))
