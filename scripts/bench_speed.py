"""Speed of metaad, measured in one run, single-threaded, the contenders of each table alternating
so that load on the machine hits them all alike (ratios are from this run only):

1. meta-training and evaluation throughput of every learner config found in ``conf/model/`` on
   digits-sized inputs (64 features, the default MLP backbone), K=5, Q=20, meta-batch 16;
2. one second-order MAML meta-gradient computed by metaad (vmapped, and its per-task loop), by
   TorchOpt, by higher and by a plain ``torch.autograd.grad`` loop: the same network (the default
   MLP + linear head of metaad's ``ScoreNet``), the same episodes, inner steps and inner lr
   (inner loss: softplus of the support logits; outer: metaad's balanced BCE). The gradients are
   checked to agree before anything is timed; then meta-batch 4, 16, 64 x inner steps 1, 5;
3. start-up of ``metaad-score`` (``--help`` and a real 20-row scoring call on a checkpoint trained
   here with ``debug=quick``) beside ``python -c "import torch"``, and what scoring imports.

    python scripts/bench_speed.py                      # everything, a few minutes on 2 cores
    python scripts/bench_speed.py --quick              # checks that it runs (under a minute)
    python scripts/bench_speed.py --sections maml --compile inductor aot_eager --chunk-sizes 4 8

TorchOpt and higher are the optional extra ``peers`` (``pip install -e .[peers]``); without them
their rows are skipped and the output says so. Data loading is left out: the meta-batches are
made once, up front. The tables are printed as markdown and written to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

from metaad.apps.build import build_learner, compose_config
from metaad.data import Episode, EpisodeDataset, collate_episodes, split_tasks
from metaad.data.sources import digits
from metaad.detectors.base import Learner, anomaly_scores
from metaad.detectors.maml import MAML, balanced_bce

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K_SHOT, N_QUERY, ANOMALY_RATIO = 5, 20, 0.5
REL_TOL = 1e-5  # gradients must agree to this, relative to the largest gradient entry
STARTUP_TARGET_S = 1.5  # metaad-score may take at most this much longer than a bare `import torch`
console = Console(stderr=True)
Grads = list[Tensor]


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@dataclass
class Check:
    """One pass/fail check of the run, said by name with the numbers behind it."""

    name: str
    passed: bool
    numbers: str


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return [f"| {' | '.join(line)} |" for line in (header, rule, *rows)]


# --- episodes and learners ----------------------------------------------------------------------
def meta_batches(n_batches: int, size: int, seed: int = 0) -> list[Episode]:
    """Digits episodes of the training classes (0-5), K=5, Q=20 (half anomalies)."""
    pool = split_tasks(digits(), train_tasks=None, val_tasks=[6, 7, 8, 9], test_tasks=[6, 7, 8, 9])["train"]
    episodes = EpisodeDataset(
        pool, "train", K_SHOT, N_QUERY, ANOMALY_RATIO, n_episodes=n_batches * size, seed=seed
    )
    return list(DataLoader(episodes, batch_size=size, collate_fn=collate_episodes))


def learner_configs() -> list[str]:
    """Every learner config in conf/model/ (found, never listed by hand)."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in files("metaad.conf").joinpath("model").iterdir()
        if p.name.endswith(".yaml")
    )


def build(name: str, run_dir: Path, overrides: tuple[str, ...] = ()) -> tuple[Learner, torch.optim.Optimizer]:
    """The learner of ``model=<name>`` on a 64-feature sample, and its configured optimizer."""
    torch.manual_seed(0)
    cfg = compose_config([f"model={name}", *overrides], run_dir)
    learner = build_learner(cfg, (64,))
    return learner, instantiate(cfg.model.optimizer)(learner.parameters())


