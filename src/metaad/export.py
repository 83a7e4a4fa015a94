"""Export a fitted detector to one file that scores raw samples without metaad: TorchScript (needs
torch only) or ONNX (needs onnxruntime only).

    det = metaad.load(ckpt).fit(X_normal)
    det.export("detector.pt")                      # torch.jit.load("detector.pt")(x) -> scores, decisions

What the file holds: the adapted state (the support's prototype, statistics or, for MAML, the
adapted weights: adapting ran in Python, the file scores with its result), the checkpoint's
preprocessing (scaling, inversion, flattened rows reshaped; not image resizing, Pillow's Lanczos:
images come at the model's size), the normalisation of the threshold (the support's leave-one-out
mean and spread) and the threshold. ``forward(x)``: ``x`` raw samples ``(N, ...)``, features in
the model's order (listed in the file's ``metaad.json``) -> ``(scores (N,) float32, decisions (N,)
bool)``, exactly what ``decision_function`` and ``predict`` give. The TorchScript file refuses a
wrong shape, NaN or inf (a NaN is never a decision); the ONNX graph has no such checks.

How: the scoring of the adapted state is traced (``torch.jit.trace``) from ``score(state, query)``
or, for a detector that offers it, from ``scoring_module(state)`` (MAML's torch.func calls cannot
be traced; its adapted network can). Before anything is written, the exported module scores probe
samples of another batch size than the traced one and must match the API's scores to 1e-5, so a
detector whose scores do not survive tracing (numpy code: the scikit-learn and PyOD baselines) is
refused by name. The file is written atomically, never onto the checkpoint, and replaces only a
previous export (or any file with ``overwrite=True``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metaad import files
from metaad.data.errors import DataError
from metaad.evaluation.thresholds import EPS

FORMATS = ("torchscript", "onnx")
METADATA = "metaad.json"
TOLERANCE = 1e-5


class ExportError(DataError):
    """A detector that cannot be exported, or a path that must not be written; the message says why."""


class _Scorer(nn.Module):
    """One episode's scoring of an adapted state: ``(Q, *x)`` -> ``(Q,)``."""

    def __init__(self, detector: Any, state: Any) -> None:
        super().__init__()
        self.detector, self.state = detector, state

    def forward(self, x: Tensor) -> Tensor:
        return self.detector.score(self.state, x.unsqueeze(0))[0].float()


class _Decide(nn.Module):
    """Raw samples -> (scores, decisions): preprocessing, the traced scoring, normalisation, threshold.

    Plain tensor code, scripted for TorchScript (with its checks) and traced for ONNX (without them).
    """

    def __init__(self, scorer: nn.Module, config: dict[str, Any], checks: bool) -> None:
        super().__init__()
        self.scorer = scorer
        self.sample_shape = list(config["sample_shape"])
        self.numel = math.prod(self.sample_shape)
        self.scale, self.invert = float(config["scale"]), bool(config["invert"])
        self.zscore = config["threshold"]["normalise"] == "zscore"
        self.mean, self.std = float(config["support_mean"]), float(config["support_std"])
        self.threshold, self.checks, self.eps = float(config["threshold"]["value"]), checks, EPS

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.checks:
            if x.dim() < 2 or x.size(0) == 0:
                raise ValueError("expected a non-empty batch of samples, shape (N, ...)")
            if x[0].numel() != self.numel:
                raise ValueError(
                    "expected samples of "
                    + str(self.sample_shape)
                    + " (or flattened), got shape "
                    + str(x.shape)
                )
        x = x.reshape([x.size(0)] + self.sample_shape).to(torch.float64)
        if self.checks and not bool(torch.isfinite(x).all()):
            raise ValueError("samples hold NaN or inf; a NaN is never a decision")
        if self.scale != 1.0:
            x = x * self.scale
        if self.invert:
            x = 1.0 - x
        scores = self.scorer(x.to(torch.float32))
        if self.checks and not bool(torch.isfinite(scores).all()):
            raise ValueError("a score is NaN or inf; a NaN is never a decision")
        normalised = scores
        if self.zscore:
            normalised = ((scores.to(torch.float64) - self.mean) / (self.std + self.eps)).to(torch.float32)
        return scores, normalised.to(torch.float64) > self.threshold


