"""A fleet larger than memory: peak memory of a whole ``metaad-train`` on a long series table read
through the store, as the fleet grows (the issue's target: 10,000 entities x 10,000 steps x 38
metrics, 15 GB as float32, under 4 GB peak), and the cost of drawing an episode at each size.

For each size a child process writes a Parquet long table (``entity`` numbers, ``t``, ``m0`` ... metrics as
float32, a 0/1 ``label`` column with a few incidents per entity; grouped by entity, time ascending,
row groups of 500,000 rows, never the whole table in memory). Then, each in its own process, one
thread, peak resident memory from ``os.wait4`` (the process's ru_maxrss):

- ``store: build``: ``metaad-train dataset=series_table dataset.source.cache=<scratch>``: the table
  streamed into the store (one entity at a time), windows indexed, then meta-trained, validated, tested;
- ``store: reuse``: the same command again: the store and its window index opened as they are.

Then, in one more child, the time to draw 200 training episodes from the store (the same episode
shape at every size: it should not grow with the table).

    python scripts/bench_series_store.py                                  # 10^2 .. 10^4 entities
    python scripts/bench_series_store.py --entities 100 --steps 2000      # a quick check that it runs

Tables and stores go to ``--scratch`` (default /work/scratch if it exists, else a temp dir) and are
deleted afterwards; the table of results to ``--out`` (default ``outputs/scale/series-store-<time>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_store import measured_train  # a script beside this one

GB = 1e9
GROUP = 500_000


def write_table(path: Path, entities: int, steps: int, metrics: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    columns = [f"m{j}" for j in range(metrics)]
    schema = pa.schema(
        [("entity", pa.int32()), ("t", pa.int64()), *(pa.field(c, pa.float32()) for c in columns)]
        + [("label", pa.int8())]
    )
    per_group = max(1, GROUP // steps)
    phase = np.arange(steps, dtype=np.float32) * (2 * np.pi / 288)
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for first in range(0, entities, per_group):
            block_entities = range(first, min(entities, first + per_group))
            n = len(block_entities) * steps
            level = rng.normal(0, 1, (len(block_entities), 1, metrics)).astype(np.float32)
            x = (
                np.sin(phase)[None, :, None]
                + level
                + 0.3 * rng.standard_normal((len(block_entities), steps, metrics), np.float32)
            )
            label = np.zeros((len(block_entities), steps), np.int8)
            for i in range(len(block_entities)):
                for start in rng.integers(0, steps - 20, 4):
                    label[i, start : start + 20] = 1
                    x[i, start : start + 20, rng.integers(metrics)] += 4.0
            block = {
                "entity": np.repeat(np.arange(first, first + len(block_entities), dtype=np.int32), steps),
                "t": np.tile(np.arange(steps, dtype=np.int64), len(block_entities)),
                **{c: x[:, :, j].reshape(n) for j, c in enumerate(columns)},
                "label": label.reshape(n),
            }
            writer.write_table(pa.table(block, schema=schema), row_group_size=GROUP)


def train(table: Path, cache: Path, run_dir: Path, steps: int, log_file: Path) -> dict:
    cmd = [
        str(Path(sys.executable).with_name("metaad-train")),
        "dataset=series_table",
        f"dataset.source.path={table}",
        "dataset.source.entity_column=entity",
        "dataset.source.time_column=t",
        "dataset.source.label_column=label",
        f"dataset.source.cache={cache}",
        "dataset.val_episodes=50",
        "dataset.test_episodes=100",
        f"dataset.train_episodes={8 * steps}",
        "dataset.eval_batch_size=50",
        "model=protonet",
        "backbone=mlp",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    return measured_train(cmd, run_dir, log_file)


DRAW = """
import time, numpy as np
from metaad.data.series import series_table
from metaad.data import split_tasks, EpisodeDataset
from metaad.data.tasks import entity_folds
data = series_table({table!r}, 'entity', 't', label_column='label', cache={cache!r})
val, test = entity_folds(data.task_names, 5, 0)
pool = split_tasks(data, None, val, test)['train']
dataset = EpisodeDataset(pool, 'train', 5, 20, 0.5, 200, seed=0, scaling='support')
dataset[(0, 0)]
start = time.perf_counter()
for i in range(200):
    dataset[(0, i)]
print((time.perf_counter() - start) / 200)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--steps", type=int, default=10_000, help="time steps per entity")
    parser.add_argument("--metrics", type=int, default=38)
    parser.add_argument("--train-steps", type=int, default=50, help="meta-batches of 8 episodes")
    default_scratch = Path("/work/scratch") if Path("/work/scratch").is_dir() else None
    parser.add_argument("--scratch", type=Path, default=default_scratch)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path("outputs/scale") / time.strftime("series-store-%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="metaad-series-store-", dir=args.scratch))
    results = []
    here = str(Path(__file__).parent)
    try:
        for entities in args.entities:
            table = scratch / f"fleet-{entities}.parquet"
            start = time.perf_counter()
            # in a child: a parent's resident memory at fork counts in its children's ru_maxrss
            child = f"import sys; sys.path.insert(0, {here!r}); import bench_series_store as b; "
            child += f"b.write_table(b.Path({str(table)!r}), {entities}, {args.steps}, {args.metrics})"
            subprocess.run([sys.executable, "-c", child], check=True)
            x_gb = entities * args.steps * args.metrics * 4 / GB
            print(
                f"{entities:,} entities x {args.steps:,} steps x {args.metrics} metrics ({x_gb:.2f} GB as "
                f"float32): {table.stat().st_size / GB:.2f} GB Parquet written in "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            cache = scratch / "cache"
            for mode in ("store: build", "store: reuse"):
                run_dir = scratch / f"run-{entities}-{mode.replace(': ', '-')}"
                row = {"entities": entities, "steps": args.steps, "metrics": args.metrics, "mode": mode}
                row |= {"x_gb": x_gb} | train(
                    table, cache, run_dir, args.train_steps, out / f"{run_dir.name}.log"
                )
                print("  " + json.dumps(row), flush=True)
                results.append(row)
            draw = subprocess.run(
                [sys.executable, "-c", DRAW.format(table=str(table), cache=str(cache))],
                check=True,
                capture_output=True,
                text=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            results[-1]["episode_ms"] = 1000 * float(draw.stdout.strip().splitlines()[-1])
            print(
                f"  one training episode (K=5, 20 queries, windows of 32) drawn in "
                f"{results[-1]['episode_ms']:.2f} ms",
                flush=True,
            )
            shutil.rmtree(cache, ignore_errors=True)
            table.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        f"`python scripts/bench_series_store.py {' '.join(sys.argv[1:])}`: a whole metaad-train "
        f"(dataset=series_table through the store; ProtoNet, MLP, {args.train_steps} steps, val 50 / test "
        "100 episodes), one thread, peak resident memory of the process",
        "",
        "| entities | steps | metrics | series (GB, float32) | mode | wall (s) | peak memory (GB) | "
        "episode draw (ms) | test AUROC | best baseline |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        draw = f"{r['episode_ms']:.2f}" if "episode_ms" in r else ""
        lines.append(
            f"| {r['entities']:,} | {r['steps']:,} | {r['metrics']} | {r['x_gb']:.2f} | {r['mode']} | "
            f"{r['wall_s']:.0f} | {r['peak_gb']:.2f} | {draw} | {r['test_auroc']:.3f} | "
            f"{r['baseline_auroc']:.3f} |"
        )
    text = "\n".join(lines)
    (out / "series_store.md").write_text(text + "\n")
    (out / "series_store.json").write_text(json.dumps(results, indent=1))
    print("\n" + text + f"\n\n(written to {out})")


if __name__ == "__main__":
    main()
