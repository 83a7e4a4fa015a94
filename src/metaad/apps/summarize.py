"""``metaad-summarize``: a Hydra multirun folder as a table, every job's val/test AUROC, best val first.

    metaad-summarize sweep_dir=SWEEP_DIR     (default: the newest under outputs/multirun)

Reads each job folder's ``.hydra/overrides.yaml`` and ``metrics.json``; prints a table sorted by
the best validation AUROC (the selection metric: the test column is reported, never chosen on)
and writes it as ``sweep_summary.csv`` and ``sweep_summary.md`` into the sweep folder. Every job
is listed, each without metrics with why: failed, unfinished or ``test=false``, refused at
start-up (``refused_jobs.yaml``), never started, or an unreadable ``metrics.json`` (named).
"""

from __future__ import annotations

import csv
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from metaad.apps.cli import app
from metaad.apps.sweeps import expected_jobs, refused_jobs
from metaad.errors import RunFolderError
from metaad.evaluation.report import fitted, one_line
from metaad.evaluation.results import RunResults

# jobs without metrics named one per line below the table, at most this many
SHOWN = 10
COLUMNS = ("job", "overrides", "val/auroc", "test/auroc", "test ci95", "steps", "status")


def job_dirs(sweep: Path) -> list[Path]:
    """Folders under ``sweep`` that Hydra ran a job in (they hold ``.hydra/overrides.yaml``)."""
    return sorted((p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")), key=_job_order)


def _job_order(path: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def summarize(sweep: Path) -> list[dict]:
    """One row per job: the overrides that differ between jobs, its AUROCs, sorted best val first.

    Every job of the sweep is listed: those with a folder, those refused at start-up (recorded in
    ``refused_jobs.yaml``, their folder gone) and, for a grid sweep, those never started because
    the sweep stopped before them (the job list comes from the sweep's ``multirun.yaml``).
    """
    jobs: dict[str, dict] = {}  # job folder (relative) -> overrides, status
    expected = expected_jobs(sweep) if _numbered(sweep) else None
    for num, overrides in enumerate(expected or []):
        jobs[str(num)] = {"overrides": overrides, "status": "not run: the sweep stopped before it"}
    for folder in job_dirs(sweep):
        name = str(folder.relative_to(sweep))
        overrides = _read_overrides(folder)
        jobs[name] = {"overrides": overrides, "folder": folder}
    for entry in refused_jobs(sweep):
        name = str(entry.get("folder") or entry.get("job"))
        job = jobs.setdefault(name, {"overrides": list(entry.get("overrides") or [])})
        started = "folder" in job and (job["folder"] / "checkpoints").exists()
        job["refused"] = f"{'failed' if started else 'refused at start-up'}: {entry.get('error', '')}"
    if not jobs:
        raise SystemExit(
            f"{sweep}: no job folders (nothing with .hydra/overrides.yaml) - is it a multirun folder?"
        )
    lists = [set(job["overrides"]) for job in jobs.values()]
    shared = set.intersection(*lists)
    rows = []
    for name in sorted(jobs, key=lambda n: _job_order(Path(n))):
        job = jobs[name]
        row = {"job": name, "overrides": " ".join(o for o in job["overrides"] if o not in shared)}
        row |= {"val/auroc": math.nan, "test/auroc": math.nan, "test ci95": math.nan, "steps": ""}
        if "folder" in job:
            row |= _metrics_row(job["folder"] / "metrics.json")
        if row.get("status") != "done":  # a job finished later (resumed in its folder) is done
            row["status"] = job.get("refused") or row.get("status") or job["status"]
        rows.append(row)
    rows.sort(key=lambda r: -r["val/auroc"] if not math.isnan(r["val/auroc"]) else math.inf)
    return rows


def _numbered(sweep: Path) -> bool:
    """Whether the sweep's job folders are named by job number (Hydra's default ``sweep.subdir``)."""
    try:
        subdir = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["sweep"]["subdir"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return subdir == "${hydra.job.num}"


def _read_overrides(folder: Path) -> list[str]:
    try:
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def _metrics_row(path: Path) -> dict:
    """A job's AUROCs from its ``metrics.json``, or a status that says why there are none."""
    if not path.is_file():
        return {"status": "no metrics.json"}
    try:
        results = RunResults.read(path)
    except RunFolderError as error:
        return {"status": f"unreadable {error}"}
    auroc = results.test.get("auroc")
    if auroc is None:
        return {"status": f"unreadable {path}: no test AUROC in it"}
    best = results.val_auroc_best
    return {
        "val/auroc": math.nan if best is None else float(best),
        "test/auroc": auroc.mean,
        "test ci95": auroc.ci95,
        "steps": "" if results.global_step is None else results.global_step,
        "status": "done",
    }


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


# on the console (the files keep every column): the test AUROC and its CI in one column; what does
# not fit the terminal is dropped from the right (named below the table), overrides and status fold
SHOWN_COLUMNS = ("job", "overrides", "val/auroc", "test/auroc ± ci95", "status", "steps")
FOLDING = ("overrides", "status")


def _cell(row: dict, column: str) -> str:
    if column == "test/auroc ± ci95":
        auroc, ci = row["test/auroc"], row["test ci95"]
        return "nan" if math.isnan(auroc) else f"{auroc:.4f} ± {ci:.4f}"
    return _fmt(row[column])


def show(rows: list[dict], sweep: Path, console: Console) -> None:
    """The table at the console's width: numbers never wrap, overrides and status fold, columns
    that still do not fit are dropped and named; every path and command on one line."""

    def build(columns: list[str]) -> Table:
        table = Table(
            title=f"{len(rows)} jobs, best validation AUROC first",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
        )
        for column in columns:
            folds = column in FOLDING
            justify = "left" if folds else "right"
            table.add_column(column, justify=justify, no_wrap=not folds, overflow="fold")
        for i, row in enumerate(rows):
            cells = [escape(_cell(row, c)) for c in columns]
            style = "bold green" if i == 0 and row["status"] == "done" else None
            table.add_row(*cells, style=style)
        return table

    table, dropped = fitted(build, list(SHOWN_COLUMNS), console.width, FOLDING)
    one_line(console, f"sweep: {sweep}")
    console.print(table)
    if dropped:
        console.print(f"(not shown at this width: {', '.join(dropped)}; see sweep_summary.csv)")
    best = rows[0]
    if best["status"] == "done":
        console.print(
            f"best config (by val/auroc): job {best['job']}: {best['overrides'] or '(the only config)'}"
            f"  val {best['val/auroc']:.4f}, test {best['test/auroc']:.4f} ± {best['test ci95']:.4f}",
            markup=False,
            highlight=False,
        )
    missing = [row for row in rows if row["status"] != "done"]
    for row in missing[:SHOWN]:
        console.print(f"[yellow]job {escape(row['job'])}: {escape(row['status'])}[/yellow]", highlight=False)
    if len(missing) > SHOWN:
        console.print(f"[yellow]... and {len(missing) - SHOWN} more jobs without metrics[/yellow]")
    console.print("tables: sweep_summary.md and sweep_summary.csv in the sweep folder")
    logdir = sweep / "tensorboard" if (sweep / "tensorboard").is_dir() else sweep
    one_line(console, f"compare the runs: tensorboard --logdir {shlex.quote(str(logdir))}")


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
    show(rows, sweep, Console())
    return rows


class SummarizeAtEnd(Callback):
    """Hydra callback (``conf/train.yaml``): every ``-m`` sweep, a grid or an Optuna study, ends
    with the table ``metaad-summarize`` prints and writes for its folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        if not job_dirs(sweep):
            return  # nothing ran (every job refused): its message was the output
        try:
            summarize_sweep(sweep)
        except (SystemExit, RunFolderError, OSError) as error:  # the sweep's results stand as they are
            print(f"metaad-summarize: {error}", file=sys.stderr)


@app("summarize")
def main(cfg: DictConfig) -> None:
    summarize_sweep(cfg.sweep_dir)


if __name__ == "__main__":
    main()
