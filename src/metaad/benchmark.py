"""``metaad-benchmark``: every learner beside every baseline, on fixed test episodes of unseen tasks.

    metaad-benchmark                                # preset=cpu (make benchmark)
    metaad-benchmark preset=quick                   # a few minutes (make benchmark-quick)
    metaad-benchmark 'suites=[digits,mvtec]'        # some suites of the preset
    metaad-benchmark 'overrides=[trainer.max_epochs=2]' preset.suites.digits.models=[protonet]

A preset (``conf/preset/*.yaml``) lists suites: an experiment (``conf/experiment/``, the
protocol), its folds (e.g. each MVTec category held out in turn), the learners, the K values and
seeds. Each learner is meta-trained once per fold and seed at ``train_k_shot`` (selection on
validation tasks only; ``k_shot_models`` (true, or a list of models) trains one model per K
instead, as OC-MAML does)
and its best checkpoint scored at every K; the baselines are scored on the very same test
episodes. Per-episode results of all folds and seeds are pooled into mean ± 95% CI. Writes
``results.csv``, ``results.md`` (the headline table with each learner's verdict against the best
baseline, then every detector) and ``preset.yaml`` into the run folder, and prints the tables.
Rerun with the same ``hydra.run.dir`` after a kill: finished evaluations are reused and an
interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metaad.build import compose_config
from metaad.cli import app
from metaad.eval import evaluate
from metaad.train import train

console = Console()


def folds_of(suite: DictConfig) -> list[list[str]]:
    """Override lists, one per fold: explicit ``folds`` or a ``leave_one_out`` rotation.

    ``leave_one_out: {tasks, val_offset}`` validates on the task ``val_offset`` places along the
    list; ``leave_one_out: {tasks, val_tasks}`` on fixed validation tasks (MT-MNIST: digit 9).
    Neither is ever the test task or trained on.
    """
    if "leave_one_out" in suite:
        rotation = suite.leave_one_out
        tasks = list(rotation.tasks)
        if rotation.get("val_tasks") is not None:
            fixed = ",".join(str(t) for t in rotation.val_tasks)
            return [[f"dataset.test_tasks=[{t}]", f"dataset.val_tasks=[{fixed}]"] for t in tasks]
        offset = rotation.get("val_offset", 1)
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


def per_k(suite: DictConfig, model: str) -> bool:
    """Whether ``model`` is trained once per K (``k_shot_models: true`` or a list of models)."""
    chosen = suite.get("k_shot_models", False)
    return model in chosen if OmegaConf.is_list(chosen) else bool(chosen)


def run(preset: DictConfig, out_dir: Path, extra: list[str], only: list[str] | None) -> list[dict]:
    unknown = set(only or []) - set(preset.suites)
    if unknown:
        raise SystemExit(f"suites: {sorted(unknown)} not in this preset, which has {list(preset.suites)}")
    jobs = [
        (name, suite, fold_index, fold, model, seed, k_train)
        for name, suite in preset.suites.items()
        if not only or name in only
        for fold_index, fold in enumerate(folds_of(suite))
        for seed in suite.get("seeds", [0])
        for model in suite.models
        for k_train in (suite.k_shots if per_k(suite, model) else [suite.train_k_shot])
    ]
    collected: dict[tuple, list[dict]] = defaultdict(list)  # (suite, K, detector, metric) -> per-fold
    quiet = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with progress:
        bar = progress.add_task("benchmark", total=len(jobs))
        for name, suite, fold_index, fold, model, seed, k_train in jobs:
            progress.update(bar, description=f"{name} fold {fold_index} seed {seed} {model} K={k_train}")
            run_dir = out_dir / "runs" / name / f"fold{fold_index}" / f"seed{seed}" / f"{model}_k{k_train}"
            overrides = [f"experiment={suite.experiment}", *fold, f"model={model}", f"seed={seed}"]
            overrides += [*suite.get("overrides", []), *suite.get("model_overrides", {}).get(model, [])]
            overrides += [f"dataset.k_shot={k_train}", "test=false", "baselines=none", *extra, *quiet]
            ks = [k_train] if per_k(suite, model) else list(suite.k_shots)
            done = {k: run_dir / f"eval_k{k}" / "metrics.json" for k in ks}
            if not all(path.is_file() for path in done.values()):
                _train_or_resume(overrides, run_dir / "train")
            checkpoint = run_dir / "train" / "checkpoints" / "best.ckpt"
            first_model = model == suite.models[0]
            for k in ks:
                if done[k].is_file():  # a rerun into the same folder reuses what a killed one finished
                    metrics = json.loads(done[k].read_text())
                    _collect(collected, name, k, model, metrics)
                    continue
                shutil.rmtree(run_dir / f"eval_k{k}", ignore_errors=True)
                eval_overrides = [f"ckpt_path={checkpoint}", f"+dataset.k_shot={k}", *quiet]
                eval_overrides += [
                    f"+dataset.{key}={value}" for key, value in suite.get("eval_dataset", {}).items()
                ]
                eval_overrides += [
                    f"baselines={suite.get('baselines', 'all')}" if first_model else "baselines=none"
                ]
                eval_overrides += list(suite.get("eval_overrides", []))
                metrics = evaluate(compose_config(eval_overrides, run_dir / f"eval_k{k}", "eval"))
                _collect(collected, name, k, model, metrics)
            progress.advance(bar)
    return [
        {"suite": name, "k_shot": k, "detector": detector, "metric": metric, **merge_summaries(parts)}
        for (name, k, detector, metric), parts in collected.items()
    ]


def _train_or_resume(overrides: list[str], train_dir: Path) -> None:
    """Train in ``train_dir``; a folder left by a killed benchmark resumes from its last checkpoint."""
    if (train_dir / "checkpoints" / "last.ckpt").is_file():
        train(compose_config([*overrides, "ckpt_path=last"], train_dir))
        return
    shutil.rmtree(train_dir, ignore_errors=True)  # killed before its first checkpoint
    train(compose_config(overrides, train_dir))


def _collect(collected: dict, suite: str, k: int, model: str, metrics: dict) -> None:
    detectors = {model: metrics["test"], **{f"baseline:{b}": v for b, v in metrics["baselines"].items()}}
    for detector, values in detectors.items():
        for metric, summary in values.items():
            collected[(suite, k, detector, metric)].append(summary)


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
        best_name = max(
            (
                (m["auroc"]["mean"], d)
                for (s, kk, d), m in by_key.items()
                if s == suite and kk == k and d.startswith("baseline:")
            ),
            default=(float("nan"), ""),
        )[1]
        best_ci = by_key[(suite, k, best_name)]["auroc"]["ci95"] if best_name else float("nan")
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
                "best_baseline": best_name.removeprefix("baseline:"),
                "verdict": verdict(auroc["mean"], auroc["ci95"], best_baseline, best_ci),
                "reference": references.get(suite, {}).get(str(k), ""),
            }
        )
    out.sort(key=lambda r: (r["suite"], r["k_shot"], -r["auroc"]))
    return out


def verdict(mean: float, ci: float, base_mean: float, base_ci: float) -> str:
    """``beats`` / ``below`` when the 95% CIs do not overlap, else ``within CIs``."""
    if math.isnan(base_mean):
        return ""
    if mean - ci > base_mean + base_ci:
        return "beats"
    if mean + ci < base_mean - base_ci:
        return "below"
    return "within CIs"


def headline(rows: list[dict]) -> list[str]:
    """Per suite and K: each learner against the best baseline there, with the verdict."""
    lines = [
        "| suite | K | learner | AUROC ± 95% CI | best baseline | its AUROC | gap | verdict | bal. acc. "
        "| baseline bal. acc. | reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["suite"], r["k_shot"], r["detector"]): r for r in rows}
    for r in rows:
        if r["detector"].startswith("baseline:"):
            continue
        base = by.get((r["suite"], r["k_shot"], f"baseline:{r['best_baseline']}"))
        base_auroc = f"{base['auroc']:.3f} ± {base['auroc_ci95']:.3f}" if base else ""
        lines.append(
            f"| {r['suite']} | {r['k_shot']} | {r['detector']} | {r['auroc']:.3f} ± {r['auroc_ci95']:.3f} | "
            f"{r['best_baseline']} | {base_auroc} | {r['vs_best_baseline']:+.3f} | **{r['verdict']}** | "
            f"{_pct(r['balanced_accuracy'])} | {_pct(base['balanced_accuracy']) if base else ''} | "
            f"{r['reference']} |"
        )
    return lines


def what_ran(preset: DictConfig, only: list[str] | None, command: str) -> list[str]:
    """The protocol lengths behind the numbers: each suite's experiment and its ``cpu_length`` note."""
    lines = ["", f"What ran (`{command}`):", ""]
    for name, suite in preset.suites.items():
        if not only or name in only:
            note = suite.get("cpu_length", "the experiment's own (paper) length")
            lines.append(f"- `{name}`: experiment `{suite.experiment}`; length: {note}")
    return lines