# --- 1. throughput of every learner -------------------------------------------------------------
def throughput(
    names: list[str], rounds: int, meta_batch: int, run_dir: Path, progress: Progress
) -> list[str]:
    """Meta-training steps (loss, backward, optimizer step) and evaluation (adapt + score under
    no_grad, as the evaluator does), one meta-batch of each learner in turn, ``rounds`` times."""
    batches = meta_batches(rounds + 1, meta_batch, seed=0)
    learners = {name: build(name, run_dir) for name in names}
    train_t: dict[str, list[float]] = defaultdict(list)
    eval_t: dict[str, list[float]] = defaultdict(list)

    def train_step(learner: Learner, optimizer: torch.optim.Optimizer, batch: Episode) -> None:
        optimizer.zero_grad()
        loss = learner.loss(batch)
        if loss is not None:  # a learner may only take in statistics (covariance prior, nothing learned)
            loss.backward()
            optimizer.step()

    def evaluate(learner: Learner, batch: Episode) -> None:
        learner.eval()
        with torch.no_grad():
            anomaly_scores(learner, batch.support, batch.query)
        learner.train()

    for learner, optimizer in learners.values():  # warm-up
        learner.train()
        train_step(learner, optimizer, batches[-1])
        evaluate(learner, batches[-1])
    task = progress.add_task("learner throughput", total=rounds)
    for r, batch in enumerate(batches[:rounds]):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            learner, optimizer = learners[name]
            start = time.perf_counter()
            train_step(learner, optimizer, batch)
            train_t[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            evaluate(learner, batch)
            eval_t[name].append(time.perf_counter() - start)
        progress.advance(task)
    progress.remove_task(task)
    rows = [
        [
            name,
            type(learners[name][0]).__name__,
            f"{meta_batch / statistics.median(train_t[name]):,.0f}",
            f"{meta_batch / statistics.median(eval_t[name]):,.0f}",
        ]
        for name in names
    ]
    return [
        f"### Learner throughput (digits-sized: 64 features, default MLP backbone; K={K_SHOT}, "
        f"Q={N_QUERY}, meta-batch {meta_batch}; median of {rounds} meta-batches each, alternating)",
        "",
        *table(["model=", "class", "meta-train episodes/s", "eval episodes/s"], rows, "llrr"),
        "",
        "Meta-training = `loss` + `backward` + optimizer step; evaluation = `adapt` + `score` under "
        "`no_grad`. Learner configs found in conf/model/: " + ", ".join(names) + ".",
    ]


# --- 2. the MAML meta-gradient, metaad beside its peers ------------------------------------------
def inner_loss(logits: Tensor) -> Tensor:
    """One-class inner loss: BCE of the (all normal) support logits toward 0, = softplus."""
    return F.softplus(logits).mean()


def metaad_gradient(model: MAML, batch: Episode, loss: Callable | None = None) -> Grads:
    model.zero_grad(set_to_none=True)
    (loss or model.loss)(batch).backward()
    return [p.grad for p in model.net.parameters()]


def autograd_loop(net: nn.Module, batch: Episode, steps: int, lr: float) -> Grads:
    """The textbook per-task loop: ``torch.autograd.grad(create_graph=True)`` per inner step."""
    net.zero_grad(set_to_none=True)
    params = dict(net.named_parameters())
    n_tasks = batch.support.shape[0]
    for b in range(n_tasks):
        fast = params
        for _ in range(steps):
            loss = inner_loss(functional_call(net, fast, (batch.support[b],)))
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        logits = functional_call(net, fast, (batch.query[b],))
        (balanced_bce(logits, batch.label[b]) / n_tasks).backward()
    return [p.grad for p in net.parameters()]


def higher_loop(net: nn.Module, batch: Episode, steps: int, lr: float) -> Grads:
    """higher's MAML recipe (its maml-omniglot example): ``innerloop_ctx`` per task."""
    import higher

    net.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(net.parameters(), lr=lr)
    n_tasks = batch.support.shape[0]
    for b in range(n_tasks):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(inner_loss(fnet(batch.support[b])))
            (balanced_bce(fnet(batch.query[b]), batch.label[b]) / n_tasks).backward()
    return [p.grad for p in net.parameters()]


class TorchOptMetaSGD:
    """TorchOpt's MAML recipe (its few-shot examples): a ``MetaSGD`` stepping the module in place,
    its state extracted before the tasks and recovered after each."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        import torchopt

        self.torchopt, self.net = torchopt, net
        self.inner_opt = torchopt.MetaSGD(net, lr=lr)

    def __call__(self, batch: Episode, steps: int) -> Grads:
        torchopt, net = self.torchopt, self.net
        net.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(self.inner_opt, by="reference")
        n_tasks = batch.support.shape[0]
        for b in range(n_tasks):
            for _ in range(steps):
                self.inner_opt.step(inner_loss(net(batch.support[b])))
            (balanced_bce(net(batch.query[b]), batch.label[b]) / n_tasks).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(self.inner_opt, opt_state)
        return [p.grad for p in net.parameters()]


def torchopt_functional(net: nn.Module, batch: Episode, steps: int, lr: float) -> Grads:
    """TorchOpt's functional API per task: ``torchopt.sgd`` update + ``apply_updates`` (not in place)."""
    import torchopt

    net.zero_grad(set_to_none=True)
    opt = torchopt.sgd(lr=lr)
    params = dict(net.named_parameters())
    n_tasks = batch.support.shape[0]
    for b in range(n_tasks):
        fast, state = params, opt.init(params)
        for _ in range(steps):
            loss = inner_loss(functional_call(net, fast, (batch.support[b],)))
            grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=True)
            updates, state = opt.update(dict(zip(fast, grads)), state, inplace=False)
            fast = torchopt.apply_updates(fast, updates, inplace=False)
        (balanced_bce(functional_call(net, fast, (batch.query[b],)), batch.label[b]) / n_tasks).backward()
    return [p.grad for p in net.parameters()]


