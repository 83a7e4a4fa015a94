"""Lightning's DDP made safe inside Hydra sweeps: every rank of a job runs that job's own config.

Lightning starts a node's extra ranks by re-running ``sys.argv``. Inside ``--multirun`` that is
the whole sweep: each extra rank replays every job (an unseeded Optuna sampler even hands ranks
of one process group different hyperparameters), and under the joblib launcher ``sys.argv`` is
not the app at all. :class:`HydraDDPStrategy` starts them instead as
``python -m <app> <this job's overrides> hydra.run.dir=<this job's folder>``, a plain run of the
job's concrete config in the job's folder. :func:`check_launch` refuses the modes that would
still replay a sweep, naming what to use instead.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose extra ranks run ``app`` with the current Hydra job's overrides."""

    def __init__(self, app: str, **kwargs) -> None:
        if importlib.util.find_spec(app) is None:
            raise ValueError(f"trainer.strategy.app: no module {app!r} to start the other ranks with")
        super().__init__(**kwargs)
        self.app = app

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = JobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, self.app
            )


class JobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with one change: the command each extra rank runs."""

    def __init__(self, cluster_environment, num_processes: int, num_nodes: int, app: str) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.app = app

    def _call_children_scripts(self) -> None:
        if not HydraConfig.initialized():  # not a Hydra app: Lightning's command line is the run's
            return super()._call_children_scripts()
        # The DDP variables as Lightning's launcher sets them (job_scope removes them after the job).
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        command, cwd = rank_command(self.app)
        for local_rank in range(1, self.num_processes):
            rank_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            job_name = f"hydra.job.name={HydraConfig.get().job.name}_rank{local_rank}"
            self.procs.append(subprocess.Popen([*command, job_name], env=rank_env, cwd=cwd))


def rank_command(app: str) -> tuple[list[str], str]:
    """The command line of a plain run of the current Hydra job, in its folder, and where to run it."""
    hydra = HydraConfig.get()
    command = [sys.executable, "-m", app, f"--config-name={hydra.job.config_name}"]
    for source in hydra.runtime.config_sources:
        if source.provider == "command-line":  # --config-dir
            command.append(f"--config-dir={source.path.removeprefix('file://')}")
    command += [
        *hydra.overrides.task,
        *(o for o in hydra.overrides.hydra if o.startswith("hydra.searchpath")),
    ]
    run_dir = hydra.runtime.output_dir.replace("\\", "\\\\").replace("'", "\\'")
    command += [
        f"hydra.run.dir='{run_dir}'",
        f"hydra.job.chdir={str(bool(hydra.job.chdir)).lower()}",
        "hydra.output_subdir=null",  # the job's first rank writes its .hydra/ config
        "hydra.mode=RUN",
    ]
    return command, hydra.runtime.cwd


def check_launch(trainer: pl.Trainer) -> None:
    """Stop before training when this Hydra multirun job's ranks would run the whole sweep."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or trainer.world_size == 1:
        return
    strategy = trainer.strategy
    if strategy.cluster_environment.creates_processes_externally:
        # submitit starts every rank of a job with that job's config; torchrun or srun start the sweep
        if "submitit" not in HydraConfig.get().launcher.get("_target_", ""):
            raise RuntimeError(
                "--multirun with processes started by torchrun or srun: each of them would run the whole "
                "sweep. Start one torchrun/srun per job (no -m), or sweep on SLURM with the submitit "
                "launcher (hydra/launcher=submitit_slurm), which starts each job's ranks itself."
            )
    elif type(strategy.launcher) is _SubprocessScriptLauncher:
        raise RuntimeError(
            f"{type(strategy).__name__} with Lightning's own launcher inside --multirun: it would start the "
            "other ranks with this command line, so each would replay the whole sweep. Use trainer=ddp "
            "(metaad's HydraDDPStrategy starts each job's ranks with that job's overrides)."
        )


@contextmanager
def job_scope() -> Iterator[None]:
    """One job's process group and DDP variables end with it, so the next job of a sweep starts afresh."""
    saved = {name: os.environ.get(name) for name in DDP_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
