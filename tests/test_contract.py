"""The scikit-learn / PyOD estimator contract of the Python API, PyOD detectors as baselines, and the
metaad-export app."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import erf
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import (
    check_estimator_cloneable,
    check_estimator_repr,
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_set_params,
    parametrize_with_checks,
)

import metaad
from metaad.api import BaselineDetector, LoadedDetector
from metaad.apps.export import export as export_app
from metaad.data import DataError
from metaad.errors import ConfigError
from metaad.evaluation.thresholds import F1Optimal, SupportQuantile, leave_one_out_scores, standardise
from tests.conftest import compose_in


@pytest.fixture(scope="module")
def digits():
    """Raw 8x8 digits (0-16): 5 normal sevens to fit, 17 samples to score."""
    data = load_digits()
    sevens, others = data.data[data.target == 7], data.data[data.target != 7]
    return sevens[:5], np.vstack([sevens[5:12], others[:10]])


@pytest.fixture(scope="module")
def ckpt(quick_checkpoint):
    return quick_checkpoint("protonet")


# --- parameters, clone, pickling -----------------------------------------------------------------
def test_a_loaded_learners_params_are_its_checkpoint_and_threshold_so_clone_reloads(ckpt, digits):
    support, query = digits
    rule = SupportQuantile(q=0.9, normalise="zscore")
    det = metaad.load(ckpt, threshold=rule).fit(support)
    assert det.get_params() == {"ckpt_path": ckpt, "threshold": rule}
    assert rule.value is None and det.threshold_rule is not rule  # the given rule is never changed
    twin = clone(det)
    assert type(twin) is LoadedDetector and not hasattr(twin, "state_")
    assert twin.get_params()["ckpt_path"] == ckpt and twin.threshold_rule is not det.threshold_rule
    with pytest.raises(NotFittedError, match=r"call fit\(X_normal\)"):
        twin.decision_function(query)
    np.testing.assert_array_equal(twin.fit(support).decision_function(query), det.decision_function(query))
    assert twin.threshold_ == det.threshold_


def test_set_params_rebuilds_and_unfits(ckpt, digits):
    support, query = digits
    det = metaad.load(ckpt).fit(support)
    assert det.threshold_rule.rule == "f1_optimal"
    det.set_params(threshold=SupportQuantile(normalise="none"))
    assert not hasattr(det, "state_") and det.threshold_rule.rule == "support_quantile"
    loo = det.fit(support).decision_scores_
    assert det.threshold_ == pytest.approx(loo.max(), rel=1e-6)
    with pytest.raises(ValueError, match=r"Invalid parameter\(s\) \['k_shot'\]"):
        det.set_params(k_shot=3)


def test_a_baselines_params_are_its_name_threshold_and_settings():
    det = metaad.baseline("mahalanobis", ridge=0.5)
    assert det.get_params() == {
        "baseline": "mahalanobis",
        "threshold": "support_quantile",
        "settings": {"ridge": 0.5},
    }
    assert clone(det).detector.ridge == 0.5
    assert (
        repr(det)
        == "BaselineDetector(baseline='mahalanobis', threshold='support_quantile', settings={'ridge': 0.5})"
    )


def test_a_grid_search_over_baseline_settings_runs():
    """Parameters make scikit-learn's tools work: a grid search, scored by mean decision on normals."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(30, 4))
    search = GridSearchCV(
        BaselineDetector("mahalanobis"),
        {"settings": [{"ridge": 1e-6}, {"ridge": 1.0}]},
        scoring=lambda est, X, y=None: -est.predict(X).mean(),
        cv=3,
    )
    assert search.fit(normal).best_params_["settings"] in ({"ridge": 1e-6}, {"ridge": 1.0})
    assert len(search.cv_results_["mean_test_score"]) == 2


@pytest.mark.parametrize("which", ["learner", "baseline"])
def test_a_pickled_fitted_detector_gives_identical_scores(which, ckpt, digits):
    support, query = digits
    det = metaad.load(ckpt) if which == "learner" else metaad.baseline("mahalanobis")
    det.fit(support)
    again = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(again.decision_function(query), det.decision_function(query))
    np.testing.assert_array_equal(again.predict(query), det.predict(query))
    assert again.get_params().keys() == det.get_params().keys()


