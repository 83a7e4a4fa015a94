"""Task pools: O(rows) cost, draws equal to sampling the full anomaly set, the same episodes as before."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from metaad.data import EpisodeDataset, LabelledData, split_tasks
from metaad.data.sources import digits


def many_tasks(rows: int, tasks: int, seed: int = 0) -> LabelledData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return LabelledData(x=x, task=rng.integers(tasks, size=rows).astype(str), name="many")


def test_one_vs_rest_pools_cost_memory_linear_in_rows_not_rows_times_tasks():
    """30,000 rows x 1,000 tasks: per-task copies of the other rows would be 240 MB; the pools take ~1 MB."""
    data = many_tasks(30_000, 1_000)
    names = [str(t) for t in range(1_000)]
    tracemalloc.start()
    pools = split_tasks(data, None, names[:20], names[20:40])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"split_tasks peaked at {peak / 2**20:.0f} MiB"
    train = pools["train"]
    assert len(train.tasks) == 960
    assert sum(len(r) for r in train.normal_rows.values()) == int(np.isin(data.task, names[40:]).sum())
    t = train.tasks[7]
    assert train.n_anomalies(t) == sum(len(r) for r in train.normal_rows.values()) - len(train.normal_rows[t])


@pytest.mark.parametrize("own", [False, True])
def test_draws_equal_sampling_the_materialised_anomaly_rows(own):
    rng = np.random.default_rng(3)
    data = many_tasks(3_000, 12)
    if own:
        data = LabelledData(x=data.x, task=data.task, anomalous=rng.random(3_000) < 0.3, name="own")
    pools = split_tasks(data, ["5", "0", "9", "2"], ["1", "3", "4"], ["6", "7", "8"])
    for pool in pools.values():
        for t in pool.tasks:
            rows = pool.anomaly_rows[t]
            assert len(rows) == pool.n_anomalies(t)
            if own:  # a task's own anomalous rows
                assert set(data.tasks_of(rows)) == {t} and data.anomalous[rows].all()
            else:  # every row of the split's other tasks, in the split's task order, ascending within each
                others = [pool.normal_rows[o] for o in pool.tasks if o != t]
                np.testing.assert_array_equal(rows, np.concatenate(others))
            for seed in range(5):
                a, b = np.random.default_rng(seed), np.random.default_rng(seed)
                np.testing.assert_array_equal(pool.draw_anomalies(a, t, 7), b.choice(rows, 7, replace=False))
                assert a.integers(10**9) == b.integers(10**9)  # the same stream afterwards


def test_digits_episodes_are_the_ones_metaad_drew_before_the_pools_were_rewritten():
    """Fingerprints of the default dataset's episodes, recorded with the previous per-task-copy pools."""
    pools = split_tasks(digits(), [0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [6, 7, 8, 9], seed=0)
    recorded = {
        "val": (965.4375, 3913.3125, [6, 7, 8, 9, 6, 7, 8, 9, 6, 7], 862),
        "test": (985.0625, 3962.8125, [6, 7, 8, 9, 6, 7, 8, 9, 6, 7], 856),
        "train": (953.625, 3919.875, [5, 5, 5, 5, 1, 2, 4, 3, 0, 3], 328),
    }
    for split, pool in pools.items():
        dataset = EpisodeDataset(pool, split, k_shot=5, n_query=20, anomaly_ratio=0.5, n_episodes=10, seed=0)
        episodes = [dataset[(1, i)] for i in range(10)]
        assert (
            float(sum(e.support.double().sum() for e in episodes)),
            float(sum(e.query.double().sum() for e in episodes)),
            [int(e.task) for e in episodes],
            int(sum((e.label * (e.query_task + 1)).sum() for e in episodes)),
        ) == recorded[split]


def test_task_names_and_codes_follow_natural_order():
    data = LabelledData(x=np.zeros((5, 1), np.float32), task=np.array(["10", "b", "2", "a", "2"]))
    assert data.task_names == ["2", "10", "a", "b"]
    np.testing.assert_array_equal(data.task_codes, [1, 3, 0, 2, 0])
