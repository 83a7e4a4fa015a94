"""Config -> components. The only place the apps call ``hydra.utils.instantiate``.

Lightning is imported only by :func:`build_trainer` and :func:`build_training`, so the Python API
and ``metaad-score`` rebuild a detector from a checkpoint without it.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metaad.apps.checks import TRAINER_INVARIANTS, check_dataset, check_trainer
from metaad.checkpoint import build_extractor, build_learner
from metaad.detectors.base import Detector
from metaad.evaluation.evaluator import Evaluator
from metaad.evaluation.thresholds import Threshold


def build_datamodule(cfg: DictConfig) -> Any:
    """Instantiate the dataset and load it now, so bad data stops the run before training."""
    check_dataset(cfg.dataset)
    extractor = build_extractor(cfg)  # a frozen backbone: the data become its patch features
    datamodule = instantiate(cfg.dataset, **({} if extractor is None else {"extractor": extractor}))
    if _reused is not None and OmegaConf.select(cfg, "dataset.source") is not None:
        key = json.dumps(plain(cfg.dataset.source), sort_keys=True, default=str)
        datamodule.source = functools.partial(_read_once, key, datamodule.source)
    datamodule.setup()
    return datamodule


# inside reuse_sources(): the last source read in this process, by its resolved config
_reused: dict[str, Any] | None = None


@contextlib.contextmanager
def reuse_sources() -> Iterator[None]:
    """Within this block, runs of the same source config read it once (the benchmark's trainings
    and evaluations of one suite and fold, one after another in one process). Only the last source
    is kept, so memory is one data set; files are assumed not to change within the block."""
    global _reused
    _reused = {}
    try:
        yield
    finally:
        _reused = None


def _read_once(key: str, source: Any) -> Any:
    if _reused is None:
        return source()
    if key not in _reused:
        _reused.clear()
        _reused[key] = source()
    return _reused[key]


def build_baselines(cfg: DictConfig) -> dict[str, Detector]:
    return {name: instantiate(conf) for name, conf in (cfg.get("baselines") or {}).items()}


def build_threshold(cfg: DictConfig, key: str = "threshold") -> Threshold | None:
    return instantiate(cfg[key]) if cfg.get(key) else None


def build_training(cfg: DictConfig, sample_shape: tuple[int, ...], score_chunk: int | None = None) -> Any:
    """The LightningModule that meta-trains the configured learner, with its evaluator, which scores
    ``score_chunk`` query samples at a time (default: the config's ``score_chunk``)."""
    from metaad.training.module import MetaTraining

    evaluator = Evaluator(
        build_baselines(cfg),
        build_threshold(cfg),
        build_threshold(cfg, "baseline_threshold"),
        ci_over=cfg.get("ci_over") or "episode",
        learner=learner_name(cfg),
        score_chunk=score_chunk if score_chunk is not None else cfg.get("score_chunk"),
        map_sigma=cfg.get("map_sigma") or 0.0,
    )
    return MetaTraining(build_learner(cfg, sample_shape), instantiate(cfg.model.optimizer), evaluator)


def learner_name(cfg: DictConfig) -> str:
    """The learner's name in results: its run name (``names.model``: the model config's name)."""
    return str(OmegaConf.select(cfg, "names.model", default=None) or "learner")


def build_trainer(cfg: DictConfig, callbacks: list = ()) -> Any:
    from metaad.training.callbacks import ProgressBar, SummaryToLogFile

    check_trainer(cfg.trainer)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    # the model summary goes to the run's log file, not the console
    if cfg.trainer.get("enable_model_summary", True):
        configured.append(SummaryToLogFile())
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        type(c).__name__.endswith("ProgressBar") for c in configured
    ):
        configured.append(ProgressBar())
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[*configured, *callbacks],
        enable_model_summary=False,
        **TRAINER_INVARIANTS,
    )


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data (safe to store in a checkpoint loaded with weights_only).

    Hydra's own node (present when composed with ``return_hydra_config``) is left out.
    """
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True)


def compose_config(
    overrides: list[str], run_dir: Path, config_name: str = "train", create: bool = True
) -> DictConfig:
    """Compose an app's config in-process (tests, the benchmark), with its run folder at ``run_dir``
    (made unless ``create=False``: a config only checked or compared).

    Sets Hydra's global run state as ``@hydra.main`` would, so ``${hydra:...}`` interpolations
    (run names, ``paths.output_dir``) resolve exactly as on the command line.
    """
    GlobalHydra.instance().clear()
    with initialize_config_module("metaad.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg
