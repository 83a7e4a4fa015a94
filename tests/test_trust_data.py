"""Trust in what comes in: extreme values, NaN scores, frames, the store, images, large supports.

Each case is one situation of issue 16 that metaad got wrong (a NaN score read as normal, a frame
read by position, a damaged or stale store served, a 16-bit PNG clipped to white, a rotated JPEG
read sideways, 25.6 GB asked for by a leave-one-out, a sparse matrix misread) and asserts what
holds now: a refusal naming the row, column, file or store, or the right answer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import metaad
from metaad.api import FewShotDetector, Parts, baseline_configs
from metaad.apps.build import build_datamodule
from metaad.apps.score import read_samples
from metaad.apps.train import train
from metaad.data import DataError, store
from metaad.data.episodes import Episode
from metaad.data.sources import omniglot, table, task_files
from metaad.detectors import baselines
from metaad.detectors.base import anomaly_scores
from metaad.evaluation.evaluator import Evaluator
from metaad.evaluation.thresholds import (
    F1Optimal,
    Fixed,
    NonFiniteScores,
    SupportQuantile,
    leave_one_out_scores,
)
from tests.conftest import compose_in


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quick real run on digits (64 pixel features, no column names): its best checkpoint."""
    overrides = ["threshold=support_quantile", "threshold.normalise=none", "baselines=none", "logger=none"]
    cfg = compose_in(tmp_path_factory.mktemp("train"), overrides)
    train(cfg)
    return cfg, Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def digits(trained):
    """Raw digit rows (0-16) of one test episode: support (normal) and query."""
    episode = build_datamodule(trained[0]).datasets["test"][0]
    return episode.support.flatten(1).numpy() * 16, episode.query.flatten(1).numpy() * 16


def normals(n: int = 12, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


# --- extreme finite values: refused naming the row and the column ---------------------------------

EXTREMES = [1e25, 1e38, -1e30, 1e39]


@pytest.mark.parametrize("value", EXTREMES)
@pytest.mark.parametrize("name", sorted(baseline_configs()))
@pytest.mark.parametrize("where", ["support", "query"])
def test_an_extreme_value_in_a_baseline_input_is_refused_naming_row_and_column(name, where, value):
    support, query = normals(), normals(6, seed=1)
    (support if where == "support" else query)[3, 2] = value
    det = metaad.baseline(name)  # support_quantile: needs leave-one-out scores of the support
    if where == "query":
        det.fit(support[:4])
    with pytest.raises(DataError, match=r"row 3, column 2 holds"):
        det.fit(support) if where == "support" else det.predict(query)


@pytest.mark.parametrize("name", sorted(baseline_configs()))
def test_a_column_of_huge_equal_values_is_refused_naming_it(name):
    support, query = normals(), normals(6, seed=1)
    support[:, 4] = query[:, 4] = 1e30
    with pytest.raises(DataError, match=r"row 0, column 4 holds 1e\+30"):
        metaad.baseline(name).fit(support).predict(query)


@pytest.mark.parametrize("value", [1e25, 1e30, -1e38])
@pytest.mark.parametrize("where", ["support", "query"])
def test_an_extreme_pixel_for_a_loaded_learner_is_refused_naming_row_and_column(
    trained, digits, where, value
):
    support, query = digits[0].copy(), digits[1].copy()
    (support if where == "support" else query)[2, 17] = value
    det = metaad.load(trained[1])
    with pytest.raises(DataError, match=r"row 2, column 17 holds"):
        det.fit(support).predict(query)


@pytest.mark.parametrize("value", [1e25, -1e30])
def test_an_extreme_value_in_a_table_is_refused_naming_row_and_column(tmp_path, value):
    rng = np.random.default_rng(0)
    data = pd.DataFrame(rng.normal(size=(40, 3)), columns=["f1", "f2", "f3"])
    data["machine"] = np.repeat(["m1", "m2"], 20)
    data.loc[17, "f2"] = value
    data.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"t.csv: row 17, column 'f2' holds"):
        table(str(tmp_path / "t.csv"), task_column="machine")


