"""The Python API: a trained learner, or a baseline, as a scikit-learn / PyOD style detector.

    det = metaad.load("outputs/train/<run>/checkpoints/best.ckpt")
    det.fit(X_normal)            # K normal samples of a new task, raw, as the user has them
    det.decision_function(X)     # anomaly scores, higher = more anomalous
    det.predict(X)               # 0/1 at the stored threshold (det.threshold_)

``fit`` is the few-shot adaptation (``adapt`` on the support set), not training.

A series model (trained on windows cut from series) takes series instead of samples:

    det = metaad.load(ckpt).fit(history)    # (T_h, D) normal history of a new entity
    scores = det.decision_function(series)  # (T - W + 1,): scores[i] is step i + W - 1
    steps = det.scored_steps(len(series))   # those step indices, W - 1 .. T - 1

``fit`` cuts the K most recent windows of the history (K = the checkpoint's ``dataset.k_shot``,
at the source's stride, the last ending at the history's last step: the support K the threshold
was fitted for), takes the scaling statistics from them alone (``scaling=support``), and adapts.
``decision_function`` scores every window of the series in one causal pass
(:func:`metaad.detectors.base.score_stream`): a step before the first full window has no score,
and none is made up. Window, stride, columns and scaling come from the checkpoint. A loaded
learner applies the preprocessing its source applied in training (scaling, resizing, inversion,
feature order by column name), stored in the checkpoint. Where training had no column names
(digits, images, a baseline), a data frame scored after a fitted frame has its columns matched to
the fitted frame's by label (labels compared as text: ``0`` and ``"0"`` are one column), whatever
the labels are; an array scored after a fitted frame, or a frame after a fitted array, is read
by position, with a warning, as scikit-learn does. Nothing here imports Lightning.

Values are checked on the way in (finite, and small enough for float32 sums of squares:
:mod:`metaad.data.values`) and scores on the way out: a score that is NaN or infinite is a
:class:`~metaad.evaluation.thresholds.NonFiniteScores` error naming the row and its largest column, never a
decision (``NaN > threshold`` would read as normal).
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from metaad.data.tasks import DataError
from metaad.data.values import column_label, magnitude_limit, refuse_extreme
from metaad.detectors.base import SCORE_CHUNK, Detector, score_in_chunks
from metaad.errors import CheckpointError
from metaad.evaluation.thresholds import NonFiniteScores, Threshold, leave_one_out_scores

PYOD = "pyod:"  # metaad.baseline("pyod:IForest"): a PyOD detector by its class name


def baseline_configs(file: str = "all") -> dict[str, dict[str, Any]]:
    """Every baseline one file of ``conf/baselines/`` names (``all``: those ``baselines=all`` scores
    beside a learner), by name: the one registry is that folder (a file's ``defaults`` are read
    first, as Hydra composes them)."""
    folder = resources.files("metaad.conf") / "baselines"

    def read(name: str) -> dict[str, Any]:
        node = yaml.safe_load((folder / f"{name}.yaml").read_text()) or {}
        merged: dict[str, Any] = {}
        for entry in node.get("defaults", []):
            if entry != "_self_":
                merged |= read(entry)
        return merged | {key: value for key, value in node.items() if key != "defaults"}

    return read(file)


# The files whose baselines metaad.baseline(name) builds: the sample baselines and the patch ones
# (on patch features (C, h, w), with anomaly maps).
API_BASELINES = ("all", "patch")


def api_baseline_configs() -> dict[str, dict[str, Any]]:
    """The baselines :func:`baseline` finds by name (:data:`API_BASELINES`)."""
    found: dict[str, dict[str, Any]] = {}
    for file in API_BASELINES:
        found |= baseline_configs(file)
    return found


@dataclass(frozen=True)
class Parts:
    """What a detector's parameters build: the model, its preprocessing and threshold rule."""

    detector: Detector
    preprocessing: Any
    threshold: Threshold | None
    name: str
    threshold_k_shot: int | None = None
    series_k_shot: int | None = None  # a series model: the K history windows fit adapts on


