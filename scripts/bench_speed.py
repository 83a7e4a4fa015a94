"""Speed of the learners, measured in one run: meta-training and evaluation throughput of each
learner on the same episodes, and vmapped MAML against a per-task Python loop.

    python scripts/bench_speed.py                      # every learner, MAML at meta-batch 16
    python scripts/bench_speed.py --steps 10 --threads 1

Episodes are digits episodes of the training classes (K=5, 20 queries), the backbone the default
MLP; data loading is left out (the meta-batches are made once, up front). Meta-training steps are
``loss -> backward -> optimizer step``; evaluation is ``adapt`` + ``score`` under ``no_grad`` as in
validation/test. The MAML comparison runs the same second-order meta-gradient both ways (same
initialisation; their gradients are checked to agree) and alternates them, so load on the
machine hits both alike. Prints markdown tables; ratios are from this run only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader

from metaad.build import build_model, compose_config
from metaad.data import Episode, EpisodeDataset, split_tasks
from metaad.data.sources import digits
from metaad.detectors.base import EpisodicModule

LEARNERS = ["protonet", "protonet_nway", "siamese", "maml", "fomaml", "metasgd", "anil", "ocmaml"]
console = Console(stderr=True)


def meta_batches(n: int, size: int, seed: int = 0) -> list[Episode]:
    pool = split_tasks(digits(), train_tasks=None, val_tasks=[6, 7, 8, 9], test_tasks=[6, 7, 8, 9])["train"]
    episodes = EpisodeDataset(
        pool, "train", k_shot=5, n_query=20, anomaly_ratio=0.5, n_episodes=n * size, seed=seed
    )
    return list(DataLoader(episodes, batch_size=size))


def learner(name: str, run_dir: Path, overrides: list[str] = ()) -> EpisodicModule:
    torch.manual_seed(0)
    cfg = compose_config([f"model={name}", *overrides], run_dir)
    return build_model(cfg, (64,))


def train_step(model: EpisodicModule, optimizer: torch.optim.Optimizer, batch: Episode) -> None:
    optimizer.zero_grad()
    model.loss(batch).backward()
    optimizer.step()


def evaluate(model: EpisodicModule, batch: Episode) -> None:
    with torch.no_grad():
        model.anomaly_scores(batch.support, batch.query)


def throughput(name: str, batches: list[Episode], run_dir: Path) -> tuple[float, float]:
    """(meta-training, evaluation) episodes per second of one learner."""
    model = learner(name, run_dir).train()
    optimizer = model.configure_optimizers()
    episodes = sum(b.support.shape[0] for b in batches)
    train_step(model, optimizer, batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch)
    train_rate = episodes / (time.perf_counter() - start)
    model.eval()
    evaluate(model, batches[0])
    start = time.perf_counter()
    for batch in batches:
        evaluate(model, batch)
    return train_rate, episodes / (time.perf_counter() - start)


def maml_vmap_vs_loop(batch: Episode, repeats: int, run_dir: Path) -> dict[str, float]:
    """Second-order MAML meta-gradient on one meta-batch: vmapped vs the same per-task function
    called task by task in a Python loop (``model.vectorize=false``)."""
    models = {v: learner("maml", run_dir, [f"model.vectorize={v}"]).train() for v in ("true", "false")}

    def meta_gradient(model: EpisodicModule) -> list[torch.Tensor]:
        model.zero_grad()
        model.loss(batch).backward()
        return [p.grad for p in model.parameters()]

    grads = {v: meta_gradient(m) for v, m in models.items()}  # also the warm-up
    diff = max((a - b).abs().max().item() for a, b in zip(grads["true"], grads["false"]))
    times = {"true": 0.0, "false": 0.0}
    for _ in range(repeats):
        for v, model in models.items():
            start = time.perf_counter()
            meta_gradient(model)
            times[v] += time.perf_counter() - start
    tasks = batch.support.shape[0] * repeats
    return {"vmap": tasks / times["true"], "loop": tasks / times["false"], "max_grad_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="meta-batches timed per learner")
    parser.add_argument("--meta-batch-size", type=int, default=8)
    parser.add_argument("--maml-meta-batch-size", type=int, default=16)
    parser.add_argument("--maml-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--learners", nargs="*", default=LEARNERS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batches = meta_batches(args.steps, args.meta_batch_size)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as progress:
        run_dir = Path(tmp)
        task = progress.add_task("learners", total=len(args.learners) + 1)
        for name in args.learners:
            progress.update(task, description=f"timing {name}")
            rates[name] = throughput(name, batches, run_dir)
            progress.advance(task)
        progress.update(task, description=f"MAML vmap vs loop, meta-batch {args.maml_meta_batch_size}")
        big = meta_batches(1, args.maml_meta_batch_size, seed=1)[0]
        maml = maml_vmap_vs_loop(big, args.maml_repeats, run_dir)
        progress.advance(task)

    print(
        f"digits episodes (K=5, 20 queries), MLP backbone, meta-batch {args.meta_batch_size}, "
        f"{args.steps} meta-batches, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n"
    )
    print("| learner | meta-train episodes/s | eval episodes/s |")
    print("|---|---:|---:|")
    for name, (train_rate, eval_rate) in rates.items():
        print(f"| {name} | {train_rate:,.0f} | {eval_rate:,.0f} |")
    print(
        f"\nSecond-order MAML meta-gradient, meta-batch {args.maml_meta_batch_size}, "
        f"{args.maml_repeats} repeats "
        f"(max |grad difference| {maml['max_grad_diff']:.1e}):\n"
    )
    print("| MAML | tasks/s | speed-up |")
    print("|---|---:|---:|")
    print(f"| per-task Python loop | {maml['loop']:,.0f} | 1.00x |")
    print(f"| vmap | {maml['vmap']:,.0f} | {maml['vmap'] / maml['loop']:.2f}x |")


if __name__ == "__main__":
    main()
