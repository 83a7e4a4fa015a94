"""Shared test helpers: compose the real Hydra config in-process, into a temporary run folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# A few steps: enough to run every stage of a real experiment in seconds.
QUICK = [
    "trainer.max_epochs=1",
    "dataset.train_episodes=32",
    "dataset.val_episodes=20",
    "dataset.test_episodes=40",
    "dataset.eval_batch_size=20",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


def compose_in(
    run_dir: Path, overrides: list[str] = (), config_name: str = "train", quick: bool = True
) -> DictConfig:
    """The config an app would see for these overrides, with its run folder at ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_module("metaad.conf", version_base="1.3"):
        cfg = compose(
            config_name, overrides=[*(QUICK if quick else []), *overrides], return_hydra_config=True
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_cfg(overrides, config_name="train", quick=True)``: a composed config, run dir in tmp_path."""

    def _compose(overrides: list[str] = (), config_name: str = "train", quick: bool = True) -> DictConfig:
        return compose_in(tmp_path / "run", overrides, config_name, quick)

    yield _compose
    GlobalHydra.instance().clear()
