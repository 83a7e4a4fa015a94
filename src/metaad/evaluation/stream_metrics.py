"""Metrics of a scored series (one score per step), as the time-series anomaly field reports them.

A stream is one entity's series after the time cut, scored by a window ending at each step
(:func:`metaad.detectors.base.score_stream`): the first ``W - 1`` steps have no score, so labels
are aligned to the scores' end (:func:`align`), never padded with made-up scores.

- ``auroc``, ``aupr``: point-wise, every step one sample (AUPR is average precision, step-wise,
  as scikit-learn).
- ``vus_pr``, ``vus_roc``: Volume Under the Surface (Paparrizos et al., VLDB 2022), which credits
  detections a little before or after a labelled segment (a window's score lags its anomaly).
  :func:`vus` mirrors the reference implementation (TheDatumOrg/VUS, ``vus/utils/metrics.py``,
  ``metricor.RangeAUC_volume_opt``, the default ``version='opt'``, ``thre=250``): the same buffers,
  existence reward, thresholds and sums, vectorised over thresholds. Where it differs: scores are
  aligned causally instead of the reference README's centred padding; a stream without anomalies
  or without normals is refused (the reference divides by zero); the buffer's default is the
  window length (the reference asks for a user-chosen ``slidingWindow``).
- ``best_f1``: the F1 of the best threshold on the stream itself, **without point adjustment**
  (each step counts; an oracle threshold, so an upper bound on what a deployment gets).
- ``f1_support``: F1 at a threshold fitted from the support alone (:func:`support_threshold`),
  what a deployment without labels has. Point-adjusted F1 is not computed: it rewards a single
  hit inside a long segment as if the whole segment were found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from metaad.data.episodes import Stream
from metaad.detectors.base import Detector, leave_one_out_scores, score_stream
from metaad.evaluation.metrics import summarize
from metaad.evaluation.results import StreamResults, Summary
from metaad.evaluation.thresholds import EPS


def _check(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{what}: {scores.size} scores for {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: the scores contain NaN or inf")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0/1")
    labels = labels.astype(np.int64)
    if labels.sum() == 0 or labels.sum() == labels.size:
        raise ValueError(
            f"{what}: undefined on a stream with only {'normal' if labels.sum() == 0 else 'anomalous'} steps"
        )
    return scores, labels


def align(labels: np.ndarray, n_scores: int) -> np.ndarray:
    """The labels of the steps that have a score: the last ``n_scores`` (each window ends at its step)."""
    labels = np.asarray(labels).ravel()
    if n_scores > labels.size:
        raise ValueError(f"align: {n_scores} scores for a stream of {labels.size} steps")
    return labels[labels.size - n_scores :]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(an anomalous step scores above a normal one), ties half (Mann-Whitney with average ranks)."""
    scores, labels = _check(scores, labels, "auroc")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # average ranks of tied runs
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def aupr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, ties as one threshold."""
    scores, labels = _check(scores, labels, "aupr")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    last = np.r_[s[:-1] != s[1:], True]  # the last position of each run of tied scores
    tp, n = tp[last], np.flatnonzero(last) + 1
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / n))


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over thresholds ``score >= t``, every step counted, no point adjustment."""
    scores, labels = _check(scores, labels, "best_f1")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[:-1] != s[1:], True]
    tp = np.cumsum(y)[last]
    predicted = np.flatnonzero(last) + 1
    f1 = 2 * tp / (predicted + labels.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(s[last][best])


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """F1, precision and recall of the decisions ``score > threshold`` (the thresholds' rule)."""
    scores, labels = _check(scores, labels, "f1_at")
    predicted = scores > threshold
    tp = float((predicted & (labels == 1)).sum())
    fp, fn = float(predicted.sum()) - tp, float(labels.sum()) - tp
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
    }


def support_threshold(loo_scores: Tensor | np.ndarray, q: float = 1.0, margin: float = 1.0) -> float:
    """A raw-score threshold from the support alone: ``thresholds.SupportQuantile`` (zscore) on one
    episode. The support's leave-one-out scores ``loo`` (K,) give ``z = (s - mean) / (std + eps)``;
    the threshold is ``margin x`` the ``q``-quantile of the support's own z, turned back into a raw
    score. Needs K >= 3 (a spread of at least two leave-one-out scores that can differ)."""
    loo = torch.as_tensor(loo_scores, dtype=torch.float64).flatten()
    if loo.numel() < 3:
        raise ValueError(f"support_threshold needs at least 3 support windows, got {loo.numel()}")
    mean, std = loo.mean(), loo.std()
    z = (loo - mean) / (std + EPS)
    return float(mean + (std + EPS) * margin * torch.quantile(z, q))


