"""Series results: the stream block of a run, the validation-chosen best baseline, K=1 without NaN
decisions, and the series presets composing and passing the start-up checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metaad.evaluation.metrics import summarize
from metaad.evaluation.results import RunResults, Summary
from metaad.evaluation.stream_metrics import evaluate_stream
from tests.conftest import compose_in
from tests.test_series_sources import fleet, tagged_series

WINDOW = 8
FLEET = ["dataset=series_folders", f"dataset.source.window={WINDOW}", "dataset.source.stride=4"]
FLEET += ["dataset.n_folds=3", "dataset.n_query=8", "logger=none"]


def fleet_config(tmp_path: Path, *overrides: str):
    labels = fleet(tmp_path / "fleet", n=6)
    cfg = compose_in(tmp_path / "run", [*FLEET, f"dataset.source.root={tmp_path / 'fleet'}", *overrides])
    return cfg, labels


def test_the_stream_block_is_evaluate_stream_on_each_held_out_entitys_part_after_the_cut(tmp_path):
    from metaad.apps.build import build_datamodule, build_training
    from metaad.apps.eval import measure_streams

    cfg, labels = fleet_config(tmp_path, "dataset.k_shot=3", "baselines=series", "dataset.scaling=none")
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    model = build_training(cfg, datamodule.sample_shape)
    block = measure_streams(model, datamodule)
    held_out = datamodule.task_names()["test"]
    assert block is not None and block.entities == held_out and not block.notes
    assert set(block.detectors) == {"protonet", *model.evaluator.baselines}

    dataset = datamodule.datasets["test"]
    streams = [s for s in datamodule.test_streams() if not isinstance(s, str)]
    assert [s.entity for s in streams] == held_out
    for stream in streams:
        # the entity's raw test part from W - 1 steps before the cut (at half of it) to its end,
        # labels from the cut on, as its files say; the support of its first test episode
        entity = int(stream.entity.removeprefix("m"))
        cut = 200 // 2
        assert stream.series[:, 0].tolist() == [entity] * (200 - cut + WINDOW - 1)
        assert stream.series[:, 1].tolist() == list(range(120 + cut - WINDOW + 1, 120 + 200))
        assert stream.labels.tolist() == labels[stream.entity][cut:].tolist()
        first = dataset[dataset.pool.tasks.index(stream.entity)]
        assert first.support.numpy().tolist() == stream.support.tolist()

    for name in ("protonet", "zscore", "pca"):
        detector = model.learner if name == "protonet" else model.evaluator.baselines[name]
        each = [
            evaluate_stream(detector, torch.from_numpy(s.support), torch.from_numpy(s.series), s.labels)
            for s in streams
        ]
        for metric in ("auroc", "aupr", "vus_pr", "best_f1", "f1_support"):
            expected = summarize(torch.tensor([getattr(m, metric) for m in each], dtype=torch.float64))
            got = block.detectors[name][metric]
            assert got.mean == pytest.approx(expected.mean, abs=1e-12), (name, metric)
            assert got.ci95 == pytest.approx(expected.ci95, abs=1e-12) and got.n_groups == len(streams)
    # and it round-trips through metrics.json
    results = RunResults(names={"model": "protonet"}, k_shot=3, seed=0, data=None, checkpoint="",
                         tasks={}, test={}, stream=block)  # fmt: skip
    again = RunResults.from_json(results.to_json())
    assert again.stream == block


def test_streams_are_scaled_by_the_support_of_the_entitys_first_episode(tmp_path):
    from metaad.apps.build import build_datamodule
    from metaad.data.episodes import scale_with, support_statistics

    cfg, _ = fleet_config(tmp_path, "dataset.k_shot=3", "dataset.support_draw=first")
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    dataset = datamodule.datasets["test"]
    for stream in datamodule.test_streams():
        raw_support = dataset.pool.take(dataset.pool.support_rows[stream.entity][:3])
        assert np.array_equal(
            stream.support, dataset[dataset.pool.tasks.index(stream.entity)].support.numpy()
        )
        mean, spread = support_statistics(raw_support)
        entity = int(stream.entity.removeprefix("m"))
        raw_series = tagged_series(entity, 200, offset=120)[200 // 2 - (WINDOW - 1) :]
        expected = scale_with(raw_series.astype(np.float32), mean, spread, 100.0)  # stored as float32
        np.testing.assert_allclose(stream.series, expected, rtol=1e-6, atol=1e-6)
        assert not np.array_equal(stream.series, raw_series.astype(np.float32))


def _results(learner: tuple[float, float], baselines: dict[str, tuple[float, float]]) -> RunResults:
    """A run whose learner scores ``learner`` (test AUROC, CI) and whose baselines score (val, test)."""

    def metrics(mean: float, ci: float = 0.01) -> dict[str, Summary]:
        return {"auroc": Summary(mean, ci, 100, 10), "aupr": Summary(mean, ci, 100, 10)}

    return RunResults(
        names={"model": "protonet"},
        k_shot=5,
        seed=0,
        data=None,
        checkpoint="",
        tasks={},
        test=metrics(*learner),
        baselines={name: metrics(test) for name, (_, test) in baselines.items()},
        val={"protonet": metrics(0.5), **{name: metrics(val) for name, (val, _) in baselines.items()}},
    )


def test_the_best_baseline_chosen_on_validation_can_differ_from_the_test_choice_and_the_verdict_follows():
    from collections import defaultdict

    from metaad.apps.benchmark import _collect, headline, table_rows

    # pca is best on validation entities, knn on the test entities themselves
    run = _results((0.75, 0.01), {"pca": (0.90, 0.60), "knn": (0.70, 0.85)})
    collected: dict = defaultdict(list)
    for suite in ("by_val", "by_test"):
        _collect(collected, suite, 5, "protonet", run)
    pooled: dict = defaultdict(dict)
    for (suite, k, detector, metric), parts in collected.items():
        pooled[(suite, k, detector)][metric] = Summary.pooled(parts)
    rows = table_rows(pooled, OmegaConf.create({}), {"by_val": "val", "by_test": "test"})
    learner = {r["suite"]: r for r in rows if r["detector"] == "protonet"}
    assert learner["by_val"]["best_baseline"] == "pca" and learner["by_val"]["verdict"] == "beats"
    assert learner["by_test"]["best_baseline"] == "knn" and learner["by_test"]["verdict"] == "below"
    assert learner["by_val"]["vs_best_baseline"] == pytest.approx(0.15)
    lines = headline(rows)
    assert any("| by_val | 5 | protonet |" in line and "| pca (val) |" in line for line in lines)
    assert any("| by_test | 5 | protonet |" in line and "| knn |" in line for line in lines)


def test_a_suites_best_baseline_rule_is_checked_at_start_up():
    from metaad.apps.benchmark import check_preset
    from metaad.errors import ConfigError

    suite = {"experiment": "smd", "models": ["protonet"], "k_shots": [5], "train_k_shot": 5}
    preset = OmegaConf.create({"suites": {"s": {**suite, "best_baseline": "valid"}}})
    with pytest.raises(ConfigError, match="suite s: best_baseline must be one of \\['val', 'test'\\]"):
        check_preset(preset, "p", None)
    preset = OmegaConf.create({"suites": {"s": {**suite, "stream_k_shots": [20]}}})
    with pytest.raises(ConfigError, match="suite s: stream_k_shots must list some of its k_shots \\[5\\]"):
        check_preset(preset, "p", None)


def test_k1_series_runs_decide_without_nan_and_skip_support_thresholds_with_a_note(tmp_path):
    from metaad.apps.train import train

    cfg, _ = fleet_config(tmp_path, "dataset.k_shot=1", "baselines=series", "threshold=support_quantile")
    results = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert "null_reasons" not in written  # no metric left non-finite (it would be written null, said why)
    # the learner's support threshold needs leave-one-out scores (K >= 2): skipped, said why
    assert "skipped" in results.threshold and "f1" not in results.test
    assert all(math.isfinite(s.mean) for s in results.test.values())
    stream = results.stream
    assert stream is not None and stream.entities
    assert all("f1_support" not in metrics for metrics in stream.detectors.values())
    assert any("f1_support not measured at K=1" in note for note in stream.notes)
    for metrics in stream.detectors.values():
        assert all(math.isfinite(s.mean) for s in metrics.values())


def test_k1_with_the_default_threshold_decides_on_every_episode(tmp_path):
    from metaad.apps.train import train

    cfg, _ = fleet_config(tmp_path, "dataset.k_shot=1", "stream=false")
    results = train(cfg)
    assert results.threshold is not None and "skipped" not in results.threshold
    assert math.isfinite(results.test["f1"].mean) and math.isfinite(results.test["balanced_accuracy"].mean)
    assert results.stream is None  # stream=false: no stream block
    assert "stream" not in json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_the_benchmark_reads_a_source_once_for_the_runs_of_one_config(tmp_path):
    from metaad.apps.build import build_datamodule, reuse_sources

    cfg, _ = fleet_config(tmp_path, "dataset.k_shot=3")
    other = compose_in(
        tmp_path / "other", [*FLEET, f"dataset.source.root={tmp_path / 'fleet'}", "dataset.k_shot=5"]
    )
    with reuse_sources():
        first, second = build_datamodule(cfg), build_datamodule(other)
        assert first.pools["test"].x is second.pools["test"].x  # one read, two K
        assert second.datasets["test"][0].support.shape[0] == 5
    assert build_datamodule(cfg).pools["test"].x is not first.pools["test"].x  # outside: read again


@pytest.mark.parametrize("preset_name", ["series", "series_paper"])
def test_the_series_presets_compose_and_pass_the_start_up_checks(tmp_path, preset_name):
    from metaad.apps.benchmark import _eval_config, check_jobs, check_preset, jobs_of, resolved

    raw = OmegaConf.load(Path(__file__).parents[1] / "conf" / "preset" / f"{preset_name}.yaml")
    preset = resolved(raw, preset_name)
    check_preset(preset, preset_name, None)
    jobs = jobs_of(preset, tmp_path, None)
    # every suite's training composed and checked (its other folds and seeds differ only there)
    first_of_each = {j.suite_name: j for j in reversed(jobs)}.values()
    assert len(check_jobs(list(first_of_each), [])) == len(preset.suites)
    assert {s.get("best_baseline") for s in preset.suites.values()} == {"val"}
    by = {(j.suite_name, j.fold_index): j for j in jobs}
    for name, suite in preset.suites.items():
        source = suite.get("train_with")
        if source:  # scored with the first K windows, on the very models of the suite it names
            assert suite.eval_dataset.support_draw == "first"
            assert by[(name, 0)].train_dir == by[(source, 0)].train_dir != by[(name, 0)].run_dir / "train"
            assert by[(name, 0)].overrides([]) == by[(source, 0)].overrides([])
    job = by[("jumpstarter_first", 2)]
    eval_cfg = _eval_config(job, job.ks[0], create=False)
    assert eval_cfg.dataset.support_draw == "first"
    assert str(eval_cfg.ckpt_path).startswith(str(by[("jumpstarter", 2)].train_dir))


def test_a_suite_that_trains_with_another_takes_its_training_and_refuses_its_own():
    from metaad.apps.benchmark import resolved
    from metaad.errors import ConfigError

    base = {"experiment": "smd", "models": ["protonet"], "k_shots": [5], "train_k_shot": 5}
    preset = OmegaConf.create({"suites": {"a": base, "b": {"train_with": "a", "k_shots": [5]}}})
    assert resolved(preset).suites.b.experiment == "smd"
    bad = OmegaConf.create({"suites": {"a": base, "b": {"train_with": "a", "models": ["maml"]}}})
    with pytest.raises(ConfigError, match="suite b trains with suite a and takes its \\['models'\\]"):
        resolved(bad)
    with pytest.raises(ConfigError, match="train_with: 'c' must name another suite"):
        resolved(OmegaConf.create({"suites": {"b": {"train_with": "c"}}}))


def test_a_long_tables_test_parts_are_streams_in_memory_and_through_the_store(tmp_path):
    from metaad.data.series import series_table
    from tests.test_series_sources import TABLE, long_table

    path = tmp_path / "fleet.parquet"
    table = long_table()
    table.to_parquet(path, index=False)
    memory = series_table(str(path), **TABLE)
    built = series_table(str(path), cache=str(tmp_path / "cache"), **TABLE)
    reused = series_table(str(path), cache=str(tmp_path / "cache"), **TABLE)
    for data in (memory, built, reused):
        parts = data.streams
        assert len(parts.entity) == 4
        for p in range(4):
            entity = data.task_names[int(parts.entity[p])]
            rows = table[table.host == entity]
            # the test part starts at history_end (0.5) of the table's one clock; its steps and labels
            steps = data.x.steps(int(parts.start[p]), int(parts.stop[p]))
            labels = parts.labels(int(parts.start[p]), int(parts.stop[p]))
            test = rows.ts.to_numpy() >= table.ts.min() + 0.5 * (table.ts.max() - table.ts.min())
            assert np.array_equal(steps[:, 1], rows.x1.to_numpy()[test])
            assert np.array_equal(labels, rows.incident.to_numpy()[test])
        assert np.array_equal(parts.cut, memory.streams.cut) and np.array_equal(
            parts.anomalous, memory.streams.anomalous
        )
