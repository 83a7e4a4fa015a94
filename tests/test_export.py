"""Export: a fitted detector written as a TorchScript (or ONNX) file scores raw samples as the API does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import metaad
from metaad.api import baseline_configs
from metaad.detectors.baselines import _SupportFitted
from metaad.evaluation.thresholds import SupportQuantile
from metaad.export import ExportError
from tests.conftest import LEARNERS

# `make test` runs one learner per export path (traced score with weights, MAML's adapted network,
# a float64 state); the other learners, siamese included, run under -m slow.
FAST = {"protonet", "maml", "covariance"}
# Operators ONNX has no equivalent of (covariance and Mahalanobis solve with their Cholesky factor).
NO_ONNX = {"covariance": "cholesky_solve", "mahalanobis": "cholesky_solve"}
# learners over the baselines' scores: their ONNX trace depends on the batch size (the TorchScript
# file matches), and the parity check refuses it
NO_ONNX_TRACE = {"combination", "residual"}
TORCH_BASELINES = sorted(
    name for name in baseline_configs() if not isinstance(metaad.baseline(name).detector, _SupportFitted)
)
SKLEARN_BASELINES = sorted(set(baseline_configs()) - set(TORCH_BASELINES))


@pytest.fixture(scope="module")
def digits():
    """Raw 8x8 digits (0-16) as a user has them: 5 normal sevens to fit, 17 samples to score."""
    data = load_digits()
    sevens, others = data.data[data.target == 7], data.data[data.target != 7]
    return sevens[:5], np.vstack([sevens[5:12], others[:10]])


def check_parity(det, path: Path, query: np.ndarray, format: str = "torchscript") -> None:
    """The file's scores equal the API's to 1e-5 and its decisions are the API's."""
    if format == "torchscript":
        scores, decisions = (t.numpy() for t in torch.jit.load(str(path))(torch.from_numpy(query).float()))
    else:
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        scores, decisions = session.run(None, {"x": query.astype(np.float32)})
    assert scores.dtype == np.float32 and decisions.dtype == np.bool_
    np.testing.assert_allclose(scores, det.decision_function(query), rtol=1e-5, atol=1e-5)
    assert decisions.tolist() == det.predict(query).astype(bool).tolist()
    if len(query) > 1:
        assert 0 < decisions.sum() < len(query)  # decisions that could be wrong either way


@pytest.mark.parametrize(
    "model", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in LEARNERS]
)
def test_every_learner_exports_with_the_apis_scores(model, quick_checkpoint, digits, tmp_path):
    """Raw pixels in (the checkpoint's 1/16 scaling inside the file), the API's scores and decisions out,
    with the checkpoint's threshold and with a support-normalised (z-score) one."""
    support, query = digits
    for threshold in (None, SupportQuantile(q=0.8)):
        det = metaad.load(quick_checkpoint(model), threshold=threshold).fit(support)
        path = det.export(tmp_path / f"{model}.pt")
        check_parity(det, path, query)
        check_parity(det, path, query[:1])  # a batch of one: nothing traced at the support's size
        if model in NO_ONNX_TRACE:
            with pytest.raises(ExportError, match="traced scores differ .* on samples of another batch size"):
                det.export(tmp_path / f"{model}.onnx", format="onnx")
            assert not (tmp_path / f"{model}.onnx").exists()
        elif pytest.importorskip("onnx") and model not in NO_ONNX:
            check_parity(det, det.export(tmp_path / f"{model}.onnx", format="onnx"), query, "onnx")
        elif model in NO_ONNX:
            with pytest.raises(ExportError, match=f"cannot be exported to ONNX .*{NO_ONNX[model]}"):
                det.export(tmp_path / f"{model}.onnx", format="onnx")


@pytest.mark.parametrize("name", TORCH_BASELINES)
def test_every_torch_baseline_exports_with_the_apis_scores(name, tmp_path):
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(12, 5)) * 0.3 + 2  # near one direction: apart from the anomalies in any metric
    support, query = normal[:6], np.vstack([normal[6:], rng.normal(size=(6, 5)) * 3])
    det = metaad.baseline(name).fit(support)
    check_parity(det, det.export(tmp_path / f"{name}.pt"), query)
    if pytest.importorskip("onnx") and name not in NO_ONNX:
        check_parity(det, det.export(tmp_path / f"{name}.onnx", format="onnx"), query, "onnx")


