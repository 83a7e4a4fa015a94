"""The one interface every detector answers, learned or not: adapt to a support set, then score.

A *learner* is a plain ``nn.Module`` that also has a meta-training ``loss``. Nothing here (nor
in any detector) imports Lightning: :mod:`metaad.training.module` meta-trains a learner, and the Python
API (:mod:`metaad.api`) scores with one without it.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Detector(Protocol):
    """``state = adapt(support)`` with support ``(B, K, *x)`` normal samples; then
    ``score(state, query)`` maps a query ``(B, Q, *x)`` to ``(B, Q)`` scores, higher = more anomalous.

    Export (:mod:`metaad.export`) traces ``score`` on a fitted state; a detector whose ``score`` cannot
    be traced may offer ``scoring_module(state) -> nn.Module``, one task's ``(Q, *x) -> (Q,)`` scoring.

    A detector of series windows ``(W, D)`` may also answer ``score_stream(state, series, window)``:
    every window of a series ``(B, T, D)`` scored in one causal pass; :func:`score_stream` is the
    one entry point and falls back to scoring windows as queries for any other detector.
    """

    def adapt(self, support: Tensor) -> Any: ...

    def score(self, state: Any, query: Tensor) -> Tensor: ...


class Learner(nn.Module):
    """A detector with parameters and a meta-training loss on a meta-batch of episodes.

    ``loss`` may return ``None`` for a step with nothing to optimise (a learner that only
    accumulates statistics from the episodes, such as the covariance prior).
    """

    def adapt(self, support: Tensor) -> Any:
        raise NotImplementedError

    def score(self, state: Any, query: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, episodes: Any) -> Tensor | None:
        raise NotImplementedError

    def anomaly_scores(self, support: Tensor, query: Tensor) -> Tensor:
        return self.score(self.adapt(support), query)


def anomaly_scores(
    detector: Detector, support: Tensor, query: Tensor, chunk_size: int | None = None
) -> Tensor:
    """``score(adapt(support), query)`` for any detector, the query ``chunk_size`` samples at a time
    (:func:`score_in_chunks`)."""
    return score_in_chunks(detector, detector.adapt(support), query, chunk_size)


def score_in_chunks(detector: Detector, state: Any, query: Tensor, chunk_size: int | None) -> Tensor:
    """``score(state, query)`` with at most ``chunk_size`` query samples, over all B episodes of the
    batch, through the detector at once (at least one per episode); ``None``: the whole query.

    A detector scores each query sample on its own (nothing transductive; the generic tests check
    every learner and baseline), so the scores are those of the whole query (bitwise for most; to
    float32 rounding where a batched matmul sums in another order for fewer rows) while memory is
    bounded by the setting, not by the query size: a 4,000-image query through a conv net is gigabytes.
    """
    if chunk_size is None:
        return detector.score(state, query)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"score_chunk must be a positive integer or null, got {chunk_size!r}")
    per_episode = max(1, chunk_size // max(1, query.shape[0]))
    if per_episode >= query.shape[1]:
        return detector.score(state, query)
    parts = [
        detector.score(state, query[:, start : start + per_episode])
        for start in range(0, query.shape[1], per_episode)
    ]
    return torch.cat(parts, 1)


# query samples scored at once by the Python API (the apps: the config's score_chunk)
SCORE_CHUNK = 1024

_BLOCK = 2**24  # values of the differences a euclidean pairwise_distance forms at once


_LOO_WARN_K = 1000  # support sizes above which K adaptations for leave-one-out scores get a warning
_LOO_ELEMENTS = 2**24  # values of the leave-one-out support copies built at a time (64 MB of float32)


def leave_one_out_scores(detector: Detector, support: Tensor) -> Tensor:
    """Score of each support sample by the detector adapted to the others. (B, K, *x) -> (B, K).

    A detector with a ``leave_one_out(support)`` method (closed forms: the baselines) answers
    itself, in memory linear in K. Otherwise each held-out sample gets the K-1 others copied out,
    a chunk of held-out samples at a time, so memory stays ``O(chunk K x)`` rather than the whole
    ``(B K, K-1, *x)`` tensor (25.6 GB at K = 10,000 of 64 features).
    """
    b, k = support.shape[:2]
    if k < 2:
        raise ValueError(f"leave-one-out scores need at least 2 support samples, got {k}")
    own = getattr(detector, "leave_one_out", None)
    if own is not None:
        return own(support)
    if k > _LOO_WARN_K:
        warnings.warn(
            f"leave-one-out scores of {type(detector).__name__} at K={k}: {k} adaptations to {k - 1} "
            "samples each (hours for a scikit-learn baseline at K=10,000); a threshold that needs none "
            "(threshold=None, or Fixed(value, normalise='none')) skips them",
            stacklevel=2,
        )
    sample = support[0, 0].numel()
    chunk = max(1, min(k, _LOO_ELEMENTS // max(1, b * (k - 1) * sample)))
    index = torch.arange(k, device=support.device)
    parts = []
    for start in range(0, k, chunk):
        held = index[start : start + chunk]
        # the others of each held-out i: 0..k-2 with the ones at or above i shifted up by one
        others = torch.arange(k - 1, device=support.device)[None, :]
        others = others + (others >= held[:, None]).long()  # (c, K-1)
        rest = support[:, others].flatten(0, 1)  # (B*c, K-1, *x)
        held_out = support[:, held].flatten(0, 1).unsqueeze(1)  # (B*c, 1, *x)
        parts.append(anomaly_scores(detector, rest, held_out).reshape(b, len(held)))
    return torch.cat(parts, 1)


def sliding_windows(series: Tensor, window: int) -> Tensor:
    """Every window of a series ``(B, T, D)`` as a view ``(B, T - window + 1, window, D)`` (no copy)."""
    return series.unfold(1, window, 1).transpose(-1, -2)


def window_products(series: Tensor, kernels: Tensor) -> Tensor:
    """Inner products of every window of ``series`` (B, T, D) with each of an episode's fixed windows
    ``kernels`` (B, M, W, D) -> (B, T - W + 1, M), in one grouped convolution (no window is cut out).
    With :func:`window_sq_norms` this gives the distance of every window to support windows or
    directions in one pass: ``|x - s|^2 = |x|^2 - 2 <x, s> + |s|^2``."""
    b, t, d = series.shape
    m, w = kernels.shape[1:3]
    weight = kernels.permute(0, 1, 3, 2).reshape(b * m, d, w)
    out = torch.nn.functional.conv1d(series.transpose(1, 2).reshape(1, b * d, t), weight, groups=b)
    return out.view(b, m, t - w + 1).transpose(1, 2)


def window_sq_norms(series: Tensor, window: int) -> Tensor:
    """Squared norm of every window of ``series`` (B, T, D) -> (B, T - window + 1), by a running sum
    (in float64, so long series lose nothing to cancellation)."""
    steps = series.double().pow(2).sum(-1)
    running = torch.nn.functional.pad(steps.cumsum(1), (1, 0))
    return (running[:, window:] - running[:, :-window]).to(series.dtype)


def score_stream(detector: Detector, state: Any, series: Tensor, window: int, chunk: int = 4096) -> Tensor:
    """Scores of every window of a series, the one contract for scoring a live series.

    ``series`` ``(B, T, D)`` (episode ``b``'s series scored with its ``state``, adapted on windows
    of length ``window``) -> ``(B, T - window + 1)``: entry ``i`` scores ``series[:, i : i + window]``,
    the window ending at step ``i + window - 1``; steps before the first full window get no score
    (never a made-up one). A detector with its own ``score_stream(state, series, window)`` (one
    causal pass, e.g. on a TCN) answers itself; any other is scored ``chunk`` windows at a time as
    queries, so memory stays that of the series plus one chunk of windows.
    """
    if series.dim() != 3:
        raise ValueError(
            f"score_stream: series must be (episodes, steps, metrics), got shape {tuple(series.shape)}"
        )
    if series.shape[1] < window:
        raise ValueError(
            f"score_stream: the series has {series.shape[1]} steps, fewer than one window of {window}"
        )
    own = getattr(detector, "score_stream", None)
    if own is not None:
        return own(state, series, window)
    return windowed_stream_scores(detector, state, series, window, chunk)


def windowed_stream_scores(
    detector: Detector, state: Any, series: Tensor, window: int, chunk: int = 4096
) -> Tensor:
    """The generic fallback of :func:`score_stream`: windows scored as queries, ``chunk`` at a time."""
    windows = sliding_windows(series, window)
    parts = [
        detector.score(state, windows[:, start : start + chunk].contiguous())
        for start in range(0, windows.shape[1], chunk)
    ]
    return torch.cat(parts, 1)


def ranking_loss(scores: Tensor, label: Tensor, per_episode: bool = False) -> Tensor:
    """Pairwise logistic loss within each episode, every anomaly above every normal: a smooth
    1 - AUROC, the metric reported. ``scores``/``label`` (B, Q) -> a scalar over all pairs, or
    with ``per_episode`` (B,), each episode's mean over its own pairs."""
    anomaly, normal = label.bool(), ~label.bool()
    margin = scores.unsqueeze(1) - scores.unsqueeze(2)  # [b, i, j] = s_j - s_i: normal i, anomaly j
    pairs = normal.unsqueeze(2) & anomaly.unsqueeze(1)
    losses = torch.nn.functional.softplus(-margin) * pairs
    if per_episode:
        return losses.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return losses.sum() / pairs.sum().clamp(min=1)


