"""metaad: config-driven few-shot (meta-learning) anomaly detection on PyTorch Lightning and Hydra.

Entry points: ``metaad-train`` (:mod:`metaad.train`), ``metaad-eval`` (:mod:`metaad.eval`) and
``metaad-score`` (:mod:`metaad.score`); configs live in ``conf/`` (shipped as ``metaad.conf``).
"""

__version__ = "0.1.0"