def torchopt_vmap(net: nn.Module, batch: Episode, steps: int, lr: float) -> Grads:
    """TorchOpt's functional update inside a hand-written ``torch.func.vmap`` over the tasks: not
    TorchOpt's MAML recipe, but what a TorchOpt user who vectorises by hand gets (metaad's design)."""
    import torchopt

    opt = torchopt.sgd(lr=lr)

    def task_loss(params: dict, support: Tensor, query: Tensor, label: Tensor) -> Tensor:
        state = opt.init(params)
        for _ in range(steps):
            grads = grad(lambda p: inner_loss(functional_call(net, p, (support,))))(params)
            updates, state = opt.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        return balanced_bce(functional_call(net, params, (query,)), label)

    net.zero_grad(set_to_none=True)
    params = dict(net.named_parameters())
    losses = vmap(task_loss, in_dims=(None, 0, 0, 0))(params, batch.support, batch.query, batch.label)
    losses.mean().backward()
    return [p.grad for p in net.parameters()]


def peers_available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(name) is not None for name in ("torchopt", "higher")}


def maml_contenders(
    run_dir: Path, steps: int, compile_backends: list[str], chunk_sizes: list[int], meta_batch: int
) -> dict[str, Callable[[Episode], Grads]]:
    """name -> meta-gradient of one meta-batch; each contender has its own copy of the same network."""
    overrides = ("model.first_order=false", f"model.inner_steps={steps}")
    vmapped, _ = build("maml", run_dir, overrides)
    looped, _ = build("maml", run_dir, (*overrides, "model.vectorize=false"))
    looped.load_state_dict(vmapped.state_dict())
    vmapped.train()
    looped.train()
    lr = vmapped.inner_lr
    out: dict[str, Callable[[Episode], Grads]] = {
        "metaad MAML (vmap)": lambda b: metaad_gradient(vmapped, b),
        "metaad MAML, vectorize=false (its per-task loop)": lambda b: metaad_gradient(looped, b),
    }
    for size in chunk_sizes:
        if size < meta_batch:
            chunked = copy.deepcopy(vmapped)
            chunked.chunk_size = size
            out[f"metaad MAML, chunk_size={size}"] = lambda b, m=chunked: metaad_gradient(m, b)
    for backend in compile_backends:
        compiled = copy.deepcopy(vmapped)
        loss = torch.compile(compiled.loss, backend=backend)
        out[f"metaad MAML + torch.compile(loss, {backend})"] = lambda b, m=compiled, f=loss: metaad_gradient(
            m, b, f
        )

    def net() -> nn.Module:
        return copy.deepcopy(vmapped.net)

    available = peers_available()
    if available["torchopt"]:
        metasgd = TorchOptMetaSGD(net(), lr)
        out["TorchOpt MetaSGD (per task)"] = lambda b: metasgd(b, steps)
        functional_net = net()
        out["TorchOpt functional sgd (per task)"] = lambda b: torchopt_functional(
            functional_net, b, steps, lr
        )
    if available["higher"]:
        higher_net = net()
        out["higher innerloop_ctx (per task)"] = lambda b: higher_loop(higher_net, b, steps, lr)
    loop_net = net()
    out["torch.autograd.grad loop (per task)"] = lambda b: autograd_loop(loop_net, b, steps, lr)
    if available["torchopt"]:
        vmap_net = net()
        out["TorchOpt sgd in a hand-written torch.func.vmap"] = lambda b: torchopt_vmap(
            vmap_net, b, steps, lr
        )
    return out


