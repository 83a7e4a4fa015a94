"""metaad-score end to end: a checkpoint trained here, a user's files made here, CSV rows out, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from metaad import checkpoint as ckpt
from metaad.apps.build import build_datamodule, build_learner
from metaad.apps.eval import evaluate
from metaad.apps.score import read_samples, score
from metaad.data import DataError
from metaad.evaluation.thresholds import leave_one_out_scores, standardise
from tests.conftest import compose_in

COLUMNS = ["id", "score", "normalised_score", "is_anomaly"]


@pytest.fixture(scope="module")
def trained(quick_run):
    """The shared quick run (f1_optimal on z-scores): config, metrics, best checkpoint."""
    return quick_run


@pytest.fixture(scope="module")
def model(trained):
    """The checkpoint's model rebuilt as metaad-eval does, in eval mode."""
    checkpoint = ckpt.load(trained[2])
    model = build_learner(checkpoint.config, checkpoint.sample_shape)
    checkpoint.load_weights(model)
    return model.eval()


@pytest.fixture(scope="module")
def episode(trained):
    """Test episode 0 (a digit never seen in training), as the evaluation sees it."""
    return build_datamodule(trained[0]).datasets["test"][0]


def raw(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Digits as the user has them (0-16): the source scales them by 1/16, scoring does the same."""
    return np.asarray(x).reshape(len(x), -1) * 16.0


def write_csv(path: Path, x: torch.Tensor | np.ndarray, ids: list[str] | None = None) -> Path:
    """A CSV of raw digits (``x`` as the episodes hold them, scaled back to 0-16)."""
    frame = pd.DataFrame(raw(x), columns=[f"pixel_{i}" for i in range(64)])
    if ids is not None:
        frame.insert(0, "id", ids)
    frame.to_csv(path, index=False)
    return path


def run_score(tmp_path: Path, ckpt: Path, support: Path, query: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose_in(
        tmp_path / "score",
        [f"ckpt_path={ckpt}", f"support={support}", f"query={query}", *overrides],
        config_name="score",
        quick=False,
    )
    table = score(cfg)
    pd.testing.assert_frame_equal(table, pd.read_csv(cfg.output, dtype={"id": str}), check_dtype=False)
    return table


def test_scores_a_csv_as_evaluation_does_with_the_stored_threshold(trained, model, episode, tmp_path):
    _, _, ckpt = trained
    ids = [f"sample-{i}" for i in range(len(episode.query))]
    support = write_csv(tmp_path / "normal.csv", episode.support)
    query = write_csv(tmp_path / "new.csv", episode.query, ids)
    table = run_score(tmp_path, ckpt, support, query, f"output={tmp_path / 'out' / 'scores.csv'}")

    assert list(table.columns) == COLUMNS and table.id.tolist() == ids
    assert (tmp_path / "out" / "scores.csv").is_file()
    with torch.no_grad():
        expected = model.anomaly_scores(episode.support[None], episode.query[None])
        loo = leave_one_out_scores(model, episode.support[None])
    assert table.score.to_numpy() == pytest.approx(expected[0].numpy(), abs=1e-5)
    normalised = standardise(expected, loo)[0].numpy()
    assert table.normalised_score.to_numpy() == pytest.approx(normalised, abs=1e-4)
    stored = torch.load(ckpt, weights_only=True)["metaad_threshold"]
    assert stored["rule"] == "f1_optimal" and stored["value"] is not None
    assert table.is_anomaly.tolist() == (table.normalised_score > stored["value"]).astype(int).tolist()
    assert 0 < table.is_anomaly.sum() < len(table)  # a trained model on an easy episode flags some, not all


def test_npz_input_and_a_threshold_chosen_at_scoring_time(trained, model, episode, tmp_path):
    support, query = tmp_path / "normal.npz", tmp_path / "new.npz"
    np.savez(support, X=raw(episode.support))
    np.savez(query, X=raw(episode.query), id=np.array([f"q{i}" for i in range(len(episode.query))]))
    table = run_score(
        tmp_path, trained[2], support, query, "threshold=support_quantile", "threshold.margin=1.5"
    )
    assert table.id.tolist()[:2] == ["q0", "q1"]
    with torch.no_grad():
        loo = leave_one_out_scores(model, episode.support[None])
    threshold = 1.5 * standardise(loo, loo).max().item()
    assert table.is_anomaly.tolist() == (table.normalised_score > threshold).astype(int).tolist()


def test_checkpoint_keeps_the_threshold_and_eval_reproduces_the_decisions(trained, compose_cfg):
    cfg, metrics, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["metaad_config"]["threshold"]["_target_"] == "metaad.evaluation.thresholds.F1Optimal"
    assert checkpoint["metaad_sample_shape"] == [64]
    assert metrics["threshold"]["value"] == checkpoint["metaad_threshold"]["value"]
    for name in ("auroc", "f1", "precision", "recall", "balanced_accuracy"):
        assert metrics["test"][name]["n_episodes"] == 40
    # the fitted threshold decides better than chance on unseen digits
    assert metrics["test"]["balanced_accuracy"]["mean"] - metrics["test"]["balanced_accuracy"]["ci95"] > 0.5
    eval_cfg = compose_cfg([f"ckpt_path={ckpt}", "logger=none"], config_name="eval", quick=False)
    evaluated = evaluate(eval_cfg).to_json()
    for name in ("f1", "balanced_accuracy"):
        assert evaluated["test"][name]["mean"] == pytest.approx(metrics["test"][name]["mean"], abs=1e-9)
    assert evaluated["threshold"] == metrics["threshold"]


@pytest.mark.parametrize(
    "make_support, make_query, message",
    [
        (lambda x: x[:5], lambda x: x[:, :10], r"query=.*query.csv: .*shape \(N, 64\), got shape \(20, 10\)"),
        (lambda x: x[:0], lambda x: x, "holds no samples"),
        (lambda x: np.where(np.arange(64) == 3, np.nan, x[:5]), lambda x: x, "NaN"),
        (lambda x: x[:2], lambda x: x, r"support=.*: fit got 2 normal sample\(s\); k_shot=2: .* at least 3"),
    ],
    ids=["width", "empty", "nan", "two-samples"],
)
def test_refuses_bad_files_with_a_clear_message(trained, tmp_path, make_support, make_query, message):
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    support = tmp_path / "support.csv"
    pd.DataFrame(make_support(x)).add_prefix("f").to_csv(support, index=False)
    query = tmp_path / "query.csv"
    pd.DataFrame(make_query(x)).add_prefix("f").to_csv(query, index=False)
    with pytest.raises(DataError, match=message):
        run_score(tmp_path, trained[2], support, query)


def test_refuses_a_threshold_the_checkpoint_did_not_fit(trained, episode, tmp_path):
    support = write_csv(tmp_path / "normal.csv", episode.support)
    with pytest.raises(ValueError, match="holds no f1_optimal threshold fitted .*'normalise': 'none'"):
        run_score(tmp_path, trained[2], support, support, "threshold=f1_optimal", "threshold.normalise=none")


def test_refuses_text_columns_missing_files_and_images_for_a_vector_model(trained, tmp_path):
    x = np.random.default_rng(0).random((5, 64))
    support = write_csv(tmp_path / "support.csv", x)
    text = tmp_path / "text.csv"
    pd.DataFrame(x).assign(note="ok").to_csv(text, index=False)
    with pytest.raises(DataError, match=r"column\(s\) \['note'\] are not numeric"):
        run_score(tmp_path, trained[2], support, text)
    with pytest.raises(DataError, match="no such file"):
        run_score(tmp_path, trained[2], support, tmp_path / "missing.csv")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"takes samples of shape \(64,\)"):
        run_score(tmp_path, trained[2], support, tmp_path / "images")


def test_reads_a_folder_of_images_as_raw_pixels_and_refuses_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"b{i}.png")
    (folder / "notes.txt").write_text("not an image")
    ids, x = read_samples(folder, "query")
    assert ids == ["b0.png", "b1.png", "b2.png"] and x.shape == (3, 8, 8)
    assert x == pytest.approx(pixels)  # raw: the checkpoint's preprocessing scales, resizes, inverts
    _, rgb = read_samples(folder, "query", channels=3)
    assert rgb.shape == (3, 3, 8, 8) and rgb[:, 1] == pytest.approx(x)
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(folder / "c.png")
    with pytest.raises(DataError, match=r"c.png is 12x10 pixels but b0.png is 8x8"):
        read_samples(folder, "query")


def test_a_headerless_csv_is_all_samples(tmp_path):
    x = np.arange(12.0).reshape(3, 4)
    np.savetxt(tmp_path / "plain.csv", x, delimiter=",")
    ids, read = read_samples(tmp_path / "plain.csv", "support")
    assert ids == ["0", "1", "2"] and np.asarray(read) == pytest.approx(x)


def test_a_header_of_column_positions_is_a_header_not_a_sample(tmp_path):
    """pandas writes 0, 1, ... as the header of an unnamed frame: it must not become a sample."""
    x = np.arange(12.0).reshape(3, 4) + 5
    pd.DataFrame(x).to_csv(tmp_path / "pandas.csv", index=False)
    ids, read = read_samples(tmp_path / "pandas.csv", "support")
    assert ids == ["0", "1", "2"] and np.asarray(read) == pytest.approx(x)


def test_a_repeated_column_name_is_refused(tmp_path):
    (tmp_path / "twice.csv").write_text("a,b,a\n1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match=r"names the column\(s\) \['a'\] more than once"):
        read_samples(tmp_path / "twice.csv", "query")


@pytest.mark.slow
def test_command_line(trained, episode, tmp_path):
    support = write_csv(tmp_path / "normal.csv", episode.support)
    query = write_csv(tmp_path / "new.csv", episode.query)
    out = tmp_path / "scores.csv"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cli = [sys.executable, "-m", "metaad.apps.score", f"ckpt_path={trained[2]}", f"support={support}"]
    run = {"capture_output": True, "text": True, "env": env, "cwd": tmp_path}
    done = subprocess.run([*cli, f"query={query}", f"output={out}"], **run)
    assert done.returncode == 0, done.stderr
    assert "anomalies at threshold f1_optimal" in done.stdout
    assert len(pd.read_csv(out)) == len(episode.query)
    assert not list((tmp_path / "outputs" / "score").iterdir())  # no empty run folder left behind
    done = subprocess.run([*cli, f"query={query}"], **run)  # the table into the run folder: kept
    assert done.returncode == 0, done.stderr
    assert [len(pd.read_csv(p)) for p in (tmp_path / "outputs" / "score").glob("*/scores.csv")] == [
        len(episode.query)
    ]
    bad = write_csv(tmp_path / "bad.csv", np.full((5, 64), np.nan))
    failed = subprocess.run(
        [*cli[:-1], f"support={bad}", f"query={query}"], capture_output=True, text=True, env=env
    )
    assert failed.returncode != 0 and "NaN" in failed.stderr
