"""The Python API: a trained learner, or a baseline, as a scikit-learn / PyOD style detector.

    det = metaad.load("outputs/train/<run>/checkpoints/best.ckpt")
    det.fit(X_normal)            # K normal samples of a new task, raw, as the user has them
    det.decision_function(X)     # anomaly scores, higher = more anomalous
    det.predict(X)               # 0/1 at the stored threshold (det.threshold_)

``fit`` is the few-shot adaptation (``adapt`` on the support set), not training. A loaded
learner applies the preprocessing its source applied in training (scaling, resizing, inversion,
feature order by column name), stored in the checkpoint. Where training had no column names
(digits, images), a data frame scored after a fitted frame has its columns matched to the fitted
frame's by name (positional names 0, 1, ... of a headerless file are taken in order). Nothing
here imports Lightning.
"""

from __future__ import annotations

import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from metaad.data.tasks import DataError
from metaad.detectors.base import Detector
from metaad.evaluation.thresholds import Threshold, leave_one_out_scores, standardise


def baseline_configs() -> dict[str, dict[str, Any]]:
    """Every baseline ``baselines=all`` scores beside a learner, by name: the one registry is
    ``conf/baselines/`` (a file's ``defaults`` are read first, as Hydra composes them)."""
    folder = resources.files("metaad.conf") / "baselines"

    def read(name: str) -> dict[str, Any]:
        node = yaml.safe_load((folder / f"{name}.yaml").read_text()) or {}
        merged: dict[str, Any] = {}
        for entry in node.get("defaults", []):
            if entry != "_self_":
                merged |= read(entry)
        return merged | {key: value for key, value in node.items() if key != "defaults"}

    return read("all")


class FewShotDetector:
    """Any metaad detector behind ``fit`` / ``decision_function`` / ``predict``.

    Fitted attributes: ``n_support_`` (K), ``feature_names_in_`` (column names of a fitted
    frame, else None), ``threshold_`` (the decision threshold on the threshold's scale, see
    :mod:`metaad.evaluation.thresholds`; None without a threshold).
    """

    def __init__(
        self,
        detector: Detector,
        preprocessing: Any = None,
        threshold: Threshold | None = None,
        name: str = "detector",
        threshold_k_shot: int | None = None,
    ) -> None:
        self.detector, self.preprocessing, self.threshold = detector, preprocessing, threshold
        self.name, self.threshold_k_shot = name, threshold_k_shot
        if isinstance(detector, torch.nn.Module):
            detector.eval()

    def __repr__(self) -> str:
        rule = self.threshold.rule if self.threshold is not None else None
        return f"FewShotDetector({self.name}, threshold={rule})"

    # --- inputs ------------------------------------------------------------------------------
    def _inputs(self, X: Any, fitting: bool) -> Tensor:
        names = _column_names(X)
        if self.preprocessing is not None:
            if self.preprocessing.feature_names is None and names is not None and not _positional(names):
                # a model trained without column names: the support's names fix the order of the query's
                if fitting:
                    self.frame_names_ = names
                elif getattr(self, "frame_names_", None) is not None:
                    X = _reorder(X, self.frame_names_, "the support's")
            x = self.preprocessing.transform(X)
            if len(x) == 0:
                raise DataError(f"{self.name}: expected at least one sample, got shape {x.shape}")
            return torch.from_numpy(np.ascontiguousarray(x))
        if fitting:
            self.feature_names_in_ = names
        elif names is not None and self.feature_names_in_ is not None:
            X = _reorder(X, self.feature_names_in_, "the fitted")
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
        if fitting:
            self.sample_shape_ = x.shape[1:]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    # --- the estimator API ---------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> FewShotDetector:
        """Adapt to ``X``, K normal samples of the task to watch (``y`` is ignored)."""
        support = self._inputs(X, fitting=True)[None]
        k = support.shape[1]
        if self.preprocessing is not None:
            self.feature_names_in_ = (
                list(self.preprocessing.feature_names) if self.preprocessing.feature_names else None
            )
        threshold = self.threshold
        if threshold is not None and k < threshold.min_k_shot:
            raise DataError(f"{self.name}: fit got {k} normal sample(s); {threshold.too_few(k)}")
        if threshold is not None and self.threshold_k_shot not in (None, k):
            warnings.warn(
                f"{self.name}: its {threshold.rule} threshold was fitted on validation episodes with "
                f"K={self.threshold_k_shot} support samples, and fit got K={k}; the decisions may be off "
                "(the scores are not)",
                stacklevel=2,
            )
        with torch.no_grad():
            self.state_ = self.detector.adapt(support)
            needs_loo = threshold is not None and (
                threshold.normalise == "zscore" or threshold.uses_support_scores
            )
            self.support_scores_ = leave_one_out_scores(self.detector, support) if needs_loo else None
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
            placeholder = torch.zeros(1, 1)
            self.threshold_ = threshold.per_episode(placeholder, support_normalised)[0].item()
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly score of each sample; higher = more anomalous."""
        return self._scores(X).double().numpy()[0]

    def normalised_scores(self, X: Any) -> np.ndarray:
        """The scores on the threshold's scale (z-scores with ``normalise=zscore``)."""
        self._require_threshold()
        return self._normalise(self._scores(X)).double().numpy()[0]

    def predict(self, X: Any) -> np.ndarray:
        """1 for an anomaly (score above ``threshold_``), 0 for normal."""
        self._require_threshold()
        return (self.normalised_scores(X) > self.threshold_).astype(np.int64)

    # --- helpers -------------------------------------------------------------------------------
    def _scores(self, X: Any) -> Tensor:
        if not hasattr(self, "state_"):
            raise RuntimeError(f"{self.name}: call fit(X_normal) with normal samples first")
        query = self._inputs(X, fitting=False)[None]
        with torch.no_grad():
            return self.detector.score(self.state_, query).detach().float()

    def _normalise(self, scores: Tensor) -> Tensor:
        if self.threshold.normalise == "zscore":
            return standardise(scores, self.support_scores_)
        return scores.float()

    def _require_threshold(self) -> None:
        if self.threshold is None:
            raise RuntimeError(
                f"{self.name} has no threshold to decide with; give one, e.g. "
                "metaad.baseline(name, threshold='support_quantile')"
            )
        if not hasattr(self, "state_"):
            raise RuntimeError(f"{self.name}: call fit(X_normal) with normal samples first")


