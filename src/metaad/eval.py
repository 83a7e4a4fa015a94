"""``metaad-eval ckpt_path=...``: re-score a trained checkpoint on its test episodes, write metrics.json.

The model, backbone, baselines and dataset are rebuilt from the config stored in the checkpoint
(plain data, loaded with ``weights_only=True``); keys given under ``dataset`` replace the stored
ones, e.g. ``+dataset.k_shot=10`` to evaluate the same model with more shots; ``baselines=all``
scores another set of baselines beside it and ``threshold=...`` decides by another rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metaad.build import load_checkpoint
from metaad.checks import check_dataset, check_processes, check_threshold
from metaad.cli import app
from metaad.errors import Interrupted
from metaad.resume import SignalStop, command_line
from metaad.runs import claim


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    checkpoint, run_cfg = load_checkpoint(cfg.ckpt_path)
    run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, cfg.dataset)
    # chosen on the command line: replaces the stored one
    for group in ("baselines", "threshold", "baseline_threshold"):
        if cfg.get(group) is not None:
            run_cfg[group] = cfg[group]
    check_dataset(run_cfg.dataset)
    check_threshold(run_cfg.get("threshold"))
    check_processes(cfg)
    run_dir = Path(cfg.paths.output_dir)
    with claim(cfg, run_dir, resume=False):
        try:
            with SignalStop() as stop:
                return _evaluate(cfg, checkpoint, run_cfg, run_dir, stop)
        except Interrupted as interrupted:
            import signal

            name = signal.Signals(interrupted.signum).name
            fresh = run_dir.with_name(f"{run_dir.name}_again")
            raise Interrupted(
                interrupted.signum,
                f"interrupted by {name}: no metrics were written; an evaluation starts over, in a fresh "
                f"folder: {command_line('metaad-eval', fresh)}",
            ) from None


def _evaluate(
    cfg: DictConfig, checkpoint: dict, run_cfg: DictConfig, run_dir: Path, stop: SignalStop
) -> dict[str, Any]:
    from metaad.build import build_datamodule, build_trainer, build_training, load_weights
    from metaad.distributed import check_launch, job_scope
    from metaad.report import print_summary, results, write_metrics
    from metaad.training import StopOnSignal, quiet_lightning

    quiet_lightning()
    trainer = build_trainer(cfg, [StopOnSignal(stop)])
    check_launch(trainer)  # before any data is read or any process started
    datamodule = build_datamodule(run_cfg)
    model = build_training(run_cfg, datamodule.sample_shape)
    load_weights(model.learner, checkpoint, cfg.ckpt_path)
    model.on_load_checkpoint(checkpoint)
    with job_scope():
        trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {
        **run_cfg.names,
        "k_shot": run_cfg.dataset.k_shot,
        "seed": run_cfg.seed,
        "data": getattr(datamodule, "data_name", None),
        "checkpoint": str(cfg.ckpt_path),
        **results(model.report),
    }
    if trainer.is_global_zero:
        write_metrics(run_dir / "metrics.json", metrics)
        print_summary(metrics, run_dir)
    return metrics


@app("eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