# --- PyOD's fitted attributes and predict_proba --------------------------------------------------
def test_decision_scores_are_the_supports_leave_one_out_scores_and_labels_their_decisions(ckpt, digits):
    support, _ = digits
    det = metaad.load(ckpt, threshold=SupportQuantile(q=0.5, normalise="zscore"))
    labels = det.fit_predict(support)
    x = torch.from_numpy(support / 16).float()[None]
    with torch.no_grad():
        loo = leave_one_out_scores(det.detector, x)
    np.testing.assert_allclose(det.decision_scores_, loo[0].numpy(), rtol=1e-6)
    z = standardise(loo, loo)[0].double().numpy()
    assert labels.tolist() == (z > det.threshold_).astype(int).tolist() == det.labels_.tolist()
    assert 0 < labels.sum() < len(labels)  # the median rule flags some of the support


def pyod_formula(train: np.ndarray, test: np.ndarray, method: str) -> np.ndarray:
    """PyOD's BaseDetector.predict_proba, written out (pyod/models/base.py)."""
    if method == "linear":
        p = MinMaxScaler().fit(train.reshape(-1, 1)).transform(test.reshape(-1, 1)).ravel().clip(0, 1)
    else:
        p = erf((test - train.mean()) / (train.std() * np.sqrt(2))).clip(0, 1)
    return np.stack([1 - p, p], axis=1)


@pytest.mark.parametrize("method", ["linear", "unify"])
def test_predict_proba_is_pyods_formula_on_the_leave_one_out_scores(method, digits):
    support, query = digits
    det = metaad.baseline("nn_euclidean").fit(support)
    proba = det.predict_proba(query, method=method)
    expected = pyod_formula(det.decision_scores_, det.decision_function(query), method)
    np.testing.assert_allclose(proba, expected, atol=1e-12)
    assert proba.shape == (len(query), 2) and ((proba[:, 1] > 0) & (proba[:, 1] < 1)).any()


@pytest.mark.parametrize("method", ["linear", "unify"])
def test_predict_proba_equals_pyods_own(method, digits):
    base = pytest.importorskip("pyod.models.base")
    support, query = digits
    det = metaad.baseline("mahalanobis").fit(support)

    class Same(base.BaseDetector):  # PyOD's own predict_proba on our scores
        def __init__(self):
            super().__init__()

        def fit(self, X, y=None):
            self._set_n_classes(y)
            self.decision_scores_ = det.decision_scores_
            self._process_decision_scores()
            return self

        def decision_function(self, X):
            return det.decision_function(X)

    np.testing.assert_allclose(
        det.predict_proba(query, method), Same().fit(support).predict_proba(query, method), atol=1e-12
    )


def test_predict_proba_without_spread_and_with_one_sample_never_gives_nan():
    """K=2 nearest-neighbour: both leave-one-out scores are the same distance (PyOD would divide by 0)."""
    det = metaad.baseline("nn_euclidean").fit(np.array([[0.0, 0.0], [1.0, 0.0]]))
    proba = det.predict_proba(np.array([[0.5, 0.0], [3.0, 0.0]]), method="unify")
    assert proba[:, 1].tolist() == [0.0, 1.0]
    one = metaad.baseline("nn_euclidean", threshold=None).fit(np.array([[0.0, 1.0]]))
    with pytest.raises(DataError, match="need at least 2 support samples; fit got 1"):
        one.predict_proba(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="method must be 'linear' or 'unify'"):
        det.predict_proba(np.zeros((1, 2)), method="probit")


# --- scikit-learn's estimator checks -------------------------------------------------------------
WORDING = "metaad's message says the same in its own words (the check matches scikit-learn's wording)"
NOT_APPLICABLE = {
    "check_fit2d_1sample": "few-shot semantics: one sample is refused only by a threshold that needs K >= 2, "
    "with metaad's message; with threshold=None K=1 is a valid fit",
    "check_fit2d_predict1d": WORDING + ": 'reshape it: X.reshape(-1, 1) ...'",
    "check_n_features_in_after_fitting": WORDING + ": 'samples of shape (3,), but it was fitted on (4,)'",
    "check_dtype_object": WORDING + ": 'expected numeric samples'",
}
FLOAT32 = {
    "check_methods_subset_invariance": "float32 scores: torch's batched distances round differently "
    "by batch size (1e-7, the check's tolerance)",
}


def expected_failures(estimator) -> dict[str, str]:
    return NOT_APPLICABLE | (FLOAT32 if estimator.baseline != "mahalanobis" else {})


with warnings.catch_warnings():  # it notes the class is not a BaseEstimator subclass: by design, no import
    warnings.simplefilter("ignore", UserWarning)
    sklearn_checks = parametrize_with_checks(
        [BaselineDetector("mahalanobis"), BaselineDetector("nn_cosine")],
        expected_failed_checks=expected_failures,
    )


@sklearn_checks
def test_sklearn_estimator_checks(estimator, check):
    """Every check scikit-learn runs on an unsupervised estimator, on baselines (any feature count);
    the outlier-detector checks do not run: they expect -1/+1 labels and `contamination`, PyOD's
    contract (0/1) is metaad's."""
    check(estimator)


@pytest.mark.parametrize(
    "check",
    [
        check_get_params_invariance,
        check_set_params,
        check_no_attributes_set_in_init,
        check_estimator_repr,
        check_estimator_cloneable,
    ],
)
def test_sklearn_parameter_checks_on_a_loaded_learner(check, ckpt):
    """A loaded learner takes only its checkpoint's features (64 here), so of the checks it runs
    those that do not fit generated data."""
    check("loaded", metaad.load(ckpt))


# --- PyOD detectors as baselines ------------------------------------------------------------------
def test_a_pyod_detector_is_a_baseline_with_pyods_own_scores():
    iforest = pytest.importorskip("pyod.models.iforest")
    rng = np.random.default_rng(0)
    support, query = rng.normal(size=(12, 3)), rng.normal(size=(8, 3)) * 3
    det = metaad.baseline("pyod:IForest", n_estimators=50).fit(support)
    own = iforest.IForest(n_estimators=50, random_state=0).fit(support).decision_function(query)
    np.testing.assert_allclose(det.decision_function(query), own, rtol=1e-6)
    assert det.get_params()["settings"] == {"n_estimators": 50}
    with pytest.raises(ValueError, match="PyOD has no detector class Forest .*e.g. IForest"):
        metaad.baseline("pyod:Forest")
    with pytest.raises(ValueError, match="baseline pyod:KNN cannot fit a support set of 3 samples"):
        metaad.baseline("pyod:KNN").fit(support[:3])


def test_a_missing_pyod_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyod", None)
    monkeypatch.setitem(sys.modules, "pyod.models.base", None)
    with pytest.raises(ImportError, match=r"needs PyOD, an optional extra: pip install pyod"):
        metaad.baseline("pyod:ECOD")


def test_baselines_pyod_scores_pyod_detectors_on_the_training_episodes(tmp_path):
    """baselines=pyod: PyOD detectors beside the fast baselines on the very episodes metaad-train scores."""
    pytest.importorskip("pyod")
    from pyod.models.ecod import ECOD

    from metaad.apps.build import build_baselines, build_datamodule

    cfg = compose_in(tmp_path / "run", ["baselines=pyod"])
    built = build_baselines(cfg)
    assert {"pyod_ecod", "pyod_iforest", "mahalanobis"} <= set(built)
    episode = build_datamodule(cfg).datasets["test"][0]
    scores = built["pyod_ecod"].score(built["pyod_ecod"].adapt(episode.support[None]), episode.query[None])[0]
    own = ECOD().fit(episode.support.double().numpy()).decision_function(episode.query.double().numpy())
    np.testing.assert_allclose(scores.numpy(), own, rtol=1e-5)


