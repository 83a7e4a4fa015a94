"""Config -> components. The only place the apps call ``hydra.utils.instantiate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metaad.data.datamodule import EpisodeDataModule
from metaad.data.tasks import DataError
from metaad.learners.base import EpisodicModule


def build_datamodule(cfg: DictConfig) -> EpisodeDataModule:
    """Instantiate the dataset and load it now, so bad data stops the run before training."""
    missing = sorted(OmegaConf.missing_keys(cfg.dataset))
    if missing:
        settings = " ".join(f"dataset.{key}=..." for key in missing)
        raise DataError(f"the dataset config leaves {missing} unset (???); give them: {settings}")
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, sample_shape: tuple[int, ...]) -> EpisodicModule:
    """The learner with its backbone sized for ``sample_shape``, the baselines it reports beside and
    the threshold that turns its scores into decisions (none without a ``threshold`` config)."""
    backbone = instantiate(cfg.backbone, sample_shape=list(sample_shape))
    baselines = {name: instantiate(conf) for name, conf in (cfg.get("baselines") or {}).items()}
    threshold = instantiate(cfg.threshold) if cfg.get("threshold") else None
    return instantiate(cfg.model, backbone=backbone, baselines=baselines, threshold=threshold)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], DictConfig]:
    """A metaad checkpoint (tensors and plain data only) and the run config stored in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "metaad_config" not in checkpoint:
        raise ValueError(f"ckpt_path: {path} was not written by metaad-train (no 'metaad_config' in it)")
    return checkpoint, OmegaConf.create(checkpoint["metaad_config"])


def restore_model(
    checkpoint: dict[str, Any], cfg: DictConfig, sample_shape: tuple[int, ...]
) -> EpisodicModule:
    """The model of ``cfg`` with the checkpoint's weights and state (best val AUROC, threshold)."""
    model = build_model(cfg, sample_shape)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)
    return model


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
    """Stores the run's resolved config (and the sample shape) in every checkpoint, so eval and
    scoring can rebuild the model."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = plain(cfg)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["metaad_config"] = self.config
        if trainer.datamodule is not None:
            checkpoint["metaad_sample_shape"] = list(trainer.datamodule.sample_shape)


def compose_config(overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose an app's config in-process (tests, the benchmark), with its run folder at ``run_dir``.

    Sets Hydra's global run state as ``@hydra.main`` would, so ``${hydra:...}`` interpolations
    (run names, ``paths.output_dir``) resolve exactly as on the command line.
    """
    GlobalHydra.instance().clear()
    with initialize_config_module("metaad.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg
