"""Episode construction: shapes, labels, disjoint tasks, determinism, sharding, start-up errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from metaad.data import (
    DataError,
    EpisodeDataModule,
    EpisodeDataset,
    EpisodeSampler,
    LabelledData,
    collate_episodes,
    split_tasks,
)
from metaad.data.sources import digits


def tagged_data(n_tasks: int = 6, per_task: int = 30) -> LabelledData:
    """Each sample is (task number, row number), so an episode's contents can be checked exactly."""
    task = np.repeat(np.arange(n_tasks), per_task)
    x = np.stack([task, np.arange(len(task))], axis=1).astype(np.float32)
    return LabelledData(x=x, task=task.astype(str), name="tagged")


def module(**overrides) -> EpisodeDataModule:
    args = dict(
        source=tagged_data,
        train_tasks=[0, 1, 2],
        val_tasks=[3, 4, 5],
        test_tasks=[3, 4, 5],
        k_shot=4,
        n_query=10,
        anomaly_ratio=0.3,
        meta_batch_size=4,
        train_episodes=16,
        val_episodes=12,
        test_episodes=12,
        eval_batch_size=6,
    )
    dm = EpisodeDataModule(**{**args, **overrides})
    dm.setup()
    return dm


def test_batch_shapes_and_labels():
    dm = module()
    batch = next(iter(dm.train_dataloader()))
    assert batch.support.shape == (4, 4, 2)
    assert batch.query.shape == (4, 10, 2)
    assert batch.label.shape == (4, 10) and batch.task.shape == (4,)
    assert (batch.label.sum(1) == 3).all()  # round(10 * 0.3) anomalies in every episode


def test_episode_contents_follow_the_task():
    dm = module()
    for split in ("train", "test"):
        pool_tasks = {int(t) for t in dm.pools[split].tasks}
        for batch in dm.train_dataloader() if split == "train" else dm.evaluation_loader("test"):
            for b in range(len(batch.task)):
                task = int(batch.task[b])
                assert task in pool_tasks
                assert (batch.support[b, :, 0] == task).all(), "support must be the task's normals"
                query_task = batch.query[b, :, 0]
                assert torch.equal(batch.label[b].bool(), query_task != task), "anomaly <=> other task"
                assert set(query_task.long().tolist()) <= pool_tasks, "anomalies come from the same split"
                rows = torch.cat([batch.support[b, :, 1], batch.query[b, :, 1]])
                assert rows.unique().numel() == rows.numel(), "support and query share no sample"


def test_train_and_test_tasks_are_disjoint_and_shared_eval_tasks_split_rows():
    dm = module()
    assert not set(dm.pools["train"].tasks) & set(dm.pools["test"].tasks)
    for t in dm.pools["val"].tasks:
        val_rows, test_rows = dm.pools["val"].normal_rows[t], dm.pools["test"].normal_rows[t]
        assert len(val_rows) and len(test_rows) and not set(val_rows) & set(test_rows)


def test_episodes_are_the_same_whatever_the_worker_count():
    dm = module()
    dataset = dm.datasets["train"]
    sampler = EpisodeSampler(len(dataset))
    sampler.set_epoch(3)
    serial = list(DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_episodes))
    parallel = list(
        DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2, collate_fn=collate_episodes)
    )
    for a, b in zip(serial, parallel, strict=True):
        assert all(x is y is None or torch.equal(x, y) for x, y in zip(a, b))


def test_training_episodes_change_between_epochs_but_eval_episodes_do_not():
    dm = module()
    train, test = dm.datasets["train"], dm.datasets["test"]
    assert not torch.equal(train[(0, 5)].query, train[(1, 5)].query)
    assert torch.equal(train[(2, 5)].query, train[(2, 5)].query)
    assert torch.equal(test[(0, 5)].query, test[(7, 5)].query)


