"""Tables larger than memory: peak memory and time of a whole ``metaad-train`` on a Parquet table, read
into memory or through the store (``dataset.source.cache``), as rows grow.

For each size a child process writes a Parquet table (row groups of 500,000 rows, never the whole
table in memory): ``features`` float32 columns, a ``task`` column dealing rows evenly to
rows / ``--rows-per-task`` tasks (``t0000`` ...), an ``anomalous`` 0/1 column (10% of each task's
rows, shifted); tasks ``*8?`` validate, ``*9?`` test, the rest meta-train. Then, each in its own
process, single-threaded, peak resident memory from ``os.wait4`` (the process's ru_maxrss):

- ``memory``: ``dataset.source.cache=null``, the table gathered in memory;
- ``store: build``: the first run with a cache folder: the table streamed into the store, then trained;
- ``store: reuse``: the same command again: the store opened as it is.

Then the cost of the store's content checks (``data.store``: the small files' CRC-32 at opening,
a row's CRC-32 each time it is read), timed on that store with and without them, beside the
reuse run's wall time: opening, plus the per-row cost times the rows the run reads.

Every run meta-trains ProtoNet on the MLP (``trainer.max_steps``, default 50), validates and tests
(50 / 100 episodes) beside the baselines. Sizes whose in-memory run would not fit in the free memory
are skipped for ``memory`` and the output says so.

    python scripts/bench_store.py                        # 10^5 .. 10^7 rows x 100 features, 1,000 rows a task
    python scripts/bench_store.py --rows 100000 --quick  # one small size, checks that it runs

The table goes to ``--out`` (default ``outputs/scale/store-<time>/store.md``), the raw numbers beside it.
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

GB = 1e9
GROUP = 500_000


def write_table(path: Path, rows: int, features: int, tasks: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (tasks, features)).astype(np.float32)
    names = np.array([f"t{t:04d}" for t in range(tasks)])
    columns = [f"f{j}" for j in range(features)]
    schema = pa.schema(
        [*(pa.field(c, pa.float32()) for c in columns), ("task", pa.string()), ("anomalous", pa.int8())]
    )
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, GROUP):
            n = min(GROUP, rows - start)
            task = (start + np.arange(n)) % tasks
            anomalous = (start + np.arange(n)) // tasks % 10 == 9
            x = rng.standard_normal((n, features), np.float32) + means[task]
            x[anomalous, : max(1, features // 10)] += 0.5
            block = {c: x[:, j] for j, c in enumerate(columns)}
            block |= {"task": names[task], "anomalous": anomalous.astype(np.int8)}
            writer.write_table(pa.table(block, schema=schema))


def train(table: Path, cache: Path | None, run_dir: Path, steps: int, log_file: Path) -> dict:
    cmd = [
        str(Path(sys.executable).with_name("metaad-train")),
        "dataset=table",
        f"dataset.source.path={table}",
        "dataset.source.task_column=task",
        "dataset.source.anomaly_column=anomalous",
        f"dataset.source.cache={cache if cache else 'null'}",
        "dataset.val_tasks=[*8?]",  # a tenth of the tasks each
        "dataset.test_tasks=[*9?]",
        "dataset.val_episodes=50",
        "dataset.test_episodes=100",
        f"dataset.train_episodes={8 * steps}",  # one epoch of `steps` meta-batches of 8
        "dataset.eval_batch_size=50",
        "model=protonet",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    return measured_train(cmd, run_dir, log_file)


def measured_train(cmd: list[str], run_dir: Path, log_file: Path) -> dict:
    """Run a ``metaad-train`` command on one thread: wall time, peak memory (the child's ru_maxrss,
    from os.wait4), its test AUROC and the best baseline's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"metaad-train failed (log: {log_file}):\n{' '.join(cmd)}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = max(b["auroc"]["mean"] for b in metrics["baselines"].values())
    auroc = metrics["test"]["auroc"]["mean"]
    peak = usage.ru_maxrss * 1024 / GB
    return {"wall_s": wall, "peak_gb": peak, "test_auroc": auroc, "baseline_auroc": best}