class FewShotDetector:
    """Any metaad detector behind scikit-learn's and PyOD's estimator API.

    Its parameters (``get_params`` / ``set_params``, so ``sklearn.base.clone`` works) are what
    rebuilds it, not the built model: a checkpoint path (:class:`LoadedDetector`) or a baseline's
    name and settings (:class:`BaselineDetector`), and the threshold. The model is built from them
    once, when first needed (:func:`load` and :func:`baseline` build it at once, so a bad checkpoint
    or name fails there); ``set_params`` drops it and the fit.

    Fitted attributes: ``n_support_`` (K), ``feature_names_in_`` (column names of a fitted frame,
    else None), ``threshold_`` (the decision threshold on the threshold's scale, see
    :mod:`metaad.evaluation.thresholds`; None without a threshold), ``decision_scores_`` (the
    support's leave-one-out scores: each support sample scored by the detector adapted to the
    others, PyOD's "scores of the training data"; K >= 2) and ``labels_`` (their 0/1 decisions).
    A fitted detector pickles with its model and adapted state (pickle only files you trust).
    """

    def _build(self) -> Parts:
        raise NotImplementedError

    def _parts(self) -> Parts:
        parts = self.__dict__.get("_built")
        if parts is None:
            parts = self._built = self._build()
            if isinstance(parts.detector, torch.nn.Module):
                parts.detector.eval()
        return parts

    @property
    def detector(self) -> Detector:
        return self._parts().detector

    @property
    def preprocessing(self) -> Any:
        return self._parts().preprocessing

    @property
    def threshold_rule(self) -> Threshold | None:
        """The :class:`Threshold` the ``threshold`` parameter resolves to (None: scores only)."""
        return self._parts().threshold

    @property
    def name(self) -> str:
        return self._parts().name

    @property
    def threshold_k_shot(self) -> int | None:
        return self._parts().threshold_k_shot

    # --- parameters (scikit-learn's contract) ----------------------------------------------------
    @classmethod
    def _get_param_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in parameters if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, as given (``deep`` is accepted for scikit-learn; none nest)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> FewShotDetector:
        """Replace parameters; the model is rebuilt from them when next needed, and must be fitted again."""
        valid = self._get_param_names()
        unknown = [key for key in params if key not in valid]
        if unknown:
            raise ValueError(
                f"Invalid parameter(s) {unknown} for estimator {type(self).__name__}; valid parameters "
                f"are {valid}"
            )
        for key, value in params.items():
            setattr(self, key, value)
        for attribute in [a for a in vars(self) if a.endswith("_") or a == "_built"]:
            delattr(self, attribute)
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "state_")

    def __sklearn_tags__(self) -> Any:
        """An unsupervised detector of dense, finite samples (used by scikit-learn's checks)."""
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(
            estimator_type=None,
            target_tags=TargetTags(required=False),
            input_tags=InputTags(allow_nan=False, sparse=False),
            requires_fit=True,
            non_deterministic=False,
        )

    # --- inputs ------------------------------------------------------------------------------
    def _inputs(self, X: Any, fitting: bool) -> Tensor:
        _refuse_sparse(X, self.name)
        names = _column_names(X)
        model_names = self.preprocessing.feature_names if self.preprocessing is not None else None
        if model_names is None:  # no names from training: the support's labels fix the columns
            if fitting:
                self.frame_names_ = names
            else:
                X = self._match_columns(X, names)
        if self.preprocessing is not None:
            x = self.preprocessing.transform(X)
            if len(x) == 0:
                raise DataError(f"{self.name}: expected at least one sample, got shape {x.shape}")
            steps = self.preprocessing
            after = f" (x {steps.scale:g}{', then 1 - x' if steps.invert else ''}: the model's preprocessing)"
            columns = model_names or getattr(self, "frame_names_", None)  # the frame's, matched by label
            refuse_extreme(
                x, self.name, columns=columns, after=after if steps.scale != 1 or steps.invert else ""
            )
            return torch.from_numpy(np.ascontiguousarray(x))
        if fitting:
            self.feature_names_in_ = names
        x = _as_array(X)
        if x.ndim < 2 or len(x) == 0:
            raise DataError(f"{self.name}: expected a non-empty (samples, features...) array, got {x.shape}")
        if not fitting and x.shape[1:] != self.sample_shape_:
            raise DataError(
                f"{self.name}: samples of shape {x.shape[1:]}, but it was fitted on {self.sample_shape_}"
            )
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        if len(bad):
            raise DataError(
                f"{self.name}: {len(bad)} row(s) hold NaN or inf (first rows: {bad[:5].tolist()})"
            )
        refuse_extreme(x, self.name, columns=names if fitting else self.feature_names_in_)
        if fitting:
            self.sample_shape_ = x.shape[1:]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def _match_columns(self, X: Any, names: list[str] | None) -> Any:
        """The query's columns in the support's order: by label when both are frames."""
        fitted = getattr(self, "frame_names_", None)
        if names is not None and fitted is not None:
            return _reorder(X, fitted, "the support's")
        if names is None and fitted is not None:
            warnings.warn(
                f"{self.name}: X has no column labels but fit got a frame with labels {fitted[:5]}...: "
                "its columns are read in that order",
                stacklevel=4,
            )
        elif names is not None and hasattr(self, "state_"):
            warnings.warn(
                f"{self.name}: X is a frame with column labels but fit got an array without them: "
                "its columns are read by position",
                stacklevel=4,
            )
        return X

    # --- the estimator API ---------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> FewShotDetector:
        """Adapt to ``X``, K normal samples of the task to watch (``y`` is ignored)."""
        parts = self._parts()
        for attribute in [a for a in vars(self) if a.endswith("_")]:
            delattr(self, attribute)  # nothing of an earlier fit survives a refit
        support = self._series_support(X) if self._is_series else self._inputs(X, fitting=True)[None]
        k = support.shape[1]
        if support[0, 0].numel() == 0:
            raise DataError(
                f"{self.name}: 0 feature(s) (shape={tuple(support.shape[1:])}) while a minimum of 1 is "
                "required."
            )
        self.n_features_in_ = support[0, 0].numel()
        if self._is_series:
            self.feature_names_in_ = list(parts.preprocessing.columns)
        elif parts.preprocessing is not None:
            names = parts.preprocessing.feature_names
            self.feature_names_in_ = list(names) if names else None
        threshold = parts.threshold
        if threshold is not None and k < threshold.min_k_shot:
            raise DataError(f"{self.name}: fit got {k} normal sample(s); {threshold.too_few(k)}")
        if threshold is not None and parts.threshold_k_shot not in (None, k):
            warnings.warn(
                f"{self.name}: its {threshold.rule} threshold was fitted on validation episodes with "
                f"K={parts.threshold_k_shot} support samples, and fit got K={k}; the decisions may be off "
                "(the scores are not)",
                stacklevel=2,
            )
        with torch.no_grad():
            self.state_ = parts.detector.adapt(support)
            needs_loo = threshold is not None and (
                threshold.normalise == "zscore" or threshold.uses_support_scores
            )
            self.support_scores_ = leave_one_out_scores(parts.detector, support) if needs_loo else None
        self.support_ = support
        if self.support_scores_ is not None:
            self._require_finite(self.support_scores_, support[0], "leave-one-out score of the support")
        self.n_support_ = k
        self.threshold_ = None
        if threshold is not None:
            if not threshold.value_known:
                raise DataError(
                    f"{self.name} holds no {threshold.rule} threshold fitted on validation episodes with "
                    f"the settings {threshold.params()}; choose threshold=support_quantile or threshold=fixed"
                )
            support_normalised = (
                self._normalise(self.support_scores_) if self.support_scores_ is not None else None
            )
            self.threshold_ = threshold.per_episode(support_normalised)[0].item()
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly score of each sample; higher = more anomalous. A series model: one score per
        step from the first full window on, ``T - W + 1`` of them (see :meth:`scored_steps`)."""
        return self._scores(X).double().numpy()[0]

    def anomaly_maps(
        self, X: Any, size: int | tuple[int, int] | None = None, sigma: float = 0.0
    ) -> np.ndarray:
        """Where each sample is anomalous: a patch detector's patch scores (higher = more anomalous),
        ``(N, h, w)`` on its patch grid, or upsampled bilinearly to ``size`` (an image's ``(H, W)``)
        and blurred by a Gaussian of ``sigma`` pixels unless 0. The image score
        (:meth:`decision_function`) is taken from these patch scores (their maximum or top mean)."""
        from metaad.evaluation.pixel_metrics import upsample_maps

        self._require_fit()
        if not callable(getattr(self.detector, "score_maps", None)):
            raise TypeError(
                f"{self.name} scores whole samples and has no anomaly maps; the patch detectors have them "
                "(metaad.baseline('patch_knn'), 'padim', or a patch learner such as model=patch_adapter)"
            )
        query = self._inputs(X, fitting=False)[None]
        with torch.no_grad():
            maps = self.detector.score_maps(self.state_, query)[0].detach().float()
        self._require_finite(maps.flatten(1).amax(1, keepdim=True).T, query[0], "anomaly map")
        if size is not None:
            maps = upsample_maps(maps, size, sigma)
        return maps.double().numpy()

    def normalised_scores(self, X: Any) -> np.ndarray:
        """The scores on the threshold's scale (z-scores with ``normalise=zscore``)."""
        self._require_threshold()
        return self._normalise(self._scores(X)).double().numpy()[0]

    def predict(self, X: Any) -> np.ndarray:
        """1 for an anomaly (score above ``threshold_``), 0 for normal."""
        self._require_threshold()
        return (self.normalised_scores(X) > self.threshold_).astype(np.int64)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """``fit(X).labels_``, as PyOD: the support's own 0/1 decisions, from its leave-one-out scores."""
        return self.fit(X, y).labels_

    @property
    def decision_scores_(self) -> np.ndarray:
        """The support's leave-one-out scores (K,), computed on first use: each support sample scored
        by the detector adapted to the other K - 1 (scoring a sample the state was adapted to would
        flatter it: a nearest-neighbour distance would be 0)."""
        return self._support_scores()[0].double().numpy()

    @property
    def labels_(self) -> np.ndarray:
        """0/1 decisions on the support's leave-one-out scores (PyOD's labels of the training data)."""
        self._require_threshold()
        normalised = self._normalise(self._support_scores())[0].double().numpy()
        return (normalised > self.threshold_).astype(np.int64)

    def predict_proba(self, X: Any, method: str = "linear") -> np.ndarray:
        """``(N, 2)``: [P(normal), P(anomaly)] of each sample, as PyOD's ``BaseDetector.predict_proba``
        computes them, from ``decision_scores_`` (the support's leave-one-out scores):

        - ``linear``: min-max scaling of the score by the leave-one-out scores, clipped to [0, 1]
          (scikit-learn's ``MinMaxScaler``: a zero range scales by 1);
        - ``unify`` (Kriegel et al. 2011): ``erf((s - mean) / (std * sqrt(2)))`` clipped to [0, 1],
          mean and population std of the leave-one-out scores. Where they have no spread (std 0)
          this is the formula's limit, 1 above the mean and 0 otherwise (PyOD divides by zero).

        Needs K >= 2 (no leave-one-out score with one sample); PyOD's ``return_confidence`` is not offered.
        """
        if method not in ("linear", "unify"):
            raise ValueError(f"predict_proba: method must be 'linear' or 'unify', got {method!r}")
        reference = self.decision_scores_
        scores = self.decision_function(X)
        if method == "linear":
            low, span = reference.min(), reference.max() - reference.min()
            scale = 1.0 / (span if span != 0 else 1.0)
            anomaly = (scores * scale - low * scale).clip(0, 1)
        else:
            mean, std = reference.mean(), reference.std()
            if std > 0:
                z = torch.from_numpy((scores - mean) / (std * np.sqrt(2)))
                anomaly = torch.erf(z).numpy().clip(0, 1)
            else:
                anomaly = (scores > mean).astype(np.float64)
        return np.stack([1 - anomaly, anomaly], axis=1)

    def export(self, path: str | Path, format: str = "torchscript", overwrite: bool = False) -> Path:
        """Write the fitted detector as a file that needs only torch (``torchscript``) or onnxruntime
        (``onnx``) to score: raw samples in, ``(scores, decisions)`` out. See :mod:`metaad.export`."""
        from metaad.export import export

        return export(self, path, format=format, overwrite=overwrite)

    # --- helpers -------------------------------------------------------------------------------
    def _support_scores(self) -> Tensor:
        self._require_fit()
        if self.support_scores_ is None:
            if self.n_support_ < 2:
                raise DataError(
                    f"{self.name}: decision_scores_, labels_ and predict_proba use the support's "
                    "leave-one-out scores, which need at least 2 support samples; fit got 1"
                )
            with torch.no_grad():
                self.support_scores_ = leave_one_out_scores(self.detector, self.support_)
        return self.support_scores_

    @property
    def _is_series(self) -> bool:
        preprocessing = self.preprocessing
        return preprocessing is not None and getattr(preprocessing, "is_series", False)

    def scored_steps(self, n_steps: int) -> np.ndarray:
        """A series model: the step index of each entry of ``decision_function`` on a series of
        ``n_steps`` steps, ``W - 1 .. n_steps - 1`` (the last step of each window scored)."""
        if not self._is_series:
            raise DataError(f"{self.name}: scores samples, not the steps of a series")
        window = self.preprocessing.window
        self._refuse_short(int(n_steps), "the series")
        return np.arange(window - 1, int(n_steps))

    def _refuse_short(self, n_steps: int, what: str) -> None:
        window = self.preprocessing.window
        if n_steps < window:
            raise DataError(
                f"{self.name}: {what} has {n_steps} step(s), fewer than one window of {window}; "
                "a step is scored once a full window ends at it"
            )

    def _series_support(self, history: Any) -> Tensor:
        """The K most recent windows of ``history`` at the source's stride, scaled by their own
        statistics where the model was trained so (``series_mean_`` / ``series_spread_``)."""
        from metaad.data.episodes import scale_with, support_statistics

        steps, k = self.preprocessing, self._parts().series_k_shot
        values = steps.series_values(history, f"{self.name}: fit (the history)")
        need = steps.window + (k - 1) * steps.stride
        if len(values) < need:
            raise DataError(
                f"{self.name}: fit got a history of {len(values)} step(s); the model adapts on its "
                f"K={k} most recent windows of {steps.window} steps at stride {steps.stride}, so it "
                f"needs at least {need} steps"
            )
        starts = len(values) - steps.window - steps.stride * np.arange(k - 1, -1, -1)
        windows = values[starts[:, None] + np.arange(steps.window)]
        self.series_mean_ = self.series_spread_ = None
        if steps.scaling == "support":
            self.series_mean_, self.series_spread_ = support_statistics(windows)
            windows = scale_with(windows, self.series_mean_, self.series_spread_, steps.scale_clip)
        if self.series_mean_ is not None:
            values = scale_with(values, self.series_mean_, self.series_spread_, steps.scale_clip)
        self._refuse_extreme_steps(values, "history")
        self.window_ = steps.window
        return torch.from_numpy(np.ascontiguousarray(windows, np.float32))[None]

    def _refuse_extreme_steps(self, values: np.ndarray, what: str) -> None:
        """A step value too large for float32 sums of squares over a window (:mod:`metaad.data.values`)."""
        steps = self.preprocessing
        limit = magnitude_limit(steps.window * values.shape[1])
        big = np.abs(values) > limit
        if big.any():
            row, column = (int(i) for i in np.argwhere(big)[0])
            scaled = " after the support's scaling" if self.series_mean_ is not None else ""
            raise DataError(
                f"{self.name}: the {what}'s step {row}, column {steps.columns[column]!r} holds "
                f"{float(values[row, column]):.3g}{scaled}; metaad computes in float32, where squares of "
                f"values beyond +-{limit:.2g} summed over a window overflow: rescale the data"
            )

    def _series_scores(self, series: Any) -> Tensor:
        """(1, T - W + 1) scores of every window of ``series``, in one pass."""
        from metaad.data.episodes import scale_with
        from metaad.detectors.base import score_stream

        steps = self.preprocessing
        values = steps.series_values(series, f"{self.name}: decision_function (the series)")
        self._refuse_short(len(values), "the series")
        if self.series_mean_ is not None:
            values = scale_with(values, self.series_mean_, self.series_spread_, steps.scale_clip)
        self._refuse_extreme_steps(values, "series")
        with torch.no_grad():
            scores = score_stream(self.detector, self.state_, torch.from_numpy(values)[None], steps.window)
        scores = scores.detach().float()
        bad = np.flatnonzero(~torch.isfinite(scores[0]).numpy())
        if len(bad):
            raise NonFiniteScores(
                f"{self.name}: the score of {len(bad)} step(s) is NaN or infinite (first steps: "
                f"{(bad[:5] + steps.window - 1).tolist()}); a score that is not a number is never a decision"
            )
        return scores

    def _scores(self, X: Any) -> Tensor:
        self._require_fit()
        if self._is_series:
            return self._series_scores(X)
        query = self._inputs(X, fitting=False)[None]
        with torch.no_grad():
            scores = score_in_chunks(self.detector, self.state_, query, SCORE_CHUNK).detach().float()
        self._require_finite(scores, query[0], "score")
        return scores

    def _normalise(self, scores: Tensor) -> Tensor:
        normalised = self.threshold_rule.normalised(scores, self.support_scores_)
        if not torch.isfinite(normalised).all():  # finite scores, a scale that overflows float32
            raise NonFiniteScores(
                f"{self.name}: finite scores became NaN or infinite on the threshold's scale (largest "
                f"|score| {scores.abs().max().item():.3g}, support spread "
                f"{self.support_scores_.std().item() if self.support_scores_ is not None else 0:.3g}); "
                "rescale the data"
            )
        return normalised

    def _require_finite(self, scores: Tensor, samples: Tensor, what: str) -> None:
        """A :class:`NonFiniteScores` naming the rows whose ``scores`` (1, N) are NaN or infinite, each
        with its largest value and that value's column, and the support's largest value."""
        bad = np.flatnonzero(~torch.isfinite(scores[0]).numpy())
        if not len(bad):
            return
        names = getattr(self, "feature_names_in_", None)

        def largest(x: Tensor) -> str:
            flat = x.reshape(-1).double()
            c = int(flat.abs().argmax())
            return f"{flat[c].item():.3g} in column {column_label(c, tuple(x.shape), names)}"

        rows = "; ".join(f"row {r} (largest value {largest(samples[r])})" for r in bad[:5])
        support = self.support_[0]
        top = int(support.reshape(len(support), -1).double().abs().max(1).values.argmax())
        raise NonFiniteScores(
            f"{self.name}: the {what} of {len(bad)} row(s) is NaN or infinite: {rows}; the support's "
            f"largest value is {largest(support[top])} of row {top}. The detector computes in "
            "float32 and values this large overflow it: rescale the data (e.g. standardise each "
            "column). A score that is not a number is never a decision."
        )

    def _require_fit(self) -> None:
        if not hasattr(self, "state_"):
            raise _not_fitted(f"{self.name}: call fit(X_normal) with normal samples first")

    def _require_threshold(self) -> None:
        if self.threshold_rule is None:
            raise RuntimeError(
                f"{self.name} has no threshold to decide with; give one, e.g. "
                "metaad.baseline(name, threshold='support_quantile')"
            )
        self._require_fit()


class LoadedDetector(FewShotDetector):
    """A learner trained by ``metaad-train``, from its checkpoint (see :func:`load`).

    ``threshold``: None for the checkpoint's own rule (with its value fitted on validation episodes),
    or a :class:`Threshold` (copied; the one given is never changed).
    """

    def __init__(self, ckpt_path: str | Path, threshold: Threshold | None = None) -> None:
        self.ckpt_path, self.threshold = ckpt_path, threshold

    def _build(self) -> Parts:
        from hydra.utils import instantiate

        from metaad import checkpoint as ckpt
        from metaad.data.preprocessing import Preprocessing

        threshold = self.threshold
        if threshold is not None and not isinstance(threshold, Threshold):
            raise TypeError(
                "metaad.load: threshold must be a metaad.evaluation.thresholds.Threshold (e.g. "
                f"SupportQuantile()) or None for the checkpoint's own, got {threshold!r}"
            )
        threshold = copy.deepcopy(threshold)
        path = self.ckpt_path
        checkpoint = ckpt.load(path)
        cfg = checkpoint.config
        sample_shape = checkpoint.sample_shape
        learner = ckpt.build_learner(cfg, sample_shape)
        checkpoint.load_weights(learner)
        if checkpoint.preprocessing is not None:
            preprocessing = Preprocessing.from_dict(checkpoint.preprocessing)
        else:
            preprocessing = Preprocessing(sample_shape=sample_shape)
        if preprocessing.extractor is not None:  # patch features: the same frozen extractor again
            extractor = ckpt.build_extractor(cfg)
            if extractor is None:
                raise CheckpointError(f"{path}: a model of patch features whose backbone is no extractor")
            preprocessing = preprocessing.with_extractor(extractor)
        stored = checkpoint.threshold_state
        if threshold is None and cfg.get("threshold"):
            threshold = instantiate(cfg.threshold)
        if threshold is not None and stored is not None:
            threshold.load_state_dict(stored)  # taken only if fitted under this very rule and settings
        name = f"{cfg.get('names', {}).get('model', 'learner')} ({Path(path).name})"
        k_shot = cfg.dataset.get("k_shot") if threshold is not None and threshold.fits_on_validation else None
        series_k_shot = int(cfg.dataset.k_shot) if preprocessing.is_series else None
        return Parts(learner, preprocessing, threshold, name, k_shot, series_k_shot)


class BaselineDetector(FewShotDetector):
    """A no-learning baseline by name (see :func:`baseline`); ``settings`` replace its configured ones."""

    def __init__(
        self,
        baseline: str = "mean_euclidean",
        threshold: Threshold | str | None = "support_quantile",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.baseline, self.threshold, self.settings = baseline, threshold, settings

    def _build(self) -> Parts:
        from hydra.utils import instantiate

        from metaad.evaluation.thresholds import SupportQuantile

        settings = dict(self.settings or {})
        if self.baseline.startswith(PYOD):
            from metaad.detectors.baselines import PyOD

            detector = PyOD(self.baseline.removeprefix(PYOD), **settings)
        else:
            configs = api_baseline_configs()
            if self.baseline not in configs:
                raise ValueError(
                    f"metaad.baseline: unknown baseline {self.baseline!r}; choose one of {sorted(configs)} "
                    "or pyod:<Name> for a PyOD detector (e.g. pyod:IForest)"
                )
            detector = instantiate({**configs[self.baseline], **settings})
        threshold = self.threshold
        if threshold == "support_quantile":
            threshold = SupportQuantile(q=1.0, normalise="none")
        elif isinstance(threshold, str) or not isinstance(threshold, Threshold | None):
            raise ValueError(
                "metaad.baseline: threshold must be 'support_quantile', None or a Threshold, got "
                f"{threshold!r}"
            )
        return Parts(detector, None, copy.deepcopy(threshold), f"baseline {self.baseline}")


def load(path: str | Path, threshold: Threshold | None = None) -> LoadedDetector:
    """A learner trained by ``metaad-train`` from its checkpoint (loaded with ``weights_only=True``),
    built at once so that a bad file or threshold is refused here."""
    detector = LoadedDetector(path, threshold)
    detector._parts()
    return detector


def baseline(
    name: str, threshold: Threshold | str | None = "support_quantile", **settings: Any
) -> BaselineDetector:
    """A no-learning baseline by name (:func:`api_baseline_configs`, as ``metaad-train`` scores it), behind
    the same API; ``settings`` replace its configured ones. ``pyod:<Name>`` is any PyOD detector
    (``pip install pyod``), fitted on the support set, ``settings`` its constructor's arguments.

    ``threshold="support_quantile"`` (default) flags a sample scoring above every leave-one-out
    score of the support (needs K >= 2); ``None`` for scores only; or any :class:`Threshold`.
    """
    detector = BaselineDetector(name, threshold, settings or None)
    detector._parts()
    return detector


def _not_fitted(message: str) -> Exception:
    """scikit-learn's ``NotFittedError``, also a ``RuntimeError`` (what metaad raised before); scikit-learn
    is imported only on this error path."""
    from sklearn.exceptions import NotFittedError

    return type("NotFittedError", (NotFittedError, RuntimeError), {})(message)


# --- array-likes -------------------------------------------------------------------------------
def _column_names(X: Any) -> list[str] | None:
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(X, pandas.DataFrame):
        names = [str(c) for c in X.columns]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise DataError(f"the frame has duplicate column names {duplicated}")
        return names
    return None


def _refuse_sparse(X: Any, name: str) -> None:
    """A sparse matrix (scipy) or tensor (torch) is one clear error: np.asarray would make a 0-d object."""
    scipy_sparse = sys.modules.get("scipy.sparse")
    if scipy_sparse is not None and scipy_sparse.issparse(X):
        raise DataError(
            f"{name}: X is a scipy sparse {type(X).__name__} of shape {X.shape}; metaad takes dense "
            "samples: pass X.toarray()"
        )
    if isinstance(X, Tensor) and X.layout != torch.strided:
        raise DataError(f"{name}: X is a sparse torch tensor ({X.layout}); pass X.to_dense()")


def _reorder(X: Any, names: list[str], whose: str = "the fitted") -> Any:
    have = [str(c) for c in X.columns]
    missing, extra = [n for n in names if n not in have], [n for n in have if n not in names]
    if missing or extra:
        width = (
            f"expected samples of shape (N, {len(names)}), got shape {tuple(X.shape)}; "
            if len(have) != len(names)
            else ""
        )
        raise DataError(
            f"{width}columns do not match {whose} ones (matched by name): missing {missing[:10]}, "
            f"unexpected {extra[:10]}"
        )
    return X.iloc[:, [have.index(n) for n in names]]


def _as_array(X: Any) -> np.ndarray:
    if hasattr(X, "toarray") or np.iscomplexobj(X):  # converting would densify or drop the imaginary part
        kind = "Sparse input is" if hasattr(X, "toarray") else "Complex data"
        raise DataError(f"{kind} not supported: expected dense, real-valued samples")
    if isinstance(X, Tensor):
        return X.detach().cpu().numpy()
    try:
        x = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"expected numeric samples (numpy array, tensor or data frame): {error}") from error
    if x.ndim == 1:  # N samples of one feature, or one sample of N? as scikit-learn, ask instead of guessing
        raise DataError(
            f"expected a (samples, features) array, got a 1-D array of {len(x)} values; reshape it: "
            "X.reshape(-1, 1) for samples of one feature, X.reshape(1, -1) for one sample"
        )
    return x
