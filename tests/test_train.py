"""End to end through Hydra, in-process: train -> test -> metrics.json, TensorBoard, checkpoints, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metaad.apps.build import build_datamodule
from metaad.apps.eval import evaluate
from metaad.apps.train import train
from metaad.data import DataError
from metaad.detectors.baselines import SupportMeanDistance
from metaad.errors import ConfigError
from metaad.evaluation.metrics import EpisodeMetrics
from metaad.evaluation.results import RunResults
from tests.conftest import event_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One quick real run shared by the assertions below (training twice would double the cost)."""
    from tests.conftest import compose_in

    cfg = compose_in(tmp_path_factory.mktemp("train"), [])
    return cfg, train(cfg)


def test_run_writes_metrics_json_with_learner_and_baselines(trained):
    cfg, metrics = trained
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics.to_json()))
    assert RunResults.read(Path(cfg.paths.output_dir) / "metrics.json") == metrics
    assert on_disk["model"] == "protonet" and on_disk["dataset"] == "digits" and on_disk["k_shot"] == 5
    for block in (on_disk["test"], *on_disk["baselines"].values()):
        assert block["auroc"]["mean"] - block["auroc"]["ci95"] > 0.5, "every detector above chance on digits"
        assert block["auroc"]["n_episodes"] == 40
    fast = {"mean_euclidean", "mean_cosine", "nn_euclidean", "nn_cosine", "mahalanobis"}
    assert set(on_disk["baselines"]) == fast


def test_baseline_numbers_are_computed_on_the_fixed_test_episodes(trained):
    cfg, metrics = trained
    datamodule = build_datamodule(cfg)
    baseline, collected = SupportMeanDistance("euclidean"), EpisodeMetrics()
    for batch in datamodule.evaluation_loader("test"):
        collected.update(baseline.score(baseline.adapt(batch.support), batch.query), batch.label)
    expected = collected.compute()["auroc"].mean
    assert metrics.baselines["mean_euclidean"]["auroc"].mean == pytest.approx(expected, abs=1e-9)


def test_tensorboard_has_the_curves_and_real_hparams(trained):
    cfg, metrics = trained
    folder = event_dir(Path(cfg.paths.output_dir))
    assert folder.name == "protonet_digits", "a single run is named by its run_name"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/auroc", "val/auroc_best", "test/auroc", "test/aupr", "hp/val_auroc"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert "test/baseline/mean_euclidean/auroc" in tags
    test_auroc = events.Scalars("test/auroc")[-1].value
    assert test_auroc == pytest.approx(metrics.test["auroc"].mean, abs=1e-6)
    # each hp metric once, at the end, with its real value: no placeholder at step 0
    known = {"hp/val_auroc": metrics.val_auroc_best, "hp/test_auroc": metrics.test["auroc"].mean}
    for tag, value in known.items():
        written = events.Scalars(tag)
        assert [(e.step, e.value) for e in written] == [(metrics.global_step, pytest.approx(value, abs=1e-6))]


def test_checkpoints_hold_plain_config_and_eval_reproduces_the_test(trained, compose_cfg):
    cfg, metrics = trained
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    checkpoint = torch.load(ckpt_dir / "best.ckpt", weights_only=True)
    assert checkpoint["metaad_config"]["dataset"]["k_shot"] == 5
    eval_cfg = compose_cfg([f"ckpt_path={ckpt_dir / 'best.ckpt'}"], config_name="eval", quick=False)
    evaluated = evaluate(eval_cfg)
    assert evaluated.test["auroc"].mean == pytest.approx(metrics.test["auroc"].mean, abs=1e-6)
    assert (Path(eval_cfg.paths.output_dir) / "metrics.json").is_file()


def test_same_seed_same_numbers_and_another_seed_differs(trained, tmp_path):
    from tests.conftest import compose_in

    cfg, metrics = trained
    again = train(compose_in(tmp_path / "again", []))
    assert again.test == metrics.test and again.baselines == metrics.baselines
    other = train(compose_in(tmp_path / "other", ["seed=1"]))
    assert other.test["auroc"].mean != pytest.approx(metrics.test["auroc"].mean, abs=1e-6)


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("dataset.k_shot=500", DataError, "k_shot"),
        ("dataset.train_tasks=[0,1,6]", DataError, "overlaps val/test tasks"),
        ("dataset.test_tasks=[]", DataError, "test_tasks is empty"),
        ("dataset=no_such_dataset", MissingConfigException, "no_such_dataset"),
    ],
)
def test_bad_requests_stop_before_training(compose_cfg, override, error, message):
    with pytest.raises(error, match=message):
        train(compose_cfg([override]))


def test_required_dataset_settings_are_named(compose_cfg):
    with pytest.raises(
        ConfigError, match=r"give them: dataset\.source\.root=\.\.\. .*dataset\.val_tasks=\.\.\."
    ) as error:
        train(compose_cfg(["dataset=task_files"]))
    assert "dataset.dataset." not in str(error.value)


def test_debug_overfit_trains_on_the_same_episodes_every_epoch(compose_cfg):
    """debug=overfit: one fixed meta-batch each epoch (so the loss can go to ~0), val/test as usual."""
    cfg = compose_cfg(["debug=overfit", "trainer.max_epochs=2", "logger=none"], quick=False)
    datamodule = build_datamodule(cfg)
    train_set = datamodule.datasets["train"]
    assert len(train_set) == cfg.dataset.meta_batch_size
    first, later = train_set[(0, 3)], train_set[(7, 3)]
    assert torch.equal(first.support, later.support) and torch.equal(first.query, later.query)
    fresh = build_datamodule(compose_cfg(["logger=none"])).datasets["train"]
    assert not torch.equal(fresh[(0, 3)].support, fresh[(7, 3)].support)  # normal runs: new episodes
    assert train(cfg).global_step == 2
