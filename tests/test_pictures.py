"""TensorBoard pictures, read back from a real run: figures, PR curve, projector; decision scalars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metaad.apps.train import train
from metaad.evaluation.pictures import histogram_figure, pr_probabilities, roc_points
from tests.conftest import compose_in, event_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A quick run with the anomaly-free threshold rule, for the learner and one baseline."""
    overrides = [
        "threshold=support_quantile",
        "threshold.baselines=true",
        "baselines=none",
        "+baselines.mean._target_=metaad.detectors.baselines.SupportMeanDistance",
    ]
    cfg = compose_in(tmp_path_factory.mktemp("pictures"), overrides)
    metrics = train(cfg).to_json()
    logdir = event_dir(Path(cfg.paths.output_dir))
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return cfg, metrics, events, logdir


def test_figures_and_pr_curve_are_in_the_event_file(run):
    _, _, events, _ = run
    tags = events.Tags()
    for tag in ("val/roc", "val/score_histogram", "test/roc", "test/score_histogram"):
        assert tag in tags["images"], f"{tag} missing from {tags['images']}"
        image = events.Images(tag)[-1]
        assert image.width > 100 and image.height > 100 and len(image.encoded_image_string) > 1000
    assert "test/pr_curve" in tags["tensors"]
    assert events.SummaryMetadata("test/pr_curve").plugin_data.plugin_name == "pr_curves"
    curve = events.Tensors("test/pr_curve")[-1].tensor_proto
    assert [d.size for d in curve.tensor_shape.dim][0] == 6  # TP, FP, TN, FN, precision, recall


def test_decision_metrics_are_logged_and_reported(run):
    _, metrics, events, _ = run
    scalars = set(events.Tags()["scalars"])
    for name in ("f1", "precision", "recall", "balanced_accuracy", "threshold"):
        assert f"test/{name}" in scalars and f"val/{name}" in scalars
    for name in ("f1", "balanced_accuracy"):
        assert events.Scalars(f"test/{name}")[-1].value == pytest.approx(
            metrics["test"][name]["mean"], abs=1e-6
        )
        assert metrics["test"][name]["ci95"] > 0
    assert metrics["baselines"]["mean"]["balanced_accuracy"]["n_episodes"] == 40
    assert "test/baseline/mean/f1" in scalars
    threshold = metrics["threshold"]
    assert threshold["rule"] == "support_quantile" and threshold["q"] == 1.0 and threshold["value"] is None
    assert events.Scalars("test/threshold")[-1].value == pytest.approx(
        threshold["mean_per_episode"], abs=1e-6
    )


def test_projector_holds_support_query_and_prototype_embeddings(run):
    cfg, _, _, logdir = run
    config = (logdir / "projector_config.pbtxt").read_text()
    assert "test" in config and "embeddings" in config
    metadata = next(logdir.rglob("metadata.tsv")).read_text().splitlines()
    vectors = next(logdir.rglob("tensors.tsv")).read_text().splitlines()
    k, q = cfg.dataset.k_shot, cfg.dataset.n_query
    assert metadata[0].split("\t") == ["episode", "task", "kind"]
    assert len(metadata) - 1 == len(vectors) == 3 * (k + q + 1)
    kinds = [row.split("\t")[2] for row in metadata[1:]]
    assert kinds.count("support") == 3 * k and kinds.count("support mean") == 3
    assert kinds.count("query anomaly") == 3 * round(q * cfg.dataset.anomaly_ratio)
    assert len(vectors[0].split("\t")) == cfg.backbone.embed_dim


def test_roc_points_are_scikit_learns_curve():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (20, 12), generator=gen).double()  # ties
    labels = (torch.rand(20, 12, generator=gen) < 0.5).long()
    labels[:, 0], labels[:, 1] = 0, 1
    fpr, tpr = roc_points(scores, labels)
    for b in range(20):
        f, t, _ = roc_curve(labels[b], scores[b], drop_intermediate=False)
        expected = {(round(x, 6), round(y, 6)) for x, y in zip(f.tolist(), t.tolist())} - {(0.0, 0.0)}
        assert {(round(x, 6), round(y, 6)) for x, y in zip(fpr[b].tolist(), tpr[b].tolist())} == expected


def test_pr_probabilities_put_the_threshold_at_one_half_and_keep_the_order():
    z = torch.tensor([[-1.0, 0.5, 3.0], [2.0, 4.0, 1.0]])
    p = pr_probabilities(z, torch.tensor([0.5, 2.0]))
    assert p[0, 1].item() == 0.5 and p[1, 0].item() == 0.5
    assert (p.argsort(1) == z.argsort(1)).all() and ((p > 0.5) == (z > torch.tensor([[0.5], [2.0]]))).all()


def test_histogram_marks_the_threshold():
    z = torch.tensor([[-1.0, 0.0, 2.0, 3.0]])
    labels = torch.tensor([[0, 0, 1, 1]])
    (ax,) = histogram_figure(z, labels, torch.tensor([1.25])).axes
    assert [line.get_xdata()[0] for line in ax.lines] == [1.25]
    (ax,) = histogram_figure(z.repeat(3, 1), labels.repeat(3, 1), torch.tensor([1.0, 1.5, 2.0])).axes
    assert np.isclose(ax.lines[0].get_xdata()[0], 1.5)  # the median of per-episode thresholds