def compared(rows: list[dict], preset: DictConfig) -> list[str]:
    """Suites run as a variant of another on the same test episodes (``compare_to``: the
    entity-only split beside the entity x time one): each learner's AUROC in both and the
    difference, with a CI from the two CIs (conservative: the episodes are paired)."""
    by = {(r["suite"], r["k_shot"], r["detector"]): r for r in rows}
    lines = []
    for name, suite in preset.suites.items():
        other = suite.get("compare_to")
        for r in rows:
            if other is None or r["suite"] != name or r["detector"].startswith("baseline:"):
                continue
            base = by.get((other, r["k_shot"], r["detector"]))
            if base is None:
                continue
            ci = math.hypot(r["auroc_ci95"], base["auroc_ci95"])
            lines.append(
                f"| {name} | {other} | {r['k_shot']} | {r['detector']} | "
                f"{r['auroc']:.3f} ± {r['auroc_ci95']:.3f} | "
                f"{base['auroc']:.3f} ± {base['auroc_ci95']:.3f} | "
                f"{r['auroc'] - base['auroc']:+.3f} ± {ci:.3f} |"
            )
    if not lines:
        return []
    header = [
        "",
        "Variants on the same test episodes (`compare_to`):",
        "",
        "| suite | compared to | K | learner | AUROC | its AUROC there | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    return header + lines


def write_tables(rows: list[dict], out_dir: Path, footer: list[str] = ()) -> str:
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [*headline(rows), "", "Every detector:", ""]
    lines += [
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
    markdown = "\n".join([*lines, *footer]) + "\n"
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


@app("benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    # read before the runs: each composes its own config into Hydra's global state
    command = " ".join(["metaad-benchmark", *HydraConfig.get().overrides.task])
    out_dir = Path(cfg.paths.output_dir)
    OmegaConf.save(cfg.preset, out_dir / "preset.yaml")
    only = list(cfg.suites) if cfg.get("suites") else None
    rows = run(cfg.preset, out_dir, list(cfg.overrides), only)
    rows = table_rows(rows, cfg.preset.get("references", {}))
    markdown = write_tables(
        rows, out_dir, [*compared(rows, cfg.preset), *what_ran(cfg.preset, only, command)]
    )
    print_table(rows)
    print(markdown)
    console.print(f"results: {out_dir / 'results.md'} and {out_dir / 'results.csv'}")


if __name__ == "__main__":
    main()