def _segments(labels: np.ndarray) -> np.ndarray:
    """Runs of 1s as inclusive ``(start, end)`` rows."""
    edges = np.diff(np.r_[0, labels, 0])
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1], 1)


def _merged(segments: np.ndarray, half: int, length: int) -> np.ndarray:
    """Segments widened by ``half`` each side, overlapping ones merged (the reference's ``new_sequence``)."""
    merged = []
    start = max(segments[0, 0] - half, 0)
    for (_, end), (next_start, _) in zip(segments[:-1], segments[1:]):
        if end + half < next_start - half:
            merged.append((start, end + half))
            start = next_start - half
    merged.append((start, min(segments[-1, 1] + half, length - 1)))
    return np.array(merged)


def _extended(labels: np.ndarray, segments: np.ndarray, window: int) -> np.ndarray:
    """Labels with a buffer of ``window // 2`` steps each side, weight ``sqrt(1 - distance / window)``
    (the reference's ``sequencing``), capped at 1."""
    out = labels.astype(np.float64)
    n, half = labels.size, window // 2
    for start, end in segments:
        after = np.arange(end + 1, min(end + half + 1, n))
        out[after] += np.sqrt(1 - (after - end) / window)
        before = np.arange(max(start - half, 0), start)
        out[before] += np.sqrt(1 - (start - before) / window)
    return np.minimum(out, 1.0)