PEERS = ("TorchOpt MetaSGD", "TorchOpt functional", "higher", "torch.autograd.grad loop")


def maml_versus_peers(
    run_dir: Path,
    sizes: list[int],
    step_counts: list[int],
    rounds: int,
    compile_backends: list[str],
    chunk_sizes: list[int],
    progress: Progress,
) -> tuple[list[str], list[Check]]:
    lines: list[str] = []
    available = peers_available()
    missing = [name for name, ok in available.items() if not ok]
    checks: list[Check] = []
    summary: list[list[str]] = []
    compile_rows: list[list[str]] = []
    task = progress.add_task("MAML vs peers", total=len(sizes) * len(step_counts))
    for steps in step_counts:
        for size in sizes:
            progress.update(task, description=f"MAML vs peers: meta-batch {size}, {steps} inner step(s)")
            torch._dynamo.reset()
            batch = meta_batches(1, size, seed=1)[0]
            contenders = maml_contenders(run_dir, steps, compile_backends, chunk_sizes, size)
            names = list(contenders)
            # Check: every gradient against metaad's vmapped one (also the warm-up, and compilation).
            reference = [g.clone() for g in contenders[names[0]](batch)]
            scale = max(g.abs().max().item() for g in reference)
            first_call: dict[str, float] = {}
            diffs: dict[str, float] = {}
            for name in names:
                start = time.perf_counter()
                got = contenders[name](batch)
                first_call[name] = time.perf_counter() - start
                diffs[name] = max((a - b).abs().max().item() for a, b in zip(got, reference))
            times: dict[str, list[float]] = defaultdict(list)
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    start = time.perf_counter()
                    contenders[name](batch)
                    times[name].append(time.perf_counter() - start)
            ms = {name: median_ms(times[name]) for name in names}
            base = ms[names[0]]
            rows = []
            off = {name: diff for name, diff in diffs.items() if not diff <= REL_TOL * scale}
            checks.append(
                Check(
                    f"gradients agree with metaad's (meta-batch {size}, {steps} inner step(s))",
                    not off,
                    ", ".join(f"{name}: max |diff| {diff:.1e}" for name, diff in off.items())
                    + f"{' > ' if off else 'all <= '}{REL_TOL:g} x largest |grad| {scale:.2e} "
                    f"= {REL_TOL * scale:.1e}",
                )
            )
            for name in names:
                agree = name not in off
                rows.append(
                    [
                        name,
                        f"{ms[name]:.1f}",
                        f"{ms[name] / base:.2f}x",
                        f"{diffs[name]:.1e}" + ("" if agree else " DISAGREE"),
                    ]
                )
                if "torch.compile" in name:
                    compile_s = first_call[name] - ms[name] / 1000
                    compile_rows.append([name, str(size), str(steps), f"{compile_s:.1f}", f"{ms[name]:.1f}"])
            lines += [
                f"#### Meta-batch {size}, {steps} inner step(s): ms per meta-batch (median of {rounds}, "
                f"alternating); max |grad - metaad's| (largest |grad| entry: {scale:.2e})",
                "",
                *table(["contender", "ms / meta-batch", "time vs metaad", "max abs grad diff"], rows),
                "",
            ]
            peers = {n: ms[n] for n in names if n.startswith(PEERS)}
            if peers:
                fastest = min(peers, key=peers.get)
                row = [str(size), str(steps), f"{base:.1f}", fastest, f"{peers[fastest] / base:.2f}x"]
                vmapped = next((n for n in names if "hand-written" in n), None)
                row.append(f"{ms[vmapped] / base:.2f}x" if vmapped else "-")
                summary.append(row)
            progress.advance(task)
    progress.remove_task(task)
    head = [
        "### Second-order MAML meta-gradient: metaad beside TorchOpt, higher and a per-task loop",
        "",
        "Same network (default MLP backbone + linear head, metaad's ScoreNet), same digits episodes "
        f"(K={K_SHOT}, Q={N_QUERY}), same inner steps and inner lr (0.1); inner loss softplus of the "
        "support logits, outer loss metaad's balanced BCE, mean over the tasks. Gradients are checked "
        f"against metaad's before timing (must agree to {REL_TOL:g} relative). `time vs metaad` > 1: "
        "slower than metaad.",
        "",
    ]
    if missing:
        head += [
            f"**Peers not installed: {', '.join(missing)}** (their rows are skipped; "
            "`pip install -e .[peers]` adds them).",
            "",
        ]
    if summary:
        head += [
            "Summary: the fastest peer (TorchOpt MetaSGD or functional, higher, or the autograd loop, "
            "each in its documented per-task recipe) against metaad; last column: TorchOpt's update "
            "inside a hand-written `torch.func.vmap`.",
            "",
            *table(
                [
                    "meta-batch",
                    "inner steps",
                    "metaad ms",
                    "fastest peer",
                    "its time vs metaad",
                    "TorchOpt + vmap",
                ],
                summary,
                "rrrlrr",
            ),
            "",
        ]
        goal = [row for row in summary if row[0] == "16"]
        if goal:
            verdicts = ", ".join(
                f"{row[1]} inner step(s): {row[4]} ({'met' if float(row[4][:-1]) >= 2 else 'NOT met'})"
                for row in goal
            )
            head += [f"Goal, metaad at least 2x the fastest peer at meta-batch 16: {verdicts}.", ""]
    if compile_rows:
        lines += [
            "torch.compile of metaad's whole loss (compile time = first call minus a timed call):",
            "",
            *table(
                ["contender", "meta-batch", "inner steps", "compile s", "ms / meta-batch"],
                compile_rows,
                "lrrrr",
            ),
            "",
        ]
    return head + lines, checks


