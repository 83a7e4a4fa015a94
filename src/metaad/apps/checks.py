"""Checks of a composed config that need no data and no Lightning: run first, in milliseconds.

Each failure is a :class:`~metaad.errors.ConfigError` naming the setting, its value and what it
should be, raised before any data is read or Lightning is imported, so a typo costs no waiting.
"""

from __future__ import annotations

import functools
import math
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from metaad.data.episodes import check_episode_settings
from metaad.errors import ConfigError

# Learner and backbone settings by name, wherever a conf/model or conf/backbone file has one:
# (least value, whether null is allowed) for an integer, or "positive" for a positive number.
MODEL_SETTINGS: dict[str, tuple[int, bool] | str] = {
    "inner_steps": (1, False),
    "test_inner_steps": (0, True),  # 0: score with the meta-learned weights, unadapted
    "chunk_size": (1, True),
    "k": (1, False),
    "head_hidden": (1, False),
    "inner_lr": "positive",
    "temperature": "positive",
    "margin": "positive",
}
BACKBONE_SETTINGS: dict[str, tuple[int, bool] | str] = {
    "embed_dim": (1, False),
    "channels": (1, False),
    "blocks": (1, False),
    "norm_groups": (1, False),
}
FLAGS = (
    "first_order",
    "meta_sgd",
    "anil",
    "vectorize",
    "learn_temperature",
    "learn_isotropy",
    "learn_strength",
)


def check_train_config(cfg: DictConfig) -> None:
    check_dataset(cfg.dataset)
    _flag("test", cfg.get("test", True))
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    check_learner(cfg)
    check_trainer(cfg.get("trainer") or {})
    optimizer = OmegaConf.select(cfg, "model.optimizer")
    if optimizer is not None:
        for key in ("lr", "weight_decay"):
            if key in optimizer:
                least = 0.0 if key == "weight_decay" else None
                _number(f"model.optimizer.{key}", optimizer[key], positive=least is None, least=least)
    check_threshold(cfg.get("threshold"))
    check_score_chunk(cfg)
    check_processes(cfg)
    check_baseline_columns(cfg)


def check_baseline_columns(cfg: DictConfig) -> None:
    """Baselines on a subset of the columns (``baselines=series_subset``) need the subset named."""
    baselines = cfg.get("baselines") or {}
    wanted = [
        name
        for name, conf in baselines.items()
        if isinstance(conf, DictConfig)
        and "columns" in conf
        and "baseline_columns" in str(OmegaConf.to_container(conf).get("columns"))
    ]
    if wanted and OmegaConf.is_missing(cfg, "baseline_columns"):
        raise ConfigError(
            f"baselines {wanted[:4]} score a subset of the columns: name it with baseline_columns=[...] "
            "(e.g. baseline_columns=[0], a telemanom channel's telemetry; experiment=smap and msl set it)"
        )


def check_score_chunk(cfg: DictConfig) -> None:
    """``score_chunk``: query samples scored at once, a positive integer or null (the whole batch)."""
    if cfg.get("score_chunk") is not None:
        _integer("score_chunk", cfg.score_chunk, 1, " or null")