def export(detector: Any, path: str | Path, format: str = "torchscript", overwrite: bool = False) -> Path:
    """Write fitted ``detector`` (a :class:`metaad.api.FewShotDetector`) to ``path``; returns the path."""
    if format not in FORMATS:
        raise ExportError(f"export: format must be one of {FORMATS}, got {format!r}")
    if getattr(detector.preprocessing, "is_series", False):
        raise ExportError(
            f"export: {detector.name} is a series model (windows cut from a series and scaled by its "
            "history's statistics); a file that scores raw samples cannot hold that: score it with "
            "metaad.load(ckpt).fit(history).decision_function(series) or metaad-score history= series="
        )
    path = Path(path)
    _check_output(detector, path, format, overwrite)
    detector._require_threshold()  # decisions need a threshold, and the detector must be fitted
    state, support = detector.state_, detector.support_
    if support.shape[0] != 1:
        raise ExportError(f"export: {detector.name} holds {support.shape[0]} episodes; export fits one")
    config = _config(detector)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        make = getattr(detector.detector, "scoring_module", None)
        scorer = make(state) if make is not None else _Scorer(copy.deepcopy(detector.detector), state)
        scorer.eval().requires_grad_(False)  # a copy: the fitted detector is left as it was
        try:
            traced = torch.jit.trace(scorer, (support[0],), check_trace=False)
        except Exception as error:  # whatever tracing meets (numpy, torch.func) means: not exportable
            raise _refused(detector, f"its scoring cannot be traced ({_first_line(error)})") from error
    probe = _raw_probe(detector)
    expected_scores = detector.decision_function(probe)
    expected_decisions = detector.predict(probe).astype(bool)
    if format == "torchscript":
        module = torch.jit.script(_Decide(traced, config, checks=True))
        write = _torchscript_writer(module, config)
        run = lambda x: module(torch.from_numpy(x))  # noqa: E731
    else:
        module, write, run = _onnx(scorer, config, probe)
    with torch.no_grad():
        scores, decisions = (np.asarray(t) for t in run(probe))
    if scores.shape != expected_scores.shape or not np.allclose(
        scores, expected_scores, rtol=TOLERANCE, atol=TOLERANCE
    ):
        gap = np.abs(scores - expected_scores).max() if scores.shape == expected_scores.shape else "shape"
        raise _refused(
            detector,
            f"its traced scores differ from its own by {gap} on samples of another batch size "
            "(scoring that is not torch code, or depends on the batch size, does not survive tracing)",
        )
    near = np.abs(scores - expected_scores) > TOLERANCE
    if not np.array_equal(decisions.astype(bool)[~near], expected_decisions[~near]):
        raise _refused(detector, "its traced decisions differ from its own")
    _write_atomically(path, write)
    return path


def _config(detector: Any) -> dict[str, Any]:
    """What the file needs besides the traced scoring, as plain data (also its ``metaad.json``)."""
    preprocessing = detector.preprocessing
    rule = detector.threshold_rule
    shape = list(preprocessing.sample_shape if preprocessing is not None else detector.sample_shape_)
    loo = detector.support_scores_
    mean = std = 0.0
    if rule.normalise == "zscore":
        loo = loo.detach().double()
        mean, std = loo.mean(1).item(), loo.std(1).item()
    return {
        "format": 1,
        "name": detector.name,
        "sample_shape": shape,
        "feature_names": getattr(detector, "feature_names_in_", None),
        "scale": preprocessing.scale if preprocessing is not None else 1.0,
        "invert": preprocessing.invert if preprocessing is not None else False,
        "image_size": preprocessing.image_size if preprocessing is not None else None,
        "n_support": detector.n_support_,
        "threshold": {"rule": rule.rule, "normalise": rule.normalise, "value": detector.threshold_},
        "support_mean": mean,
        "support_std": std,
        "outputs": ["scores", "decisions"],
    }