# --- 3. start-up of metaad-score ------------------------------------------------------------------
def scoring_files(tmp: Path, progress: Progress) -> tuple[list[str], list[str]] | tuple[None, str]:
    """A checkpoint trained here (debug=quick) and CSVs of raw digits values (0-16): 5 normal
    support rows (a 6), 20 query rows (ten 6s, ten 7s). Returns the scoring command line."""
    from sklearn.datasets import load_digits

    task = progress.add_task("training a debug=quick checkpoint", total=None)
    run = subprocess.run(
        [str(BIN / "metaad-train"), "debug=quick", "logger=none", f"hydra.run.dir={tmp / 'train'}"],
        capture_output=True,
        text=True,
    )
    progress.remove_task(task)
    ckpt = tmp / "train" / "checkpoints" / "best.ckpt"
    if run.returncode or not ckpt.is_file():
        return None, f"metaad-train debug=quick failed (rc {run.returncode}): {run.stderr[-500:]}"
    data = load_digits()
    x, y = data.data.astype(int), data.target
    columns = ",".join(f"pixel_{i}" for i in range(x.shape[1]))
    support, query = x[y == 6][:5], [*x[y == 6][5:15], *x[y == 7][:10]]
    (tmp / "support.csv").write_text(
        columns + "\n" + "\n".join(",".join(map(str, r)) for r in support) + "\n"
    )
    (tmp / "query.csv").write_text(
        "id,"
        + columns
        + "\n"
        + "\n".join(f"q{i}," + ",".join(map(str, r)) for i, r in enumerate(query))
        + "\n"
    )
    args = [f"ckpt_path={ckpt}", f"support={tmp / 'support.csv'}", f"query={tmp / 'query.csv'}"]
    return args, ""


