"""``metaad-train``: meta-train a learner, test it beside the baselines, write metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from metaad.build import StoreConfig, build_datamodule, build_model, build_trainer, plain
from metaad.report import print_summary, write_metrics


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the metrics written to ``metrics.json`` (empty if ``test=false``)."""
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule.sample_shape)
    trainer = build_trainer(cfg, callbacks=[StoreConfig(cfg)])
    for logger in trainer.loggers:
        hparams = {key: plain(cfg[key]) for key in ("names", "dataset", "backbone", "model")} | {"seed": cfg.seed}
        logger.log_hyperparams(hparams, metrics={"hp/val_auroc": 0.0, "hp/test_auroc": 0.0})
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if not cfg.test:
        return {}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    metrics = {
        **cfg.names,
        "k_shot": cfg.dataset.k_shot,
        "seed": cfg.seed,
        "val_auroc_best": model.val_auroc_best,
        "checkpoint": best,
        **model.test_results,
    }
    if trainer.is_global_zero:
        write_metrics(run_dir / "metrics.json", metrics)
        print_summary(metrics, run_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://metaad.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation AUROC: the value a Hydra sweeper (Optuna) optimises."""
    metrics = train(cfg)
    return metrics.get("val_auroc_best", float("nan"))


if __name__ == "__main__":
    main()
