"""A run folder belongs to one run: a lock while it runs, and its config written once it starts.

Hydra's own ``.hydra/`` writing is switched off (``conf/hydra/default.yaml``) so that a run
refused at start-up (a changed config on resume, a folder in use) changes nothing in the folder;
:func:`claim` writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` itself once
the run is allowed, and never over a resumed run's own (a checkpoint continued in a fresh folder
gets them; one of another run is not continued in a folder that holds a run).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metaad.errors import RunFolderError
from metaad.files import process_alive

LOCK = ".lock"


def _is_extra_rank() -> bool:
    """A DDP rank started by rank 0 for the same run (it shares rank 0's folder and lock)."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


@contextlib.contextmanager
def claim(cfg: DictConfig, run_dir: Path, resume: bool) -> Iterator[None]:
    """Hold ``run_dir`` for this run: refuse a folder in use or holding another run, else lock it."""
    if _is_extra_rank():
        yield
        return
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RunFolderError(
            f"run folder {run_dir}: {blocking} is a file, not a folder; give another hydra.run.dir"
        )
    lock = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = _pid(lock)
        if pid is not None and process_alive(pid):
            raise RunFolderError(
                f"run folder {run_dir} is in use by another run (pid {pid}); give each run its own "
                "hydra.run.dir"
            ) from None
        lock.unlink(missing_ok=True)  # left by a run that was killed
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError as error:
        raise RunFolderError(f"run folder {run_dir}: cannot write in it ({error.strerror})") from error
    with os.fdopen(fd, "w") as file:
        file.write(str(os.getpid()))
    try:
        held = [
            p.name
            for p in (run_dir / ".hydra", run_dir / "checkpoints", run_dir / "metrics.json")
            if p.exists()
        ]
        ckpt = cfg.get("ckpt_path")
        if resume and held and ckpt is not None and str(ckpt) != "last" and not _inside(Path(ckpt), run_dir):
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(held)}), and ckpt_path={ckpt} is "
                "not one of its checkpoints; continue another run's checkpoint in a fresh hydra.run.dir"
            )
        if not resume and held:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run ({', '.join(held)}); {_advice(cfg)}"
            )
        if not (run_dir / ".hydra").exists():  # a fresh run, or a checkpoint continued in a fresh folder
            write_hydra_files(cfg, run_dir)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _advice(cfg: DictConfig) -> str:
    """What to do about a folder that holds a run, for the app at hand: only training continues."""
    if cfg.get("task_name", "train") == "train":
        return "continue it with ckpt_path=last, or give this run another hydra.run.dir"
    app = f"metaad-{cfg.task_name}"
    return (
        f"{app} starts over each time and has nothing to continue (ckpt_path=last resumes metaad-train "
        f"only): give this {app} run another hydra.run.dir"
    )


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def write_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """What Hydra would have written: the composed config, Hydra's own, and the overrides."""
    from hydra.core.hydra_config import HydraConfig

    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    app = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]) if "hydra" in cfg else cfg
    OmegaConf.save(app, folder / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")
