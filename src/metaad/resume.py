"""Resume after a crash: ``last.ckpt`` written regularly and atomically, and ``ckpt_path=last`` resolved.

A resumed run continues in its own folder (``hydra.run.dir=<run folder> ckpt_path=last``): the
step count, optimizer, loops and episode stream come from the checkpoint (the training loader is
resumable, see :class:`metaad.data.datamodule.ResumableLoader`) and TensorBoard drops the events
the crashed process wrote after the checkpoint, so the curves continue without a fold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from metaad.build import load_checkpoint

# Config sections that decide what is trained; a resume must not change them.
RUN_DEFINING = ("dataset", "backbone", "model", "seed")


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt``, the whole training state, every ``every_n_train_steps``
    optimizer steps and at the end of every training epoch (after its validation).

    The file is replaced atomically, so a kill while saving leaves the previous one intact. No
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

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        n = self.every_n_train_steps
        if (
            n
            and trainer.global_step % n == 0
            and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        partial = self.path.with_suffix(".ckpt.partial")
        trainer.save_checkpoint(partial)  # every rank takes part; global rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """``last`` is this run folder's ``checkpoints/last.ckpt``; anything else must be a checkpoint file."""
    if ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if str(ckpt_path) == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = (
            f"ckpt_path=last resumes the run in the current run folder ({run_dir}); point Hydra at the "
            "crashed run's folder: metaad-train <its overrides> hydra.run.dir=<its folder> ckpt_path=last"
            if str(ckpt_path) == "last"
            else "give the path of a .ckpt file written by metaad-train"
        )
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}. {hint}")
    return path


def load_resume_state(path: Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint to resume (plain data, ``weights_only``); refused if trained with another config."""
    checkpoint, _ = load_checkpoint(path)
    stored = checkpoint["metaad_config"]
    now = {key: _plain(cfg.get(key)) for key in RUN_DEFINING}
    changed = _differences({k: stored.get(k) for k in RUN_DEFINING}, now)
    if changed:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed[:8])
        raise ValueError(
            f"ckpt_path={path} was trained with another config ({listed}). Resume with the overrides of "
            "the original run (its .hydra/overrides.yaml); only trainer, callbacks and logger "
            "settings may change."
        )
    return checkpoint


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]