def test_an_extreme_value_in_a_task_file_is_refused_naming_row_and_column(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4))
    x[5, 1] = 1e30
    np.savez(tmp_path / "a.npz", X=x, y=np.zeros(20))
    with pytest.raises(DataError, match=r"a.npz: row 5, column 1 holds 1e\+30"):
        task_files(str(tmp_path))


# --- a NaN score is never a decision ------------------------------------------------------------


class Overflowing:
    """A detector whose float32 arithmetic overflows for one query (as a learner's may): the sum of
    fourth powers of the differences to the support mean."""

    def adapt(self, support):
        return support.flatten(2).mean(1, keepdim=True)

    def score(self, state, query):
        d = query.flatten(2) - state
        s = d.pow(4).sum(-1) * 1e30
        return s - s  # inf - inf: NaN where the fourth powers overflow, 0 elsewhere


class Wrapped(FewShotDetector):
    """Any detector object behind the API (the API's own subclasses build theirs from parameters)."""

    def __init__(self, detector, threshold) -> None:
        self.inner, self.threshold = detector, threshold

    def _build(self) -> Parts:
        return Parts(self.inner, None, self.threshold, "overflowing")


@pytest.mark.parametrize(
    "rule",
    [Fixed(0.5, normalise="none"), SupportQuantile(normalise="none"), SupportQuantile(normalise="zscore")],
    ids=["fixed", "support_quantile", "support_quantile_zscore"],
)
@pytest.mark.parametrize("call", ["predict", "normalised_scores", "decision_function"])
def test_a_nan_score_through_the_api_is_refused_naming_the_row(rule, call):
    support, query = normals(), normals(6, seed=1)
    query[4, 3] = 1e3  # a fourth power of 1e12, times 1e30: inf in float32
    det = Wrapped(Overflowing(), rule).fit(support)
    with pytest.raises(NonFiniteScores, match=r"row 4 \(largest value 1e\+03 in column 3\)"):
        getattr(det, call)(query)


@pytest.mark.parametrize("rule", [Fixed(0.5), SupportQuantile(), F1Optimal()], ids=lambda r: r.rule)
def test_a_threshold_never_decides_on_a_nan_score(rule):
    rule.value = 0.5 if rule.fits_on_validation else rule.value
    normalised = torch.tensor([[0.1, float("nan"), 2.0]])
    with pytest.raises(NonFiniteScores, match=r"\(0, 1\)"):
        rule.decide(normalised, torch.tensor([[0.0, 0.3, 0.2]]))


@pytest.mark.parametrize(
    "rule", [Fixed(0.0, normalise="none"), F1Optimal(normalise="none")], ids=lambda r: r.rule
)
def test_the_evaluator_reports_no_decisions_where_scores_are_nan(rule):
    support = torch.randn(4, 5, 3)
    query = torch.randn(4, 6, 3)
    query[2, 1, 0] = 1e3
    labels = torch.tensor([[0, 0, 0, 1, 1, 1]] * 4)
    batch = Episode(support, query, labels, torch.arange(4), torch.zeros(4, 6, dtype=torch.long))
    evaluator = Evaluator(threshold=rule)
    evaluator.add("val", {"learner": Overflowing()}, batch)
    evaluator.add("test", {"learner": Overflowing()}, batch)
    report = evaluator.finish()
    assert "NaN or infinite" in report.notes["learner"]
    assert "f1" not in report.metrics["test"]["learner"]


# --- frames are matched by label ----------------------------------------------------------------

LABELS = {
    "int labels": (lambda i: i, lambda i: i),
    "str labels": (str, str),
    "int support, str query": (lambda i: i, str),
}


