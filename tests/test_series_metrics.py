"""Stream metrics of a scored series against hand-computed values and the VUS reference's own
loops, and CIs over entities (draws averaged within an entity first)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from metaad.data.episodes import Episode
from metaad.detectors.baselines import SupportMeanDistance
from metaad.evaluation.evaluator import Evaluator
from metaad.evaluation.metrics import summarize
from metaad.evaluation.stream_metrics import (
    align,
    aupr,
    auroc,
    best_f1,
    f1_at,
    stream_metrics,
    support_threshold,
    vus,
)
from metaad.evaluation.thresholds import SupportQuantile, leave_one_out_scores, standardise

# Step 1, just before the segment [2, 3], scores highest; the segment's steps rank 2nd and 5th.
LABELS = np.array([0, 0, 1, 1, 0, 0])
SCORES = np.array([0.1, 0.9, 0.8, 0.2, 0.3, 0.4])


def test_point_metrics_by_hand():
    # the anomaly 0.8 beats 3 of the 4 normals (not 0.9), 0.2 beats 1 (0.1): (3 + 1) / 8
    assert auroc(SCORES, LABELS) == pytest.approx(4 / 8)
    # AP: recall 1/2 at precision 1/2 (top 2), recall 1 at precision 2/5 (top 5)
    assert aupr(SCORES, LABELS) == pytest.approx(0.5 * 0.5 + 0.5 * 0.4)
    f1, threshold = best_f1(SCORES, LABELS)
    assert f1 == pytest.approx(2 * 2 / (5 + 2)) and threshold == 0.2  # top 5: tp 2, fp 3, fn 0
    decided = f1_at(SCORES, LABELS, 0.35)  # > 0.35: steps 1, 2, 5
    assert decided == pytest.approx({"f1": 2 / (2 + 2 + 1), "precision": 1 / 3, "recall": 1 / 2})


def test_point_metrics_equal_sklearn_with_ties():
    g = np.random.default_rng(0)
    labels = (g.random(500) < 0.1).astype(int)
    scores = np.round(g.random(500) + labels * 0.3, 1)  # many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert aupr(scores, labels) == pytest.approx(average_precision_score(labels, scores))


def test_vus_by_hand():
    # buffers 0 and 1 (half-width 0) credit only the segment: VUS-PR = AP = 0.45 there.
    # buffer 2 (half-width 1): steps 1 and 4 get credit c = sqrt(1 - 1/2) when predicted, the one
    # widened range [1, 4] is hit by every threshold. Thresholds from the top: {1}, {1,2}, {1,2,5},
    # {1,2,5,4}, {.., 3}, {.., 0}.
    c = math.sqrt(0.5)
    tp = [c, 1 + c, 1 + c, 1 + 2 * c, 2 + 2 * c, 2 + 2 * c]
    p_new = [2 + c / 2, 2 + c / 2, 2 + c / 2, 2 + c, 2 + c, 2 + c]
    recall = [min(t / p, 1) for t, p in zip(tp, p_new)]
    precision = [t / k for t, k in zip(tp, range(1, 7))]
    ap_2 = sum((r - r0) * p for r, r0, p in zip(recall, [0, *recall[:-1]], precision))
    _, vus_pr = vus(SCORES, LABELS, max_buffer=2)
    assert vus_pr == pytest.approx((0.45 + 0.45 + ap_2) / 3)
    assert vus(SCORES, LABELS, max_buffer=0)[1] == pytest.approx(0.45)
    # ROC at buffer 0: the (FPR, TPR) staircase of the 6 thresholds, trapezoids from (0,0) to (1,1)
    fpr = [1 / 4, 1 / 4, 2 / 4, 3 / 4, 3 / 4, 1]
    tpr = [0, 1 / 2, 1 / 2, 1 / 2, 1, 1]
    xs, ys = [0, *fpr, 1], [0, *tpr, 1]
    area = sum((x1 - x0) * (y1 + y0) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    assert vus(SCORES, LABELS, max_buffer=0)[0] == pytest.approx(area)


def reference_vus(labels: np.ndarray, score: np.ndarray, window_size: int, thre: int = 250) -> tuple:
    """TheDatumOrg/VUS ``metricor.RangeAUC_volume_opt`` (vus/utils/metrics.py), its loops kept as
    they are (``tp`` stays zero there too), so the vectorised version is checked against them."""

    def range_convers(label):
        edges = np.diff(np.r_[0, label, 0])
        return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))

    def new_sequence(label, seq, window):
        a = max(seq[0][0] - window // 2, 0)
        out = []
        for i in range(len(seq) - 1):
            if seq[i][1] + window // 2 < seq[i + 1][0] - window // 2:
                out.append((a, seq[i][1] + window // 2))
                a = seq[i + 1][0] - window // 2
        out.append((a, min(seq[-1][1] + window // 2, len(label) - 1)))
        return out

    def sequencing(x, seq, window):
        label = x.copy().astype(float)
        for s, e in seq:
            x1 = np.arange(e + 1, min(e + window // 2 + 1, len(label)))
            label[x1] += np.sqrt(1 - (x1 - e) / window)
            x2 = np.arange(max(s - window // 2, 0), s)
            label[x2] += np.sqrt(1 - (s - x2) / window)
        return np.minimum(np.ones(len(label)), label)

    p = np.sum(labels)
    seq = range_convers(labels)
    long = new_sequence(labels, seq, window_size)
    score_sorted = -np.sort(-score)
    aucs, aps = [], []
    for window in range(window_size + 1):
        extended = sequencing(labels, seq, window)
        ranges = new_sequence(extended, seq, window)
        tf, precisions = [[0, 0]], [1]
        for i in np.linspace(0, len(score) - 1, thre).astype(int):
            pred = score >= score_sorted[i]
            lab = extended.copy()
            existence = 0
            for s, e in ranges:
                lab[s : e + 1] = extended[s : e + 1] * pred[s : e + 1]
                existence += (pred[s : e + 1] > 0).any()
            for s, e in seq:
                lab[s : e + 1] = 1
            tp = sum(np.dot(lab[s : e + 1], pred[s : e + 1]) for s, e in long)
            n_labels = sum(np.sum(lab[s : e + 1]) for s, e in long)
            p_new = (p + n_labels) / 2
            tf.append(
                [min(tp / p_new, 1) * existence / len(ranges), (np.sum(pred) - tp) / (len(lab) - p_new)]
            )
            precisions.append(tp / np.sum(pred))
        tf.append([1, 1])
        tf, precisions = np.array(tf), np.array(precisions)
        aucs.append(np.dot(tf[1:, 1] - tf[:-1, 1], (tf[1:, 0] + tf[:-1, 0]) / 2))
        aps.append(np.dot(tf[1:-1, 0] - tf[:-2, 0], precisions[1:]))
    return sum(aucs) / len(aucs), sum(aps) / len(aps)


@pytest.mark.parametrize("seed", [0, 1])
def test_vus_equals_the_reference_loops(seed):
    g = np.random.default_rng(seed)
    n = 400
    labels = np.zeros(n, dtype=int)
    # a segment at the very start, two close enough for their buffers to merge, one at the end
    for start, length in [(0, 3), (100, 10), (114, 5), (250, 1), (n - 6, 6)]:
        labels[start : start + length] = 1
    scores = g.random(n) + 0.8 * np.convolve(labels, np.ones(5) / 5, mode="same")
    for max_buffer in (0, 5, 12):
        np.testing.assert_allclose(vus(scores, labels, max_buffer), reference_vus(labels, scores, max_buffer))


def test_undefined_streams_and_bad_input_are_refused():
    with pytest.raises(ValueError, match="only normal steps"):
        vus(SCORES, np.zeros(6, dtype=int), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        auroc(np.r_[SCORES[:-1], np.nan], LABELS)
    with pytest.raises(ValueError, match="6 scores for 5 labels"):
        aupr(SCORES, LABELS[:5])
    with pytest.raises(ValueError, match="labels must be 0/1"):
        best_f1(SCORES, LABELS * 2)


def test_align_keeps_the_labels_of_the_scored_steps():
    labels = np.arange(10)
    assert align(labels, 7).tolist() == list(range(3, 10))  # window of 4: steps 3..9 have a score


def test_support_threshold_is_support_quantile_on_the_raw_scale():
    support = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    query = torch.randn(1, 30, 4, generator=torch.Generator().manual_seed(1)) * 2
    detector = SupportMeanDistance("euclidean")
    scores = detector.score(detector.adapt(support), query)[0]
    loo = leave_one_out_scores(detector, support)
    rule = SupportQuantile(q=0.9, margin=1.5)
    decided, _ = rule.decide(standardise(scores[None], loo), standardise(loo, loo))
    threshold = support_threshold(loo[0], q=0.9, margin=1.5)
    # the same decisions (away from the float32 rounding of the normalised scale)
    away = (scores.double() - threshold).abs() > 1e-4
    assert torch.equal((scores > threshold)[away], decided[0][away])
    with pytest.raises(ValueError, match="at least 3 support windows"):
        support_threshold(loo[0, :2])


def test_stream_metrics_gathers_them():
    out = stream_metrics(torch.tensor(SCORES), torch.tensor(LABELS), max_buffer=2, threshold=0.35)
    assert out.auroc == pytest.approx(4 / 8) and out.f1_support == pytest.approx(0.4)
    assert stream_metrics(SCORES, LABELS, max_buffer=2).f1_support is None


# --- CIs over entities ------------------------------------------------------------------------
def test_summarize_averages_within_a_group_first():
    values = torch.tensor([1.0, 3.0, 10.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([7, 7, 2, 5, 5, 5])  # means: entity 7 -> 2, entity 2 -> 10, entity 5 -> 0
    out = summarize(values, groups)
    means = torch.tensor([2.0, 10.0, 0.0], dtype=torch.float64)
    assert out.mean == pytest.approx(4.0) and out.n_groups == 3 and out.n_episodes == 6
    assert out.ci95 == pytest.approx(1.96 * means.std().item() / math.sqrt(3))
    assert summarize(values).ci95 == pytest.approx(1.96 * values.double().std().item() / math.sqrt(6))
    with pytest.raises(ValueError, match="5 group keys for 6"):
        summarize(values, groups[:5])


def test_evaluator_gives_cis_over_tasks_when_asked():
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(6, 4, 3, generator=g), torch.randn(6, 8, 3, generator=g)
    label = torch.tensor([[0, 1] * 4] * 6)
    query[label.bool()] += torch.linspace(0.0, 3.0, 6).repeat_interleave(4).view(-1, 1)
    task = torch.tensor([0, 0, 0, 1, 1, 2])
    batch = Episode(support, query, label, task, label)
    per = {}
    for ci_over in ("episode", "task"):
        evaluator = Evaluator(ci_over=ci_over)
        evaluator.add("test", {evaluator.learner: SupportMeanDistance("euclidean")}, batch)
        per[ci_over] = evaluator.finish().metrics["test"]["learner"]["auroc"]
    scores = SupportMeanDistance("euclidean").score(SupportMeanDistance("euclidean").adapt(support), query)
    from metaad.evaluation.metrics import episode_auroc

    expected = summarize(episode_auroc(scores, label), task)
    assert per["task"] == expected and per["task"].n_groups == 3
    assert per["episode"].n_groups is None and per["episode"].n_episodes == 6
    with pytest.raises(ValueError, match="ci_over must be one of"):
        Evaluator(ci_over="entity")


def test_evaluate_stream_scores_after_the_context_and_fits_the_threshold_on_the_support():
    from metaad.detectors.series_baselines import RobustZScore
    from metaad.evaluation.stream_metrics import evaluate_stream, summarize_streams

    g = torch.Generator().manual_seed(0)
    w = 8
    support = torch.randn(5, w, 2, generator=g)
    series = torch.randn(w - 1 + 200, 2, generator=g)
    labels = np.zeros(series.shape[0], dtype=int)
    labels[w - 1 + 100 : w - 1 + 110] = 1
    series[w - 1 + 100 : w - 1 + 110, 1] += 8.0
    detector = RobustZScore()
    out = evaluate_stream(detector, support, series, labels)
    scores = detector.score_stream(detector.adapt(support[None]), series[None], w)[0].numpy()
    assert scores.shape == (200,)
    expected = stream_metrics(scores, labels[w - 1 :], max_buffer=w)
    assert out.auroc == expected.auroc and out.vus_pr == expected.vus_pr and out.auroc > 0.9
    threshold = support_threshold(leave_one_out_scores(detector, support[None])[0])
    assert out.f1_support == f1_at(scores, labels[w - 1 :], threshold)["f1"]
    summary = summarize_streams([out, out])
    assert summary["auroc"].mean == pytest.approx(out.auroc) and summary["f1_support"].n_episodes == 2
    assert "f1_support" not in summarize_streams([expected])  # no support threshold, no F1 at it
