"""The entity x time protocol on series windows, checked on what the pools can hand out and on
episodes actually drawn; the entity-only variant is built and shown to fail the leak check.

The series' values encode (entity, step) (``tagged_series``), so any drawn window says where it
was cut from.
"""

from __future__ import annotations

import numpy as np
import pytest

from metaad.data import DataError, EpisodeDataset, split_tasks
from metaad.data.episodes import scale_by_support
from metaad.data.series import KINDS, SyntheticAnomalies, series_folders
from metaad.data.tasks import AFTER, BEFORE, HISTORY, check_time_leaks, pool_rows
from tests.test_series_sources import fleet

HISTORY_STEPS, TEST_STEPS = 120, 200
CUT = HISTORY_STEPS + TEST_STEPS // 2  # the cut at half of each test part, in stored steps


@pytest.fixture
def data(tmp_path):
    fleet(tmp_path, n=6, history=HISTORY_STEPS, test=TEST_STEPS)
    return series_folders(str(tmp_path), window=8, stride=2)


def split(data, **kwargs):
    return split_tasks(data, None, ["m4"], ["m5"], **kwargs)


def drawn(pool, split_name, n=40, epochs=2, **shape):
    """(entity, first step, last step, is support) of every window of the episodes drawn."""
    shape = {"k_shot": 3, "n_query": 8, "anomaly_ratio": 0.5} | shape
    dataset = EpisodeDataset(pool, split_name, n_episodes=n, seed=0, **shape)
    seen = []
    for epoch in range(epochs if split_name == "train" else 1):
        for i in range(n):
            episode = dataset[(epoch, i)]
            for windows, support in ((episode.support, True), (episode.query, False)):
                w = windows.numpy()
                seen += [(int(x[0, 0]), int(x[0, 1]), int(x[-1, 1]), support) for x in w]
    return seen


def test_meta_training_and_validation_end_before_the_cut_test_queries_start_after_it(data):
    pools = split(data, train_anomalies="real")
    train = drawn(pools["train"], "train")
    val = drawn(pools["val"], "val")
    test = drawn(pools["test"], "test")
    assert (
        {e for e, *_ in train} == {0, 1, 2, 3}
        and {e for e, *_ in val} == {4}
        and {e for e, *_ in test} == {5}
    )
    assert max(last for _, _, last, _ in train + val) < CUT
    assert min(first for _, first, _, support in test if not support) >= CUT
    # of a held-out entity: only its history as support, and its queries after the cut
    assert max(last for _, _, last, support in test if support) < HISTORY_STEPS
    assert max(last for _, _, last, support in val if support) < HISTORY_STEPS
    assert min(first for _, first, _, support in val if not support) >= HISTORY_STEPS
    # what the pools can ever hand out, not only what was drawn
    for name in ("train", "val"):
        rows = pool_rows(pools[name])
        assert (data.period[rows] != AFTER).all()
    test_pool = pools["test"]
    assert (data.period[np.concatenate(list(test_pool.support_rows.values()))] == HISTORY).all()
    assert (data.period[pool_rows(test_pool, supports=False)] == AFTER).all()


def test_the_entity_only_variant_fails_the_leak_check(data):
    pools = split(data, time_cut=True)
    check_time_leaks(data, pools)  # the protocol passes its own check
    leaking = split(data, time_cut=False)  # entity folds only: split_tasks skips its check
    assert (data.period[pool_rows(leaking["train"])] == AFTER).any()
    with pytest.raises(DataError, match="train window.* reach the held-out entities' query period"):
        check_time_leaks(data, leaking)
    # and the check reads spans, not periods: a pool with one after-cut row smuggled in fails
    smuggled = dict(pools)
    after_row = np.flatnonzero((data.period == AFTER) & (data.task_codes == 0))[:1]
    val = pools["val"]
    normal_rows = dict(val.normal_rows)
    normal_rows["m4"] = np.concatenate([normal_rows["m4"], after_row])
    import dataclasses

    smuggled["val"] = dataclasses.replace(val, normal_rows=normal_rows)
    with pytest.raises(DataError, match="val window"):
        check_time_leaks(data, smuggled)


