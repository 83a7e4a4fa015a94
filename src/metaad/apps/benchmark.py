"""``metaad-benchmark``: every learner beside every baseline, on fixed test episodes of unseen tasks.

    metaad-benchmark                                # preset=cpu (make benchmark)
    metaad-benchmark preset=quick                   # a few minutes (make benchmark-quick)
    metaad-benchmark 'suites=[digits,mvtec]'        # some suites of the preset
    metaad-benchmark 'overrides=["trainer.max_epochs=2"]' preset.suites.digits.models=[protonet]

A preset (``conf/preset/*.yaml``) lists suites: an experiment (``conf/experiment/``, the
protocol), its folds (e.g. each MVTec category held out in turn), the learners, the K values and
seeds. Each learner is meta-trained once per fold and seed at ``train_k_shot`` (selection on
validation tasks only; ``k_shot_models`` (true, or a list of models) trains one model per K
instead, as OC-MAML does)
and its best checkpoint scored at every K; the baselines are scored on the very same test
episodes. Per-episode results of all folds and seeds are pooled into mean ± 95% CI. Writes
``results.csv``, ``results.md`` (the headline table with each learner's verdict against the best
baseline, then every detector) and ``preset.yaml`` into the run folder, and prints the tables.
Series suites add the stream metrics (each held-out entity's test part after the cut, a score a
step; ``stream_k_shots`` limits the K values they are measured at) in a table of their own.
``best_baseline: val`` chooses the baseline of each verdict by its AUROC on the validation tasks
(``test``, the default kept by the older suites: on the test episodes themselves); ``train_with:
<suite>`` scores another suite's trained models another way (``eval_dataset``: e.g. the first K
windows as support) without training them again.
Every suite and every training's config is checked before the first one trains. Rerun with the
same ``hydra.run.dir`` after a kill: an evaluation is reused only when the full resolved config it
ran with (its training's and its own, stored beside it as ``benchmark_config.json``) is the one it
would run with now, an interrupted training of the same config resumes from its last checkpoint,
and each reused, rerun or retrained one is named on the console and counted under "What ran".
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metaad import files
from metaad.apps.build import compose_config, plain, reuse_sources
from metaad.apps.checks import check_train_config
from metaad.apps.cli import app
from metaad.apps.eval import evaluate
from metaad.apps.train import train
from metaad.errors import ConfigError
from metaad.evaluation.results import RunResults, Summary, verdict
from metaad.training.resume import _differences

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


def per_k(suite: DictConfig, model: str) -> bool:
    """Whether ``model`` is trained once per K (``k_shot_models: true`` or a list of models)."""
    chosen = suite.get("k_shot_models", False)
    return model in chosen if OmegaConf.is_list(chosen) else bool(chosen)


@dataclass
class Job:
    """One learner trained once (a suite's fold, seed, model and training K) and scored at ``ks``.

    ``train_dir`` is where it trains: its own ``run_dir / "train"``, or, for a suite that
    ``train_with`` another (the same models evaluated another way, e.g. with the first K windows
    as support), that suite's training of the same fold, seed and model, trained once for both.
    """

    suite_name: str
    suite: DictConfig
    fold_index: int
    fold: list[str]
    model: str
    seed: int
    k_train: int
    run_dir: Path
    train_dir: Path | None = None
    train_suite: DictConfig | None = None

    def __post_init__(self) -> None:
        self.train_dir = self.train_dir or self.run_dir / "train"
        self.train_suite = self.train_suite if self.train_suite is not None else self.suite

    @property
    def label(self) -> str:
        where = f"suite {self.suite_name}, fold {self.fold_index}, seed {self.seed}"
        return f"{where}, {self.model} K={self.k_train}"

    @property
    def ks(self) -> list[int]:
        return [self.k_train] if per_k(self.suite, self.model) else list(self.suite.k_shots)

    def overrides(self, extra: list[str]) -> list[str]:
        suite, model = self.train_suite, self.model
        overrides = [f"experiment={suite.experiment}", *self.fold, f"model={model}", f"seed={self.seed}"]
        overrides += [*suite.get("overrides", []), *suite.get("model_overrides", {}).get(model, [])]
        return [*overrides, f"dataset.k_shot={self.k_train}", "test=false", "baselines=none", *extra, *QUIET]


QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# What each training and evaluation of the benchmark ran with (its resolved config), beside its results:
# a rerun into the same folder reuses an evaluation only when this matches the config it would run now.
RECORD = "benchmark_config.json"


def check_preset(preset: DictConfig, preset_name: str, only: list[str] | None) -> None:
    """Each chosen suite names an experiment, learners, K values and folds: said at start-up, by name."""
    suites = list(preset.get("suites") or {})
    unknown = set(only or []) - set(suites)
    if unknown:
        raise ConfigError(f"suites: {sorted(unknown)} not in preset={preset_name}, which has {suites}")
    if not preset.get("suites"):
        raise ConfigError(f"preset={preset_name} lists no suites (preset.suites is empty)")
    for name, suite in preset.suites.items():
        if only and name not in only:
            continue
        where = f"preset={preset_name}, suite {name}"
        if not isinstance(suite, DictConfig):
            raise ConfigError(
                f"{where}: a suite is a mapping (experiment, models, train_k_shot, k_shots), got {suite!r}"
            )
        if not suite.get("experiment"):
            raise ConfigError(f"{where}: no experiment; name one of conf/experiment/ (experiment: digits)")
        for key, example in (("models", "[protonet]"), ("k_shots", "[5]")):
            value = suite.get(key)
            if not OmegaConf.is_list(value) or not value:
                what = "no learners" if key == "models" else "no K values"
                raise ConfigError(
                    f"{where} has {what} ({key}: {value!r}); list at least one: "
                    f"preset.suites.{name}.{key}={example}"
                )
        if not isinstance(suite.get("train_k_shot"), int) or isinstance(suite.get("train_k_shot"), bool):
            raise ConfigError(f"{where}: train_k_shot must be an integer, got {suite.get('train_k_shot')!r}")
        if not folds_of(suite):
            raise ConfigError(f"{where} has no folds (folds: []); leave folds out for one fold")
        streamed = suite.get("stream_k_shots")
        if streamed is not None and (not OmegaConf.is_list(streamed) or set(streamed) - set(suite.k_shots)):
            raise ConfigError(
                f"{where}: stream_k_shots must list some of its k_shots {list(suite.k_shots)}, "
                f"got {streamed!r}"
            )
        rule = suite.get("best_baseline", "test")
        if rule not in BEST_BASELINE:
            raise ConfigError(
                f"{where}: best_baseline must be one of {list(BEST_BASELINE)} (the split whose AUROC "
                f"chooses the baseline of a verdict), got {rule!r}"
            )


# how a suite's "best baseline" is chosen: on the validation tasks' AUROC (a choice a user can make
# before seeing the test tasks) or, as the older suites did, on the test tasks' AUROC itself
BEST_BASELINE = {
    "val": "chosen by AUROC on the validation tasks",
    "test": "chosen by AUROC on the test episodes themselves",
}
# what a suite that trains with another takes from it (its own training keys would be ignored)
TRAINING_KEYS = (
    "experiment",
    "folds",
    "leave_one_out",
    "models",
    "seeds",
    "train_k_shot",
    "overrides",
    "model_overrides",
    "k_shot_models",
)


def resolved(preset: DictConfig, preset_name: str = "?") -> DictConfig:
    """The preset with each ``train_with`` suite given its training suite's training keys."""
    suites = preset.get("suites") or {}
    out = OmegaConf.create({k: v for k, v in preset.items() if k != "suites"})
    out.suites = {}
    for name, suite in suites.items():
        source = suite.get("train_with") if isinstance(suite, DictConfig) else None
        if source is None:
            out.suites[name] = suite
            continue
        where = f"preset={preset_name}, suite {name}"
        other = suites.get(source)
        if not isinstance(other, DictConfig) or other.get("train_with") is not None:
            raise ConfigError(
                f"{where}: train_with: {source!r} must name another suite of the preset that trains "
                f"itself (suites: {list(suites)})"
            )
        own = [key for key in TRAINING_KEYS if key in suite]
        if own:
            raise ConfigError(
                f"{where} trains with suite {source} and takes its {own} from there; leave them out"
            )
        merged = OmegaConf.merge({k: other[k] for k in TRAINING_KEYS if k in other}, suite)
        if per_k(merged, merged.models[0]) or merged.get("k_shot_models"):
            raise ConfigError(
                f"{where}: train_with needs one model per fold scored at every K (no k_shot_models)"
            )
        out.suites[name] = merged
    return out


def jobs_of(preset: DictConfig, out_dir: Path, only: list[str] | None) -> list[Job]:
    def folder(name: str, fold_index: int, seed: int, model: str, k_train: int) -> Path:
        return out_dir / "runs" / name / f"fold{fold_index}" / f"seed{seed}" / f"{model}_k{k_train}"

    jobs = []
    for name, suite in preset.suites.items():
        if only and name not in only:
            continue
        source = suite.get("train_with") or name
        for fold_index, fold in enumerate(folds_of(suite)):
            for seed in suite.get("seeds", [0]):
                for model in suite.models:
                    for k_train in suite.k_shots if per_k(suite, model) else [suite.train_k_shot]:
                        run_dir = folder(name, fold_index, seed, model, k_train)
                        train_dir = folder(source, fold_index, seed, model, k_train) / "train"
                        train_suite = preset.suites[source]
                        jobs.append(
                            Job(
                                name,
                                suite,
                                fold_index,
                                fold,
                                model,
                                seed,
                                k_train,
                                run_dir,
                                train_dir,
                                train_suite,
                            )
                        )
    return jobs


def check_jobs(jobs: list[Job], extra: list[str]) -> list[dict]:
    """Every training's config composed and checked before the first one trains; their resolved configs."""
    from metaad.apps.messages import message

    configs = []
    for job in jobs:
        try:
            cfg = compose_config(job.overrides(extra), job.train_dir, create=False)
            check_train_config(cfg)
            configs.append(plain(cfg))
        except Exception as error:
            text = message(error)
            if text is None:
                raise
            raise ConfigError(f"{job.label}: {text}") from error
    return configs


Pooled = dict[tuple[str, int, str], dict[str, Summary]]  # (suite, K, detector) -> metric -> summary


def run(
    preset: DictConfig, out_dir: Path, extra: list[str], only: list[str] | None, preset_name: str = "?"
) -> tuple[Pooled, dict[str, Counter]]:
    """Every job's results, pooled per (suite, K, detector) over folds and seeds; and per suite, how
    many evaluations were reused from an earlier run into this folder and how many ran now."""
    preset = resolved(preset, preset_name)
    check_preset(preset, preset_name, only)
    jobs = jobs_of(preset, out_dir, only)
    configs = check_jobs(jobs, extra)
    collected: dict[tuple, list[Summary]] = defaultdict(list)  # (suite, K, detector, metric) -> per-fold
    counts: dict[str, Counter] = defaultdict(Counter)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with progress, reuse_sources():
        bar = progress.add_task("benchmark", total=len(jobs))
        for job, train_config in zip(jobs, configs):
            progress.update(bar, description=job.label)
            name, model, run_dir = job.suite_name, job.model, job.run_dir
            evals = {k: run_dir / f"eval_k{k}" for k in job.ks}
            eval_configs = {k: plain(_eval_config(job, k, create=False)) for k in job.ks}
            wanted = {k: _normal({"train": train_config, "eval": eval_configs[k]}) for k in job.ks}
            reusable = {k: _matches(evals[k], wanted[k]) for k in job.ks}
            if not all(reusable.values()):
                _train(job, extra, train_config, progress.console)
            for k in job.ks:
                folder = evals[k]
                if reusable[k]:  # the same full config: what an earlier run finished is reused
                    results = RunResults.read(folder / "metrics.json")
                    counts[name]["reused"] += 1
                    progress.console.print(f"reused: {job.label}, evaluated at K={k} (same config)")
                else:
                    if folder.exists():
                        why = _why_rerun(folder, wanted[k])
                        kept = _set_aside(folder)
                        progress.console.print(
                            f"rerun: {job.label}, evaluated at K={k}: {why} (kept as {kept.name})"
                        )
                    results = evaluate(_eval_config(job, k))
                    _write_record(folder, wanted[k])
                    counts[name]["run"] += 1
                _collect(collected, name, k, model, results)
            progress.advance(bar)
    pooled: Pooled = defaultdict(dict)
    for (name, k, detector, metric), parts in collected.items():
        pooled[(name, k, detector)][metric] = Summary.pooled(parts)
    return dict(pooled), counts


def _eval_config(job: Job, k: int, create: bool = True) -> DictConfig:
    """The config of ``metaad-eval`` scoring ``job``'s best checkpoint at K=``k``."""
    suite, checkpoint = job.suite, job.train_dir / "checkpoints" / "best.ckpt"
    overrides = [f"ckpt_path={checkpoint}", f"+dataset.k_shot={k}", *QUIET]
    overrides += [f"+dataset.{key}={value}" for key, value in suite.get("eval_dataset", {}).items()]
    first_model = job.model == suite.models[0]
    overrides += [f"baselines={suite.get('baselines', 'all')}" if first_model else "baselines=none"]
    overrides += list(suite.get("eval_overrides", []))
    streamed = suite.get("stream_k_shots")  # K values scored as streams too (default: every K)
    if streamed is not None and k not in streamed:
        overrides.append("stream=false")
    return compose_config(overrides, job.run_dir / f"eval_k{k}", "eval", create=create)


def _normal(config: dict) -> dict:
    """``config`` as it reads back from its JSON record (lists, string keys), for comparing."""
    return json.loads(json.dumps(config))


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_record(folder: Path, config: dict) -> None:
    text = json.dumps(config, indent=1, sort_keys=True)
    files.write_atomically(folder / RECORD, lambda partial: partial.write_text(text))


def _matches(folder: Path, wanted: dict) -> bool:
    return (folder / "metrics.json").is_file() and _read_record(folder) == wanted


def _why_rerun(folder: Path, wanted: dict, results: str = "metrics.json", stored: dict | None = None) -> str:
    """Why what ``folder`` holds is not reused: unfinished, of an unknown config, or what changed."""
    stored = stored if stored is not None else _read_record(folder)
    if not (folder / results).exists():
        return "unfinished"
    if stored is None:
        return "no record of the config it ran with"
    changed = _differences(stored, wanted)
    if not changed:
        return "unfinished"
    listed = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, old, new in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f"config changed ({listed}{more})"


def _train(job: Job, extra: list[str], config: dict, console: Console) -> None:
    """Train ``job`` in its ``train`` folder; a training of the same config left by a killed
    benchmark resumes from its last checkpoint, one of another config is replaced."""
    train_dir = job.train_dir
    overrides = job.overrides(extra)
    wanted, finished = _normal({"train": config}), _normal({"train": config, "finished": True})
    stored = _read_record(train_dir)
    if stored == finished and (train_dir / "checkpoints" / "best.ckpt").is_file():
        return  # trained with this config: only evaluations are missing
    if stored == wanted and (train_dir / "checkpoints" / "last.ckpt").is_file():
        train(compose_config([*overrides, "ckpt_path=last"], train_dir))
    else:
        if train_dir.exists():
            stored = {"train": stored.get("train")} if isinstance(stored, dict) else None
            why = _why_rerun(train_dir, wanted, "checkpoints", stored)
            console.print(
                f"retrained: {job.label}: {why} (the earlier one kept as {_set_aside(train_dir).name})"
            )
        cfg = compose_config(overrides, train_dir)
        _write_record(train_dir, wanted)
        train(cfg)
    _write_record(train_dir, finished)


def _set_aside(folder: Path) -> Path:
    """Rename an earlier run's folder out of the way (``<name>.replaced-<n>``): a rerun never deletes
    what an earlier run wrote."""
    n = 1
    while (kept := folder.with_name(f"{folder.name}.replaced-{n}")).exists():
        n += 1
    folder.rename(kept)
    return kept


def _collect(collected: dict, suite: str, k: int, model: str, results: RunResults) -> None:
    """Each detector's test metrics, its validation ones as ``val/<metric>`` (they choose a
    suite's best baseline where it says so) and its stream metrics as ``stream/<metric>``."""

    def key(detector: str) -> str:
        return model if detector == results.learner else f"baseline:{detector}"

    parts = [("", {results.learner: results.test, **results.baselines}), ("val/", results.val)]
    if results.stream is not None:
        parts.append(("stream/", results.stream.detectors))
    for prefix, detectors in parts:
        for detector, values in detectors.items():
            for metric, summary in values.items():
                collected[(suite, k, key(detector), prefix + metric)].append(summary)


def table_rows(
    pooled: Pooled,
    references: DictConfig,
    rules: dict[str, str] | None = None,
    against: dict[str, str] | None = None,
) -> list[dict]:
    """One row per (suite, K, detector) with AUROC and AUPR side by side, best AUROC first; each
    with its verdict against the best baseline of its suite and K, chosen by the suite's rule
    (``rules[suite]``: ``val`` by the validation AUROC, ``test``, the default, by the test AUROC).
    Series suites add the stream metrics, with a verdict on VUS-PR against the same baseline."""
    nan = Summary(math.nan, math.nan, 0)
    rules = rules or {}
    out = []
    for (suite, k, detector), metrics in pooled.items():
        rule = rules.get(suite, "test")
        chooser = "val/auroc" if rule == "val" else "auroc"
        baselines = {
            d: m.get(chooser, nan)
            for (s, kk, d), m in pooled.items()
            if s == suite and kk == k and d.startswith("baseline:")
        }
        known = {d: v for d, v in baselines.items() if not math.isnan(v.mean)}
        best_name = max(known, key=lambda d: known[d].mean, default="")
        if f"baseline:{(against or {}).get(suite)}" in baselines:  # the suite's verdict_against
            best_name = f"baseline:{against[suite]}"
        best_metrics = pooled.get((suite, k, best_name), {})
        best = best_metrics.get("auroc", nan)
        auroc = metrics["auroc"]
        row = {
            "suite": suite,
            "k_shot": k,
            "detector": detector,
            "auroc": auroc.mean,
            "auroc_ci95": auroc.ci95,
            "aupr": metrics.get("aupr", nan).mean,
            "aupr_ci95": metrics.get("aupr", nan).ci95,
            # at the run's threshold (learners only; baselines decide only with threshold.baselines)
            "balanced_accuracy": metrics.get("balanced_accuracy", nan).mean,
            "n_episodes": auroc.n_episodes,
            "vs_best_baseline": auroc.mean - best.mean,
            "best_baseline": best_name.removeprefix("baseline:"),
            "best_baseline_rule": rule,
            "verdict": verdict(auroc, best),
            "reference": references.get(suite, {}).get(str(k), ""),
        }
        if any(m.startswith("stream/") for m in metrics):
            for metric in STREAM_METRICS:
                value = metrics.get(f"stream/{metric}", nan)
                row |= {f"stream_{metric}": value.mean, f"stream_{metric}_ci95": value.ci95}
            vus, best_vus = metrics.get("stream/vus_pr", nan), best_metrics.get("stream/vus_pr", nan)
            row["stream_entities"] = metrics.get("stream/auroc", nan).n
            row["stream_vs_best_baseline"] = vus.mean - best_vus.mean
            row["stream_verdict"] = verdict(vus, best_vus)
        out.append(row)
    out.sort(key=lambda r: (r["suite"], r["k_shot"], -r["auroc"]))
    return out


# the stream metrics in the tables (of metaad.evaluation.stream_metrics; each mean ± CI over entities)
STREAM_METRICS = ("auroc", "aupr", "vus_pr", "best_f1", "f1_support")


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
            f"{_best_name(r)} | {base_auroc} | {r['vs_best_baseline']:+.3f} | **{r['verdict']}** | "
            f"{_pct(r['balanced_accuracy'])} | {_pct(base['balanced_accuracy']) if base else ''} | "
            f"{r['reference']} |"
        )
    return lines