def embed_tasks(backbone: nn.Module, x: Tensor) -> Tensor:
    """``backbone`` over every sample of a batch of tasks at once: (B, N, *x) -> (B, N, d)."""
    return backbone(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def pairwise_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """Distances between rows of ``a`` (B, Q, D) and ``b`` (B, M, D) -> (B, Q, M).

    ``euclidean`` is squared Euclidean, summed over differences (no ``|a|^2 + |b|^2 - 2ab``
    cancellation); the (B, Q, M, D) differences are formed a block of rows of ``a`` at a time, so
    large sets (10,000 support samples) need no more than ``_BLOCK`` values at once.
    ``cosine`` is 1 - cosine similarity.
    """
    if distance == "euclidean":
        per_row = a.shape[0] * b.shape[1] * a.shape[2]
        rows = max(1, _BLOCK // max(1, per_row))
        if rows >= a.shape[1]:
            return (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1)
        blocks = [a[:, i : i + rows] for i in range(0, a.shape[1], rows)]
        return torch.cat([(x.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1) for x in blocks], 1)
    if distance == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - a @ b.transpose(1, 2)
    raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")


def check_distance(distance: str, setting: str = "model.distance") -> str:
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"{setting} must be 'euclidean' or 'cosine', got {distance!r}")
    return distance