def check_cost(cache: Path, rows_read: int, reuse_wall: float) -> dict:
    """The content checks' cost on the store in ``cache``: open and row reads, checked vs unchecked."""
    from metaad.data import store

    (folder,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    manifest = json.loads((folder / "manifest.json").read_text())
    ident = {k: manifest[k] for k in ("version", "kind", "source", "files", "settings")}

    def best(f, n: int = 5) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    def unchecked_open() -> None:  # the same files read, no checksums computed
        store.RowFile(folder / "x.npy")
        np.load(folder / "task.npy")
        json.loads((folder / "tasks.json").read_text())
        if (folder / "anomalous.npy").exists():
            np.load(folder / "anomalous.npy")

    opened = best(lambda: store.open_store(folder, ident)) - best(unchecked_open)
    rng = np.random.default_rng(0)
    n = manifest["rows"]
    batches = [rng.integers(0, n, 25) for _ in range(2000)]  # episodes of 25 scattered rows
    checked = store.RowFile(folder / "x.npy", checksums=folder / "x.crc32.npy", store=folder)
    plain = store.RowFile(folder / "x.npy")

    def read(rows) -> None:
        for batch in batches:
            rows[batch]

    per_row = (best(lambda: read(checked), 3) - best(lambda: read(plain), 3)) / (25 * len(batches))
    total = opened + per_row * rows_read
    return {
        "open_s": opened,
        "per_row_us": per_row * 1e6,
        "rows_read": rows_read,
        "checks_s": total,
        "share_of_reuse": total / reuse_wall,
    }


def free_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024 / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--rows-per-task", type=int, default=1000, help="tasks = rows / this")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="10 steps")
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where tables and stores go (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.steps = 10
    out = args.out or Path("outputs/scale") / time.strftime("store-%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="metaad-store-", dir=args.scratch))
    results = []
    try:
        for rows in args.rows:
            tasks = max(10, rows // args.rows_per_task)
            table = scratch / f"table-{rows}.parquet"
            start = time.perf_counter()
            # in a child: a parent's resident memory at fork counts in its children's ru_maxrss
            child = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_store; "
            child += f"bench_store.write_table(bench_store.Path({str(table)!r}), {rows}, {args.features}, "
            child += f"{tasks})"
            subprocess.run([sys.executable, "-c", child], check=True)
            x_gb = rows * args.features * 4 / GB
            print(
                f"{rows:,} rows x {args.features} features over {tasks:,} tasks: "
                f"{table.stat().st_size / GB:.2f} GB Parquet written in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            cache = scratch / "cache"
            modes = [("store: build", cache), ("store: reuse", cache), ("memory", None)]
            for mode, folder in modes:
                row = {
                    "rows": rows,
                    "features": args.features,
                    "tasks": tasks,
                    "mode": mode,
                    "x_gb": x_gb,
                    "table_gb": table.stat().st_size / GB,
                }
                if folder is None and 3 * x_gb > 0.6 * free_gb():
                    row["skipped"] = f"needs about {3 * x_gb:.0f} GB, {free_gb():.0f} GB free"
                else:
                    run_dir = scratch / f"run-{rows}-{mode.replace(': ', '-')}"
                    row |= train(table, folder, run_dir, args.steps, out / f"{run_dir.name}.log")
                print("  " + json.dumps(row), flush=True)
                results.append(row)
            reuse = next(r for r in results if r["rows"] == rows and r["mode"] == "store: reuse")
            # episodes read: training, validation (and Lightning's sanity check of 2 batches), test
            episodes = 8 * args.steps + 50 + 2 * 50 + 100
            here = str(Path(__file__).parent)
            child = f"import sys, json; sys.path.insert(0, {here!r}); import bench_store; "
            child += f"print(json.dumps(bench_store.check_cost(bench_store.Path({str(cache)!r}), "
            child += f"{episodes * (5 + 20)}, {reuse['wall_s']})))"  # k_shot 5 + n_query 20
            # in a child, as the table is written: the parent stays small for the next size's runs
            done = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True)
            cost = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"  content checks: {cost['open_s']:.3f} s to open, {cost['per_row_us']:.2f} us a row read, "
                f"{cost['checks_s']:.3f} s for the {cost['rows_read']:,} rows of the reuse run: "
                f"{100 * cost['share_of_reuse']:.1f}% of its {reuse['wall_s']:.1f} s",
                flush=True,
            )
            reuse["checks"] = cost
            shutil.rmtree(cache, ignore_errors=True)
            table.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        f"`python scripts/bench_store.py {' '.join(sys.argv[1:])}`: a whole metaad-train (ProtoNet, MLP, "
        f"{args.steps} steps, val 50 / test 100 episodes), one thread, peak resident memory of the process",
        "",
        "| rows | features | tasks | x (GB) | mode | wall (s) | peak memory (GB) | peak / x | test AUROC "
        "| best baseline |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "skipped" in r:
            cells = ["skipped: " + r["skipped"], "", "", "", ""]
        else:
            cells = [f"{r['wall_s']:.0f}", f"{r['peak_gb']:.2f}", f"{r['peak_gb'] / r['x_gb']:.2f}"]
            cells += [f"{r['test_auroc']:.3f}", f"{r['baseline_auroc']:.3f}"]
        lines.append(
            f"| {r['rows']:,} | {r['features']} | {r['tasks']:,} | {r['x_gb']:.2f} | {r['mode']} | "
            + " | ".join(cells)
            + " |"
        )
    for r in results:
        if "checks" in r:
            c = r["checks"]
            lines.append(
                f"\nContent checks of the {r['rows']:,}-row store: {c['open_s']:.3f} s to open, "
                f"{c['per_row_us']:.2f} us a row read; {c['checks_s']:.3f} s for the {c['rows_read']:,} rows "
                f"the reuse run reads, {100 * c['share_of_reuse']:.1f}% of its wall time."
            )
    text = "\n".join(lines)
    (out / "store.md").write_text(text + "\n")
    (out / "store.json").write_text(json.dumps(results, indent=1))
    print("\n" + text + f"\n\n(written to {out})")


if __name__ == "__main__":
    main()
