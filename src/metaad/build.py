"""Config -> components. The only place the apps call ``hydra.utils.instantiate``.

Lightning is imported only by :func:`build_trainer` and :func:`build_training`, so the Python API
and ``metaad-score`` rebuild a detector from a checkpoint without it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metaad.checks import check_dataset
from metaad.detectors.base import Detector, Learner
from metaad.errors import CheckpointError
from metaad.evaluation import Evaluator
from metaad.thresholds import Threshold


def build_datamodule(cfg: DictConfig) -> Any:
    """Instantiate the dataset and load it now, so bad data stops the run before training."""
    check_dataset(cfg.dataset)
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()
    return datamodule


def build_learner(cfg: DictConfig, sample_shape: tuple[int, ...]) -> Learner:
    """The learner of ``cfg.model`` on a backbone sized for ``sample_shape``, without the optimizer
    (training's, not the learner's)."""
    backbone = instantiate(cfg.backbone, sample_shape=list(sample_shape))
    learner = OmegaConf.masked_copy(cfg.model, [key for key in cfg.model if key != "optimizer"])
    return instantiate(learner, backbone=backbone)


def build_baselines(cfg: DictConfig) -> dict[str, Detector]:
    return {name: instantiate(conf) for name, conf in (cfg.get("baselines") or {}).items()}


def build_threshold(cfg: DictConfig, key: str = "threshold") -> Threshold | None:
    return instantiate(cfg[key]) if cfg.get(key) else None


def build_training(cfg: DictConfig, sample_shape: tuple[int, ...]) -> Any:
    """The LightningModule that meta-trains the configured learner, with its evaluator."""
    from metaad.training import MetaTraining

    evaluator = Evaluator(
        build_baselines(cfg),
        build_threshold(cfg),
        build_threshold(cfg, "baseline_threshold"),
        ci_over=cfg.get("ci_over") or "episode",
    )
    return MetaTraining(build_learner(cfg, sample_shape), instantiate(cfg.model.optimizer), evaluator)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], DictConfig]:
    """A metaad checkpoint (tensors and plain data only) and the run config stored in it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"ckpt_path: {path} is a folder; give a checkpoint file, e.g. "
            f"{path / 'checkpoints' / 'best.ckpt'}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"ckpt_path: {path} is not a checkpoint, or a truncated or corrupt one (not a complete zip "
            "archive, which torch.save writes)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False, which would run code from the file
        unsafe = "weights only load failed" in str(error).lower()
        why = (
            "it holds objects other than tensors and plain data, and metaad never unpickles those"
            if unsafe
            else "it is not a checkpoint, or it is corrupt"
        )
        raise CheckpointError(f"ckpt_path: {path} cannot be loaded: {why}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        kind = type(error).__name__
        raise CheckpointError(
            f"ckpt_path: {path} cannot be loaded: not a checkpoint, or a truncated or corrupt one ({kind})"
        ) from None
    if not isinstance(checkpoint, dict) or "metaad_config" not in checkpoint:
        raise CheckpointError(f"ckpt_path: {path} was not written by metaad-train (no 'metaad_config' in it)")
    stored = checkpoint["metaad_config"]
    lacking = [
        key for key in ("dataset", "backbone", "model") if not isinstance(stored, dict) or key not in stored
    ]
    if lacking:
        raise CheckpointError(
            f"ckpt_path: {path} is not a complete metaad-train checkpoint: its metaad_config has no {lacking}"
        )
    return checkpoint, OmegaConf.create(stored)


def learner_state(checkpoint: dict[str, Any], path: str | Path = "the checkpoint") -> dict[str, torch.Tensor]:
    """The learner's own weights in a training checkpoint (the LightningModule holds it as ``learner``)."""
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"ckpt_path: {path} is not a complete metaad-train checkpoint: it holds no weights"
        )
    return {k.removeprefix("learner."): v for k, v in checkpoint["state_dict"].items()}


def load_weights(learner: Learner, checkpoint: dict[str, Any], path: str | Path) -> None:
    """The checkpoint's weights into ``learner``; weights that do not fit are a CheckpointError."""
    try:
        learner.load_state_dict(learner_state(checkpoint, path))
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(
            f"ckpt_path: {path}: its weights do not fit the model its config describes ({first[:200]})"
        ) from None


def build_trainer(cfg: DictConfig, callbacks: list = ()) -> Any:
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