@pytest.mark.slow
def test_metaad_train_scores_pyod_baselines_beside_the_learner(tmp_path):
    """A whole quick run with baselines=pyod: PyOD's detectors in metrics.json like every baseline."""
    pytest.importorskip("pyod")
    from pyod.models.ecod import ECOD

    from metaad.apps.build import build_datamodule
    from metaad.apps.train import train
    from metaad.evaluation.metrics import EpisodeMetrics

    cfg = compose_in(tmp_path / "run", ["baselines=pyod", "logger=none"])
    metrics = train(cfg).to_json()
    assert {"pyod_ecod", "pyod_iforest", "mahalanobis"} <= set(metrics["baselines"])
    collected = EpisodeMetrics()
    for batch in build_datamodule(cfg).evaluation_loader("test"):
        scores = [
            ECOD().fit(s.double().numpy()).decision_function(q.double().numpy())
            for s, q in zip(batch.support, batch.query)
        ]
        collected.update(torch.tensor(np.stack(scores)), batch.label)
    expected = collected.compute()["auroc"].mean
    assert metrics["baselines"]["pyod_ecod"]["auroc"]["mean"] == pytest.approx(expected, abs=1e-6)


# --- metaad-export -----------------------------------------------------------------------------------
def run_export(tmp_path, *overrides):
    cfg = compose_in(tmp_path / "export", list(overrides), config_name="export", quick=False)
    return export_app(cfg)


def test_metaad_export_writes_the_apis_detector_from_a_csv(ckpt, digits, tmp_path):
    support, query = digits
    csv = tmp_path / "normal.csv"
    pd.DataFrame(support, columns=[f"pixel_{i}" for i in range(64)]).to_csv(csv, index=False)
    out = run_export(tmp_path, f"ckpt_path={ckpt}", f"support={csv}", f"output={tmp_path / 'det.pt'}")
    det = metaad.load(ckpt).fit(support)
    scores, decisions = torch.jit.load(str(out))(torch.from_numpy(query).float())
    np.testing.assert_allclose(scores.numpy(), det.decision_function(query), rtol=1e-5, atol=1e-5)
    assert decisions.numpy().tolist() == det.predict(query).astype(bool).tolist()


def test_metaad_export_refuses_to_write_onto_its_inputs_and_bad_settings(ckpt, digits, tmp_path):
    csv = tmp_path / "normal.csv"
    pd.DataFrame(digits[0]).to_csv(csv, index=False)
    before = csv.read_bytes()
    with pytest.raises(DataError, match="is the support"):
        run_export(tmp_path, f"ckpt_path={ckpt}", f"support={csv}", f"output={csv}", "overwrite=true")
    assert csv.read_bytes() == before
    with pytest.raises(ConfigError, match="format must be one of torchscript, onnx, got 'tflite'"):
        run_export(tmp_path, f"ckpt_path={ckpt}", f"support={csv}", "format=tflite")
    with pytest.raises(ConfigError, match="model is not a setting of metaad-export"):
        run_export(tmp_path, f"ckpt_path={ckpt}", f"support={csv}", "+model=siamese")


@pytest.mark.slow
def test_metaad_export_command_line(ckpt, digits, tmp_path):
    np.save(tmp_path / "normal.npy", digits[0])
    out = tmp_path / "det.pt"
    cli = [
        sys.executable,
        "-m",
        "metaad.apps.export",
        f"ckpt_path={ckpt}",
        f"support={tmp_path / 'normal.npy'}",
    ]
    done = subprocess.run([*cli, f"output={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "adapted to 5 normal samples" in done.stdout and out.is_file()
    failed = subprocess.run(
        [*cli, f"output={out}", "format=onnx2"], capture_output=True, text=True, cwd=tmp_path
    )
    assert (
        failed.returncode == 1
        and "format must be one of" in failed.stderr
        and "Traceback" not in failed.stderr
    )


def test_the_old_threshold_object_given_to_load_is_left_alone(ckpt):
    rule = F1Optimal(normalise="none")
    metaad.load(ckpt, threshold=rule)
    assert rule.value is None  # the checkpoint's fitted value went into the detector's copy


def test_the_readme_example_prints_what_it_says(tmp_path, monkeypatch, capsys):
    """The README's contract-and-export example runs as written; each `# ...` line under a print is
    what that print printed."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### The scikit-learn / PyOD contract, and export", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    claimed = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    assert printed == claimed and (tmp_path / "mahalanobis.pt").is_file()
