"""Callbacks of a training run: the resumable last checkpoint, and what metaad stores in every one."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, RichProgressBar

from metaad import checkpoint as ckpt
from metaad.errors import Interrupted
from metaad.training.resume import SignalStop


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt``, the whole training state, every ``every_n_train_steps``
    optimizer steps, at the end of every training epoch (after its validation) and at the step
    where a SIGTERM or SIGINT stops the run.

    The file is replaced atomically and the one it replaces kept as ``last.previous.ckpt``, so a
    kill or disk fault while saving leaves a generation to resume from (:mod:`metaad.training.resume`). No
    step save on an epoch's last batch: Lightning 2.6 would skip that epoch's validation when
    resuming from it; the epoch-end save comes right after.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 50) -> None:
        if every_n_train_steps < 0:
            raise ValueError(
                f"callbacks: every_n_train_steps must be >= 0 (0: epoch ends only), got {every_n_train_steps}"
            )
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self.saved_step: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not self.on_last_batch(trainer):
            self._save(trainer)

    @staticmethod
    def on_last_batch(trainer: pl.Trainer) -> bool:
        return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            ckpt.save_generation(trainer.save_checkpoint, self.path)
        else:
            trainer.save_checkpoint(self.path.with_suffix(".ckpt.partial"))  # takes part; rank 0 writes
        self.saved_step = trainer.global_step


class StopOnSignal(pl.Callback):
    """Stops a run on SIGTERM or SIGINT (noted by a :class:`metaad.training.resume.SignalStop`) at the end
    of a training step, after :class:`LastCheckpoint` saved that step, on every rank at once: the
    ranks decide together at each step's end, so none is left waiting in a collective. Lightning's
    own SIGTERM handler (which stops ranks at different points) is replaced while a loop runs.
    """

    def __init__(self, stop: SignalStop) -> None:
        self.stop = stop

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop.deferred = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop.deferred = False

    def _take_over(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop.handle)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over()

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        stopping = self.stop.signum is not None
        if trainer.world_size > 1:
            stopping = trainer.strategy.reduce_boolean_decision(stopping, all=False)
        if not stopping:
            return
        for callback in trainer.callbacks:
            fresh = isinstance(callback, LastCheckpoint) and callback.saved_step != trainer.global_step
            if fresh and not LastCheckpoint.on_last_batch(trainer):
                callback._save(trainer)
        raise Interrupted(self.stop.signum or signal.SIGTERM)  # a rank told by another: the same stop

    def on_test_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if self.stop.signum is not None and trainer.world_size == 1:  # several ranks finish the test
            raise Interrupted(self.stop.signum)


class StoreConfig(pl.Callback):
    """Stores in every checkpoint what scoring needs besides the weights, as plain data
    (:func:`metaad.checkpoint.contents`): the run's stored config, the sample shape, the source's
    preprocessing, the data it was trained on and the tasks of each split."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            checkpoint.update(ckpt.contents(self.config, None, None, None, None))
            return
        preprocessing = getattr(datamodule, "preprocessing", None)
        checkpoint.update(
            ckpt.contents(
                self.config,
                datamodule.sample_shape,
                preprocessing.to_dict() if preprocessing is not None else None,
                getattr(datamodule, "data_name", None),
                datamodule.task_names(),
            )
        )


FILE_LOG = logging.getLogger("metaad.log_file")
FILE_LOG.propagate = False


def log_file_only(message: str, *args: Any) -> None:
    """``message`` in the run's log file (the root logger's file handlers, Hydra's ``<app>.log``)
    and never on the console: what one reads when looking into a run, not while it runs."""
    FILE_LOG.handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    FILE_LOG.setLevel(logging.INFO)
    FILE_LOG.info(message, *args)


class SummaryToLogFile(pl.Callback):
    """Lightning's model summary (``trainer.enable_model_summary``), written to the run's log file
    instead of the console."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            from pytorch_lightning.utilities.model_summary import summarize

            log_file_only("model summary:\n%s", summarize(pl_module, max_depth=1))


class ProgressBar(RichProgressBar):
    """Lightning's progress bar without ``v_num`` (the logger's version: the run's name, which the
    console says once at the end), so the epoch's metrics keep to one line more often."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
