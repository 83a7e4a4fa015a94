"""The one LightningModule: it meta-trains any learner and hands evaluation to the evaluator.

A learner (:mod:`metaad.detectors`) says only what is its own: ``adapt``, ``score``, ``loss``.
This module owns the optimiser, the loops, what is logged and what a checkpoint carries; every
contact with Lightning's internals (loggers, dataloaders of a loop, ranks) is here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from metaad import checkpoint as ckpt
from metaad.data.episodes import Episode
from metaad.detectors.base import Learner
from metaad.errors import TrainingError
from metaad.evaluation import pictures
from metaad.evaluation.evaluator import Evaluator, Report

log = logging.getLogger(__name__)
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
DECISION_METRICS = ("f1", "precision", "recall", "balanced_accuracy")
# TensorBoard's HPARAMS metrics, each written once, when known: the best validation AUROC at the
# end of training, the test AUROC at the end of testing
HP_METRICS = ("hp/val_auroc", "hp/test_auroc")
# where a checkpoint says its run's TensorBoard events are, so a resumed run continues them
TENSORBOARD_DIR = "tensorboard_dir"


def log_run(loggers: Iterable[Any], params: dict[str, Any]) -> None:
    """Each logger gets the settings that define the run; TensorBoard's HPARAMS also the names of
    :data:`HP_METRICS`, without values (no placeholder at step 0: the values come when known)."""
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params)  # rank 0 only, as Lightning's loggers do
            continue
        if rank_zero_only.rank != 0:  # the other ranks' TensorBoard writes nothing
            continue
        from torch.utils.tensorboard.summary import hparams

        logger.hparams.update(params)  # its hparams.yaml
        writer = logger.experiment._get_file_writer()  # Lightning's own way to these summaries
        for summary in hparams(params, dict.fromkeys(HP_METRICS, 0.0)):  # the names only
            writer.add_summary(summary)


def quiet_lightning() -> None:
    """Keep a run's console to what it says about this run: Lightning's start-up notices (no GPU,
    no TPU, logger tips) and a deprecation notice of its own internals go to the log level below."""
    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "lightning_fabric.utilities.seed",
        "pytorch_lightning.trainer.connectors.checkpoint_connector",
        "pytorch_lightning.trainer.connectors.signal_connector",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    # a resumed run's own checkpoints folder (claim refuses a fresh run into a folder holding one)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class MetaTraining(pl.LightningModule):
    """Meta-trains ``learner`` with ``optimizer``; validates and tests with ``evaluator``.

    Validation scores the learner on the validation episodes. Testing runs over the validation
    and the test episodes (in that order, as two dataloaders) with the learner and every
    baseline, so thresholds are fitted on validation scores of the very same pass.
    """

    def __init__(self, learner: Learner, optimizer: OptimizerFactory, evaluator: Evaluator) -> None:
        super().__init__()
        self.learner = learner
        self.optimizer_factory = optimizer
        self.evaluator = evaluator
        self.val_auroc_best = float("-inf")
        self.report: Report | None = None

    # --- meta-training -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "batches_done"):
            # what the training loader's resumable state counts: batches the loop has trained on
            # (not those it prefetched)
            datamodule.batches_done = self._batches_trained

    def _batches_trained(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor | None:
        loss = self.learner.loss(batch)
        if loss is not None:
            self._stop_if_diverged(loss)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch.support.shape[0])
        return loss

    def _stop_if_diverged(self, loss: Tensor) -> None:
        """A non-finite loss stops training before its gradients reach the weights (decided on
        every rank at once, so no rank waits on the others)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        lrs = sorted({group["lr"] for opt in self.trainer.optimizers for group in opt.param_groups})
        lr = ", ".join(f"{value:g}" for value in lrs)
        inner = getattr(self.learner, "inner_lr", None)
        inner = f", or model.inner_lr, now {inner:g}" if isinstance(inner, float | int) else ""
        raise TrainingError(
            f"training diverged: the loss is not finite ({loss.detach().float().mean().item()}) at step "
            f"{self.global_step} (epoch {self.current_epoch}); stopped before training on it. Lower the "
            f"learning rate (model.optimizer.lr, now {lr}{inner}) and start the run again"
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.learner.parameters())

    # --- evaluation --------------------------------------------------------------------------
    def _loader(self, dataloader_idx: int) -> Any:
        loaders = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        return (loaders if isinstance(loaders, list | tuple) else [loaders])[dataloader_idx]

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.add("val", {self.evaluator.learner: self.learner}, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.gather()
        report = self.evaluator.finish()
        name = report.learner
        summary = report.metrics["val"][name]
        auroc = summary["auroc"].mean
        if not self.trainer.sanity_checking:
            self.val_auroc_best = max(self.val_auroc_best, auroc)
        best = max(self.val_auroc_best, auroc)
        # every rank holds the gathered records, so these are equal on all ranks
        self.log("val/auroc", auroc, prog_bar=True, sync_dist=True)
        logged = {"val/aupr": summary["aupr"].mean, "val/auroc_best": best}
        logged |= {f"val/{m}": summary[m].mean for m in DECISION_METRICS if m in summary}
        values = report.per_episode_thresholds.get(("val", name))
        if values is not None:
            logged["val/threshold"] = values.mean().item()
        if name in report.notes and not self.trainer.sanity_checking:
            rank_zero_warn(f"validation: no decision metrics: {report.notes[name]}")
        self.log_dict(logged, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._log_pictures("val", report)

    def on_fit_end(self) -> None:
        if math.isfinite(self.val_auroc_best):  # else never validated: no value to show
            for logger in self.loggers:
                logger.log_metrics({"hp/val_auroc": self.val_auroc_best}, step=self.global_step)

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()
        self._embeddings: dict[str, Any] | None = None
        self._maps: Any = None

    def test_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self._loader(dataloader_idx).dataset.split
        self.evaluator.add(split, self.evaluator.detectors(self.learner, with_baselines=True), batch)
        embed = getattr(self.learner, "embed", None)
        if split == "test" and batch_idx == 0 and callable(embed) and self._embeddings is None:
            self._embeddings = pictures.episode_embeddings(embed, batch)
        if split == "test" and batch_idx == 0 and self._maps is None and self.trainer.is_global_zero:
            self._maps = pictures.episode_maps(self.learner, batch, sigma=self.evaluator.map_sigma)

    def on_test_epoch_end(self) -> None:
        shares = {
            split: int(records.get("index").numel())
            for (split, name), records in self.evaluator.records.items()
            if name == self.evaluator.learner
        }
        (log.info if self.trainer.world_size > 1 else log.debug)(
            "rank %d/%d scored its share of the episodes: %s",
            self.global_rank,
            self.trainer.world_size,
            shares,
        )
        self.evaluator.gather()
        self.report = report = self.evaluator.finish()
        learner = report.learner
        if learner in report.notes:
            rank_zero_warn(f"test: no decision metrics: {report.notes[learner]}")
        test = report.metrics["test"]
        logged = {f"test/{metric}": value.mean for metric, value in test[learner].items()}
        logged["hp/test_auroc"] = test[learner]["auroc"].mean
        values = report.per_episode_thresholds.get(("test", learner))
        if values is not None:
            logged["test/threshold"] = values.mean().item()
        for name, result in test.items():
            if name != learner:
                logged.update({f"test/baseline/{name}/{m}": v.mean for m, v in result.items()})
        self.log_dict(logged, sync_dist=True)
        self._log_pictures("test", report)

    # --- TensorBoard pictures (rank 0 only) ----------------------------------------------------
    def _log_pictures(self, split: str, report: Report) -> None:
        writer = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None or not self.trainer.is_global_zero:
            return
        records = report.records[(split, report.learner)]
        thresholds = report.per_episode_thresholds.get((split, report.learner))
        threshold = self.evaluator.threshold
        pictures.log_evaluation(
            writer,
            split,
            self.global_step,
            records.get("scores"),
            records.get("labels"),
            records.get("normalised") if thresholds is not None else None,
            thresholds,
            zscore=threshold is not None and threshold.normalise == "zscore",
        )
        if split == "test" and getattr(self, "_embeddings", None) is not None:
            writer.add_embedding(**self._embeddings, tag="test/embeddings", global_step=self.global_step)
        if split == "test" and getattr(self, "_maps", None) is not None:
            writer.add_figure("test/anomaly_maps", self._maps, global_step=self.global_step)

    # --- checkpoint state ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_auroc_best"] = self.val_auroc_best
        folders = [lg.log_dir for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if folders:
            checkpoint[TENSORBOARD_DIR] = str(folders[0])
        if self.evaluator.threshold is not None:
            checkpoint[ckpt.THRESHOLD] = self.evaluator.threshold.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_auroc_best = checkpoint.get("val_auroc_best", float("-inf"))
        if self.evaluator.threshold is not None and ckpt.THRESHOLD in checkpoint:
            self.evaluator.threshold.load_state_dict(checkpoint[ckpt.THRESHOLD])

    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """A checkpoint's learner weights and state into this module, outside a Lightning fit
        (``metaad-eval`` scores a stored learner without resuming its training)."""
        checkpoint.load_weights(self.learner)
        self.on_load_checkpoint(checkpoint.contents)