def check_dataset(dataset: DictConfig) -> None:
    missing = sorted(key.removeprefix("dataset.") for key in OmegaConf.missing_keys(dataset))
    if missing:
        settings = " ".join(f"dataset.{key}=..." for key in missing)
        raise ConfigError(f"the dataset config leaves {missing} unset (???); give them: {settings}")
    check_episode_settings(dataset, ConfigError)
    workers = dataset.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"dataset.num_workers must be an integer >= 0, got {workers!r}")
    for key in ("val_tasks", "test_tasks", "train_tasks"):
        tasks = dataset.get(key)
        if (
            key in dataset
            and not isinstance(tasks, ListConfig)
            and not (key == "train_tasks" and tasks is None)
            and not (tasks is None and dataset.get("n_folds") is not None)  # series folds deal them
        ):
            example = f"[{tasks}]" if isinstance(tasks, int | str) else "[a, b]"
            raise ConfigError(
                f"dataset.{key} must be a list of tasks{' or null' if key == 'train_tasks' else ''}, "
                f"e.g. dataset.{key}={example}; got {tasks!r}"
            )
    rotations = dataset.get("train_rotations")
    if rotations is not None and not isinstance(rotations, ListConfig):
        raise ConfigError(f"dataset.train_rotations must be a list, e.g. [90, 180, 270]; got {rotations!r}")
    if "anomalies_from" in dataset and dataset.anomalies_from not in ("split", "source_test", "all"):
        raise ConfigError(
            f"dataset.anomalies_from must be 'split' or 'source_test', got {dataset.anomalies_from!r}"
        )
    for flag in ("require_disjoint", "fixed_train_episodes"):
        if flag in dataset:
            _flag(f"dataset.{flag}", dataset[flag])


# Settings an app reads beyond those its conf/<app>.yaml names (a Lightning callback at evaluation).
READ_BESIDES = {"eval": ("callbacks",), "score": ()}


def check_settings_of(cfg: DictConfig, app: str) -> None:
    """Refuse a top-level setting the app does not read (``+model=siamese`` given to metaad-eval):
    given on the command line and silently ignored, it would look applied."""
    known = _own_settings(app) | set(READ_BESIDES.get(app, ())) | {"hydra"}
    foreign = [key for key in cfg if key not in known]
    if foreign:
        one = len(foreign) == 1
        raise ConfigError(
            f"metaad-{app}: {', '.join(foreign)} {'is not a setting' if one else 'are not settings'} "
            f"of metaad-{app}, which would ignore {'it' if one else 'them'}; its settings are "
            f"{', '.join(sorted(known - {'hydra'}))}"
        )


@functools.cache
def _own_settings(app: str) -> frozenset[str]:
    """Top-level keys and config groups of ``conf/<app>.yaml`` (``group@package`` counts as package)."""
    config = yaml.safe_load((resources.files("metaad.conf") / f"{app}.yaml").read_text()) or {}
    keys = {key for key in config if key != "defaults"}
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            name = next(iter(entry)).removeprefix("override ").strip()
            keys.add(name.split("@", 1)[1] if "@" in name else name.split("/", 1)[0])
    return frozenset(keys)


def check_threshold(threshold: DictConfig | None) -> None:
    if not threshold:
        return
    if "value" in threshold:
        _number("threshold.value", threshold.value)
    if "normalise" in threshold and threshold.normalise not in ("zscore", "none"):
        raise ConfigError(f"threshold.normalise must be 'zscore' or 'none', got {threshold.normalise!r}")
    if "q" in threshold and not 0.0 <= _number("threshold.q", threshold.q) <= 1.0:
        raise ConfigError(f"threshold.q must be in [0, 1] (1 = the maximum), got {threshold.q!r}")
    if "margin" in threshold:
        _number("threshold.margin", threshold.margin, positive=True)
    if "baselines" in threshold:
        _flag("threshold.baselines", threshold.baselines)


def check_learner(cfg: DictConfig) -> None:
    """The learner's and backbone's numeric settings and switches, by name."""
    for section, table in (("model", MODEL_SETTINGS), ("backbone", BACKBONE_SETTINGS)):
        node = cfg.get(section) or {}
        for key, rule in table.items():
            if key not in node:
                continue
            value, setting = node[key], f"{section}.{key}"
            if rule == "positive":
                _number(setting, value, positive=True)
            elif not (rule[1] and value is None):
                _integer(setting, value, rule[0], " or null" if rule[1] else "")
        for key in FLAGS:
            if key in node:
                _flag(f"{section}.{key}", node[key])
    k, k_shot = OmegaConf.select(cfg, "model.k"), OmegaConf.select(cfg, "dataset.k_shot")
    if OmegaConf.select(cfg, "model.aggregation") == "knn" and isinstance(k_shot, int) and k > k_shot:
        raise ConfigError(
            f"model.k ({k}) nearest neighbours with model.aggregation=knn needs at least as many support "
            f"samples, but dataset.k_shot is {k_shot}"
        )
    hidden = OmegaConf.select(cfg, "backbone.hidden")
    if hidden is not None:
        if not isinstance(hidden, ListConfig):
            raise ConfigError(
                f"backbone.hidden must be a list of layer widths, e.g. [128, 128]; got {hidden!r}"
            )
        for i, width in enumerate(hidden):
            _integer(f"backbone.hidden[{i}]", width, 1)


