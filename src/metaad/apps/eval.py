"""``metaad-eval ckpt_path=...``: re-score a trained checkpoint on its test episodes, write metrics.json.

The model, backbone, baselines and dataset are rebuilt from the config stored in the checkpoint
(plain data, loaded with ``weights_only=True``); keys given under ``dataset`` replace the stored
ones, e.g. ``+dataset.k_shot=10`` to evaluate the same model with more shots; ``baselines=all``
scores another set of baselines beside it and ``threshold=...`` decides by another rule. On series
data the learner and every baseline also score each held-out entity's test part after the cut a
step at a time (the ``stream`` block; ``stream=false`` skips it), as metaad-train's test does.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from metaad import checkpoint as ckpt
from metaad.apps.checks import (
    check_dataset,
    check_processes,
    check_score_chunk,
    check_settings_of,
    check_threshold,
    check_trainer,
)
from metaad.apps.cli import app
from metaad.apps.runs import claim
from metaad.errors import ConfigError, Interrupted
from metaad.training.resume import SignalStop, command_line

if TYPE_CHECKING:
    from metaad.evaluation.results import RunResults, StreamResults

log = logging.getLogger(__name__)

# Settings a checkpoint fixes: given to metaad-eval they would be ignored, so they are refused.
STORED_ONLY = {"model": "model", "backbone": "backbone", "seed": "seed", "names": "run names"}


def evaluate(cfg: DictConfig) -> RunResults:
    _refuse_stored_only(cfg)
    check_settings_of(cfg, "eval")
    check_trainer(cfg.trainer)
    check_score_chunk(cfg)
    checkpoint = ckpt.load(cfg.ckpt_path)
    run_cfg = checkpoint.config
    run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, cfg.dataset)
    # chosen on the command line: replaces the stored one
    for group in ("baselines", "threshold", "baseline_threshold"):
        if cfg.get(group) is not None:
            run_cfg[group] = cfg[group]
    check_dataset(run_cfg.dataset)
    # the names as given now, before any data is read; the tasks they expand to after (wildcards)
    check_held_out(checkpoint, [str(t) for t in run_cfg.dataset.get("test_tasks") or []])
    check_threshold(run_cfg.get("threshold"))
    check_processes(cfg)
    run_dir = Path(cfg.paths.output_dir)
    with claim(cfg, run_dir, resume=False):
        try:
            with SignalStop() as stop:
                return _evaluate(cfg, checkpoint, run_cfg, run_dir, stop)
        except Interrupted as interrupted:
            name = signal.Signals(interrupted.signum).name
            fresh = run_dir.with_name(f"{run_dir.name}_again")
            raise Interrupted(
                interrupted.signum,
                f"interrupted by {name}: no metrics were written; an evaluation starts over, in a fresh "
                f"folder: {command_line('metaad-eval', fresh)}",
            ) from None


def _refuse_stored_only(cfg: DictConfig) -> None:
    given = [key for key in STORED_ONLY if key in cfg]
    if given:
        raise ConfigError(
            f"metaad-eval: {', '.join(given)} cannot be changed at evaluation: the "
            f"{STORED_ONLY[given[0]]} of "
            f"ckpt_path={cfg.get('ckpt_path')} is the one it was trained with; to score another model, train "
            "it with metaad-train and evaluate its checkpoint"
        )


def check_held_out(checkpoint: ckpt.Checkpoint, test_tasks: list[str]) -> None:
    """Refuse test tasks the checkpoint was trained or selected on (its recorded task lists)."""
    if checkpoint.tasks is None:
        log.warning(
            "%s records no task lists (written by an older metaad-train): whether its test tasks were "
            "held out of training cannot be checked",
            checkpoint.path,
        )
        return
    tasks = checkpoint.tasks
    seen_train = sorted(set(test_tasks) & set(tasks.get("train", [])))
    # validation tasks that were also the run's own test tasks share classes by design (their rows
    # are split in disjoint halves, as dataset=digits does); any other is a task it was selected on
    seen_val = sorted(set(test_tasks) & set(tasks.get("val", [])) - set(tasks.get("test", [])))
    for seen, role in ((seen_train, "meta-trained"), (seen_val, "validated (early stopping, thresholds)")):
        if seen:
            raise ConfigError(
                f"dataset.test_tasks: {seen[:10]} {'is' if len(seen) == 1 else 'are'} among the tasks "
                f"ckpt_path={checkpoint.path} was {role} on, so scores on them would not measure a new "
                "task; evaluate on tasks it never saw"
            )


def _evaluate(
    cfg: DictConfig, checkpoint: ckpt.Checkpoint, run_cfg: DictConfig, run_dir: Path, stop: SignalStop
) -> RunResults:
    from metaad.apps import model_card
    from metaad.apps.build import build_datamodule, build_trainer, build_training, plain
    from metaad.apps.tracking import place_loggers, tensorboard_dirs
    from metaad.evaluation.report import print_summary
    from metaad.evaluation.results import RunResults
    from metaad.training.callbacks import StopOnSignal
    from metaad.training.distributed import check_launch, job_scope
    from metaad.training.module import quiet_lightning

    quiet_lightning()
    cfg = place_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, [StopOnSignal(stop)])
    check_launch(trainer)  # before any data is read or any process started
    datamodule = build_datamodule(run_cfg)
    model = build_training(run_cfg, datamodule.sample_shape, cfg.get("score_chunk"))
    tasks = datamodule.task_names()
    check_held_out(checkpoint, tasks["test"])
    model.restore(checkpoint)
    with job_scope():
        trainer.test(model, datamodule=datamodule, verbose=False)
    results = RunResults.from_report(
        model.report,
        names=dict(run_cfg.names),
        k_shot=run_cfg.dataset.k_shot,
        seed=run_cfg.seed,
        data=getattr(datamodule, "data_name", None),
        checkpoint=str(cfg.ckpt_path),
        tasks={"trained_on": checkpoint.tasks, **tasks},
        stream=measure_streams(model, datamodule) if trainer.is_global_zero and cfg.get("stream") else None,
    )
    if trainer.is_global_zero:
        results.write(run_dir / "metrics.json")
        kind = model_card.kind_of(getattr(datamodule, "preprocessing", None), datamodule.sample_shape)
        model_card.write(run_dir, results, plain(run_cfg), kind)
        print_summary(results, run_dir, tensorboard=next((d.parent for d in tensorboard_dirs(cfg)), None))
    return results


def measure_streams(model: Any, datamodule: Any) -> StreamResults | None:
    """Series data: each held-out entity's test part after the cut scored step by step by the
    learner (its tested weights) and every baseline, one entity at a time; None for other data.
    metaad-train's test and metaad-eval both measure through here."""
    streams = datamodule.test_streams()
    if streams is None:
        return None
    from metaad.evaluation.stream_metrics import evaluate_streams

    learner = model.learner.cpu().eval()  # tested already: its streams are scored on the CPU
    log.info("scoring the held-out entities' test parts after the cut as streams")
    return evaluate_streams(model.evaluator.detectors(learner, with_baselines=True), streams)


@app("eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
