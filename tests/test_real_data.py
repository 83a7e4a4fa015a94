"""The real data sets in ../shared/data (or $METAAD_DATA): loaders, default protocols, reference figures.

Skipped, with the reason, where that folder is absent; CI has it. The end-to-end runs are slow.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metaad.apps.build import build_datamodule
from metaad.data import EpisodeDataModule
from metaad.data.sources import omniglot, task_files
from metaad.detectors.baselines import NearestNeighbourDistance
from metaad.evaluation.metrics import EpisodeMetrics

# The same place conf/paths/default.yaml looks, but from the repository root rather than the cwd.
DATA = Path(os.environ.get("METAAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
OMNIGLOT, MVTEC = DATA / "omniglot_small", DATA / "mvtec_ad_resnet18"

needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"real Omniglot not found at {OMNIGLOT}")
needs_mvtec = pytest.mark.skipif(not MVTEC.is_dir(), reason=f"real MVTec AD embeddings not found at {MVTEC}")
AT_DATA = f"paths.data_dir={DATA}"


@needs_omniglot
def test_omniglot_small_zips_give_242_characters_split_by_alphabet(compose_cfg):
    data = omniglot(str(OMNIGLOT))
    assert data.x.shape == (242 * 20, 1, 28, 28) and len(data.task_names) == 242
    datamodule = build_datamodule(compose_cfg(["dataset=omniglot_small", AT_DATA]))
    alphabets = {
        split: {task.split("/")[0] for task in pool.tasks} for split, pool in datamodule.pools.items()
    }
    assert alphabets == {
        "train": {"Balinese", "Greek", "Japanese_(katakana)", "Korean", "Latin"},
        "val": {"Early_Aramaic"},
        "test": {"Sanskrit", "Tagalog"},
    }
    assert {split: len(pool.tasks) for split, pool in datamodule.pools.items()} == {
        "train": 161,
        "val": 22,
        "test": 59,
    }
    batch = next(iter(datamodule.evaluation_loader("test")))
    assert batch.support.shape[1:] == (5, 1, 28, 28) and batch.query.shape[1:] == (20, 1, 28, 28)


@needs_mvtec
def test_mvtec_every_category_supplies_regad_episodes(compose_cfg):
    data = task_files(str(MVTEC))
    assert len(data.task_names) == 15 and data.x.shape[1:] == (512,)
    cfg = compose_cfg(["dataset=mvtec", AT_DATA])
    assert build_datamodule(cfg).pools["test"].tasks == ["MVTec-AD_bottle"]
    names = data.task_names
    for i, test in enumerate(names):  # the benchmark's rotation, at the largest K of the protocol
        EpisodeDataModule(lambda: data, [names[(i + 1) % 15]], [test], k_shot=8, n_query=40).setup()


@needs_mvtec
def test_mvtec_nearest_neighbour_reproduces_the_reference_figure():
    """../shared/data/README.md: 1-NN cosine, mean image AUROC over the 15 categories, K=4: 0.725."""
    data = task_files(str(MVTEC))
    names, means = data.task_names, []
    for i, test in enumerate(names):
        datamodule = EpisodeDataModule(
            lambda: data,
            [names[(i + 1) % 15]],
            [test],
            k_shot=4,
            n_query=40,
            test_episodes=100,
            eval_batch_size=100,
        )
        datamodule.setup()
        detector, metrics = NearestNeighbourDistance("cosine"), EpisodeMetrics()
        for batch in datamodule.evaluation_loader("test"):
            metrics.update(detector.score(detector.adapt(batch.support), batch.query), batch.label)
        means.append(metrics.compute()["auroc"].mean)
    assert sum(means) / 15 == pytest.approx(0.725, abs=0.015)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, extra, n_baselines",
    [
        pytest.param("omniglot_small", [], 5, marks=needs_omniglot),
        # the scikit-learn baselines fit per episode (and per left-out shot for thresholds): small K
        pytest.param("mvtec", ["dataset.k_shot=2", "baselines=all"], 8, marks=needs_mvtec),
        ("mnist", [], 5),
    ],
)
def test_each_real_dataset_trains_and_tests_beside_the_baselines(compose_cfg, dataset, extra, n_baselines):
    from metaad.apps.train import train

    metrics = train(compose_cfg([f"dataset={dataset}", AT_DATA, *extra])).to_json()
    assert metrics["dataset"] == dataset and metrics["test"]["auroc"]["n_episodes"] == 40
    assert len(metrics["baselines"]) == n_baselines
    baselines = dict(metrics["baselines"])
    if "isolation_forest" in baselines and metrics["k_shot"] == 2:
        # two samples make trees of depth 1: every query gets the same path length, so no ranking
        assert baselines.pop("isolation_forest")["auroc"] == {"mean": 0.5, "ci95": 0.0, "n_episodes": 40}
    for name, result in baselines.items():
        assert result["auroc"]["mean"] - result["auroc"]["ci95"] > 0.5, f"{name}: above chance on real data"
    assert metrics["test"]["auroc"]["mean"] > 0.5, "the learner above chance on real data"