# Trainer settings metaad's design depends on, so not settings: MAML adapts with gradients at
# val/test time (no inference mode), and the episode samplers shard across ranks themselves.
TRAINER_INVARIANTS = {"inference_mode": False, "use_distributed_sampler": False}


def check_trainer(trainer: Any) -> None:
    given = [key for key in TRAINER_INVARIANTS if key in trainer]
    if given:
        raise ConfigError(
            f"trainer.{given[0]} is fixed by metaad ({TRAINER_INVARIANTS[given[0]]}): MAML adapts with "
            "gradients at evaluation and the episode samplers shard across processes themselves"
        )
    for key in ("check_val_every_n_epoch", "log_every_n_steps"):
        if trainer.get(key) is not None:
            _integer(f"trainer.{key}", trainer.get(key), 1)
    epochs = trainer.get("max_epochs")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or not (epochs >= 1 or epochs == -1)
    ):
        raise ConfigError(f"trainer.max_epochs must be a positive integer (or -1: no limit), got {epochs!r}")


def check_processes(cfg: DictConfig) -> None:
    """Several processes need trainer=ddp, and a meta-batch split across them must divide evenly:
    said before launching any (Lightning would start them all first, each saying it once)."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    devices, nodes = process_count(trainer.get("devices", 1)), trainer.get("num_nodes", 1)
    if devices is None or isinstance(nodes, bool) or not isinstance(nodes, int):
        return  # "auto", -1: known once Lightning sees the machine (metaad.distributed.check_launch)
    world = devices * nodes
    batch = (cfg.get("dataset") or {}).get("meta_batch_size")
    if world > 1 and "ddp" not in target.lower():
        given = f"trainer.devices={trainer.get('devices')}"
        given += f" trainer.num_nodes={nodes}" if nodes > 1 else ""
        uneven = isinstance(batch, int) and batch % world
        raise ConfigError(
            f"{given} runs {world} processes, which takes trainer=ddp (metaad's DDP launch, safe in "
            f"sweeps); trainer.strategy is {target or strategy!r}. Give: trainer=ddp {given}"
            + (f" and a dataset.meta_batch_size divisible by {world} (it is {batch})" if uneven else "")
        )
    if world > 1 and isinstance(batch, int) and batch % world:
        raise ConfigError(
            f"dataset.meta_batch_size ({batch}) must be divisible by the number of processes "
            f"(trainer.devices x trainer.num_nodes = {world}): it is the meta-batch of one optimizer "
            "step, split across them"
        )


def process_count(devices: Any) -> int | None:
    """How many processes per node ``trainer.devices`` asks for; None where only Lightning can tell."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices >= 1 else None
    if isinstance(devices, ListConfig | list | tuple):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip().strip(",")
        if text.isdigit():
            return int(text) or None
        parts = [part for part in text.split(",") if part.strip()]
        if len(parts) > 1 and all(part.strip().isdigit() for part in parts):
            return len(parts)  # GPU ids, "0,1"
    return None


def _integer(setting: str, value: Any, least: int, alternative: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(f"{setting} must be {kind}{alternative}, got {value!r}")
    return value


def _flag(setting: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{setting} must be true or false, got {value!r}")


def _number(setting: str, value: Any, positive: bool = False, least: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{setting} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{setting} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{setting} must be positive, got {value!r}")
    if least is not None and value < least:
        raise ConfigError(f"{setting} must be >= {least}, got {value!r}")
    return float(value)
