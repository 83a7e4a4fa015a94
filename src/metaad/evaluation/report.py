"""Results out: ``metrics.json`` in the run folder and a short table on the console."""

from __future__ import annotations

import errno
import json
import math
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from metaad import files


def results(report: Any) -> dict[str, Any]:
    """The part of ``metrics.json`` an evaluation gives: the learner and each baseline on the test
    episodes, every detector on the validation episodes, and the learner's threshold."""
    test = report.metrics["test"]
    out: dict[str, Any] = {
        "test": test["model"],
        "baselines": {name: value for name, value in test.items() if name != "model"},
        "val": report.metrics.get("val", {}),
    }
    threshold = report.thresholds.get("model")
    if threshold is not None:
        stored = threshold.state_dict()
        values = report.per_episode_thresholds.get(("test", "model"))
        if values is not None:
            stored["mean_per_episode"] = values.mean().item()
        if "model" in report.notes:
            stored["skipped"] = report.notes["model"]
        out["threshold"] = stored
    return out


NULL_REASONS = "null_reasons"


def finite(metrics: dict[str, Any], reasons: dict[str, str] | None = None) -> dict[str, Any]:
    """``metrics`` with every non-finite number (NaN, infinity) replaced by null, and under
    ``null_reasons`` why, keyed by its dotted path: JSON has no NaN or infinity, and a reader must
    not mistake a missing value for a measured one. ``reasons`` gives the why for known paths."""
    reasons = dict(reasons or {})
    found: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            found[key] = reasons.pop(key, f"not a finite number ({value})")
            return None
        return value

    out = clean(metrics, "")
    if found:
        out[NULL_REASONS] = {**out.get(NULL_REASONS, {}), **found}
    return out


def write_metrics(path: Path, metrics: dict[str, Any], reasons: dict[str, str] | None = None) -> None:
    """``metrics.json`` as valid JSON, written whole or not at all (a temporary file renamed over it),
    so a full disk or a kill leaves the previous file or none, never half of one."""
    text = json.dumps(finite(metrics, reasons), indent=2, allow_nan=False)
    write_atomically(path, text)


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` (:func:`metaad.files.write_atomically`); a failure names the folder."""
    from metaad.errors import RunFolderError

    try:
        files.write_atomically(path, lambda partial: partial.write_text(text))
    except OSError as error:
        why = (
            "no space left on the device (or the file size limit, ulimit -f, reached)"
            if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            else error.strerror or str(error)
        )
        raise RunFolderError(
            f"{path.parent}: cannot write {path.name}: {why}; nothing was written"
        ) from error


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


def print_summary(metrics: dict[str, Any], run_dir: Path, console: Console | None = None) -> None:
    """Learner and baselines side by side, best first, and where to look next."""
    console = console or Console()
    table = Table(title=f"{metrics['model']} on {metrics['dataset']} (K={metrics['k_shot']}), test episodes")
    decisions = [m for m in DECISION_COLUMNS if m in metrics["test"]]
    for column in (
        "detector",
        "AUROC (mean ± 95% CI)",
        "AUPR",
        *(DECISION_COLUMNS[m] for m in decisions),
        "episodes",
    ):
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
            *(f"{value[m]['mean']:.3f} ± {value[m]['ci95']:.3f}" if m in value else "-" for m in decisions),
            str(auroc["n_episodes"]),
            style=style,
        )
    console.print(table)
    threshold = metrics.get("threshold")
    if threshold:
        print_threshold(threshold, console)
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
    # paths and commands on one line each (never wrapped at the console's width), quoted for the shell
    console.print(f"run folder: {run_dir}", soft_wrap=True, markup=False, highlight=False)
    if (run_dir / "tensorboard").is_dir():  # not with logger=none
        command = f"tensorboard --logdir {shlex.quote(str(run_dir / 'tensorboard'))}"
        console.print(command, soft_wrap=True, markup=False, highlight=False)
