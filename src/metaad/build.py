"""Config -> components. The only place the apps call ``hydra.utils.instantiate``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaad.data.datamodule import EpisodeDataModule
from metaad.learners.base import EpisodicModule


def build_datamodule(cfg: DictConfig) -> EpisodeDataModule:
    """Instantiate the dataset and load it now, so bad data stops the run before training."""
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, sample_shape: tuple[int, ...]) -> EpisodicModule:
    """The learner with its backbone sized for ``sample_shape`` and the baselines it reports beside."""
    backbone = instantiate(cfg.backbone, sample_shape=list(sample_shape))
    baselines = {name: instantiate(conf) for name, conf in (cfg.get("baselines") or {}).items()}
    return instantiate(cfg.model, backbone=backbone, baselines=baselines)


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback] = ()) -> pl.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=[*configured, *callbacks])


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data (safe to store in a checkpoint loaded with weights_only).

    Hydra's own node (present when composed with ``return_hydra_config``) is left out.
    """
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True)


class StoreConfig(pl.Callback):
    """Stores the run's resolved config in every checkpoint, so eval and scoring can rebuild the model."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = plain(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["metaad_config"] = self.config
