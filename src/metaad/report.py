"""Results out: ``metrics.json`` in the run folder and a short table on the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    path.write_text(json.dumps(metrics, indent=2))


def print_summary(metrics: dict[str, Any], run_dir: Path, console: Console | None = None) -> None:
    """Learner and baselines side by side, best first, and where to look next."""
    console = console or Console()
    table = Table(title=f"{metrics['model']} on {metrics['dataset']} (K={metrics['k_shot']}), test episodes")
    for column in ("detector", "AUROC (mean ± 95% CI)", "AUPR", "episodes"):
        table.add_column(column)
    rows = [(metrics["model"], metrics["test"])]
    rows += [(f"baseline: {name}", value) for name, value in metrics["baselines"].items()]
    best = max(value["auroc"]["mean"] for _, value in rows)
    for name, value in rows:
        auroc, aupr = value["auroc"], value["aupr"]
        style = "bold green" if auroc["mean"] == best else None
        table.add_row(
            name,
            f"{auroc['mean']:.3f} ± {auroc['ci95']:.3f}",
            f"{aupr['mean']:.3f} ± {aupr['ci95']:.3f}",
            str(auroc["n_episodes"]),
            style=style,
        )
    console.print(table)
    learner = metrics["test"]["auroc"]
    for name, value in metrics["baselines"].items():
        base = value["auroc"]
        gap = learner["mean"] - base["mean"]
        verdict = (
            "beats"
            if learner["mean"] - learner["ci95"] > base["mean"] + base["ci95"]
            else "is below"
            if learner["mean"] + learner["ci95"] < base["mean"] - base["ci95"]
            else "is within the CIs of"
        )
        console.print(f"{metrics['model']} {verdict} baseline {name} ({gap:+.3f} AUROC)")
    console.print(f"run folder: {run_dir}")
    console.print(f"tensorboard --logdir {run_dir / 'tensorboard'}")