def load(path: str | Path, threshold: Threshold | None = None) -> FewShotDetector:
    """A learner trained by ``metaad-train`` from its checkpoint (loaded with ``weights_only=True``)."""
    from hydra.utils import instantiate

    from metaad import checkpoint as ckpt
    from metaad.data.preprocessing import Preprocessing

    if threshold is not None and not isinstance(threshold, Threshold):
        raise TypeError(
            "metaad.load: threshold must be a metaad.evaluation.thresholds.Threshold (e.g. "
            f"SupportQuantile()) or None for the checkpoint's own, got {threshold!r}"
        )
    checkpoint = ckpt.load(path)
    cfg = checkpoint.config
    sample_shape = checkpoint.sample_shape
    learner = ckpt.build_learner(cfg, sample_shape)
    checkpoint.load_weights(learner)
    if checkpoint.preprocessing is not None:
        preprocessing = Preprocessing.from_dict(checkpoint.preprocessing)
    else:
        preprocessing = Preprocessing(sample_shape=sample_shape)
    stored = checkpoint.threshold_state
    if threshold is None and cfg.get("threshold"):
        threshold = instantiate(cfg.threshold)
    if threshold is not None and stored is not None:
        threshold.load_state_dict(stored)  # taken only if fitted under this very rule and settings
    name = f"{cfg.get('names', {}).get('model', 'learner')} ({Path(path).name})"
    k_shot = cfg.dataset.get("k_shot") if threshold is not None and threshold.fits_on_validation else None
    return FewShotDetector(learner, preprocessing, threshold, name=name, threshold_k_shot=k_shot)


def baseline(
    name: str, threshold: Threshold | str | None = "support_quantile", **settings: Any
) -> FewShotDetector:
    """A no-learning baseline by name (:func:`baseline_configs`, as ``metaad-train`` scores it), behind
    the same API; ``settings`` replace its configured ones.

    ``threshold="support_quantile"`` (default) flags a sample scoring above every leave-one-out
    score of the support (needs K >= 2); ``None`` for scores only; or any :class:`Threshold`.
    """
    from hydra.utils import instantiate

    from metaad.evaluation.thresholds import SupportQuantile

    configs = baseline_configs()
    if name not in configs:
        raise ValueError(f"metaad.baseline: unknown baseline {name!r}; choose one of {sorted(configs)}")
    detector = instantiate({**configs[name], **settings})
    if threshold == "support_quantile":
        threshold = SupportQuantile(q=1.0, normalise="none")
    elif isinstance(threshold, str):
        raise ValueError(
            f"metaad.baseline: threshold must be 'support_quantile', None or a Threshold, got {threshold!r}"
        )
    return FewShotDetector(detector, None, threshold, name=f"baseline {name}")


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


def _positional(names: list[str]) -> bool:
    """Column names that are only positions 0, 1, ... (a headerless file, an unnamed frame)."""
    return names == [str(i) for i in range(len(names))]


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