def _best_name(row: dict) -> str:
    """The best baseline's name, marked ``(val)`` where validation chose it."""
    suffix = " (val)" if row.get("best_baseline_rule") == "val" and row["best_baseline"] else ""
    return row["best_baseline"] + suffix


def _ci(row: dict, key: str) -> str:
    value = row.get(key, math.nan)
    return "" if math.isnan(value) else f"{value:.3f} ± {row[key + '_ci95']:.3f}"


def stream_headline(rows: list[dict]) -> list[str]:
    """Series suites: each learner against the same best baseline on the streams (each held-out
    entity's test part after the cut, a score a step; CIs over entities), verdict on VUS-PR."""
    streamed = [r for r in rows if "stream_auroc" in r and not r["detector"].startswith("baseline:")]
    if not streamed:
        return []
    by = {(r["suite"], r["k_shot"], r["detector"]): r for r in rows}
    lines = [
        "",
        "Streams: each held-out entity's test part after the cut scored a step at a time (the W - 1 steps "
        "before the cut as context), mean ± 95% CI over entities; the same best baseline as above; "
        "F1 without point adjustment (best: at the stream's own best threshold, an upper bound; at "
        "support thr.: at a threshold fitted from the K support windows alone, K >= 3):",
        "",
        "| suite | K | learner | AUROC | VUS-PR | best baseline | its AUROC | its VUS-PR | gap (VUS-PR) "
        "| verdict (VUS-PR) | best F1 | its best F1 | F1 at support thr. | its F1 at support thr. "
        "| entities |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in streamed:
        base = by.get((r["suite"], r["k_shot"], f"baseline:{r['best_baseline']}"), {})
        gap = r["stream_vs_best_baseline"]
        lines.append(
            f"| {r['suite']} | {r['k_shot']} | {r['detector']} | {_ci(r, 'stream_auroc')} | "
            f"{_ci(r, 'stream_vus_pr')} | {_best_name(r)} | {_ci(base, 'stream_auroc')} | "
            f"{_ci(base, 'stream_vus_pr')} | {'' if math.isnan(gap) else f'{gap:+.3f}'} | "
            f"**{r['stream_verdict']}** | {_ci(r, 'stream_best_f1')} | {_ci(base, 'stream_best_f1')} | "
            f"{_ci(r, 'stream_f1_support') or 'needs K >= 3'} | {_ci(base, 'stream_f1_support')} | "
            f"{r['stream_entities']} |"
        )
    return lines


def what_ran(
    preset: DictConfig, only: list[str] | None, command: str, counts: dict[str, Counter] | None = None
) -> list[str]:
    """The protocol lengths behind the numbers: each suite's experiment and its ``cpu_length`` note,
    and how many of its evaluations an earlier run into this folder had finished with the same config."""
    lines = ["", f"What ran (`{command}`):", ""]
    for name, suite in preset.suites.items():
        if not only or name in only:
            note = suite.get("cpu_length", "the experiment's own (paper) length")
            done = (counts or {}).get(name, Counter())
            reused = (
                f"; evaluations: {done['run']} run now, {done['reused']} reused from an earlier run into "
                "this folder with the same full config"
                if done["reused"]
                else ""
            )
            rule = suite.get("best_baseline", "test")
            trained = f"; the models of `{suite.train_with}`" if suite.get("train_with") else ""
            judged = (
                f"; verdicts against baseline {suite.verdict_against}"
                if suite.get("verdict_against")
                else f"; best baseline {BEST_BASELINE[rule]}"
            )
            lines.append(
                f"- `{name}`: experiment `{suite.experiment}`{trained}; length: {note}{judged}{reused}"
            )
    return lines


def compared(rows: list[dict], preset: DictConfig) -> list[str]:
    """Suites run as a variant of another on the same test episodes (``compare_to``: the
    entity-only split beside the entity x time one): each learner's AUROC in both and the
    difference, with a CI from the two CIs (conservative: the episodes are paired)."""
    by = {(r["suite"], r["k_shot"], r["detector"]): r for r in rows}
    lines, streamed = [], False
    for name, suite in preset.suites.items():
        other = suite.get("compare_to")
        for r in rows:
            if other is None or r["suite"] != name or r["detector"].startswith("baseline:"):
                continue
            base = by.get((other, r["k_shot"], r["detector"]))
            if base is None:
                continue
            ci = math.hypot(r["auroc_ci95"], base["auroc_ci95"])
            line = (
                f"| {name} | {other} | {r['k_shot']} | {r['detector']} | "
                f"{r['auroc']:.3f} ± {r['auroc_ci95']:.3f} | "
                f"{base['auroc']:.3f} ± {base['auroc_ci95']:.3f} | "
                f"{r['auroc'] - base['auroc']:+.3f} ± {ci:.3f} |"
            )
            if "stream_vus_pr" in r and "stream_vus_pr" in base:
                streamed = True
                ci = math.hypot(r["stream_vus_pr_ci95"], base["stream_vus_pr_ci95"])
                line += (
                    f" {_ci(r, 'stream_vus_pr')} | {_ci(base, 'stream_vus_pr')} | "
                    f"{r['stream_vus_pr'] - base['stream_vus_pr']:+.3f} ± {ci:.3f} |"
                )
            lines.append(line)
    if not lines:
        return []
    header = [
        "",
        "Variants on the same test episodes (`compare_to`):",
        "",
        "| suite | compared to | K | learner | AUROC | its AUROC there | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    if streamed:
        header[-2] += " stream VUS-PR | its VUS-PR there | difference |"
        header[-1] += "---|---|---|"
    return header + lines


def pixel_table(pooled: Pooled) -> list[str]:
    """Pixel AUROC and PRO (anomaly maps against defect masks) of every detector that has them."""
    found = {key: m for key, m in sorted(pooled.items()) if "pixel_auroc" in m or "pro" in m}
    if not found:
        return []
    lines = [
        "",
        "Anomaly maps against the defect masks (pixel AUROC; PRO: area under the per-region overlap "
        "curve to FPR 0.3, normalised), mean ± 95% CI over episodes:",
        "",
        "| suite | K | detector | pixel AUROC | PRO | episodes |",
        "|---|---|---|---|---|---|",
    ]
    for (suite, k, detector), m in found.items():
        cells = [f"{m[x].mean:.3f} ± {m[x].ci95:.3f}" if x in m else "" for x in ("pixel_auroc", "pro")]
        n = max(m[x].n_episodes for x in ("pixel_auroc", "pro") if x in m)
        lines.append(f"| {suite} | {k} | {detector} | {cells[0]} | {cells[1]} | {n} |")
    return lines


def write_tables(rows: list[dict], out_dir: Path, footer: list[str] = ()) -> str:
    with open(out_dir / "results.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for r in rows for key in r))  # series rows add stream columns
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    streamed = any("stream_auroc" in r for r in rows)
    lines = [*headline(rows), *stream_headline(rows), "", "Every detector:", ""]
    lines += [
        "| suite | K | detector | AUROC ± 95% CI | AUPR ± 95% CI | vs best baseline | bal. acc. | episodes |"
        + (" stream AUROC | stream VUS-PR | stream F1 at support thr. |" if streamed else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if streamed else ""),
    ]
    for r in rows:
        gap = "" if r["detector"].startswith("baseline:") else f"{r['vs_best_baseline']:+.3f}"
        line = (
            f"| {r['suite']} | {r['k_shot']} | {r['detector']} | {r['auroc']:.3f} ± {r['auroc_ci95']:.3f} | "
            f"{r['aupr']:.3f} ± {r['aupr_ci95']:.3f} | {gap} | {_pct(r['balanced_accuracy'])} | "
            f"{r['n_episodes']} |"
        )
        if streamed:
            line += f" {_ci(r, 'stream_auroc')} | {_ci(r, 'stream_vus_pr')} | {_ci(r, 'stream_f1_support')} |"
        lines.append(line)
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
    preset_name = HydraConfig.get().runtime.choices.get("preset", "?")
    only = list(cfg.suites) if cfg.get("suites") else None
    pooled, counts = run(cfg.preset, out_dir, list(cfg.overrides), only, preset_name)
    preset = resolved(cfg.preset, preset_name)
    rules = {name: suite.get("best_baseline", "test") for name, suite in preset.suites.items()}
    against = {name: s.verdict_against for name, s in preset.suites.items() if s.get("verdict_against")}
    rows = table_rows(pooled, preset.get("references", {}), rules, against)
    note = preset.get("reference_note")
    footer = [*pixel_table(pooled), *compared(rows, preset), *what_ran(preset, only, command, counts)]
    markdown = write_tables(rows, out_dir, [*footer, *(["", str(note)] if note else [])])
    print_table(rows)
    print(markdown)
    console.print(f"results: {out_dir / 'results.md'} and {out_dir / 'results.csv'}")


if __name__ == "__main__":
    main()
