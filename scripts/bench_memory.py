"""Peak memory of ``metaad-train`` per experiment at its full evaluation query size, with the query
scored ``score_chunk`` samples at a time (the default) and in one piece (``score_chunk=null``).

Each run is its own single-threaded process; its peak resident memory is the process's ru_maxrss
(``os.wait4``). Training is cut to a few steps and the number of validation/test episodes lowered
where the experiment has many: neither changes the size of a batch of episodes, which is what sets
the peak while scoring (the query images of ``eval_batch_size`` episodes through the backbone).

    python scripts/bench_memory.py                           # every experiment below, both settings
    python scripts/bench_memory.py --experiments mt_mnist    # one

The table goes to ``--out`` (default ``outputs/memory/<time>/memory.md``), the raw numbers beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_store import measured_train  # a script beside this one

BIN = Path(sys.executable).parent
# experiment ("default": the default run) -> overrides that shorten it without changing a batch's size
EXPERIMENTS: dict[str, list[str]] = {
    "default": [],
    "digits": ["experiment=digits", "trainer.max_epochs=1", "dataset.train_episodes=80"],
    "mt_mnist": [
        "experiment=mt_mnist",
        "trainer.max_epochs=1",
        "dataset.train_episodes=16",
        "dataset.val_episodes=4",
        "dataset.test_episodes=4",
    ],
    "fashion_mnist": [
        "experiment=fashion_mnist",
        "trainer.max_epochs=1",
        "dataset.train_episodes=64",
        "dataset.val_episodes=8",
        "dataset.test_episodes=8",
    ],
    "omniglot": [
        "experiment=omniglot",
        "trainer.max_epochs=1",
        "dataset.train_episodes=120",
        "dataset.val_episodes=100",
        "dataset.test_episodes=200",
    ],
    "mvtec": ["experiment=mvtec", "trainer.max_epochs=1"],
}


def measured(cmd: list[str], run_dir: Path, log_file: Path) -> dict:
    """One ``metaad-train`` on one thread (bench_store's measurement: wall time, peak memory from
    os.wait4, test AUROC), with the evaluation batch it scored."""
    run = measured_train(cmd, run_dir, log_file)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads(
        subprocess.run(
            [sys.executable, "-c", _CONFIG_OF.format(run_dir=str(run_dir))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return {
        "wall_s": run["wall_s"],
        "peak_gb": run["peak_gb"],
        "test_auroc": run["test_auroc"],
        "data": metrics.get("data"),
        **config,
        "model": metrics["model"],
        "dataset": metrics["dataset"],
    }


# what a batch of test episodes held, from the run's stored config
_CONFIG_OF = """
import json, yaml
c = yaml.safe_load(open("{run_dir}/.hydra/config.yaml"))
d = c["dataset"]
q = d.get("test_n_query") or d["n_query"]
print(json.dumps({{"backbone": c["backbone"]["_target_"].rsplit(".", 1)[-1], "test_query": q,
    "eval_batch": d["eval_batch_size"], "k_shot": d["k_shot"]}}))
"""


def table(rows: list[dict]) -> str:
    lines = [
        "| experiment | model | backbone | test query (samples x episodes a batch) | score_chunk "
        "| peak memory (GB) | wall (s) | test AUROC |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        chunk = "whole batch" if r["score_chunk"] is None else f"{r['score_chunk']:,}"
        lines.append(
            f"| {r['experiment']} ({r['dataset']}) | {r['model']} | {r['backbone']} "
            f"| {r['test_query']:,} x {r['eval_batch']} | {chunk} | {r['peak_gb']:.2f} "
            f"| {r['wall_s']:.0f} | {r['test_auroc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--chunks", nargs="+", default=["1024", "null"], help="score_chunk values")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, help="only print the table of a memory.json written before")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    out = args.out or Path("outputs/memory") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="metaad-memory-"))
    rows = []
    for name in args.experiments:
        for chunk in args.chunks:
            run_dir = scratch / f"{name}-{chunk}"
            cmd = [str(BIN / "metaad-train"), *EXPERIMENTS[name], f"score_chunk={chunk}", "logger=none"]
            cmd += ["trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
            row = {"experiment": name, "score_chunk": None if chunk == "null" else int(chunk)}
            row |= measured(cmd, run_dir, out / f"{run_dir.name}.log") | {"run_dir": str(run_dir)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    text = (
        f"`{shlex.join(['python', 'scripts/bench_memory.py', *sys.argv[1:]])}` ({stamp}, one thread a "
        f"run, {os.cpu_count()} CPU cores): peak resident memory of a whole `metaad-train` (training cut "
        "to a few steps, episode counts lowered where many; a batch of episodes as the experiment has it)\n\n"
        + table(rows)
        + "\n"
    )
    (out / "memory.md").write_text(text)
    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{text}\nwritten to {out / 'memory.md'}")


if __name__ == "__main__":
    main()
