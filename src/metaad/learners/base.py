"""The episodic LightningModule: loops, metrics and logging live here once.

A learner subclasses :class:`EpisodicModule` and says only what is its own:

- ``adapt(support)``: state from a support set ``(B, K, *x)`` of normal samples;
- ``score(state, query)``: ``(B, Q)`` anomaly scores, higher = more anomalous;
- ``loss(batch)``: its meta-training loss on a meta-batch of :class:`~metaad.data.Episode`.

No-learning baselines answer the same ``adapt``/``score`` pair and are scored on the very same
test episodes, so every result stands beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from metaad.data.episodes import Episode
from metaad.detector import Detector
from metaad.metrics import EpisodeMetrics

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class EpisodicModule(pl.LightningModule):
    """Base class of every learner. Subclasses implement ``adapt``, ``score`` and ``loss``."""

    def __init__(self, optimizer: OptimizerFactory, baselines: Mapping[str, Detector] | None = None) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.baselines: dict[str, Detector] = dict(baselines or {})
        self.val_auroc_best = float("-inf")
        self.test_results: dict[str, Any] = {}
        self._metrics: dict[str, EpisodeMetrics] = {}

    # --- what a learner says -------------------------------------------------------------
    def adapt(self, support: Tensor) -> Any:
        raise NotImplementedError

    def score(self, state: Any, query: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, batch: Episode) -> Tensor:
        raise NotImplementedError

    # --- the episodic loops ----------------------------------------------------------------
    def anomaly_scores(self, support: Tensor, query: Tensor) -> Tensor:
        return self.score(self.adapt(support), query)

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.support.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._metrics = {"model": EpisodeMetrics()}

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._metrics["model"].update(self.anomaly_scores(batch.support, batch.query), batch.label)

    def on_validation_epoch_end(self) -> None:
        summary = self._metrics["model"].compute()
        auroc = summary["auroc"]["mean"]
        if not self.trainer.sanity_checking:
            self.val_auroc_best = max(self.val_auroc_best, auroc)
        # Every rank evaluates the same fixed episodes, so the sync is a mean of equal values.
        best = max(self.val_auroc_best, auroc)
        self.log("val/auroc", auroc, prog_bar=True, sync_dist=True)
        self.log_dict(
            {"val/aupr": summary["aupr"]["mean"], "val/auroc_best": best, "hp/val_auroc": best}, sync_dist=True
        )

    def on_test_epoch_start(self) -> None:
        self._metrics = {name: EpisodeMetrics() for name in ("model", *self.baselines)}

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._metrics["model"].update(self.anomaly_scores(batch.support, batch.query), batch.label)
        for name, detector in self.baselines.items():
            scores = detector.score(detector.adapt(batch.support), batch.query)
            self._metrics[name].update(scores, batch.label)

    def on_test_epoch_end(self) -> None:
        results = {name: metrics.compute() for name, metrics in self._metrics.items()}
        logged = {f"test/{metric}": value["mean"] for metric, value in results["model"].items()}
        logged["hp/test_auroc"] = results["model"]["auroc"]["mean"]
        for name in self.baselines:
            logged.update({f"test/baseline/{name}/{m}": v["mean"] for m, v in results[name].items()})
        self.log_dict(logged, sync_dist=True)
        self.test_results = {
            "test": results["model"],
            "baselines": {name: results[name] for name in self.baselines},
        }

    # --- optimisation and checkpoint state -------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_auroc_best"] = self.val_auroc_best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_auroc_best = checkpoint.get("val_auroc_best", float("-inf"))
