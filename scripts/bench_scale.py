"""How metaad's costs grow, measured in one run, single-threaded, the contenders of each table alternating
so that load on the machine hits them all alike:

1. setup (``LabelledData`` + ``split_tasks`` + the three ``EpisodeDataset`` checks) on random float32
   features, one-vs-rest, tasks "0" "1" "2" for validation and "3" "4" "5" for test, every other task
   for meta-training, rows dealt evenly to tasks: time, peak memory (tracemalloc, and the ru_maxrss
   rise) beside the feature array's own size, and the time to draw 1,000 training episodes, as rows,
   tasks and features grow. Each point runs in its own process (so ru_maxrss means something);
   sizes whose estimated peak does not fit in the free memory are skipped and the output says so;
2. meta-training throughput (loss, backward, optimizer step; meta-batches made up front) of ProtoNet
   and second-order MAML on the default MLP (digits episodes, 64 features, Q=20) as meta-batch, K
   and MAML's inner steps grow;
3. ``metaad-eval`` of one checkpoint (trained here with ``debug=quick``) with 1 and with 2 processes
   (``trainer=ddp trainer.devices=2``): wall time of the command and of its test loop (a callback
   from this file, passed with ``+callbacks``), and whether both write the same metrics.

    python scripts/bench_scale.py                      # everything, about 10 minutes on 2 cores
    python scripts/bench_scale.py --quick              # small sizes, checks that it runs (a few minutes)
    python scripts/bench_scale.py --sections setup --rows 10000 100000 1000000 10000000

Every curve is printed as a markdown table with a fitted log-log slope ("setup ~ rows^1.0"); the
tables go to ``--out`` (default ``outputs/scale/<time>/scale.md``), the figure beside them
(``scale.png``) and the raw numbers to ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader

from metaad.data import Episode, EpisodeDataset, LabelledData, collate_episodes, split_tasks
from metaad.data.sources import digits

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K_SHOT, N_QUERY, ANOMALY_RATIO = 5, 20, 0.5
VAL_TASKS, TEST_TASKS = ["0", "1", "2"], ["3", "4", "5"]
MB = 2**20
console = Console(stderr=True)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "r" * len(header)
    rule = ["---" if a == "l" else "---:" for a in align]
    return [f"| {' | '.join(line)} |" for line in (header, rule, *rows)]


def rotated(items: list, r: int) -> list:
    return items[r % len(items) :] + items[: r % len(items)] if items else []


def count(n: float) -> str:
    """10000 -> 10^4, 30000 -> 3x10^4, 2000 -> 2,000."""
    exponent = int(math.floor(math.log10(n))) if n > 0 else 0
    mantissa = n / 10**exponent
    if n >= 10_000 and abs(mantissa - round(mantissa)) < 1e-9:
        return f"10^{exponent}" if round(mantissa) == 1 else f"{round(mantissa)}x10^{exponent}"
    return f"{n:,.0f}"


def short(n: float) -> str:
    """Tick labels: 2000 -> 2k, 10^6 -> 1M."""
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}"


def slope(xs: list[float], ys: list[float]) -> float | None:
    """The log-log least-squares slope of ``ys`` against ``xs`` (None under two usable points)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pairs) < 2 or len({x for x, _ in pairs}) < 2:
        return None
    lx, ly = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


def growth(what: str, var: str, xs: list[float], ys: list[float]) -> str:
    """``setup time ~ rows^0.97 (last step 1.01)``, or ``flat in tasks`` for |slope| < 0.15."""
    s = slope(xs, ys)
    if s is None:
        return f"{what}: too few points"
    tail = slope(xs[-2:], ys[-2:]) if len(xs) > 2 else None
    last = f"last step {tail:.2f}" if tail is not None else ""
    if abs(s) < 0.15 and (tail is None or abs(tail) < 0.15):
        return f"{what} flat in {var} (slope {s:+.2f}{'; ' + last if last else ''})"
    return f"{what} ~ {var}^{s:.2f}{' (' + last + ')' if last else ''}"


