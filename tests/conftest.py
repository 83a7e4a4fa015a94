"""Shared test helpers: compose the real Hydra config in-process, into a temporary run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from metaad.apps.build import compose_config

# Every stage of a real experiment in seconds (conf/debug/quick.yaml), on the 8x8 digits with ProtoNet
# (experiment=digits, the default run before MNIST's; a test's own experiment= or model= replaces it).
QUICK = ["experiment=digits", "debug=quick"]
# Every learner is one config in conf/model/: the generic tests run each of them.
LEARNERS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))


def compose_in(
    run_dir: Path, overrides: list[str] = (), config_name: str = "train", quick: bool = True
) -> DictConfig:
    """The config an app would see for these overrides (quick settings first), run folder ``run_dir``."""
    return compose_config([*(QUICK if quick else []), *overrides], run_dir, config_name)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_cfg(overrides, config_name="train", quick=True)``: a composed config, run dir in tmp_path."""

    def _compose(overrides: list[str] = (), config_name: str = "train", quick: bool = True) -> DictConfig:
        return compose_in(tmp_path / "run", overrides, config_name, quick)

    yield _compose
    GlobalHydra.instance().clear()


BIN = Path(sys.executable).parent


def event_dir(run_dir: Path) -> Path:
    """The folder of a single run's TensorBoard events: ``<run folder>/tensorboard/<run_name>``."""
    folders = sorted({p.parent for p in (Path(run_dir) / "tensorboard").rglob("events.out.tfevents.*")})
    assert len(folders) == 1, f"one TensorBoard run expected under {run_dir}, found {folders}"
    return folders[0]


def run_app(app: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """An installed app (``metaad-train`` ...) as a user runs it: one thread, no traceback switch,
    no DDP variables of an enclosing run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("HYDRA_FULL_ERROR", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return subprocess.run(
        [str(BIN / app), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> tuple[DictConfig, dict, Path]:
    """One quick real digits run (f1_optimal on z-scores, fitted at K=5, no baselines), shared by
    every test that needs a trained checkpoint: ``(cfg, metrics, best.ckpt)``. Read it, never change it."""
    from metaad.apps.train import train

    overrides = ["threshold=f1_optimal", "threshold.normalise=zscore", "baselines=none", "logger=none"]
    cfg = compose_in(tmp_path_factory.mktemp("quick_run") / "run", overrides)
    metrics = train(cfg).to_json()
    return cfg, metrics, Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """``quick_checkpoint(model)``: the best checkpoint of a short real digits run of that learner
    (f1_optimal on raw scores), trained once per test session."""
    from metaad.apps.train import train

    made: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in made:
            overrides = [f"model={model}", "baselines=none", "logger=none", "dataset.train_episodes=8"]
            overrides += ["dataset.val_episodes=4", "dataset.test_episodes=4"]
            cfg = compose_in(tmp_path_factory.mktemp(f"ckpt_{model}") / "run", overrides)
            train(cfg)
            GlobalHydra.instance().clear()
            made[model] = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
        return made[model]

    return get