def test_ranks_share_out_the_episodes_without_repeats():
    single = list(EpisodeSampler(10))
    ranks = [list(EpisodeSampler(10, rank, 2)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert sorted(ranks[0] + ranks[1]) == single
    assert len(EpisodeSampler(11, 0, 2)) == len(EpisodeSampler(11, 1, 2)) == 5


def test_anomalies_from_all_is_refused_naming_the_leak():
    with pytest.raises(DataError, match="anomalies_from=all is gone: .*test rows reached meta-training"):
        split_tasks(tagged_data(), None, ["4"], ["5"], anomalies_from="all")
    with pytest.raises(DataError, match="source_test needs a source with its own train/test partition"):
        split_tasks(tagged_data(), None, ["4"], ["5"], anomalies_from="source_test")


def test_a_task_alone_in_its_split_has_no_anomalies_and_the_error_says_what_to_do():
    with pytest.raises(DataError, match="test task '5' has 0 anomalies .*alone in its split"):
        module(val_tasks=[3, 4], test_tasks=[5])


def test_episodes_use_the_pool_draws_and_are_a_pure_function_of_seed_split_epoch_index():
    dm = module()
    again = module()
    for split in ("train", "val"):
        a, b = dm.datasets[split], again.datasets[split]
        for index in ((0, 0), (1, 3), (4, 7)):
            assert all(x is y is None or torch.equal(x, y) for x, y in zip(a[index], b[index]))
    shifted = module(seed=1)
    assert not torch.equal(dm.datasets["train"][(0, 0)].query, shifted.datasets["train"][(0, 0)].query)


def test_digits_source_is_real():
    data = digits()
    assert data.x.shape == (1797, 64) and data.x.dtype == np.float32
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    assert data.task_names == [str(d) for d in range(10)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k_shot": 40}, "k_shot"),
        ({"n_query": 60}, "n_query"),
        ({"val_tasks": []}, "val_tasks is empty"),
        ({"train_tasks": [0, 1, 3]}, "overlaps"),
        ({"test_tasks": [9]}, "not in tagged"),
        ({"anomaly_ratio": 1.0}, "anomaly_ratio"),
        ({"k_shot": 0}, "k_shot must be a positive integer"),
        ({"anomalies_from": "elsewhere"}, "anomalies_from"),
    ],
)
def test_bad_settings_fail_at_start_up_naming_the_setting(overrides, message):
    with pytest.raises(DataError, match=message):
        module(**overrides)


def test_non_finite_samples_are_refused_with_their_rows():
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(DataError, match=r"rows: \[2\]"):
        LabelledData(x=x, task=np.array(["a", "a", "b", "b"]), name="bad.csv")


def test_the_datamodule_exposes_the_sources_preprocessing_and_name_after_setup():
    dm = EpisodeDataModule(digits, [6, 7, 8, 9], [6, 7, 8, 9], [0, 1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError, match="call setup"):
        dm.preprocessing  # noqa: B018
    dm.setup()
    assert dm.data_name == "digits" and dm.sample_shape == (64,)
    assert dm.preprocessing.to_dict() == {
        "sample_shape": [64],
        "feature_names": None,
        "scale": 1 / 16,
        "invert": False,
        "image_size": None,
    }
    tagged = module()
    assert tagged.data_name == "tagged" and tagged.preprocessing.sample_shape == (2,)  # identity by default
    assert tagged.preprocessing.scale == 1.0 and not tagged.preprocessing.invert


def test_a_task_with_its_own_anomalies_but_none_is_not_told_to_use_source_test():
    """anomalies_from does not apply to tasks that carry their own anomalies: the hint must not say it."""
    rng = np.random.default_rng(0)
    task = np.repeat(["a", "b", "c"], 30)
    anomalous = (np.arange(90) % 5 == 0) & (task != "c")
    data = LabelledData(x=rng.normal(size=(90, 4)).astype(np.float32), task=task, anomalous=anomalous)
    pools = split_tasks(data, None, ["b"], ["c"])
    with pytest.raises(DataError, match="test task 'c' has 0 anomalies") as error:
        EpisodeDataset(pools["test"], "test", k_shot=2, n_query=6, anomaly_ratio=0.5, n_episodes=2, seed=0)
    assert "source_test" not in str(error.value)
