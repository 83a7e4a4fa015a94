"""The Python API: a trained learner and a baseline behind fit / decision_function / predict."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import metaad
from metaad.api import baseline_configs
from metaad.apps.build import build_datamodule
from metaad.data import DataError
from metaad.detectors.baselines import Mahalanobis
from metaad.evaluation.thresholds import leave_one_out_scores, standardise
from tests.conftest import compose_in


@pytest.fixture(scope="module")
def trained(quick_run):
    """The shared quick run (f1_optimal on z-scores): its config and best checkpoint."""
    return quick_run[0], quick_run[2]


@pytest.fixture(scope="module")
def episode(trained):
    return build_datamodule(trained[0]).datasets["test"][0]


def test_a_loaded_learner_scores_raw_data_as_evaluation_scores_its_episodes(trained, episode):
    """Raw digits (0-16) through the API give the scores the evaluation gives the scaled episode."""
    det = metaad.load(trained[1])
    fitted = det.fit(episode.support.numpy() * 16)
    assert fitted is det and det.n_support_ == len(episode.support)
    scores = det.decision_function(episode.query.numpy() * 16)
    with torch.no_grad():
        expected = det.detector.anomaly_scores(episode.support[None], episode.query[None])[0]
        loo = leave_one_out_scores(det.detector, episode.support[None])
    assert scores == pytest.approx(expected.numpy(), abs=1e-5)
    z = standardise(expected[None], loo)[0].numpy()
    assert det.threshold_ == torch.load(trained[1], weights_only=True)["metaad_threshold"]["value"]
    assert det.predict(episode.query.numpy() * 16).tolist() == (z > det.threshold_).astype(int).tolist()


def test_a_frame_and_a_tensor_give_the_same_scores_as_an_array(trained, episode):
    det = metaad.load(trained[1]).fit(torch.from_numpy(episode.support.numpy() * 16))
    query = episode.query.numpy() * 16
    frame = pd.DataFrame(query, columns=[f"pixel_{i}" for i in range(64)])
    assert det.decision_function(frame) == pytest.approx(det.decision_function(query))


def test_too_few_support_samples_for_the_threshold_are_refused(trained, episode):
    with pytest.raises(DataError, match=r"fit got 2 normal sample\(s\); k_shot=2: .* needs at least 3"):
        metaad.load(trained[1]).fit(episode.support.numpy()[:2] * 16)


def test_another_k_than_the_threshold_was_fitted_at_is_warned(trained, episode):
    with pytest.warns(UserWarning, match="fitted on validation episodes with K=5 .* fit got K=4"):
        metaad.load(trained[1]).fit(episode.support.numpy()[:4] * 16)


def test_scoring_before_fit_says_what_to_do(trained):
    with pytest.raises(RuntimeError, match=r"call fit\(X_normal\)"):
        metaad.load(trained[1]).decision_function(np.zeros((2, 64)))


def test_a_baseline_answers_the_same_api_and_matches_the_detector():
    rng = np.random.default_rng(0)
    support, query = rng.normal(size=(6, 5)), rng.normal(size=(9, 5)) * 3
    det = metaad.baseline("mahalanobis").fit(support)
    direct = Mahalanobis()
    with torch.no_grad():
        s = torch.from_numpy(support).float()[None]
        expected = direct.score(direct.adapt(s), torch.from_numpy(query).float()[None])[0]
    assert det.decision_function(query) == pytest.approx(expected.numpy(), rel=1e-5)
    # support_quantile on raw scores: anomalous when above every leave-one-out support score
    loo = leave_one_out_scores(direct, s)[0]
    assert det.threshold_ == pytest.approx(loo.max().item(), rel=1e-5)
    assert det.predict(query).tolist() == (det.decision_function(query) > det.threshold_).astype(int).tolist()


def test_a_baseline_matches_frame_columns_by_name():
    rng = np.random.default_rng(1)
    columns = ["a", "b", "c"]
    support = pd.DataFrame(rng.normal(size=(5, 3)), columns=columns)
    query = pd.DataFrame(rng.normal(size=(4, 3)), columns=columns)
    det = metaad.baseline("nn_euclidean").fit(support)
    assert det.feature_names_in_ == columns
    shuffled = query[["c", "a", "b"]]
    assert det.decision_function(shuffled) == pytest.approx(det.decision_function(query))
    with pytest.raises(DataError, match=r"missing \['c'\], unexpected \['d'\]"):
        det.decision_function(query.rename(columns={"c": "d"}))


def test_a_1d_array_is_refused_as_by_a_loaded_learner(trained):
    """N values: N samples of one feature or one sample of N? Neither detector guesses."""
    with pytest.raises(DataError, match=r"got shape \(6,\)"):
        metaad.load(trained[1]).fit(np.arange(6.0))
    with pytest.raises(DataError, match=r"1-D array of 6 values; reshape it: X.reshape\(-1, 1\)"):
        metaad.baseline("nn_euclidean").fit(np.arange(6.0))
    det = metaad.baseline("nn_euclidean").fit(np.arange(6.0).reshape(-1, 1))
    with pytest.raises(DataError, match="1-D array of 3 values"):
        det.decision_function(np.arange(3.0))


def test_unknown_baseline_and_threshold_are_named():
    with pytest.raises(ValueError, match="unknown baseline 'knn'.*mahalanobis"):
        metaad.baseline("knn")
    with pytest.raises(ValueError, match="threshold must be"):
        metaad.baseline("mahalanobis", threshold="high")


def test_loading_and_scoring_does_not_import_lightning(trained, episode):
    """The API's promise: a detector from a checkpoint scores without importing Lightning."""
    code = (
        "import sys, numpy as np, metaad\n"
        f"det = metaad.load({str(trained[1])!r})\n"
        f"det.fit(np.load({str(trained[1].parent / 'support.npy')!r}))\n"
        "det.predict(np.zeros((3, 64)))\n"
        "print('pytorch_lightning' in sys.modules, 'lightning' in sys.modules)\n"
    )
    np.save(trained[1].parent / "support.npy", episode.support.numpy() * 16)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", sorted(baseline_configs()))
def test_the_api_builds_each_baseline_as_training_scores_it(name, tmp_path):
    """One registry, conf/baselines/: metaad.baseline(name) is the detector baselines=all builds."""
    from metaad.apps.build import build_baselines

    built = build_baselines(compose_in(tmp_path / "run", ["baselines=all"]))[name]
    api = metaad.baseline(name).detector
    assert type(api) is type(built) and vars(api) == vars(built)


def test_api_settings_replace_the_configured_ones():
    assert baseline_configs()["mahalanobis"]["ridge"] != 0.5
    assert metaad.baseline("mahalanobis", ridge=0.5).detector.ridge == 0.5