def test_scaling_comes_from_the_support_alone():
    rng = np.random.default_rng(0)
    support = rng.normal(5.0, 2.0, (4, 8, 3)).astype(np.float32)
    support[..., 2] = 7.0  # a constant metric
    query = rng.normal(5.0, 2.0, (6, 8, 3)).astype(np.float32)
    scaled_support, scaled_query = scale_by_support(support, query)
    other_support, _ = scale_by_support(support, query * 100)
    np.testing.assert_array_equal(scaled_support, other_support)  # the query sets nothing
    mean, spread = support[..., :2].reshape(-1, 2).mean(0), support[..., :2].reshape(-1, 2).std(0)
    np.testing.assert_allclose(scaled_query[..., :2], (query[..., :2] - mean) / spread, rtol=1e-4)
    assert np.isfinite(scaled_query).all() and np.abs(scaled_query).max() <= 100


def test_episodes_are_pure_functions_of_seed_split_epoch_index(data):
    pools = split(data, train_anomalies="real+synthetic", synthetic=SyntheticAnomalies(seed=0))
    first = EpisodeDataset(pools["train"], "train", 3, 8, 0.5, 10, seed=0, scaling="support")
    second = EpisodeDataset(pools["train"], "train", 3, 8, 0.5, 10, seed=0, scaling="support")
    for index in ((0, 3), (2, 3)):
        a, b = first[index], second[index]
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(first[(0, 3)].query, first[(1, 3)].query)


