"""``metaad-train``: meta-train a learner, test it beside the baselines, write metrics.json.

``ckpt_path=last`` (with ``hydra.run.dir=<the run's folder>``) or ``ckpt_path=<file>`` resumes a
run where its checkpoint left it; ``trainer=ddp`` trains across processes, also inside sweeps.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from metaad.apps.checks import check_train_config
from metaad.apps.cli import app
from metaad.apps.runs import claim
from metaad.checkpoint import stored_config
from metaad.training.resume import load_resume_state, resolve_ckpt_path

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the metrics written to ``metrics.json``.

    With ``test=false`` nothing is written and only ``val_auroc_best`` and ``global_step`` return.
    """
    check_train_config(cfg)  # before reading data or importing Lightning
    stored = stored_config(cfg)  # what the checkpoints keep: refused now if it could not be loaded
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    resumed = load_resume_state(ckpt_path, cfg) if ckpt_path else None
    with claim(cfg, run_dir, resume=resumed is not None):
        return _train(cfg, stored, run_dir, ckpt_path, resumed)


def _train(
    cfg: DictConfig, stored: dict[str, Any], run_dir: Path, ckpt_path: Path | None, resumed: dict | None
) -> dict[str, Any]:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from metaad.apps.build import build_datamodule, build_trainer, build_training, plain
    from metaad.evaluation.report import print_summary, results, write_metrics
    from metaad.training.callbacks import StoreConfig
    from metaad.training.distributed import check_launch, job_scope
    from metaad.training.module import quiet_lightning

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    model = build_training(cfg, datamodule.sample_shape)
    trainer = build_trainer(
        _continue_curves(cfg, resumed["global_step"]) if resumed else cfg, [StoreConfig(stored)]
    )
    check_launch(trainer)
    hparams = {key: plain(cfg[key]) for key in ("names", "dataset", "backbone", "model")} | {"seed": cfg.seed}
    with job_scope():
        if resumed is None:  # a resumed run's folder has them already
            for logger in trainer.loggers:
                logger.log_hyperparams(hparams, metrics={"hp/val_auroc": 0.0, "hp/test_auroc": 0.0})
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        log.info(
            "rank %d/%d trained %d steps; %s",
            trainer.global_rank,
            trainer.world_size,
            trainer.global_step,
            json.dumps({key: hparams[key] for key in ("backbone", "model")}),
        )
        trained = {"val_auroc_best": model.val_auroc_best, "global_step": trainer.global_step}
        if not cfg.test:
            return trained
        tracks_best = [
            cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor
        ]
        best = next((cb.best_model_path for cb in tracks_best), "")
        if best and not Path(best).resolve().is_relative_to(run_dir.resolve()):
            # continued in a fresh folder and no epoch here beat the resumed run's best
            if Path(best).is_file():
                log.warning("testing the best checkpoint of the resumed run, %s: no epoch here beat it", best)
            else:
                log.warning("the resumed run's best checkpoint %s is gone: testing the last weights", best)
                best = ""
        trainer.test(
            model,
            datamodule=datamodule,
            ckpt_path=best or None,
            weights_only=True,
            verbose=False,
        )
    metrics = {
        **cfg.names,
        "k_shot": cfg.dataset.k_shot,
        "seed": cfg.seed,
        "data": getattr(datamodule, "data_name", None),
        **trained,
        "checkpoint": best,
        "tasks": datamodule.task_names(),
        **results(model.report),
    }
    if trainer.is_global_zero:
        write_metrics(run_dir / "metrics.json", metrics)
        print_summary(metrics, run_dir)
    return metrics


def _continue_curves(cfg: DictConfig, step: int) -> DictConfig:
    """The config with TensorBoard told to hide what the crashed process logged from ``step`` on."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for conf in (cfg.get("logger") or {}).values():
            if str(conf.get("_target_", "")).endswith("TensorBoardLogger"):
                conf.purge_step = step
    return cfg


@app("train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation AUROC: the value a Hydra sweeper (Optuna) maximises."""
    return train(cfg)["val_auroc_best"]


if __name__ == "__main__":
    main()
