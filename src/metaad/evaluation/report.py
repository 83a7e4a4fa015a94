"""A run's results on the console: learner and baselines side by side, the verdicts, where to look."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from metaad.evaluation.results import RunResults, verdict

DECISION_COLUMNS = {"f1": "F1", "balanced_accuracy": "bal. acc."}


def print_threshold(threshold: dict[str, Any], console: Console) -> None:
    """The rule and value behind the decision columns (or why there are none)."""
    if "skipped" in threshold:
        console.print(f"threshold {threshold['rule']} not applied: {threshold['skipped']}")
        return
    shown = ("rule", "value", "mean_per_episode")
    settings = ", ".join(f"{k}={v}" for k, v in threshold.items() if k not in shown)
    value = threshold.get("value")
    value = f"{value:.3f}" if value is not None else f"per episode, mean {threshold['mean_per_episode']:.3f}"
    rule = f"{threshold['rule']}({settings})" if settings else threshold["rule"]
    scale = "raw score" if threshold.get("normalise") == "none" else "support-normalised score"
    console.print(f"decisions at threshold {rule} = {value} on the {scale}")


PHRASES = {
    "beats": "beats",
    "below": "is below",
    "within CIs": "is within the CIs of",
    "": "has no verdict against",
}


def print_summary(results: RunResults, run_dir: Path, console: Console | None = None) -> None:
    """Learner and baselines side by side, best first, and where to look next."""
    console = console or Console()
    name = results.learner
    dataset = results.names.get("dataset", "?")
    table = Table(title=f"{name} on {dataset} (K={results.k_shot}), test episodes")
    decisions = [m for m in DECISION_COLUMNS if m in results.test]
    for column in (
        "detector",
        "AUROC (mean ± 95% CI)",
        "AUPR",
        *(DECISION_COLUMNS[m] for m in decisions),
        "episodes",
    ):
        table.add_column(column)
    rows = [(name, results.test), *((f"baseline: {b}", v) for b, v in results.baselines.items())]
    best = max(value["auroc"].mean for _, value in rows)
    for label, value in rows:
        auroc, aupr = value["auroc"], value["aupr"]
        table.add_row(
            label,
            f"{auroc.mean:.3f} ± {auroc.ci95:.3f}",
            f"{aupr.mean:.3f} ± {aupr.ci95:.3f}",
            *(f"{value[m].mean:.3f} ± {value[m].ci95:.3f}" if m in value else "-" for m in decisions),
            str(auroc.n_episodes),
            style="bold green" if auroc.mean == best else None,
        )
    console.print(table)
    for label, value in rows:  # detectors with anomaly maps, on data with defect masks
        if "pixel_auroc" in value or "pro" in value:
            cells = [
                f"{m} {value[m].mean:.3f} ± {value[m].ci95:.3f}" for m in ("pixel_auroc", "pro") if m in value
            ]
            console.print(f"anomaly maps of {label}: {', '.join(cells)}")
    if results.threshold:
        print_threshold(results.threshold, console)
    learner = results.test["auroc"]
    for baseline, value in results.baselines.items():
        gap = learner.mean - value["auroc"].mean
        console.print(
            f"{name} {PHRASES[verdict(learner, value['auroc'])]} baseline {baseline} ({gap:+.3f} AUROC)"
        )
    # paths and commands on one line each (never wrapped at the console's width), quoted for the shell
    console.print(f"run folder: {run_dir}", soft_wrap=True, markup=False, highlight=False)
    if (run_dir / "tensorboard").is_dir():  # not with logger=none
        command = f"tensorboard --logdir {shlex.quote(str(run_dir / 'tensorboard'))}"
        console.print(command, soft_wrap=True, markup=False, highlight=False)