@pytest.mark.parametrize("labels", LABELS, ids=list(LABELS))
def test_a_query_frame_with_the_support_frame_labels_in_another_order_is_read_by_label(
    trained, digits, labels
):
    to_support, to_query = LABELS[labels]
    support, query = digits
    det = metaad.load(trained[1])
    expected = det.fit(support).decision_function(query)
    order = np.random.default_rng(0).permutation(64)
    support_frame = pd.DataFrame(support, columns=[to_support(i) for i in range(64)])
    query_frame = pd.DataFrame(query[:, order], columns=[to_query(int(i)) for i in order])
    got = det.fit(support_frame).decision_function(query_frame)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_a_refit_on_an_array_forgets_the_earlier_frame_labels(trained, digits):
    support, query = digits
    det = metaad.load(trained[1])
    det.fit(pd.DataFrame(support, columns=[f"p{i}" for i in range(64)]))
    expected = det.fit(support).decision_function(query)
    with pytest.warns(UserWarning, match="read by position"):
        got = det.decision_function(pd.DataFrame(query, columns=[f"q{i}" for i in range(64)]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# --- scipy sparse input --------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["fit", "decision_function", "predict"])
@pytest.mark.parametrize("detector", ["baseline", "learner"])
def test_sparse_input_is_refused_saying_toarray(trained, digits, call, detector):
    from scipy import sparse

    det = metaad.baseline("nn_euclidean") if detector == "baseline" else metaad.load(trained[1])
    support, query = digits
    if call != "fit":
        det.fit(support)
    with pytest.raises(DataError, match=r"scipy sparse csr_matrix .*X\.toarray\(\)"):
        getattr(det, call)(sparse.csr_matrix(support if call == "fit" else query))


# --- leave-one-out in memory linear in K --------------------------------------------------------


def brute_force_loo(detector, support: torch.Tensor) -> torch.Tensor:
    """Adapt to the K-1 others, score the held-out one: the definition, (K, K-1, D) copies and all."""
    b, k = support.shape[:2]
    index = torch.arange(k)
    others = torch.stack([index[index != i] for i in range(k)])
    rest = support[:, others].flatten(0, 1)
    return anomaly_scores(detector, rest, support.flatten(0, 1).unsqueeze(1)).reshape(b, k)


LOO_DETECTORS = {
    "mahalanobis": baselines.Mahalanobis,
    "mean_euclidean": baselines.SupportMeanDistance,
    "mean_cosine": lambda: baselines.SupportMeanDistance("cosine"),
    "nn_euclidean": baselines.NearestNeighbourDistance,
    "nn_cosine": lambda: baselines.NearestNeighbourDistance("cosine"),
}


@pytest.mark.parametrize("shape", [(2, 5), (5, 64), (40, 8), (70, 3)], ids=lambda s: f"K{s[0]}xD{s[1]}")
@pytest.mark.parametrize("name", LOO_DETECTORS)
def test_a_closed_form_leave_one_out_equals_the_brute_force_one(name, shape):
    k, d = shape
    torch.manual_seed(0)
    support = torch.randn(3, k, d) * torch.rand(1, 1, d) * 3 + 2
    detector = LOO_DETECTORS[name]()
    got = detector.leave_one_out(support)  # what leave_one_out_scores takes when a detector has it
    np.testing.assert_allclose(got, brute_force_loo(detector, support), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(leave_one_out_scores(detector, support), got)


@pytest.mark.parametrize("name", ["nn_euclidean", "nn_cosine", "mahalanobis"])
def test_a_closed_form_leave_one_out_with_repeated_and_tied_samples_equals_the_brute_force_one(name):
    torch.manual_seed(1)
    support = torch.randn(2, 30, 6).round()  # integer coordinates: exact ties
    support[:, 10:15] = support[:, :5]  # and repeated samples
    detector = LOO_DETECTORS[name]()
    expected = brute_force_loo(detector, support)
    np.testing.assert_allclose(detector.leave_one_out(support), expected, rtol=1e-5, atol=1e-5)


def test_mahalanobis_leave_one_out_of_identical_samples_is_zero():
    support = torch.ones(1, 6, 4)
    assert baselines.Mahalanobis().leave_one_out(support).abs().max() == 0


def test_the_generic_leave_one_out_in_chunks_equals_it_in_one_go(monkeypatch):
    from metaad.detectors import base

    detector = baselines.LocalOutlierFactor(n_neighbors=3)  # no closed form: adapted K times
    support = torch.randn(2, 9, 4)
    whole = leave_one_out_scores(detector, support)
    monkeypatch.setattr(base, "_LOO_ELEMENTS", 2 * 8 * 4 * 2)  # two held-out samples a chunk
    np.testing.assert_array_equal(leave_one_out_scores(detector, support), whole)
    np.testing.assert_allclose(whole, brute_force_loo(detector, support), rtol=1e-6)


@pytest.mark.parametrize("name", LOO_DETECTORS)
def test_a_baseline_fits_ten_thousand_support_samples(name):
    x = np.random.default_rng(0).normal(size=(10_000, 64)) + 2
    det = metaad.baseline(name).fit(x)
    assert det.support_scores_.shape == (1, 10_000) and torch.isfinite(det.support_scores_).all()
    assert det.predict(-x[:100]).all() and not det.predict(x[:100]).any()


# --- the store: the data or nothing -------------------------------------------------------------

LABELLED = {"task_column": "machine", "anomaly_column": "faulty"}


def write_table(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = pd.DataFrame(rng.normal(size=(48, 3)).round(3), columns=["f1", "f2", "f3"])
    data["machine"] = np.repeat(["m1", "m2", "m3", "m4"], 12)
    data["faulty"] = np.tile([0, 0, 0, 1], 12)
    data.to_csv(path, index=False)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_partial_stores_of_dead_builders_are_removed_and_live_ones_kept(tmp_path):
    import socket

    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    write_table(path)
    cache.mkdir()
    host = socket.gethostname()
    partials = {
        f"t.csv-0123.partial-{host}-{dead_pid()}": False,  # a killed build on this host
        f"t.csv-0123.partial-{dead_pid()}": False,  # the same, named as format 1 named it
        f"t.csv-0123.partial-{host}-{os.getppid()}": True,  # a build still running
        f"t.csv-0123.partial-elsewhere.example-{dead_pid()}": True,  # another host's: cannot tell
    }
    for name in partials:
        (cache / name).mkdir()
        (cache / name / "x.npy").write_bytes(b"half")
    foreign = cache / f"notes.partial-{host}-{dead_pid()}"  # named alike, but not a build's
    foreign.mkdir()
    (foreign / "mine.txt").write_text("the user's")
    table(str(path), **LABELLED, cache=str(cache))
    assert {name: (cache / name).exists() for name in partials} == partials
    assert (foreign / "mine.txt").read_text() == "the user's"


def only_store(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if ".partial-" not in p.name]
    return folder


def test_a_same_size_damaged_row_of_a_store_is_an_error_naming_the_store_and_row(tmp_path):
    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    write_table(path)
    table(str(path), **LABELLED, cache=str(cache))
    folder = only_store(cache)
    size = (folder / "x.npy").stat().st_size
    rows = store.RowFile(folder / "x.npy")
    with open(folder / "x.npy", "r+b") as f:  # row 7 zeroed, the file's size kept
        f.seek(rows.offset + 7 * rows.row_bytes)
        f.write(bytes(rows.row_bytes))
    assert (folder / "x.npy").stat().st_size == size
    data = table(str(path), **LABELLED, cache=str(cache))
    np.testing.assert_array_equal(data.x[np.array([6, 8])].shape, (2, 3))  # the others read
    with pytest.raises(DataError, match=rf"store {folder} is damaged: row 7 of x.npy .* delete"):
        data.x[np.array([3, 7])]


DAMAGE = {  # one value changed, the file's size and validity kept
    "task.npy": lambda b: b[:-4] + bytes([b[-4] ^ 1]) + b[-3:],  # the last row's task
    "anomalous.npy": lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # the last row's label
    "tasks.json": lambda b: b.replace(b'"m1"', b'"m9"'),  # a task's name
    "x.crc32.npy": lambda b: b[:-4] + bytes([b[-4] ^ 1]) + b[-3:],  # the last row's checksum
}


@pytest.mark.parametrize("damaged", DAMAGE)
def test_a_same_size_damaged_small_file_of_a_store_is_built_again(tmp_path, caplog, damaged):
    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    write_table(path)
    first = table(str(path), **LABELLED, cache=str(cache))
    file = only_store(cache) / damaged
    size = file.stat().st_size
    file.write_bytes(DAMAGE[damaged](file.read_bytes()))
    assert file.stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="metaad.data"):
        again = table(str(path), **LABELLED, cache=str(cache))
    if damaged == "x.crc32.npy":  # a checksum that no longer matches its row: an error, never data
        with pytest.raises(DataError, match="is damaged"):
            np.asarray(again.x)
        return
    assert "building it again" in caplog.text
    names = np.array(first.task_names)[first.task_codes]
    np.testing.assert_array_equal(np.array(again.task_names)[again.task_codes], names)
    np.testing.assert_array_equal(again.anomalous, first.anomalous)
    assert again.task_names == first.task_names


def test_a_source_edited_with_its_size_and_mtime_kept_is_read_afresh(tmp_path):
    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    write_table(path)
    old = table(str(path), **LABELLED, cache=str(cache))
    stat, text = path.stat(), path.read_text()
    at = text.index("\n") + 1 + (text[text.index("\n") + 1] == "-")  # the first value's first digit
    path.write_text(text[:at] + str((int(text[at]) + 5) % 10) + text[at + 1 :])  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, rsync -t and tar restore it
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    new, fresh = table(str(path), **LABELLED, cache=str(cache)), table(str(path), **LABELLED)
    assert np.asarray(old.x)[0, 0] != fresh.x[0, 0]
    np.testing.assert_array_equal(np.asarray(new.x), fresh.x)


# --- images as a viewer shows them --------------------------------------------------------------


def sixteen_bit_png(path: Path) -> np.ndarray:
    """A 16-bit greyscale PNG of a ramp over the whole 0-65535 range; the 8-bit values a viewer shows."""
    values = np.linspace(0, 65535, 48).round().astype(np.uint16).reshape(6, 8)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # really 16 bits on disk
    return np.round(values.astype(np.float64) * 255 / 65535)


def rotated_jpeg(path: Path) -> np.ndarray:
    """A JPEG stored 8 wide x 4 high with EXIF orientation 6 (turn 90 degrees clockwise to view)."""
    stored = np.zeros((4, 8), np.uint8)
    stored[:, :4] = 250  # left half white: at the top once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).convert("RGB").save(path, quality=100, exif=exif)
    return np.rot90(stored, k=-1).astype(np.float64)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_sixteen_bit_png_is_read_scaled_to_eight_bits_not_clipped(tmp_path, channels):
    folder = tmp_path / "images"
    folder.mkdir()
    expected = sixteen_bit_png(folder / "a.png")
    _, x = read_samples(folder, "query", channels=channels)
    got = x[0] if channels == 1 else x[0, 1]
    np.testing.assert_allclose(got, expected, atol=0.5)


@pytest.mark.parametrize("channels", [1, 3])
def test_an_exif_rotated_jpeg_is_read_upright(tmp_path, channels):
    folder = tmp_path / "images"
    folder.mkdir()
    expected = rotated_jpeg(folder / "a.jpg")
    _, x = read_samples(folder, "query", channels=channels)
    got = x[0] if channels == 1 else x[0, 0]
    assert got.shape == (8, 4)
    np.testing.assert_allclose(got, expected, atol=12)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_read_as_the_white_page_a_viewer_shows(tmp_path, mode):
    folder = tmp_path / "images"
    folder.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, 3] = 255  # top half opaque black, bottom half fully transparent black
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        image = Image.fromarray(np.array([[0] * 4] * 2 + [[1] * 4] * 2, np.uint8), "P")
        image.putpalette([0, 0, 0, 0, 0, 0])
        image.info["transparency"] = 1
    image = image if mode in ("RGBA", "P") else image.convert(mode)
    image.save(folder / "a.png")
    _, x = read_samples(folder, "query", channels=1)
    assert (x[0, :2] == 0).all() and (x[0, 2:] == 255).all()


def test_omniglot_reads_a_sixteen_bit_png_scaled_not_clipped(tmp_path):
    root = tmp_path / "Alphabet"
    for character in ("c1", "c2"):
        (root / character).mkdir(parents=True)
        for i in range(2):
            values = np.full((20, 20), 65535, np.uint16)
            values[5:15, 5:15] = 16384  # a dark grey square of ink (64 of 255) on white paper
            Image.fromarray(values).save(root / character / f"{i}.png")
    data = omniglot(str(tmp_path), image_size=20)
    assert data.x[0, 0, 10, 10] == pytest.approx(1 - 64 / 255, abs=0.01)  # ink, not paper
    assert data.x[0, 0, 0, 0] == pytest.approx(0.0)  # paper
