"""``metaad-train``: meta-train a learner, test it beside the baselines, write metrics.json.

``ckpt_path=last`` (with ``hydra.run.dir=<the run's folder>``) or ``ckpt_path=<file>`` resumes a
run where its checkpoint left it; ``trainer=ddp`` trains across processes, also inside sweeps.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from metaad.apps.checks import check_train_config
from metaad.apps.cli import app
from metaad.apps.runs import claim
from metaad.checkpoint import stored_config
from metaad.errors import Interrupted
from metaad.training.resume import SignalStop, command_line, load_resume_state, resolve_ckpt_path

if TYPE_CHECKING:
    from metaad.evaluation.results import RunResults

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> RunResults:
    """Run one experiment; returns its results, as written to ``metrics.json``.

    With ``test=false`` nothing is written and the results hold no test metrics.
    A SIGTERM or SIGINT stops it at the next step's end with ``last.ckpt`` saved there, as
    :class:`~metaad.errors.Interrupted` saying how to resume.
    """
    check_train_config(cfg)  # before reading data or importing Lightning
    stored = stored_config(cfg)  # what the checkpoints keep: refused now if it could not be loaded
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    resumed = load_resume_state(ckpt_path, cfg) if ckpt_path else None
    with claim(cfg, run_dir, resume=resumed is not None):
        try:
            with SignalStop() as stop:
                return _train(cfg, stored, run_dir, ckpt_path, resumed, stop)
        except Interrupted as interrupted:
            raise Interrupted(interrupted.signum, _resume_advice(cfg, run_dir, interrupted.signum)) from None


def _resume_advice(cfg: DictConfig, run_dir: Path, signum: int) -> str:
    """One line: where the run stopped and the command that continues it."""
    import signal

    name = signal.Signals(signum).name
    last = run_dir / "checkpoints" / "last.ckpt"
    step = _saved_step(last)
    if step is None:
        return (
            f"interrupted by {name} before its first checkpoint: nothing to resume in {run_dir}; "
            "start the run again with another hydra.run.dir"
        )
    return f"interrupted by {name}; {last} holds step {step}. Resume with: " + command_line(
        "metaad-train", run_dir, "ckpt_path=last"
    )


def _saved_step(path: Path) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # none, or not a checkpoint: nothing to resume from
        return None


def _train(
    cfg: DictConfig,
    stored: dict[str, Any],
    run_dir: Path,
    ckpt_path: Path | None,
    resumed: dict | None,
    stop: SignalStop,
) -> RunResults:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from metaad.apps import model_card
    from metaad.apps.build import build_datamodule, build_trainer, build_training, plain
    from metaad.apps.eval import measure_streams
    from metaad.apps.tracking import place_loggers, run_hparams, tensorboard_dirs
    from metaad.evaluation.report import print_summary
    from metaad.evaluation.results import RunResults
    from metaad.training.callbacks import StopOnSignal, StoreConfig, log_file_only
    from metaad.training.distributed import check_launch, job_scope
    from metaad.training.module import TENSORBOARD_DIR, log_run, quiet_lightning

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    placed = place_loggers(cfg, run_dir, resumed.get(TENSORBOARD_DIR) if resumed else None)
    trainer = build_trainer(
        _continue_curves(placed, resumed["global_step"]) if resumed else placed,
        [StoreConfig(stored), StopOnSignal(stop)],
    )
    check_launch(trainer)  # before any data is read or any process started
    datamodule = build_datamodule(cfg)
    model = build_training(cfg, datamodule.sample_shape)
    with job_scope():
        if resumed is None:  # a resumed run's folder has them already
            log_run(trainer.loggers, run_hparams(cfg))
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        log_file_only(
            "rank %d/%d trained %d steps; %s",
            trainer.global_rank,
            trainer.world_size,
            trainer.global_step,
            json.dumps({key: plain(cfg[key]) for key in ("backbone", "model")}),
        )
        best_val = model.val_auroc_best
        results = RunResults(
            names=dict(cfg.names),
            k_shot=cfg.dataset.k_shot,
            seed=cfg.seed,
            data=getattr(datamodule, "data_name", None),
            checkpoint="",
            tasks=datamodule.task_names(),
            test={},
            val_auroc_best=best_val if best_val != float("-inf") else float("nan"),
            global_step=trainer.global_step,
            null_reasons=_never_validated(cfg, model, trainer),
        )
        if not cfg.test:
            return results
        tracks_best = [
            cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor
        ]
        best = next((cb.best_model_path for cb in tracks_best), "")
        if best and not Path(best).resolve().is_relative_to(run_dir.resolve()):
            # continued in a fresh folder and no epoch here beat the resumed run's best
            if Path(best).is_file():
                log.warning("testing the best checkpoint of the resumed run, %s: no epoch here beat it", best)
            else:
                log.warning("the resumed run's best checkpoint %s is gone: testing the last weights", best)
                best = ""
        trainer.test(
            model,
            datamodule=datamodule,
            ckpt_path=best or None,
            weights_only=True,
            verbose=False,
        )
    results = RunResults.from_report(
        model.report,
        **{f: getattr(results, f) for f in ("names", "k_shot", "seed", "data", "tasks")},
        stream=measure_streams(model, datamodule) if trainer.is_global_zero and cfg.get("stream") else None,
        checkpoint=best,
        val_auroc_best=results.val_auroc_best,
        global_step=results.global_step,
        null_reasons=results.null_reasons,
    )
    if trainer.is_global_zero:
        results.write(run_dir / "metrics.json")
        kind = model_card.kind_of(getattr(datamodule, "preprocessing", None), datamodule.sample_shape)
        model_card.write(run_dir, results, stored, kind)
        print_summary(results, run_dir, tensorboard=next((d.parent for d in tensorboard_dirs(placed)), None))
    return results


def _never_validated(cfg: DictConfig, model: Any, trainer: Any) -> dict[str, str]:
    """Why ``val_auroc_best`` is null when no validation ran (warned), else nothing."""
    if model.val_auroc_best != float("-inf"):
        return {}
    every, epochs = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch"), trainer.current_epoch
    cause = (
        f"validation never ran: trainer.check_val_every_n_epoch={every} is more than the {epochs} "
        "epoch(s) trained"
        if isinstance(every, int) and every > epochs
        else "no validation epoch gave a finite val/auroc"
    )
    why = (
        f"{cause}, so no best checkpoint was chosen and the test scored the last weights "
        f"(step {trainer.global_step})"
    )
    log.warning("%s; val_auroc_best is null in metrics.json", why)
    return {"val_auroc_best": why}


def _continue_curves(cfg: DictConfig, step: int) -> DictConfig:
    """The config with TensorBoard told to hide what the crashed process logged from ``step`` on."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for conf in (cfg.get("logger") or {}).values():
            if str(conf.get("_target_", "")).endswith("TensorBoardLogger"):
                conf.purge_step = step
    return cfg


@app("train")
def main(cfg: DictConfig) -> float:
    """Returns the best validation AUROC: the value a Hydra sweeper (Optuna) maximises (-inf for a
    run that never validated)."""
    best = train(cfg).val_auroc_best
    return float("-inf") if best is None or math.isnan(best) else best


if __name__ == "__main__":
    main()