@pytest.mark.parametrize("name", SKLEARN_BASELINES)
def test_numpy_baselines_are_refused_by_name(name, tmp_path):
    """scikit-learn's estimators are numpy code: tracing bakes one answer in; refused, nothing written."""
    det = metaad.baseline(name).fit(np.random.default_rng(0).normal(size=(6, 3)))
    with pytest.raises(ExportError, match=f"baseline {name} cannot be exported: its traced scores differ"):
        det.export(tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_the_file_loads_and_scores_with_torch_alone(quick_checkpoint, digits, tmp_path):
    """A process where metaad cannot even be imported loads the files and gets the API's numbers."""
    support, query = digits
    expected = {}
    for model in ("protonet", "maml"):
        det = metaad.load(quick_checkpoint(model)).fit(support)
        det.export(tmp_path / f"{model}.pt")
        expected[model] = (det.decision_function(query), det.predict(query))
    np.save(tmp_path / "query.npy", query)
    code = (
        "import json, sys\n"
        "sys.modules['metaad'] = None  # import metaad now fails\n"
        "import numpy as np, torch\n"
        f"folder = {str(tmp_path)!r}\n"
        "x = torch.from_numpy(np.load(folder + '/query.npy'))\n"
        "out = {}\n"
        "for name in ('protonet', 'maml'):\n"
        "    extra = {'metaad.json': ''}\n"
        "    module = torch.jit.load(f'{folder}/{name}.pt', _extra_files=extra)\n"
        "    scores, decisions = module(x)\n"
        "    out[name] = [scores.tolist(), decisions.int().tolist(), json.loads(extra['metaad.json'])]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for model, (scores, decisions) in expected.items():
        np.testing.assert_allclose(out[model][0], scores, rtol=1e-5, atol=1e-5)
        assert out[model][1] == decisions.tolist()
        info = out[model][2]
        assert info["sample_shape"] == [64] and info["scale"] == 1 / 16 and info["n_support"] == 5


def test_the_file_refuses_nan_and_the_wrong_shape(digits, tmp_path):
    support, query = digits
    module = torch.jit.load(str(metaad.baseline("mahalanobis").fit(support).export(tmp_path / "m.pt")))
    bad = torch.from_numpy(query).float()
    bad[3, 5] = float("nan")
    with pytest.raises(Exception, match="NaN or inf"):
        module(bad)
    with pytest.raises(Exception, match=r"expected samples of \[64\]"):
        module(torch.zeros(3, 63))
    assert module(torch.from_numpy(query).reshape(-1, 8, 8).float())[0].shape == (len(query),)  # 8x8 images


def test_export_never_writes_onto_the_checkpoint_or_a_foreign_file(quick_checkpoint, digits, tmp_path):
    ckpt = quick_checkpoint("protonet")
    before = ckpt.read_bytes()
    det = metaad.load(ckpt).fit(digits[0])
    with pytest.raises(ExportError, match="is the checkpoint"):
        det.export(ckpt, overwrite=True)
    assert ckpt.read_bytes() == before
    notes = tmp_path / "notes.pt"
    notes.write_text("mine")
    with pytest.raises(ExportError, match="exists and is not a file metaad exported"):
        det.export(notes)
    assert notes.read_text() == "mine"
    first = det.export(tmp_path / "det.pt")
    det.fit(digits[1][:5]).export(first)  # a previous export is replaced, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.pt", "notes.pt"]
    check_parity(det, first, digits[1])


def test_an_unfitted_or_thresholdless_detector_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"call fit\(X_normal\)"):
        metaad.baseline("mahalanobis").export(tmp_path / "a.pt")
    with pytest.raises(RuntimeError, match="has no threshold to decide with"):
        metaad.baseline("mahalanobis", threshold=None).fit(np.eye(4)).export(tmp_path / "a.pt")
    with pytest.raises(ExportError, match="format must be one of"):
        metaad.baseline("mahalanobis").fit(np.eye(4)).export(tmp_path / "a.pt", format="tflite")
