"""``metaad-summarize``: a Hydra multirun folder as a table, every job's val/test AUROC, best val first.

    metaad-summarize sweep_dir=SWEEP_DIR     (default: the newest under outputs/multirun)

Reads each job folder's ``.hydra/overrides.yaml`` and ``metrics.json``; prints a table sorted by
the best validation AUROC (the selection metric: the test column is reported, never chosen on)
and writes it as ``sweep_summary.csv`` and ``sweep_summary.md`` into the sweep folder. Jobs
without a ``metrics.json`` (failed, unfinished or ``test=false``) are listed, not dropped.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import yaml
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from metaad.cli import app

COLUMNS = ("job", "overrides", "val/auroc", "test/auroc", "test ci95", "steps", "status")


def job_dirs(sweep: Path) -> list[Path]:
    """Folders under ``sweep`` that Hydra ran a job in (they hold ``.hydra/overrides.yaml``)."""
    found = sorted((p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")), key=_job_order)
    if not found:
        raise SystemExit(
            f"{sweep}: no job folders (nothing with .hydra/overrides.yaml) - is it a multirun folder?"
        )
    return found


def _job_order(path: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def summarize(sweep: Path) -> list[dict]:
    """One row per job: the overrides that differ between jobs, its AUROCs, sorted best val first."""
    jobs = job_dirs(sweep)
    overrides = {job: yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [] for job in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values()))
    rows = []
    for job in jobs:
        row = {
            "job": str(job.relative_to(sweep)),
            "overrides": " ".join(o for o in overrides[job] if o not in shared),
        }
        metrics_file = job / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            auroc = metrics["test"]["auroc"]
            row |= {
                "val/auroc": math.nan if metrics["val_auroc_best"] is None else metrics["val_auroc_best"],
                "test/auroc": auroc["mean"],
                "test ci95": auroc["ci95"],
                "steps": metrics.get("global_step", ""),
                "status": "done",
            }
        else:
            row |= {"val/auroc": math.nan, "test/auroc": math.nan, "test ci95": math.nan, "steps": ""}
            row["status"] = "no metrics.json"
        rows.append(row)
    rows.sort(key=lambda r: -r["val/auroc"] if not math.isnan(r["val/auroc"]) else math.inf)
    return rows


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_tables(rows: list[dict], sweep: Path) -> None:
    with open(sweep / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    (sweep / "sweep_summary.md").write_text("\n".join(lines) + "\n")


def show(rows: list[dict], sweep: Path, console: Console) -> None:
    table = Table(title=f"{sweep}: {len(rows)} jobs, best validation AUROC first")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column not in ("overrides", "status") else "left")
    for i, row in enumerate(rows):
        table.add_row(*(_fmt(row[c]) for c in COLUMNS), style="bold green" if i == 0 else None)
    console.print(table)
    best = rows[0]
    if best["status"] == "done":
        console.print(
            f"best config (by val/auroc): job {best['job']}: {best['overrides'] or '(the only config)'}"
            f"  val {best['val/auroc']:.4f}, test {best['test/auroc']:.4f} ± {best['test ci95']:.4f}"
        )
    missing = [row["job"] for row in rows if row["status"] != "done"]
    if missing:
        console.print(f"[yellow]no metrics.json in job(s) {', '.join(missing)}[/yellow]")
    console.print(f"tables: {sweep / 'sweep_summary.md'}, {sweep / 'sweep_summary.csv'}")
    command = f"tensorboard --logdir {shlex.quote(str(sweep))}"
    console.print(f"compare the runs: {command}", soft_wrap=True, markup=False, highlight=False)


def latest_sweep(root: Path = Path("outputs/multirun")) -> Path:
    sweeps = sorted((p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not sweeps:
        raise SystemExit(f"no sweep folders under {root}; pass one: metaad-summarize sweep_dir=SWEEP_DIR")
    return sweeps[-1]


def summarize_sweep(sweep: Path | None = None) -> list[dict]:
    """Summarise ``sweep`` (default: the newest), write its tables and print them; the rows."""
    sweep = Path(sweep) if sweep is not None else latest_sweep()
    if not sweep.is_dir():
        raise SystemExit(f"sweep_dir={sweep}: no such folder")
    rows = summarize(sweep)
    write_tables(rows, sweep)
    show(rows, sweep, Console(width=160))
    return rows


@app("summarize")
def main(cfg: DictConfig) -> None:
    summarize_sweep(cfg.sweep_dir)


if __name__ == "__main__":
    main()
