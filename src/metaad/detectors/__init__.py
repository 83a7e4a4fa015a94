"""Detectors: plain torch modules that adapt to K normal samples and score queries; no Lightning."""

from metaad.detectors.base import Detector, Learner, anomaly_scores

__all__ = ["Detector", "Learner", "anomaly_scores"]
