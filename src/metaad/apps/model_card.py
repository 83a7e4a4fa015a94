"""``MODEL_CARD.md``: what a checkpoint is for, what it was trained and tested on, how it compares
with the baselines, where it fails and how to use it, written by every run into its run folder.

Everything in it comes from the run's :class:`~metaad.evaluation.results.RunResults` (the numbers
of ``metrics.json``) and its stored config; the verdicts are :func:`verdict`'s and the known limits
are read off the results (a learner below its baselines says so), never typed.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any

from metaad import files
from metaad.evaluation.results import RunResults, Summary, verdict
from metaad.training.resume import hydra_value

NAME = "MODEL_CARD.md"
BIN = Path(sys.executable).parent  # where the apps of this installation are
SHOWN_TASKS = 20  # task names listed per split; the rest counted
WORDS = {
    "beats": "beats",
    "below": "is below",
    "within CIs": "is within the CIs of",
    "": "has no verdict against",
}


def _num(summary: Summary | None) -> str:
    if summary is None or math.isnan(summary.mean):
        return "n/a"
    ci = "" if math.isnan(summary.ci95) else f" ± {summary.ci95:.3f}"
    return f"{summary.mean:.3f}{ci}"


def _tasks(names: Any) -> str:
    names = [str(n) for n in names or []]
    if not names:
        return "none"
    shown = ", ".join(names[:SHOWN_TASKS])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > SHOWN_TASKS else f"{shown} ({len(names)})"


def _arg(key: str, path: str | Path) -> str:
    """``key=<path>`` as one shell word Hydra reads back as the path."""
    return shlex.quote(f"{key}={hydra_value(str(path))}")


def commands(checkpoint: Path, kind: str) -> dict[str, str]:
    """The commands that use ``checkpoint``, one line each, quoted for the shell and for Hydra.
    ``kind``: ``samples``, ``images`` or ``series`` (what the model scores)."""
    ckpt = _arg("ckpt_path", checkpoint)
    if kind == "series":
        inputs = "history=normal_steps.csv series=new_steps.csv"
    elif kind == "images":
        inputs = "support=normal_images/ query=new_images/"
    else:
        inputs = "support=normal.csv query=new.csv"
    support = inputs.split(" ")[0]
    out = {
        "score": f"metaad-score {ckpt} {inputs} output=scores.csv",
        "eval": f"metaad-eval {ckpt}",
        "load": f"det = metaad.load({str(checkpoint)!r}).fit(X_normal)",
    }
    if kind != "series":  # export refuses series models (README: Export)
        out["export"] = f"metaad-export {ckpt} {support} output=detector.pt"
    return out


def _threshold(results: RunResults) -> list[str]:
    threshold = results.threshold
    if not threshold:
        return [
            "No threshold: the run reports ranking metrics (AUROC, AUPR) only, and scores carry no decision."
        ]
    rule = threshold.get("rule", "?")
    scale = "raw score" if threshold.get("normalise") == "none" else "support-normalised score (z-score)"
    if "skipped" in threshold:
        return [f"Rule `{rule}` on the {scale} was not applied: {threshold['skipped']}."]
    settings = ", ".join(
        f"{k}={v}" for k, v in threshold.items() if k not in ("rule", "value", "mean_per_episode")
    )
    how = {
        "f1_optimal": "fitted on the validation episodes' scores: the cut that maximises the mean "
        "per-episode F1 there (validation tasks only; the test tasks played no part)",
        "support_quantile": "set per episode from that episode's own leave-one-out support scores "
        "(margin x their q-quantile): nothing is fitted, no anomalies are needed",
        "fixed": "given in the config (not fitted)",
    }.get(rule, "as its rule defines")
    value = threshold.get("value")
    shown = (
        f"{value:.4g}"
        if isinstance(value, int | float)
        else f"per episode (mean over the test episodes {threshold.get('mean_per_episode', math.nan):.4g})"
    )
    return [
        f"Rule `{rule}` ({settings}) on the {scale}: threshold {shown}, {how}. A query is an "
        "anomaly when its score is above it. `metaad-score`, `metaad-export` and the Python API decide "
        "at this threshold."
    ]


def limits(results: RunResults, config: dict[str, Any]) -> list[str]:
    """Known limits read off the results and the config."""
    out = []
    learner, name = results.test.get("auroc"), results.learner
    verdicts = {b: verdict(learner, v["auroc"]) for b, v in results.baselines.items()} if learner else {}
    below = [b for b, v in verdicts.items() if v == "below"]
    within = [b for b, v in verdicts.items() if v == "within CIs"]
    if below:
        out.append(
            f"**Below the baselines on this data**: {name}'s test AUROC is below {', '.join(below)} "
            "(95% CIs apart). On tasks like these, use the baseline instead, or retrain "
            "(another backbone, more episodes, another learner)."
        )
    if within:
        out.append(
            f"Not distinguishable from {', '.join(within)} (95% CIs overlap): on this data the "
            "meta-training did not show a gain over it."
        )
    if not results.baselines:
        out.append("No baselines were scored: nothing says whether meta-training paid on this data.")
    k = results.k_shot
    if k == 1:
        out.append(
            "K=1: a single normal sample has no leave-one-out score, so there is no support threshold "
            "(`support_quantile`) and no z-score: decisions need a threshold on raw scores."
        )
    elif k == 2 and (results.threshold or {}).get("normalise") == "zscore":
        out.append("K=2: the z-score needs K >= 3 (two leave-one-out scores have no spread).")
    test_tasks, val_tasks = list(results.tasks.get("test") or []), list(results.tasks.get("val") or [])
    if test_tasks and len(test_tasks) < 5:
        out.append(
            f"Tested on {len(test_tasks)} held-out task(s) only: the CIs are over episodes of these "
            "tasks and say little about how much another task's AUROC may differ."
        )
    shared = sorted(set(map(str, test_tasks)) & set(map(str, val_tasks)))
    if shared:
        out.append(
            f"The validation and test tasks share {len(shared)} task(s), their samples split in "
            f"disjoint halves ({', '.join(shared[:SHOWN_TASKS])}): model selection and the threshold "
            "saw those tasks' kind of data, so the test is not of wholly unseen tasks."
        )
    best = results.val_auroc_best
    if learner is not None and best is not None and not math.isnan(best) and not math.isnan(learner.mean):
        gap = best - learner.mean
        if gap > max(0.05, 2 * learner.ci95):
            out.append(
                f"Validation AUROC {best:.3f} is {gap:.3f} above the test AUROC: the test tasks are "
                "harder than the validation tasks, or selection on validation overfitted them."
            )
    if results.threshold and "skipped" in results.threshold:
        out.append(f"No decisions: {results.threshold['skipped']}.")
    for key, why in results.null_reasons.items():
        out.append(f"`{key}` is null: {why}.")
    out.append(
        "Scores new tasks of the kind it was meta-trained on "
        f"({results.data or results.names.get('dataset')}); "
        "another kind of data (other sensors, image sizes or classes far from the training ones) is "
        "untested: measure it with `metaad-eval` on labelled tasks of yours first."
    )
    return out


def render(results: RunResults, config: dict[str, Any], checkpoint: Path, kind: str) -> str:
    """The card's Markdown."""
    name, dataset = results.learner, results.names.get("dataset", "?")
    data = config.get("dataset") or {}
    learner = results.test.get("auroc")
    rows = [(name, results.test, "")]
    verdicts = []
    for baseline, metrics in results.baselines.items():
        word = verdict(learner, metrics["auroc"]) if learner else ""
        gap = learner.mean - metrics["auroc"].mean if learner else math.nan
        rows.append((f"baseline {baseline}", metrics, f"{name} {WORDS[word]} it ({gap:+.3f})"))
        verdicts.append(word)
    cmd = commands(checkpoint, kind)
    counts = ", ".join(f"{WORDS[w]} {verdicts.count(w)}" for w in WORDS if w in verdicts)
    lines = [
        f"# Model card: {name} on {dataset} (K={results.k_shot})",
        "",
        f"Written by the run from its `metrics.json` and stored config. Checkpoint: `{checkpoint}`.",
        "",
        "## Intended use",
        "",
        f"Few-shot anomaly detection on new tasks like its training ones ({results.data or dataset}): "
        f"given {results.k_shot} or more normal samples of a task it has not seen (the support), it "
        "scores new samples of that task (the query), higher meaning more anomalous. It needs no "
        "anomalies and no retraining for a new task; it is not a detector for data unlike its tasks.",
        "",
        "## Data and task split",
        "",
        f"- data: {results.data or dataset}",
        f"- meta-training tasks: {_tasks(_trained_on(results))}",
        f"- validation tasks (model selection, threshold): {_tasks(results.tasks.get('val'))}",
        f"- test tasks (held out, reported below): {_tasks(results.tasks.get('test'))}",
        "",
        "## Protocol",
        "",
        f"- K = {results.k_shot} normal support samples per episode; {data.get('n_query', '?')} queries "
        f"per episode, {_share(data.get('anomaly_ratio'))} of them anomalies{_anomalies(data)}"
        + _query_sizes(data),
        f"- episodes: {data.get('train_episodes', '?')} meta-training per epoch, "
        f"{data.get('val_episodes', '?')} validation, {_test_episodes(results)} test",
        f"- 95% CIs over {config.get('ci_over') or 'episode'}s; seed {results.seed}",
    ]
    if results.val_auroc_best is not None:
        lines.append(f"- best validation AUROC (the selection metric): {_plain(results.val_auroc_best)}")
    lines += [
        "",
        "## Test metrics beside the baselines",
        "",
        "| detector | AUROC | AUPR | F1 | verdict (AUROC, 95% CIs) |",
        "|---|---|---|---|---|",
    ]
    for label, metrics, word in rows:
        lines.append(
            f"| {label} | {_num(metrics.get('auroc'))} | {_num(metrics.get('aupr'))} | "
            f"{_num(metrics.get('f1'))} | {word or '(the learner)'} |"
        )
    verdict_line = (
        f"{name} {counts} of the {len(verdicts)} baselines (test AUROC; beats or is below: the 95% "
        "CIs do not overlap)"
        if verdicts
        else f"{name} has no baselines to compare with"
    )
    lines += ["", f"**Verdict**: {verdict_line}."]
    lines += ["", "## Threshold", "", *_threshold(results), "", "## Known limits", ""]
    lines += [f"- {limit}" for limit in limits(results, config)]
    lines += [
        "",
        "## How to use it",
        "",
        f"The apps are in the environment metaad is installed in ({shlex.quote(str(BIN))}): put it "
        "on the PATH, or write the commands with it.",
        "",
        "Load and score in Python (raw samples, as you have them; the checkpoint's preprocessing is "
        "applied):",
        "",
        "```python",
        "import metaad",
        cmd["load"] + "  # X_normal: normal samples of the task",
        "scores, is_anomaly = det.decision_function(X_new), det.predict(X_new)",
        "```",
        "",
        "Score files from the command line (one row per query sample: id, score, normalised_score, "
        "is_anomaly):",
        "",
        "```bash",
        cmd["score"],
        "```",
    ]
    if "export" in cmd:
        lines += [
            "",
            "Export, adapted to your normal samples, as one TorchScript file that needs torch only "
            "(`format=onnx` for ONNX):",
            "",
            "```bash",
            cmd["export"],
            "```",
        ]
    lines += [
        "",
        "Re-score the test episodes (or other tasks: `+dataset.test_tasks=[...]`):",
        "",
        "```bash",
        cmd["eval"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _trained_on(results: RunResults) -> Any:
    """The tasks the checkpoint was meta-trained on (``metaad-eval`` records them apart)."""
    return (results.tasks.get("trained_on") or {}).get("train", results.tasks.get("train"))


def kind_of(preprocessing: Any, sample_shape: tuple[int, ...]) -> str:
    """What the model scores: ``series`` (windows of a series), ``images`` or ``samples`` (rows)."""
    if getattr(preprocessing, "is_series", False):
        return "series"
    return "images" if len(sample_shape) >= 2 else "samples"


def _anomalies(data: dict[str, Any]) -> str:
    source = {
        "split": "the other tasks of the same split, one-vs-rest",
        "source_test": "the source's own test rows no other split uses",
    }
    given = data.get("anomalies_from")
    return f" from {source.get(given, given)}" if given else ""


def _share(ratio: Any) -> str:
    return f"{ratio:.0%}" if isinstance(ratio, int | float) else "?"


def _query_sizes(data: dict[str, Any]) -> str:
    sizes = {s: data.get(f"{s}_n_query") for s in ("val", "test") if data.get(f"{s}_n_query") is not None}
    return "".join(f"; {n} queries per {s} episode" for s, n in sizes.items())


def _test_episodes(results: RunResults) -> str:
    auroc = results.test.get("auroc")
    return str(auroc.n_episodes) if auroc is not None else "?"


def _plain(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def write(run_dir: Path, results: RunResults, config: dict[str, Any], kind: str) -> Path:
    """Write ``<run_dir>/MODEL_CARD.md`` (whole or not at all); its path."""
    checkpoint = Path(results.checkpoint) if results.checkpoint else run_dir / "checkpoints" / "last.ckpt"
    path = run_dir / NAME
    text = render(results, config, checkpoint.absolute(), kind)
    files.write_atomically(path, lambda partial: partial.write_text(text))
    return path