def test_synthetic_anomalies_change_normal_windows_of_the_entity(data):
    injector = SyntheticAnomalies(seed=0)
    pools = split(data, train_anomalies="synthetic", synthetic=injector)
    pool = pools["train"]
    assert pool.anomaly_pool.size == 0  # no real incident reaches meta-training in this mode
    rng = np.random.default_rng(0)
    rows = pool.draw_anomalies(rng, "m1", 200)
    base = rows % len(pool.x)
    assert set(base.tolist()) <= set(pool.normal_rows["m1"].tolist())
    injected, clean = pool.take(rows), pool.x[base]
    changed = np.abs(injected - clean).reshape(len(rows), -1).max(axis=1) > 1e-6
    assert changed.all()
    assert (pool.task_ids(rows) == -1).all()
    kinds = {KINDS[(r // len(pool.x) - 1) % len(KINDS)] for r in rows}
    assert kinds == set(KINDS)
    np.testing.assert_array_equal(pool.take(rows), injected)  # the same rows, the same anomalies


def test_one_vs_rest_anomalies_are_other_training_entities_before_the_cut(data):
    pool = split(data, train_anomalies="one_vs_rest")["train"]
    rows = pool.draw_anomalies(np.random.default_rng(0), "m0", 50)
    assert set(pool.x[rows][:, 0, 0].astype(int).tolist()) <= {1, 2, 3}
    assert (data.period[rows] != AFTER).all()


def test_first_k_support_is_the_start_of_the_history(data):
    pools = split(data)
    dataset = EpisodeDataset(pools["test"], "test", 3, 8, 0.5, 4, seed=0, support_draw="first")
    steps = dataset[0].support.numpy()[:, 0, 1]
    np.testing.assert_array_equal(steps, [0, 2, 4])


def test_an_entity_with_no_anomaly_after_the_cut_is_left_out_of_the_test_split_by_name(tmp_path, caplog):
    fleet(tmp_path, n=6)
    labels = np.zeros(TEST_STEPS, np.int64)
    labels[30:40] = 1  # m5's only incident lies before the cut
    (tmp_path / "test_label" / "m5.txt").write_text("\n".join(map(str, labels)) + "\n")
    data = series_folders(str(tmp_path), window=8, stride=2)
    pools = split_tasks(data, None, ["m4"], ["m5", "m3"])
    dataset = EpisodeDataset(pools["test"], "test", 3, 8, 0.5, 4, seed=0)
    assert dataset.pool.tasks == ["m3"] and "m5 (" in caplog.text
    with pytest.raises(DataError, match="no test entity has both normal and anomalous query windows"):
        EpisodeDataset(split_tasks(data, None, ["m4"], ["m5"])["test"], "test", 3, 8, 0.5, 4, seed=0)


def test_the_datamodule_deals_folds_and_warns_on_the_leaking_variant(data, caplog):
    from metaad.data import EpisodeDataModule

    tested = set()
    for fold in range(3):
        module = EpisodeDataModule(lambda: data, None, None, n_folds=3, fold=fold, k_shot=3, n_query=8)
        module.setup()
        tested |= set(module.pools["test"].tasks)
        assert not set(module.pools["test"].tasks) & set(module.pools["train"].tasks)
    assert tested == set(data.task_names)
    EpisodeDataModule(lambda: data, None, None, n_folds=3, protocol="entity", k_shot=3, n_query=8).setup()
    assert "a leak through time" in caplog.text
    with pytest.raises(DataError, match="set dataset.val_tasks and test_tasks to null"):
        EpisodeDataModule(lambda: data, ["m1"], None, n_folds=3)


@pytest.mark.slow
def test_metaad_train_runs_a_series_fleet_end_to_end_and_eval_reproduces_it(tmp_path, compose_cfg):
    """Config -> series source -> windows -> ProtoNet on the MLP -> metrics.json; the checkpoint
    re-scores the same test episodes (windows re-cut from the stored series)."""
    import json
    from pathlib import Path

    from metaad.apps.eval import evaluate
    from metaad.apps.train import train
    from tests.conftest import compose_in

    fleet(tmp_path / "fleet", n=6)
    overrides = [
        "dataset=series_folders",
        f"dataset.source.root={tmp_path / 'fleet'}",
        "dataset.source.window=8",
        "dataset.source.stride=4",
        "dataset.n_folds=3",
        "dataset.k_shot=3",
        "dataset.n_query=8",
        "logger=none",
    ]
    cfg = compose_in(tmp_path / "train", overrides)
    metrics = train(cfg).to_json()
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["dataset"] == "series_folders" and on_disk["test"]["auroc"]["n_episodes"] > 0
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    evaluated = evaluate(compose_cfg([f"ckpt_path={ckpt}"], config_name="eval", quick=False)).to_json()
    assert evaluated["test"]["auroc"]["mean"] == pytest.approx(metrics["test"]["auroc"]["mean"], abs=1e-6)


def test_the_benchmark_reports_a_variant_against_the_suite_it_varies():
    from omegaconf import OmegaConf

    from metaad.apps.benchmark import compared

    def row(suite, detector, auroc):
        return {"suite": suite, "k_shot": 5, "detector": detector, "auroc": auroc, "auroc_ci95": 0.03}

    rows = [row("js", "protonet", 0.60), row("js_entity", "protonet", 0.75), row("js", "baseline:knn", 0.7)]
    preset = OmegaConf.create({"suites": {"js": {}, "js_entity": {"compare_to": "js"}}})
    lines = compared(rows, preset)
    assert lines[-1] == "| js_entity | js | 5 | protonet | 0.750 ± 0.030 | 0.600 ± 0.030 | +0.150 ± 0.042 |"
    assert len(lines) == 6  # header and one learner: baselines are not compared


def test_a_validation_entity_without_an_incident_before_the_cut_gets_injected_ones(tmp_path, caplog):
    fleet(tmp_path, n=6)
    labels = np.zeros(TEST_STEPS, np.int64)
    labels[150:160] = 1  # m4's only incident lies after the cut: validation may not see it
    (tmp_path / "test_label" / "m4.txt").write_text("\n".join(map(str, labels)) + "\n")
    data = series_folders(str(tmp_path), window=8, stride=2)
    pool = split(data, synthetic=SyntheticAnomalies(seed=0))["val"]
    dataset = EpisodeDataset(pool, "val", 3, 8, 0.5, 4, seed=0)
    assert "have no real incident in their period; theirs are injected: m4" in caplog.text
    assert dataset.pool.tasks == ["m4"] and len(dataset[0].query) == 8
    rows = pool.draw_anomalies(np.random.default_rng(0), "m4", 6, replace=True)
    assert (rows >= len(pool.x)).all() and (pool.task_ids(rows) == -1).all()  # all injected
    base = rows % len(pool.x)
    assert (data.period[base] == BEFORE).all() and (data.task_codes[base] == 4).all()  # before the cut