def import_costs(stderr: str, top: int = 8) -> list[tuple[str, float, str]]:
    """From ``python -X importtime`` output: (top-level package, self import time in s summed over
    its modules, the metaad module that first pulled it in), costliest first."""
    entries = []  # (depth, module, self s) in the order Python reports them: children first
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|( +)(\S+)", line)
        if match:
            entries.append(((len(match.group(2)) - 1) // 2, match.group(3), int(match.group(1)) / 1e6))
    totals: dict[str, float] = defaultdict(float)
    via: dict[str, str] = {}
    for i, (depth, module, seconds) in enumerate(entries):
        root = module.split(".")[0]
        totals[root] += seconds
        if root in via:
            continue
        # The importer chain: the first later entry one level up, and so on to the top level.
        chain, level = [], depth
        for later_depth, later, _ in entries[i + 1 :]:
            if later_depth < level:
                chain.append(later)
                level = later_depth
        importer = next((m for m in chain if m.startswith("metaad.")), None)
        via[root] = "-" if root == "metaad" else f"`{importer}`" if importer else "a run-time import"
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(root, seconds, via[root]) for root, seconds in ranked]


def startup(repeats: int, real_call: bool, progress: Progress) -> tuple[list[str], list[Check]]:
    py = sys.executable
    lines = [
        f"### metaad-score start-up (wall time of a fresh process; median of {repeats}, alternating)",
        "",
    ]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        commands: dict[str, list[str]] = {
            'python -c "import torch"': [py, "-c", "import torch"],
            'python -c "import metaad.api"': [py, "-c", "import metaad.api"],
            "metaad-score --help": [str(BIN / "metaad-score"), "--help"],
        }
        score_args: list[str] | None = None
        if real_call:
            score_args, error = scoring_files(tmp, progress)
            if score_args is None:
                lines += [f"(no real scoring call: {error})", ""]
            else:
                commands["metaad-score, 20 query rows"] = [str(BIN / "metaad-score"), *score_args]
        times: dict[str, list[float]] = defaultdict(list)
        task = progress.add_task("start-up", total=repeats * len(commands))
        names = list(commands)
        for r in range(repeats):
            for label in names[r % len(names) :] + names[: r % len(names)]:
                cmd = commands[label]
                if label.startswith("metaad-score, "):
                    cmd = [*cmd, f"output={tmp / f'scores_{r}.csv'}", f"hydra.run.dir={tmp / f'score_{r}'}"]
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                times[label].append(time.perf_counter() - start)
                if done.returncode:
                    raise RuntimeError(
                        f"{shlex.join(cmd)} failed (rc {done.returncode}):\n{done.stderr[-2000:]}"
                    )
                progress.advance(task)
        progress.remove_task(task)
        torch_s = statistics.median(times[names[0]])
        rows = [
            [
                f"`{label}`",
                f"{statistics.median(times[label]):.2f}",
                f"{min(times[label]):.2f}",
                f"{statistics.median(times[label]) - torch_s:+.2f}",
            ]
            for label in names
        ]
        lines += [*table(["command", "median s", "min s", "vs import torch (s)"], rows), ""]
        scoring = next((n for n in reversed(names) if n.startswith("metaad-score")), None)
        over = statistics.median(times[scoring]) - torch_s
        met = over <= STARTUP_TARGET_S
        lines += [
            f"Target: `{scoring}` within {STARTUP_TARGET_S:g} s of the bare torch import: "
            f"**{'met' if met else 'NOT met'}** ({over:+.2f} s).",
            "",
        ]
        checks = [
            Check(
                f"start-up target: `{scoring}` within {STARTUP_TARGET_S:g} s of `import torch`",
                met,
                f"median {statistics.median(times[scoring]):.2f} s vs {torch_s:.2f} s: {over:+.2f} s",
            )
        ]
        # What scoring imports: Lightning must not be among it; the costliest packages.
        probe = "import sys, metaad.api; print(sorted({m.split('.')[0] for m in sys.modules}))"
        loaded = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout
        lightning_api = [m for m in ("pytorch_lightning", "lightning") if f"'{m}'" in loaded]
        traced = [py, "-X", "importtime", str(BIN / "metaad-score")]
        traced += (
            [*score_args, f"output={tmp / 'traced.csv'}", f"hydra.run.dir={tmp / 'traced'}"]
            if score_args
            else ["--help"]
        )
        trace = subprocess.run(traced, capture_output=True, text=True)
        imported = {m.group(1).split(".")[0] for m in re.finditer(r"\|\s+(\S+)\s*$", trace.stderr, re.M)}
        lightning_score = sorted(imported & {"pytorch_lightning", "lightning", "lightning_fabric"})
        costs = import_costs(trace.stderr)
        what = "the real scoring call" if score_args else "`metaad-score --help`"
        lines += [
            f"Lightning imported by `import metaad.api`: {lightning_api or 'no'}; by {what} "
            f"(`python -X importtime`): {lightning_score or 'no'}.",
            "",
            f"Costliest imports of {what} (self time summed by top-level package, one traced run):",
            "",
            *table(
                ["package", "import s", "pulled in by"],
                [[f"`{name}`", f"{s:.2f}", by] for name, s, by in costs],
                "lrl",
            ),
            "",
        ]
    checks += [
        Check("no Lightning in `import metaad.api`", not lightning_api, f"imported: {lightning_api}"),
        Check(f"no Lightning in {what}", not lightning_score, f"imported: {lightning_score}"),
    ]
    return lines, checks


# --- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run that checks the script works")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["learners", "maml", "startup"],
        default=["learners", "maml", "startup"],
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed meta-batches per contender (default 20, quick 3)"
    )
    parser.add_argument("--meta-batch-size", type=int, default=16, help="for the learner table")
    parser.add_argument(
        "--maml-meta-batch-sizes", type=int, nargs="+", default=None, help="default 4 16 64 (quick: 4 16)"
    )
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument(
        "--compile",
        nargs="*",
        default=[],
        metavar="BACKEND",
        help="also time metaad with torch.compile(loss, backend=...), e.g. inductor aot_eager",
    )
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="*", default=[], help="also time metaad with vmap chunk_size=..."
    )
    parser.add_argument("--startup-repeats", type=int, default=None, help="default 5 (quick 2)")
    parser.add_argument(
        "--no-score-call", action="store_true", help="time metaad-score --help only (no checkpoint)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (measure with 1)")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file (default outputs/speed/<time>/speed.md)"
    )
    args = parser.parse_args()
    # One thread here and in every process started from here (the start-up timings).
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    rounds = args.rounds or (3 if args.quick else 20)
    sizes = args.maml_meta_batch_sizes or ([4, 16] if args.quick else [4, 16, 64])
    repeats = args.startup_repeats or (2 if args.quick else 5)
    out = args.out or ROOT / "outputs" / "speed" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S") / "speed.md"

    versions = {
        name: importlib.metadata.version(name) for name in ("torchopt", "higher") if peers_available()[name]
    }
    lines = [
        f"## metaad speed ({'quick check' if args.quick else 'full run'}, {datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"`{shlex.join(['python', 'scripts/bench_speed.py', *sys.argv[1:]])}`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU core(s) "
        f"({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}"
        + "".join(f", {name} {version}" for name, version in versions.items())
        + ".",
        "",
    ]
    print("\n".join(lines))
    checks: list[Check] = []
    with tempfile.TemporaryDirectory() as tmp, progress_bar() as progress:
        run_dir = Path(tmp)
        for section in args.sections:
            if section == "learners":
                part = throughput(learner_configs(), rounds, args.meta_batch_size, run_dir, progress)
            elif section == "maml":
                part, found = maml_versus_peers(
                    run_dir, sizes, args.inner_steps, rounds, args.compile, args.chunk_sizes, progress
                )
                checks += found
            else:
                part, found = startup(repeats, not args.no_score_call, progress)
                checks += found
            progress.console.print(f"[dim]{section} done[/dim]")
            print("\n".join(part) + "\n", flush=True)
            lines += [*part, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    console.print(f"tables written to {out}")
    failed = [check for check in checks if not check.passed]
    for check in failed:
        console.print(f"[red]FAILED: {escape(check.name)}: {escape(check.numbers)}[/red]", highlight=False)
    if failed:
        passed = len(checks) - len(failed)
        console.print(f"{len(failed)} check(s) failed, {passed} passed")
        sys.exit(1)
    console.print(f"all {len(checks)} checks passed")


if __name__ == "__main__":
    main()
