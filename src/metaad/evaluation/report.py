"""A run's results on the console: learner and baselines side by side, the verdicts, where to look."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from metaad.evaluation.results import Metrics, RunResults, verdict

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


FOLDED_WIDTH = 16  # a folding column (free text) is given at least this width before columns are dropped


def fitted(
    build: Callable[[list[str]], Table], columns: list[str], width: int, folding: Sequence[str] = ()
) -> tuple[Table, list[str]]:
    """The table of as many ``columns`` as fit ``width`` characters, dropped from the last (the
    first is always kept); the table and the dropped columns' names. Cells never wrap, except in
    ``folding`` columns (free text), which fold to fit once each has :data:`FOLDED_WIDTH`."""
    wide = Console(width=10_000)
    columns, dropped = list(columns), []
    while True:
        table = build(columns)
        folded = [c for c in table.columns if c.header in folding]
        for column in folded:
            column.max_width = FOLDED_WIDTH
        needed = Measurement.get(wide, wide.options, table).maximum
        for column in folded:
            column.max_width = None
        if len(columns) <= 1 or needed <= width:
            return table, dropped
        dropped.insert(0, columns.pop())


def one_line(console: Console, text: str) -> None:
    """A path or command on one line (never wrapped at the console's width), as written."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def print_summary(
    results: RunResults, run_dir: Path, console: Console | None = None, tensorboard: Path | None = None
) -> None:
    """Learner and baselines side by side, the verdicts, and where to look next; the table fits
    the console's width (columns that do not fit are named below it, all are in metrics.json).
    ``tensorboard``: the run's TensorBoard folder (default: ``<run_dir>/tensorboard`` if there)."""
    console = console or Console()
    name = results.learner
    dataset = results.names.get("dataset", "?")
    rows = [(name, results.test), *results.baselines.items()]
    episodes = {value["auroc"].n_episodes for _, value in rows}
    title = f"{name} on {dataset} (K={results.k_shot})"
    title += f", {episodes.pop()} test episodes" if len(episodes) == 1 else ", test episodes"
    metrics = {"AUROC ± 95% CI": "auroc", "AUPR": "aupr"}
    metrics |= {DECISION_COLUMNS[m]: m for m in DECISION_COLUMNS if m in results.test}
    if len({value["auroc"].n_episodes for _, value in rows}) > 1:
        metrics["episodes"] = "episodes"
    best = max(value["auroc"].mean for _, value in rows)

    def cell(value: Metrics, metric: str) -> str:
        if metric == "episodes":
            return str(value["auroc"].n_episodes)
        return f"{value[metric].mean:.3f} ± {value[metric].ci95:.3f}" if metric in value else "-"

    def build(columns: list[str]) -> Table:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in columns:
            table.add_column(column, no_wrap=True)
        for label, value in rows:
            style = "bold green" if value["auroc"].mean == best else ("bold" if label == name else None)
            table.add_row(label, *(cell(value, metrics[c]) for c in columns[1:]), style=style)
        return table

    table, dropped = fitted(build, ["detector", *metrics], console.width)
    console.print(table)
    if dropped:
        console.print(f"(not shown at this width: {', '.join(dropped)}; see metrics.json)")
    for label, value in rows:  # detectors with anomaly maps, on data with defect masks
        if "pixel_auroc" in value or "pro" in value:
            cells = [
                f"{m} {value[m].mean:.3f} ± {value[m].ci95:.3f}" for m in ("pixel_auroc", "pro") if m in value
            ]
            console.print(f"anomaly maps of {label}: {', '.join(cells)}")
    if results.threshold:
        print_threshold(results.threshold, console)
    if results.stream is not None:
        print_stream(results, console)
    learner = results.test["auroc"]
    for baseline, value in results.baselines.items():
        gap = learner.mean - value["auroc"].mean
        console.print(
            f"{name} {PHRASES[verdict(learner, value['auroc'])]} baseline {baseline} ({gap:+.3f} AUROC)"
        )
    # paths and commands on one line each (never wrapped at the console's width), quoted for the shell
    card = " (MODEL_CARD.md, metrics.json)" if (run_dir / "MODEL_CARD.md").is_file() else ""
    one_line(console, f"run folder: {run_dir}{card}")
    tensorboard = tensorboard if tensorboard is not None else run_dir / "tensorboard"
    if tensorboard.is_dir():  # not with logger=none
        one_line(console, f"tensorboard --logdir {shlex.quote(str(tensorboard))}")


STREAM_COLUMNS = {
    "auroc": "AUROC",
    "aupr": "AUPR",
    "vus_pr": "VUS-PR",
    "best_f1": "best F1",
    "f1_support": "F1 at support thr.",
}


def print_stream(results: RunResults, console: Console, shown: int = 3) -> None:
    """The stream block, short: the learner and the ``shown`` best baselines by VUS-PR; the rest,
    and every note, are in metrics.json."""
    stream, name = results.stream, results.learner
    assert stream is not None
    baselines = sorted(
        (d for d in stream.detectors if d != name),
        key=lambda d: -stream.detectors[d].get("vus_pr", stream.detectors[d]["auroc"]).mean,
    )
    rows = ([name] if name in stream.detectors else []) + baselines[:shown]
    columns = [m for m in STREAM_COLUMNS if any(m in stream.detectors[d] for d in rows)]
    table = Table(
        title=f"streams: {len(stream.entities)} held-out entities after the cut, a score a step "
        "(mean ± 95% CI over entities)"
    )
    for column in ("detector", *(STREAM_COLUMNS[m] for m in columns)):
        table.add_column(column)
    for detector in rows:
        values = stream.detectors[detector]
        label = detector if detector == name else f"baseline: {detector}"
        table.add_row(
            label, *(f"{values[m].mean:.3f} ± {values[m].ci95:.3f}" if m in values else "-" for m in columns)
        )
    console.print(table)
    hidden = len(baselines) - shown
    extra = [f"{hidden} more baseline(s)"] if hidden > 0 else []
    extra += [f"{len(stream.notes)} note(s)"] if stream.notes else []
    if extra:
        console.print(f"{' and '.join(extra)} in metrics.json (stream)")
