"""metaad: config-driven few-shot (meta-learning) anomaly detection on PyTorch Lightning and Hydra.

Python API (no Lightning import): :func:`load` a trained learner, :func:`baseline` a no-learning
detector, both behind scikit-learn's and PyOD's estimator API (:class:`FewShotDetector`), and
``export`` of a fitted one to a file that needs only torch (:mod:`metaad.export`).
Apps: ``metaad-train``, ``metaad-eval``, ``metaad-score``, ``metaad-export``, ``metaad-benchmark``,
``metaad-summarize``.
"""

from importlib.metadata import version

from metaad.api import BaselineDetector, FewShotDetector, LoadedDetector, baseline, load

__version__ = version("metaad")  # one place: pyproject.toml
__all__ = ["BaselineDetector", "FewShotDetector", "LoadedDetector", "baseline", "load"]