# --- 1. setup: task pools as rows, tasks and features grow ----------------------------------------
def random_table(rows: int, tasks: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 features and string task labels ("0" ... str(tasks - 1)), rows dealt evenly
    to tasks in shuffled blocks (built in chunks, so no row-sized temporary beyond the two arrays)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    names = np.arange(tasks).astype(str)
    labels = np.empty(rows, names.dtype)
    chunk = tasks * max(1, 65536 // tasks)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        labels[start:stop] = names[rng.permutation(chunk)[: stop - start] % tasks]
    return x, labels


def build_pools(x: np.ndarray, labels: np.ndarray) -> tuple[dict[str, EpisodeDataset], float]:
    """What ``EpisodeDataModule.setup`` does after its source: the returned float is split_tasks' time."""
    data = LabelledData(x=x, task=labels, name="random")
    start = time.perf_counter()
    pools = split_tasks(data, train_tasks=None, val_tasks=VAL_TASKS, test_tasks=TEST_TASKS)
    split_s = time.perf_counter() - start
    datasets = {
        split: EpisodeDataset(pool, split, K_SHOT, N_QUERY, ANOMALY_RATIO, n_episodes=1000, seed=0)
        for split, pool in pools.items()
    }
    return datasets, split_s


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup_point(rows: int, tasks: int, features: int, episodes: int, memory: bool) -> dict[str, Any]:
    """One size, in this (fresh) process: timed setup, then (``memory``) a traced one, then episodes."""
    x, labels = random_table(rows, tasks, features)
    out: dict[str, Any] = {"x_mb": x.nbytes / MB, "labels_mb": labels.nbytes / MB}
    before = maxrss_mb()
    start = time.perf_counter()
    datasets, split_s = build_pools(x, labels)
    out["setup_s"], out["split_s"] = time.perf_counter() - start, split_s
    out["maxrss_delta_mb"] = maxrss_mb() - before
    out["maxrss_mb"] = maxrss_mb()
    if memory:
        del datasets
        tracemalloc.start()
        datasets, _ = build_pools(x, labels)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["peak_mb"], out["kept_mb"] = peak / MB, kept / MB
    train = datasets["train"]
    train.n_episodes = episodes
    start = time.perf_counter()
    for i in range(episodes):
        train[(0, i)]
    out["episodes_s"] = time.perf_counter() - start
    return out


def run_point(point: dict[str, int], episodes: int, memory: bool) -> dict[str, Any]:
    """:func:`setup_point` in a fresh process (its result is the last line it prints)."""
    spec = json.dumps({**point, "episodes": episodes, "memory": memory})
    done = subprocess.run([sys.executable, __file__, "--setup-point", spec], capture_output=True, text=True)
    if done.returncode:
        return {"error": f"rc {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def setup_curves(
    curves: dict[str, list[dict[str, int]]], rounds: int, episodes: int, progress: Progress
) -> tuple[list[str], dict[str, list[dict]], list[str]]:
    """Round 0 runs every curve's points in growing order (with memory tracing; a point whose
    estimated peak exceeds 60% of the free memory, extrapolated from the curve's last point, is
    skipped); later rounds repeat the points that took under 30 s, in rotated order."""
    results: dict[tuple, list[dict]] = defaultdict(list)
    skipped: list[str] = []
    points = [(name, tuple(sorted(p.items()))) for name, ps in curves.items() for p in ps]
    task = progress.add_task("setup (round 1)", total=len(points))
    done_points: dict[str, list] = defaultdict(list)
    for name, key in points:
        point = dict(key)
        prior = [results[k][0] for k in done_points[name] if "peak_mb" in results[k][0]]
        if prior:
            last, last_point = prior[-1], dict(done_points[name][-1])
            scale = point["rows"] * point["features"] / (last_point["rows"] * last_point["features"])
            need = (last["maxrss_mb"]) * max(1.0, scale) + last["peak_mb"] * max(1.0, scale)
            if need > 0.6 * available_mb():
                skipped.append(
                    f"{name}: {count(point['rows'])} rows x {count(point['tasks'])} tasks x "
                    f"{point['features']} features (estimated {need / 1024:.1f} GB, "
                    f"{available_mb() / 1024:.1f} GB free)"
                )
                progress.advance(task)
                continue
        progress.update(task, description=f"setup: {name} {point}")
        result = results[key][0] if results[key] else run_point(point, episodes, memory=True)
        results[key][:1] = [result]  # a point on two curves is measured once
        if "error" not in result:
            done_points[name].append(key)
        progress.advance(task)
    progress.remove_task(task)
    repeat = [(n, k) for n, k in points if k in done_points[n] and results[k][0]["setup_s"] < 30]
    repeat = list(dict.fromkeys(k for _, k in repeat))  # a point on two curves is timed once per round
    task = progress.add_task("setup (repeats)", total=(rounds - 1) * len(repeat))
    for r in range(1, rounds):
        for key in rotated(repeat, r):
            progress.update(task, description=f"setup round {r + 1}: {dict(key)}")
            result = run_point(dict(key), episodes, memory=False)
            if "error" not in result:
                results[key].append(result)
            progress.advance(task)
    progress.remove_task(task)

    lines: list[str] = []
    raw: dict[str, list[dict]] = {}
    fits: list[str] = []
    for name, ps in curves.items():
        var = {"rows": "rows", "tasks": "tasks", "features": "features"}[name]
        rows_out, series = [], []
        for p in ps:
            key = tuple(sorted(p.items()))
            runs = results.get(key)
            if not runs or "error" in runs[0]:
                if runs:
                    error = [count(p["rows"]), count(p["tasks"]), str(p["features"]), runs[0]["error"]]
                    rows_out.append(error + ["-"] * 10)
                continue
            first = runs[0]
            setup = statistics.median(r["setup_s"] for r in runs)
            split = statistics.median(r["split_s"] for r in runs)
            eps = statistics.median(r["episodes_s"] for r in runs)
            delta = first["maxrss_delta_mb"]
            entry = {**p, **first, "setup_s": setup, "split_s": split, "episodes_s": eps, "n_runs": len(runs)}
            series.append(entry)
            rows_out.append(
                [
                    count(p["rows"]),
                    count(p["tasks"]),
                    str(p["features"]),
                    f"{first['x_mb']:,.1f}",
                    f"{first['labels_mb']:,.1f}",
                    f"{setup:.3f}",
                    f"{split:.3f}",
                    f"{first['peak_mb']:,.1f}",
                    f"{first['peak_mb'] / first['x_mb']:.2f}",
                    f"{first['peak_mb'] * MB / p['rows']:,.0f}",
                    f"{first['kept_mb']:,.1f}",
                    f"{delta:,.0f}" if delta >= 1 else "<1",
                    f"{eps:.3f}",
                    str(len(runs)),
                ]
            )
        raw[name] = series
        fixed = {"rows": "tasks and features", "tasks": "rows and features", "features": "rows and tasks"}
        lines += [
            f"### Setup as {var} grow (fixed {fixed[name]}; times: median of the runs, each a fresh process)",
            "",
            *table(
                [
                    "rows",
                    "tasks",
                    "features",
                    "x MB",
                    "labels MB",
                    "setup s",
                    "split_tasks s",
                    "peak MB",
                    "peak / x",
                    "peak B / row",
                    "kept MB",
                    "ru_maxrss rise MB",
                    "1,000 episodes s",
                    "runs",
                ],
                rows_out,
            ),
            "",
        ]
        xs = [e[name] for e in series]
        line = "; ".join(
            [
                growth("setup", var, xs, [e["setup_s"] for e in series]),
                growth("split_tasks", var, xs, [e["split_s"] for e in series]),
                growth("peak memory", var, xs, [e["peak_mb"] for e in series]),
                growth("1,000 episodes", var, xs, [e["episodes_s"] for e in series]),
            ]
        )
        fits.append(f"- **{var}**: {line}.")
        lines += [f"Growth: {line}.", ""]
    lines += [
        "`x MB`: the feature array; `labels MB`: the task-label array (numpy strings) that the source "
        "passes beside it. `peak MB`: the most memory setup held at once beyond those two (tracemalloc, "
        "numpy's buffers included, in a second setup of the same arrays); `kept MB`: what the pools keep "
        "after setup; `ru_maxrss rise MB`: how far the process's resident peak rose during the first "
        "setup (`<1`: not above the peak of making the data). `1,000 episodes s`: drawing 1,000 training "
        "episodes (K=5, Q=20, half anomalies) one by one from the pool, as a loader worker does.",
        "",
    ]
    if skipped:
        lines += ["Skipped (would not fit in memory): " + "; ".join(skipped) + ".", ""]
    return lines, raw, fits + [f"- skipped: {s}" for s in skipped]


# --- 2. meta-training throughput -----------------------------------------------------------------
def throughput(
    sizes: list[int], shots: list[int], steps_list: list[int], rounds: int, run_dir: Path, progress: Progress
) -> tuple[list[str], dict[str, Any], list[str]]:
    """Meta-training steps of ProtoNet and MAML (one per inner-steps value) on every (meta-batch, K),
    every configuration once per round, in rotated order."""
    from hydra.utils import instantiate

    from metaad.apps.build import build_learner, compose_config

    pool = split_tasks(digits(), train_tasks=None, val_tasks=[6, 7, 8, 9], test_tasks=[6, 7, 8, 9])["train"]
    batches: dict[tuple[int, int], list[Episode]] = {}
    for size in sizes:
        for k in shots:
            ds = EpisodeDataset(
                pool, "train", k, N_QUERY, ANOMALY_RATIO, n_episodes=(rounds + 1) * size, seed=0
            )
            batches[size, k] = list(DataLoader(ds, batch_size=size, collate_fn=collate_episodes))
    learners: dict[str, tuple] = {}
    for name, overrides in [("protonet", ["model=protonet"])] + [
        (f"maml, {s} inner step{'s' * (s > 1)}", ["model=maml", f"model.inner_steps={s}"]) for s in steps_list
    ]:
        torch.manual_seed(0)
        cfg = compose_config(overrides, run_dir)
        learner = build_learner(cfg, (64,))
        learner.train()
        learners[name] = (learner, instantiate(cfg.model.optimizer)(learner.parameters()))

    def step(name: str, batch: Episode) -> float:
        learner, optimizer = learners[name]
        start = time.perf_counter()
        optimizer.zero_grad()
        learner.loss(batch).backward()
        optimizer.step()
        return time.perf_counter() - start

    configs = [(name, size, k) for name in learners for size in sizes for k in shots]
    for name, size, k in configs:  # warm-up
        step(name, batches[size, k][-1])
    times: dict[tuple, list[float]] = defaultdict(list)
    task = progress.add_task("meta-training throughput", total=rounds * len(configs))
    for r in range(rounds):
        for name, size, k in rotated(configs, r):
            times[name, size, k].append(step(name, batches[size, k][r]))
            progress.advance(task)
    progress.remove_task(task)

    ms = {c: statistics.median(t) * 1000 for c, t in times.items()}
    names = list(learners)
    rows = [
        [
            str(size),
            str(k),
            *(f"{size / ms[n, size, k] * 1000:,.0f} ({ms[n, size, k]:.1f} ms)" for n in names),
        ]
        for size in sizes
        for k in shots
    ]
    base_b = 16 if 16 in sizes else sizes[len(sizes) // 2]
    base_k = 5 if 5 in shots else shots[len(shots) // 2]
    fits = []
    for n in names:
        by_b = growth("ms per meta-batch", "meta-batch", sizes, [ms[n, b, base_k] for b in sizes])
        by_k = growth("ms per meta-batch", "K", shots, [ms[n, base_b, k] for k in shots])
        fits.append(f"- **{n}**: {by_b} (K={base_k}); {by_k} (meta-batch {base_b}).")
    if len(steps_list) > 1:
        maml = [f"maml, {s} inner step{'s' * (s > 1)}" for s in steps_list]
        per_step = [ms[n, base_b, base_k] for n in maml]
        fits.append(
            f"- **maml inner steps** (meta-batch {base_b}, K={base_k}): "
            + growth("ms per meta-batch", "inner steps", steps_list, per_step)
            + "; "
            + ", ".join(
                f"{s} step{'s' * (s > 1)} {t / per_step[0]:.2f}x" for s, t in zip(steps_list, per_step)
            )
            + f" of {steps_list[0]}."
        )
    lines = [
        f"### Meta-training throughput: episodes/s (ms per meta-batch), median of {rounds} meta-batches, "
        "alternating",
        "",
        "Default MLP backbone on digits episodes (64 features), Q=20 (half anomalies); one step = `loss` + "
        "`backward` + the configured optimizer's step; MAML second order (`first_order=false`).",
        "",
        *table(["meta-batch", "K", *names], rows),
        "",
        "Growth (time per meta-batch; episodes/s grows as meta-batch^(1 - slope)):",
        "",
        *fits,
        "",
    ]
    raw = {"ms": [{"learner": n, "meta_batch": b, "k": k, "ms": v} for (n, b, k), v in ms.items()]}
    return lines, raw, fits


# --- 3. evaluation with 1 and 2 processes ----------------------------------------------------------
def test_loop_timer(path: str) -> Any:
    """A Lightning callback (for ``+callbacks.<name>._target_=bench_scale.test_loop_timer``) that writes
    each rank's test-loop seconds (``on_test_start`` to ``on_test_end``) to ``<path>.rank<r>``."""
    import pytorch_lightning as pl

    class TestLoopTimer(pl.Callback):
        def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start, self.batches, self.episodes, self.in_batches = time.perf_counter(), 0, 0, 0.0

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self.batch_start = time.perf_counter()

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self.in_batches += time.perf_counter() - self.batch_start
            self.batches += 1
            self.episodes += len(batch[0])

        def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seconds = time.perf_counter() - self.start
            done = {"test_loop_s": seconds, "batches": self.batches, "episodes": self.episodes}
            done["in_batches_s"] = self.in_batches
            Path(f"{path}.rank{trainer.global_rank}").write_text(json.dumps(done))

    return TestLoopTimer()


def evaluation(
    models: list[str], test_episodes: int, batch_size: int, repeats: int, tmp: Path, progress: Progress
) -> tuple[list[str], dict, list[str]]:
    """``metaad-eval`` of a ``debug=quick`` checkpoint of each model, 1 and 2 processes alternating."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    modes = {"1 process": [], "2 processes": ["trainer=ddp", "trainer.devices=2"]}
    one, two = modes
    ckpts: dict[str, Path] = {}
    for model in models:
        task = progress.add_task(f"training a debug=quick {model} checkpoint", total=None)
        run_dir = tmp / f"train_{model}"
        done = subprocess.run(
            [
                str(BIN / "metaad-train"),
                "experiment=digits",
                "debug=quick",
                "logger=none",
                "baselines=none",
                f"model={model}",
                f"hydra.run.dir={run_dir}",
            ],
            capture_output=True,
            text=True,
        )
        progress.remove_task(task)
        if done.returncode or not (run_dir / "checkpoints" / "best.ckpt").is_file():
            why = f"metaad-train model={model} failed (rc {done.returncode}): {done.stderr[-500:]}"
            return [f"### Evaluation: not measured ({why})", ""], {}, [f"- evaluation: not measured ({why})"]
        ckpts[model] = run_dir / "checkpoints" / "best.ckpt"
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    metrics: dict[tuple[str, str], dict] = {}
    contenders = [(model, mode) for model in models for mode in modes]
    task = progress.add_task("metaad-eval, 1 and 2 processes", total=repeats * len(contenders))
    for r in range(repeats):
        for i, (model, mode) in enumerate(rotated(contenders, r)):
            run_dir, timer = tmp / f"eval_{r}_{i}", tmp / f"timer_{r}_{i}"
            cmd = [
                str(BIN / "metaad-eval"),
                f"ckpt_path={ckpts[model]}",
                "logger=none",
                f"+dataset.test_episodes={test_episodes}",
                f"+dataset.eval_batch_size={batch_size}",
                *modes[mode],
                "+callbacks.scale_timer._target_=bench_scale.test_loop_timer",
                f"+callbacks.scale_timer.path={timer}",
                f"hydra.run.dir={run_dir}",
            ]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - start
            if done.returncode:
                raise RuntimeError(f"{shlex.join(cmd)} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
            ranks = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"timer_{r}_{i}.rank*"))]
            runs[model, mode].append({"wall_s": wall, "ranks": ranks})
            metrics.setdefault((model, mode), json.loads((run_dir / "metrics.json").read_text()))
            progress.advance(task)
    progress.remove_task(task)

    def median(model: str, mode: str, what: str) -> float | None:
        """Median over the runs of the slowest rank's ``what`` (or of the whole command's wall time)."""
        values = [
            run["wall_s"] if what == "wall_s" else max((rank[what] for rank in run["ranks"]), default=None)
            for run in runs[model, mode]
        ]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def cell(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.2f}{unit}"

    rows, fits, raw = [], [], {"test_episodes": test_episodes, "models": {}}
    for model in models:
        for mode in modes:
            ranks = runs[model, mode][0]["ranks"]
            wall, loop = median(model, mode, "wall_s"), median(model, mode, "test_loop_s")
            rows.append(
                [
                    model,
                    mode,
                    " + ".join(str(rank["batches"]) for rank in ranks) or "-",
                    cell(wall),
                    cell(loop),
                    cell(median(model, mode, "in_batches_s")),
                    cell(wall - loop if wall is not None and loop is not None else None),
                ]
            )
        ratios = {
            w: (median(model, one, w) or 0) / (median(model, two, w) or float("inf"))
            for w in ("wall_s", "test_loop_s", "in_batches_s")
        }
        rows.append([model, "1 / 2 processes", "", *(f"{ratios[w]:.2f}x" for w in ratios), ""])
        same = metrics[model, one] == metrics[model, two]
        differ = sorted(
            k for k in metrics[model, one] if metrics[model, one].get(k) != metrics[model, two].get(k)
        )
        fits.append(
            f"- **evaluation, {model}** ({test_episodes:,} test episodes + the validation episodes): "
            f"2 processes are {ratios['wall_s']:.2f}x as fast as 1 on the whole command, "
            f"{ratios['test_loop_s']:.2f}x on the test loop, {ratios['in_batches_s']:.2f}x on the scoring "
            "steps; metrics.json identical: " + ("yes." if same else f"NO ({', '.join(differ)}).")
        )
        raw["models"][model] = {
            "runs": {mode: runs[model, mode] for mode in modes},
            "ratios": ratios,
            "identical_metrics": same,
        }
    lines = [
        f"### Evaluation: `metaad-eval` with 1 and 2 processes (median of {repeats}, alternating)",
        "",
        f"`metaad-eval ckpt_path=<best.ckpt> logger=none +dataset.test_episodes={test_episodes} "
        f"+dataset.eval_batch_size={batch_size}` and the same with `trainer=ddp trainer.devices=2`, on "
        "checkpoints trained here with `metaad-train experiment=digits debug=quick logger=none "
        "baselines=none model=<model>` "
        "(digits; no baselines, so the learner's adapt + score is the work). Test loop: `on_test_start` to "
        "`on_test_end` (the validation episodes for thresholds, then the test episodes, gathered), the "
        "slowest rank; scoring steps: the time inside `test_step` (adapt + score), summed; the rest of "
        "the loop is drawing episodes, gathering and metrics. Outside the loop: start-up (imports, data; "
        "for DDP the second process and its process group) and writing.",
        "",
        *table(
            [
                "model",
                "processes",
                "batches per rank",
                "wall s",
                "test loop s",
                "scoring steps s",
                "outside the loop s",
            ],
            rows,
            "llrrrrr",
        ),
        "",
        *fits,
        "",
    ]
    return lines, raw, fits


# --- the figure ------------------------------------------------------------------------------------
def figure(raw: dict[str, Any], fits: list[str], path: Path) -> None:
    """One PNG: setup time and memory against rows, tasks and features; meta-training throughput
    against meta-batch, K and inner steps; evaluation with 1 and 2 processes, and the slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    def decorate(ax: Any, xs: list[float], xlabel: str, ylabel: str, title: str) -> None:
        ax.set_visible(True)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted(set(xs))
        ax.set_xticks(ticks, [short(x) for x in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    setup = raw.get("setup", {})
    panels = [name for name in ("rows", "tasks", "features") if setup.get(name)]
    train, ev = raw.get("throughput"), raw.get("evaluation")
    n_rows = 2 * bool(panels) + bool(train) + bool(ev or fits)
    if not n_rows:
        return
    fig, axes = plt.subplots(n_rows, 3, figsize=(14, 3.7 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    row = 0
    for c, name in enumerate(panels):
        series = setup[name]
        xs = [e[name] for e in series]
        fixed = ", ".join(f"{count(series[0][k])} {k}" for k in ("rows", "tasks", "features") if k != name)
        ax = axes[row, c]
        ax.plot(xs, [e["setup_s"] for e in series], "o-", label="setup")
        ax.plot(xs, [e["split_s"] for e in series], "s--", label="of which split_tasks")
        ax.plot(xs, [e["episodes_s"] for e in series], "^:", label="drawing 1,000 episodes")
        decorate(ax, xs, name, "seconds", f"setup time vs {name} ({fixed})")
        ax = axes[row + 1, c]
        ax.plot(xs, [e["peak_mb"] for e in series], "o-", label="setup peak (tracemalloc)")
        rise = [(x, e["maxrss_delta_mb"]) for x, e in zip(xs, series) if e["maxrss_delta_mb"] >= 1]
        if rise:
            ax.plot(*zip(*rise), "x-.", label="ru_maxrss rise")
        ax.plot(xs, [e["kept_mb"] for e in series], "s:", label="kept by the pools")
        ax.plot(xs, [e["x_mb"] for e in series], "k--", label="feature array")
        ax.plot(xs, [e["labels_mb"] for e in series], "--", color="grey", label="task-label array")
        decorate(ax, xs, name, "MB", f"setup memory vs {name}")
    row += 2 * bool(panels)
    if train:
        ms = train["ms"]
        learners = list(dict.fromkeys(e["learner"] for e in ms))
        sizes = sorted({e["meta_batch"] for e in ms})
        shots = sorted({e["k"] for e in ms})
        base_b = 16 if 16 in sizes else sizes[len(sizes) // 2]
        base_k = 5 if 5 in shots else shots[len(shots) // 2]
        get = {(e["learner"], e["meta_batch"], e["k"]): e["ms"] for e in ms}
        ax = axes[row, 0]
        for n in learners:
            ax.plot(sizes, [b / get[n, b, base_k] * 1000 for b in sizes], "o-", label=n)
        decorate(ax, sizes, "meta-batch", "episodes/s", f"meta-training vs meta-batch (K={base_k})")
        ax = axes[row, 1]
        for n in learners:
            ax.plot(shots, [base_b / get[n, base_b, k] * 1000 for k in shots], "o-", label=n)
        decorate(ax, shots, "K (support size)", "episodes/s", f"meta-training vs K (meta-batch {base_b})")
        maml = [n for n in learners if n.startswith("maml")]
        if len(maml) > 1:
            steps = [int(n.split(", ")[1].split()[0]) for n in maml]
            ax = axes[row, 2]
            for b in sizes:
                ax.plot(steps, [b / get[n, b, base_k] * 1000 for n in maml], "o-", label=f"meta-batch {b}")
            decorate(
                ax, steps, "inner steps", "episodes/s", f"MAML meta-training vs inner steps (K={base_k})"
            )
        row += 1
    if ev or fits:
        if ev:
            ax = axes[row, 0]
            ax.set_visible(True)
            models = list(ev["models"])
            pos = np.arange(len(models))
            for j, (mode, what) in enumerate(
                [(m, w) for m in ("1 process", "2 processes") for w in ("wall_s", "test_loop_s")]
            ):
                values = []
                for model in models:
                    done = ev["models"][model]["runs"][mode]
                    values.append(
                        statistics.median(
                            run["wall_s"] if what == "wall_s" else max(r[what] for r in run["ranks"])
                            for run in done
                        )
                    )
                label = f"{mode}, {'whole command' if what == 'wall_s' else 'test loop'}"
                ax.bar(pos + (j - 1.5) * 0.2, values, 0.2, label=label)
            ax.set_xticks(pos, models)
            ax.set_ylabel("seconds")
            ax.set_title(f"metaad-eval, {ev['test_episodes']:,} test episodes", fontsize=10)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(raw.get("title", "metaad scaling"), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    if fits:  # after the layout, over the two empty cells of the last row
        box = axes[row, 1].get_position()
        wrapped = [textwrap.fill(f.replace("**", ""), 120, subsequent_indent="    ") for f in fits]
        fig.text(
            box.x0 + 0.01,
            box.y1,
            "How each cost grows (log-log slopes)\n\n" + "\n".join(wrapped),
            va="top",
            fontsize=8.5,
        )
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, checks that the script works")
    parser.add_argument(
        "--sections", nargs="+", choices=["setup", "train", "eval"], default=["setup", "train", "eval"]
    )
    parser.add_argument(
        "--rows", type=int, nargs="+", default=None, help="rows curve (default 10^4 ... 10^7; quick to 10^6)"
    )
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=None, help="tasks curve (default 10 ... 10^4)"
    )
    parser.add_argument(
        "--features", type=int, nargs="+", default=None, help="features curve (default 4 ... 256)"
    )
    parser.add_argument("--base-rows", type=int, default=200_000, help="rows of the tasks curve")
    parser.add_argument("--base-tasks", type=int, default=100, help="tasks of the rows and features curves")
    parser.add_argument("--base-features", type=int, default=16, help="features of the rows and tasks curves")
    parser.add_argument(
        "--feature-rows", type=int, default=None, help="rows of the features curve (default 10^6; quick 10^5)"
    )
    parser.add_argument("--episodes", type=int, default=1000, help="episodes drawn at each setup size")
    parser.add_argument(
        "--setup-rounds", type=int, default=None, help="runs of each setup point (default 3, quick 1)"
    )
    parser.add_argument("--meta-batch-sizes", type=int, nargs="+", default=None, help="default 4 16 64")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="K values (default 1 5 20)")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed meta-batches per configuration (default 15, quick 3)"
    )
    parser.add_argument(
        "--test-episodes",
        type=int,
        default=None,
        help="metaad-eval test episodes (default 50000, quick 2000): evaluation should dominate start-up",
    )
    parser.add_argument(
        "--eval-models", nargs="+", default=["protonet", "maml"], help="learners of the evaluated checkpoints"
    )
    parser.add_argument("--eval-batch-size", type=int, default=100, help="episodes per evaluation batch")
    parser.add_argument(
        "--eval-repeats",
        type=int,
        default=None,
        help="metaad-eval runs per process count (default 3, quick 1)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (measure with 1)")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file (default outputs/scale/<time>/scale.md)"
    )
    parser.add_argument("--setup-point", default=None, help=argparse.SUPPRESS)  # internal: one setup size
    args = parser.parse_args()
    # One thread here and in every process started from here.
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.setup_point:
        spec = json.loads(args.setup_point)
        print(
            json.dumps(
                setup_point(spec["rows"], spec["tasks"], spec["features"], spec["episodes"], spec["memory"])
            )
        )
        return

    from bench_speed import progress_bar  # the peer script beside this one (its progress display)

    q = args.quick
    rows = args.rows or ([10**4, 10**5, 10**6] if q else [10**4, 10**5, 10**6, 3 * 10**6, 10**7])
    tasks = args.tasks or [10, 100, 1000, 2000, 5000, 10**4]
    features = args.features or ([4, 16, 64] if q else [4, 16, 64, 256])
    feature_rows = args.feature_rows or (10**5 if q else 10**6)
    curves = {
        "rows": [{"rows": n, "tasks": args.base_tasks, "features": args.base_features} for n in sorted(rows)],
        "tasks": [
            {"rows": args.base_rows, "tasks": t, "features": args.base_features} for t in sorted(tasks)
        ],
        "features": [
            {"rows": feature_rows, "tasks": args.base_tasks, "features": f} for f in sorted(features)
        ],
    }
    setup_rounds = args.setup_rounds or (1 if q else 3)
    sizes = args.meta_batch_sizes or ([4, 16] if q else [4, 16, 64])
    shots = args.shots or ([1, 5] if q else [1, 5, 20])
    rounds = args.rounds or (3 if q else 15)
    test_episodes = args.test_episodes or (2000 if q else 50000)
    eval_repeats = args.eval_repeats or (1 if q else 3)
    stamp = datetime.now()
    out = args.out or ROOT / "outputs" / "scale" / stamp.strftime("%Y-%m-%d_%H-%M-%S") / "scale.md"

    title = f"metaad scaling ({'quick check' if q else 'full run'}, {stamp:%Y-%m-%d %H:%M})"
    lines = [
        f"## {title}",
        "",
        f"`{shlex.join(['python', 'scripts/bench_scale.py', *sys.argv[1:]])}`; torch {torch.__version__}, "
        f"numpy {np.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU core(s) "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
        f"{available_mb() / 1024:.1f} GB memory free at the start.",
        "",
    ]
    print("\n".join(lines))
    raw: dict[str, Any] = {"title": title}
    fits: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, progress_bar() as progress:
        for section in args.sections:
            if section == "setup":
                part, raw["setup"], fit = setup_curves(curves, setup_rounds, args.episodes, progress)
            elif section == "train":
                part, raw["throughput"], fit = throughput(
                    sizes, shots, args.inner_steps, rounds, Path(tmp) / "compose", progress
                )
            else:
                part, raw["evaluation"], fit = evaluation(
                    args.eval_models, test_episodes, args.eval_batch_size, eval_repeats, Path(tmp), progress
                )
            fits += fit
            progress.console.print(
                f"[dim]{section} done ({time.perf_counter() - started:.0f} s so far)[/dim]"
            )
            print("\n".join(part) + "\n", flush=True)
            lines += [*part, ""]
    summary = ["### How each cost grows (fitted log-log slopes)", "", *fits, ""]
    print("\n".join(summary))
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    figure(raw, fits, png)
    lines += [*summary, f"Figure: `{png.name}`; raw numbers: `{out.with_suffix('.json').name}`.", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    console.print(f"tables written to {out}, figure to {png} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
