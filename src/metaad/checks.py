"""Checks of a composed config that need no data and no Lightning: run first, in milliseconds.

Each failure is a :class:`~metaad.errors.ConfigError` naming the setting, its value and what it
should be, raised before any data is read or Lightning is imported, so a typo costs no waiting.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from metaad.errors import ConfigError

POSITIVE_INTS = (
    "k_shot",
    "n_query",
    "meta_batch_size",
    "train_episodes",
    "val_episodes",
    "test_episodes",
    "eval_batch_size",
)


def check_train_config(cfg: DictConfig) -> None:
    check_dataset(cfg.dataset)
    optimizer = OmegaConf.select(cfg, "model.optimizer")
    if optimizer is not None:
        for key in ("lr", "weight_decay"):
            if key in optimizer:
                least = 0.0 if key == "weight_decay" else None
                _number(f"model.optimizer.{key}", optimizer[key], positive=least is None, least=least)
    check_threshold(cfg.get("threshold"))
    check_processes(cfg)


def check_dataset(dataset: DictConfig) -> None:
    missing = sorted(key.removeprefix("dataset.") for key in OmegaConf.missing_keys(dataset))
    if missing:
        settings = " ".join(f"dataset.{key}=..." for key in missing)
        raise ConfigError(f"the dataset config leaves {missing} unset (???); give them: {settings}")
    for key in POSITIVE_INTS:
        if key in dataset:
            value = dataset[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset.{key} must be a positive integer, got {value!r}")
    if "anomaly_ratio" in dataset:
        ratio = _number("dataset.anomaly_ratio", dataset.anomaly_ratio)
        if not 0.0 < ratio < 1.0:
            raise ConfigError(
                f"dataset.anomaly_ratio must be in (0, 1) so queries hold both kinds, got {ratio}"
            )


def check_threshold(threshold: DictConfig | None) -> None:
    if not threshold:
        return
    if "value" in threshold:
        _number("threshold.value", threshold.value)
    if "normalise" in threshold and threshold.normalise not in ("zscore", "none"):
        raise ConfigError(f"threshold.normalise must be 'zscore' or 'none', got {threshold.normalise!r}")


def check_processes(cfg: DictConfig) -> None:
    """A meta-batch split across DDP processes must divide evenly: said before launching any."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if "ddp" not in target.lower() or not isinstance(devices, int) or not isinstance(nodes, int):
        return
    world = devices * nodes
    batch = cfg.dataset.get("meta_batch_size")
    if isinstance(batch, int) and batch % world:
        raise ConfigError(
            f"dataset.meta_batch_size ({batch}) must be divisible by the number of processes "
            f"(trainer.devices x trainer.num_nodes = {world}): it is the meta-batch of one optimizer "
            "step, split across them"
        )


def _number(setting: str, value: Any, positive: bool = False, least: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{setting} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{setting} must be positive, got {value!r}")
    if least is not None and value < least:
        raise ConfigError(f"{setting} must be >= {least}, got {value!r}")
    return float(value)
