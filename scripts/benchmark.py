"""The benchmark: every learner beside every baseline, on fixed test episodes of unseen tasks.

    python scripts/benchmark.py                 # preset=full (make benchmark)
    python scripts/benchmark.py preset=quick    # a few minutes (make benchmark-quick)
    python scripts/benchmark.py suites=digits,mvtec            # some suites of the preset
    python scripts/benchmark.py preset.suites.digits.models=[protonet] trainer.max_epochs=2

A preset (``conf/preset/*.yaml``) lists suites: a dataset protocol, its folds (e.g. each MVTec
category held out in turn), the learners, the K values. Each learner is meta-trained once per
fold (selection on validation tasks only) and its best checkpoint scored at every K; the
baselines are scored once per fold and K on the very same test episodes. Per-episode results
of all folds are pooled into mean ± 95% CI. Writes ``results.csv`` and ``results.md`` into
``outputs/benchmark/<time>/`` and prints the table.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metaad.build import compose_config
from metaad.eval import evaluate
from metaad.train import train

console = Console()


def folds_of(suite: DictConfig) -> list[list[str]]:
    """Override lists, one per fold: explicit ``folds`` or a ``leave_one_out`` rotation."""
    if "leave_one_out" in suite:
        tasks, offset = list(suite.leave_one_out.tasks), suite.leave_one_out.get("val_offset", 1)
        # Validation: the task `val_offset` places along the list; never the test task, never trained on.
        return [
            [f"dataset.test_tasks=[{t}]", f"dataset.val_tasks=[{tasks[(i + offset) % len(tasks)]}]"]
            for i, t in enumerate(tasks)
        ]
    return [list(fold) for fold in suite.get("folds", [[]])]


def merge_summaries(parts: list[dict]) -> dict:
    """Pool per-fold (mean, ci95, n) into the summary of all their episodes, exactly."""
    n = sum(p["n_episodes"] for p in parts)
    mean = sum(p["mean"] * p["n_episodes"] for p in parts) / n
    # Sum of squares from each part's sd (ci95 = 1.96 sd / sqrt(n)).
    ss = 0.0
    for p in parts:
        sd = p["ci95"] * math.sqrt(p["n_episodes"]) / 1.96 if p["n_episodes"] > 1 else 0.0
        ss += (p["n_episodes"] - 1) * sd**2 + p["n_episodes"] * (p["mean"] - mean) ** 2
    sd = math.sqrt(ss / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "ci95": 1.96 * sd / math.sqrt(n), "n_episodes": n}


def run(preset: DictConfig, out_dir: Path, extra: list[str], only: list[str] | None) -> list[dict]:
    unknown = set(only or []) - set(preset.suites)
    if unknown:
        raise SystemExit(f"suites: {sorted(unknown)} not in this preset, which has {list(preset.suites)}")
    jobs = [
        (name, suite, fold_index, fold, model)
        for name, suite in preset.suites.items()
        if not only or name in only
        for fold_index, fold in enumerate(folds_of(suite))
        for model in suite.models
    ]
    collected: dict[tuple, list[dict]] = defaultdict(list)  # (suite, K, detector, metric) -> per-fold
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with progress:
        bar = progress.add_task("benchmark", total=len(jobs))
        for name, suite, fold_index, fold, model in jobs:
            progress.update(bar, description=f"{name} fold {fold_index} {model}")
            run_dir = out_dir / "runs" / name / f"fold{fold_index}" / model
            overrides = [
                *suite.overrides,
                *fold,
                f"model={model}",
                *suite.get("model_overrides", {}).get(model, []),
            ]
            overrides += [f"dataset.k_shot={suite.train_k_shot}", "test=false", "baselines=none", *extra]
            overrides += [
                "logger=none",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
            ]
            train(compose_config(overrides, run_dir / "train"))
            checkpoint = run_dir / "train" / "checkpoints" / "best.ckpt"
            first_model = model == suite.models[0]
            for k in suite.k_shots:
                eval_overrides = [f"ckpt_path={checkpoint}", f"+dataset.k_shot={k}"]
                eval_overrides += [
                    f"+dataset.{key}={value}" for key, value in suite.get("eval_dataset", {}).items()
                ]
                eval_overrides += ["baselines=all" if first_model else "baselines=none", "logger=none"]
                eval_overrides += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
                metrics = evaluate(compose_config(eval_overrides, run_dir / f"eval_k{k}", "eval"))
                detectors = {
                    model: metrics["test"],
                    **{f"baseline:{b}": v for b, v in metrics["baselines"].items()},
                }
                for detector, values in detectors.items():
                    for metric, summary in values.items():
                        collected[(name, k, detector, metric)].append(summary)
            progress.advance(bar)
    rows = []
    for (name, k, detector, metric), parts in collected.items():
        if metric == "train_seconds":
            continue
        rows.append(
            {"suite": name, "k_shot": k, "detector": detector, "metric": metric, **merge_summaries(parts)}
        )
    return rows


def table_rows(rows: list[dict], references: DictConfig) -> list[dict]:
    """One row per (suite, K, detector) with AUROC and AUPR side by side, best AUROC first."""
    by_key: dict[tuple, dict] = {}
    for row in rows:
        entry = by_key.setdefault((row["suite"], row["k_shot"], row["detector"]), {})
        entry[row["metric"]] = row
    out = []
    for (suite, k, detector), metrics in by_key.items():
        best_baseline = max(
            (
                m["auroc"]["mean"]
                for (s, kk, d), m in by_key.items()
                if s == suite and kk == k and d.startswith("baseline:")
            ),
            default=float("nan"),
        )
        auroc = metrics["auroc"]
        out.append(
            {
                "suite": suite,
                "k_shot": k,
                "detector": detector,
                "auroc": auroc["mean"],
                "auroc_ci95": auroc["ci95"],
                "aupr": metrics.get("aupr", {}).get("mean", float("nan")),
                "aupr_ci95": metrics.get("aupr", {}).get("ci95", float("nan")),
                # at the run's threshold (learners only; baselines decide only with threshold.baselines)
                "balanced_accuracy": metrics.get("balanced_accuracy", {}).get("mean", float("nan")),
                "n_episodes": auroc["n_episodes"],
                "vs_best_baseline": auroc["mean"] - best_baseline,
                "reference": references.get(suite, {}).get(str(k), ""),
            }
        )
    out.sort(key=lambda r: (r["suite"], r["k_shot"], -r["auroc"]))
    return out


def write_tables(rows: list[dict], out_dir: Path) -> str:
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| suite | K | detector | AUROC ± 95% CI | AUPR ± 95% CI | vs best baseline | bal. acc. | episodes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "" if r["detector"].startswith("baseline:") else f"{r['vs_best_baseline']:+.3f}"
        lines.append(
            f"| {r['suite']} | {r['k_shot']} | {r['detector']} | {r['auroc']:.3f} ± {r['auroc_ci95']:.3f} | "
            f"{r['aupr']:.3f} ± {r['aupr_ci95']:.3f} | {gap} | {_pct(r['balanced_accuracy'])} | "
            f"{r['n_episodes']} |"
        )
    markdown = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(markdown)
    return markdown


def _pct(value: float) -> str:
    return "" if math.isnan(value) else f"{100 * value:.1f}%"


def print_table(rows: list[dict]) -> None:
    table = Table(title="metaad benchmark: mean AUROC over fixed test episodes of unseen tasks")
    for column in (
        "suite",
        "K",
        "detector",
        "AUROC ± CI",
        "AUPR",
        "vs best baseline",
        "bal. acc.",
        "reference",
    ):
        table.add_column(column)
    for r in rows:
        learner = not r["detector"].startswith("baseline:")
        gap = f"{r['vs_best_baseline']:+.3f}" if learner else ""
        style = ("green" if r["vs_best_baseline"] > 0 else "red") if learner else None
        table.add_row(
            r["suite"],
            str(r["k_shot"]),
            r["detector"],
            f"{r['auroc']:.3f} ± {r['auroc_ci95']:.3f}",
            f"{r['aupr']:.3f}",
            gap,
            _pct(r["balanced_accuracy"]),
            r["reference"],
            style=style,
        )
    console.print(table)


def main(argv: list[str]) -> None:
    only = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("suites=")]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = Path("outputs/benchmark") / "_".join([stamp, *(only[0] if only else [])])
    preset_overrides = [a for a in argv if a.startswith("preset")]
    extra = [a for a in argv if not a.startswith(("preset", "suites="))]
    cfg = compose_config(preset_overrides or ["preset=full"], out_dir, "benchmark")
    OmegaConf.save(cfg.preset, out_dir / "preset.yaml")
    rows = run(cfg.preset, out_dir, extra, only[0] if only else None)
    rows = table_rows(rows, cfg.preset.get("references", {}))
    markdown = write_tables(rows, out_dir)
    print_table(rows)
    print(markdown)
    console.print(f"results: {out_dir / 'results.md'} and {out_dir / 'results.csv'}")


if __name__ == "__main__":
    main(sys.argv[1:])
