"""metaad: config-driven few-shot (meta-learning) anomaly detection on PyTorch Lightning and Hydra.

Python API (no Lightning import): :func:`load` a trained learner, :func:`baseline` a no-learning
detector, both behind ``fit`` / ``decision_function`` / ``predict`` (:class:`FewShotDetector`).
Apps: ``metaad-train``, ``metaad-eval``, ``metaad-score``, ``metaad-benchmark``, ``metaad-summarize``.
"""

from importlib.metadata import version

from metaad.api import FewShotDetector, baseline, load

__version__ = version("metaad")  # one place: pyproject.toml
__all__ = ["FewShotDetector", "baseline", "load"]