def vus(
    scores: np.ndarray, labels: np.ndarray, max_buffer: int, thresholds: int = 250
) -> tuple[float, float]:
    """(VUS-ROC, VUS-PR): range AUC-ROC and AUC-PR averaged over buffers ``0 .. max_buffer`` steps.

    For a buffer ``w``, a predicted step inside a segment counts 1, one within ``w // 2`` steps of it
    ``sqrt(1 - d / w)``; recall is scaled by the fraction of (widened) segments hit at all. See the
    module docstring for how this mirrors and differs from the reference implementation.
    """
    scores, labels = _check(scores, labels, "vus")
    if not isinstance(max_buffer, int | np.integer) or max_buffer < 0:
        raise ValueError(f"vus: max_buffer must be an integer >= 0, got {max_buffer!r}")
    n, positives = labels.size, float(labels.sum())
    segments = _segments(labels)
    cut = -np.sort(-scores)[np.linspace(0, n - 1, thresholds).astype(int)]
    predicted = (scores[None, :] >= cut[:, None]).astype(np.float64)  # (thresholds, n)
    n_predicted = predicted.sum(1)
    hits = np.concatenate([np.zeros((thresholds, 1)), predicted.cumsum(1)], 1)
    anomalous = labels.astype(np.float64)
    roc, pr = [], []
    for window in range(max_buffer + 1):
        extended = _extended(labels, segments, window)
        buffer = np.where(labels == 1, 0.0, extended)  # the credit of steps near, not in, a segment
        ranges = _merged(segments, window // 2, n)
        credited = predicted @ buffer
        tp = predicted @ anomalous + credited
        p_new = positives + credited / 2
        recall = np.minimum(tp / p_new, 1.0)
        existence = ((hits[:, ranges[:, 1] + 1] - hits[:, ranges[:, 0]]) > 0).sum(1) / len(ranges)
        tpr = np.r_[0.0, recall * existence, 1.0]
        fpr = np.r_[0.0, (n_predicted - tp) / (n - p_new), 1.0]
        precision = np.r_[1.0, tp / n_predicted]
        roc.append(np.dot(np.diff(fpr), (tpr[1:] + tpr[:-1]) / 2))
        pr.append(np.dot(np.diff(tpr[:-1]), precision[1:]))
    return float(np.mean(roc)), float(np.mean(pr))


@dataclass
class StreamMetrics:
    """The metrics of one scored stream; ``f1_support`` and co. are None without a support threshold."""

    auroc: float
    aupr: float
    vus_roc: float
    vus_pr: float
    best_f1: float
    best_f1_threshold: float
    f1_support: float | None = None
    precision_support: float | None = None
    recall_support: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def stream_metrics(
    scores: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    max_buffer: int,
    threshold: float | None = None,
) -> StreamMetrics:
    """Every metric of one stream: ``scores`` (S,) aligned with ``labels`` (S,) (see :func:`align`);
    ``threshold`` a raw-score threshold fitted from the support alone (:func:`support_threshold`)."""
    scores = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    vus_roc, vus_pr = vus(scores, labels, max_buffer)
    f1, f1_threshold = best_f1(scores, labels)
    out = StreamMetrics(auroc(scores, labels), aupr(scores, labels), vus_roc, vus_pr, f1, f1_threshold)
    if threshold is not None:
        decided = f1_at(scores, labels, threshold)
        out.f1_support, out.precision_support = decided["f1"], decided["precision"]
        out.recall_support = decided["recall"]
    return out


def evaluate_stream(
    detector: Detector,
    support: Tensor,
    series: Tensor,
    labels: np.ndarray | Tensor,
    max_buffer: int | None = None,
    q: float = 1.0,
    margin: float = 1.0,
) -> StreamMetrics:
    """Score one entity's series in one pass and measure it.

    ``support`` (K, W, D): the entity's K normal windows (its only data the detector adapts to);
    ``series`` (T, D) with ``labels`` (T,): its first ``W - 1`` steps are context (give the series
    from ``W - 1`` steps before the cut, so every step after the cut is scored and measured). The
    F1 threshold comes from the support's leave-one-out scores (:func:`support_threshold`, K >= 3;
    below that ``f1_support`` stays None). ``max_buffer``: VUS's largest buffer, default W.
    """
    window = support.shape[-2]
    with torch.no_grad():
        state = detector.adapt(support.unsqueeze(0))
        scores = score_stream(detector, state, series.unsqueeze(0), window)[0]
        threshold = (
            support_threshold(leave_one_out_scores(detector, support.unsqueeze(0))[0], q, margin)
            if support.shape[0] >= 3
            else None
        )
    aligned = align(labels.cpu().numpy() if isinstance(labels, Tensor) else labels, scores.shape[0])
    return stream_metrics(scores, aligned, window if max_buffer is None else max_buffer, threshold)


def summarize_streams(results: list[StreamMetrics], groups: Tensor | None = None) -> dict[str, Summary]:
    """Each stream metric's mean and 95% CI over streams (entities), or over ``groups`` of them."""
    out = {}
    for name in StreamMetrics.__dataclass_fields__:
        values = [getattr(r, name) for r in results]
        if all(v is not None for v in values):
            out[name] = summarize(torch.tensor(values, dtype=torch.float64), groups)
    return out


def evaluate_streams(
    detectors: Mapping[str, Detector], streams: Iterable[Stream | str], q: float = 1.0, margin: float = 1.0
) -> StreamResults:
    """Every detector on every stream (:func:`evaluate_stream`), summarised over entities.

    ``streams`` yields one entity's :class:`~metaad.data.episodes.Stream` at a time (memory is that
    of one entity's series), or a line saying why one cannot be measured, kept as a note. A detector
    whose scores are not finite on a stream is left out of that entity's values, named in a note:
    a NaN is never a measurement. ``f1_support`` needs K >= 3 support windows; below, it is left
    out with a note, never NaN.
    """
    values: dict[str, list[StreamMetrics]] = {name: [] for name in detectors}
    groups: dict[str, list[int]] = {name: [] for name in detectors}
    entities: list[str] = []
    notes: list[str] = []
    k_shot = None
    for stream in streams:
        if isinstance(stream, str):
            notes.append(f"left out: {stream}")
            continue
        if stream.entity not in entities:
            entities.append(stream.entity)
        support, series = torch.from_numpy(stream.support), torch.from_numpy(stream.series)
        k_shot = support.shape[0]
        for name, detector in detectors.items():
            try:
                measured = evaluate_stream(detector, support, series, stream.labels, q=q, margin=margin)
            except ValueError as error:
                notes.append(f"{name} on {stream.entity}: not measured ({error})")
                continue
            values[name].append(measured)
            groups[name].append(entities.index(stream.entity))
    if k_shot is not None and k_shot < 3:
        notes.append(
            f"f1_support not measured at K={k_shot}: the support threshold needs the leave-one-out "
            "scores of at least 3 support windows"
        )
    summaries = {}
    for name in detectors:
        if values[name]:
            summary = summarize_streams(values[name], torch.tensor(groups[name]))
            summary.pop("best_f1_threshold")  # a raw score, on each entity's own scale: no mean
            summaries[name] = summary
    return StreamResults(summaries, entities, notes)