def _raw_probe(detector: Any) -> np.ndarray:
    """Raw samples of another batch size than the support (3K rows): the support, a shrunk copy and a
    shifted one, mapped back through the preprocessing's scaling and inversion."""
    x = detector.support_[0].double()
    probe = torch.cat([x, 0.5 * x + 0.5 * x.mean(0), x + 0.1 * x.std(0, unbiased=False) + 0.05])
    preprocessing = detector.preprocessing
    if preprocessing is not None:
        if preprocessing.invert:
            probe = 1.0 - probe
        probe = probe / preprocessing.scale
    return probe.float().numpy()


def _torchscript_writer(module: torch.jit.ScriptModule, config: dict[str, Any]):
    def write(temporary: Path) -> None:
        torch.jit.save(module, str(temporary), _extra_files={METADATA: json.dumps(config)})

    return write


def _onnx(scorer: nn.Module, config: dict[str, Any], probe: np.ndarray):
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ExportError("export: format=onnx needs onnx: pip install onnx onnxruntime") from None
    module = _Decide(scorer, config, checks=False)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (torch.from_numpy(probe),),
                buffer,
                dynamo=False,
                input_names=["x"],
                output_names=["scores", "decisions"],
                dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}, "decisions": {0: "n"}},
            )
        except Exception as error:
            raise ExportError(
                f"export: {config['name']} cannot be exported to ONNX ({_first_line(error)}); "
                "format=torchscript can"
            ) from error
    import onnx

    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(config)
    data = model.SerializeToString()
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "export: format=onnx checks the file with onnxruntime: pip install onnxruntime"
        ) from None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {"x": x})

    return model, lambda temporary: temporary.write_bytes(data), run


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1: torch's ONNX exporter prints the whole graph from C++ when an operator
    has no ONNX form (its log switch is always on in torch 2.13), and the message we raise says it."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _refused(detector: Any, why: str) -> ExportError:
    return ExportError(
        f"export: {detector.name} cannot be exported: {why}. Torch detectors whose scoring does not "
        "depend on the batch (ProtoNet, Siamese, the MAML family, the covariance prior, the mean, "
        "nearest-neighbour and Mahalanobis baselines) can; scikit-learn and PyOD baselines fit numpy "
        "estimators, which no TorchScript or ONNX file holds"
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file this module wrote (TorchScript or ONNX with ``metaad.json``)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(f"extra/{METADATA}") for name in archive.namelist())
        return METADATA.encode() in path.read_bytes()
    except OSError:
        return False


def _check_output(detector: Any, path: Path, format: str, overwrite: bool) -> None:
    if not isinstance(overwrite, bool):
        raise ExportError(f"export: overwrite must be true or false, got {overwrite!r}")
    if path.is_dir():
        raise ExportError(f"export: output={path} is a folder; give the path of the file to write")
    if not path.exists():
        return
    ckpt_path = getattr(detector, "ckpt_path", None)
    if ckpt_path is not None and Path(ckpt_path).exists() and os.path.samefile(path, ckpt_path):
        raise ExportError(f"export: output={path} is the checkpoint; give another path")
    if not overwrite and not is_export(path):
        raise ExportError(
            f"export: output={path} exists and is not a file metaad exported; give another path, or "
            "overwrite=True to replace it"
        )


def _write_atomically(path: Path, write) -> None:
    """:func:`metaad.files.write_atomically`, a failure named as the export's."""
    try:
        files.write_atomically(path, write)
    except OSError as error:
        why = error.strerror or error
        raise ExportError(f"export: cannot write {path} ({why}); nothing was replaced") from None
