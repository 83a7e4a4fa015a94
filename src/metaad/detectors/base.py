"""The one interface every detector answers, learned or not: adapt to a support set, then score.

A *learner* is a plain ``nn.Module`` that also has a meta-training ``loss``. Nothing here (nor
in any detector) imports Lightning: :mod:`metaad.training.module` meta-trains a learner, and the Python
API (:mod:`metaad.api`) scores with one without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

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


_PRODUCT_CHUNK = 2**19  # values of the intermediate products held at once in window_products (4-8 MB)
_FFT_WORK = 64  # W M (lags times kernels) from which window_products goes by FFT (below, lags are faster)


def window_products(series: Tensor, kernels: Tensor) -> Tensor:
    """Inner products of every window of ``series`` (B, T, D) with each of an episode's fixed windows
    ``kernels`` (B, M, W, D) -> (B, T - W + 1, M), without cutting out a window.
    With :func:`window_sq_norms` this gives the distance of every window to support windows or
    directions in one pass: ``|x - s|^2 = |x|^2 - 2 <x, s> + |s|^2``.

    Few lags and kernels: one matrix product of the steps with every kernel's every lag, then each
    window's sum along a diagonal. More: overlap-save FFT correlation, whose cost per step grows
    with ``D M`` rather than ``W D M`` (a float64 convolution, the obvious way, runs several times slower
    than either on a CPU). A chunk of steps at a time, so memory stays that of the series plus
    ``_PRODUCT_CHUNK`` values.
    """
    b, t, d = series.shape
    m, w = kernels.shape[1:3]
    if m == 0:
        return series.new_zeros(b, t - w + 1, 0)
    if w * m >= _FFT_WORK:
        return _products_by_fft(series, kernels)
    return _products_by_lags(series, kernels)


def _products_by_lags(series: Tensor, kernels: Tensor) -> Tensor:
    """``(T, D) @ (D, W M)``: every step against every kernel's every lag, summed along diagonals."""
    b, t, d = series.shape
    m, w = kernels.shape[1:3]
    steps = t - w + 1
    lags = kernels.permute(0, 3, 2, 1).reshape(b, d, w * m)  # column l M + j: lag l of kernel j
    chunk = max(64, _PRODUCT_CHUNK // (w * m))
    parts = []
    for start in range(0, steps, chunk):
        n = min(chunk, steps - start)
        per_lag = torch.bmm(series[:, start : start + n + w - 1], lags)  # (B, n + W - 1, W M)
        # [b, s, l, j] = per_lag[b, s + l, l M + j]: lag l of kernel j against step s + l
        diagonal = per_lag.as_strided((b, n, w, m), (per_lag.stride(0), w * m, w * m + m, 1))
        parts.append(diagonal.sum(2))
    return torch.cat(parts, 1)


def _products_by_fft(series: Tensor, kernels: Tensor) -> Tensor:
    """Overlap-save: blocks of ``L`` steps overlapping by ``W - 1``, each block's spectrum times the
    (flipped) kernels' spectra, summed over metrics as one complex matrix product per frequency;
    the last ``L - W + 1`` steps of each block's inverse are its windows' products."""
    b, t, d = series.shape
    m, w = kernels.shape[1:3]
    steps = t - w + 1
    size = max(64, 1 << (8 * w - 1).bit_length())  # L, a power of two about 8 W
    hop = size - w + 1
    frequencies = size // 2 + 1
    spectra = torch.fft.rfft(kernels.flip(2), n=size, dim=2)  # (B, M, F, D)
    spectra = spectra.permute(0, 2, 3, 1).reshape(b * frequencies, d, m)
    per_chunk = max(1, _PRODUCT_CHUNK // (frequencies * max(d, m)))  # blocks at a time
    out = series.new_empty(b, steps, m)
    for start in range(0, steps, per_chunk * hop):
        n = min(per_chunk * hop, steps - start)
        blocks = -(-n // hop)
        piece = series[:, start : start + blocks * hop + w - 1]
        short = blocks * hop + w - 1 - piece.shape[1]
        if short:  # the last block runs past the series: zeros, whose products are dropped
            piece = torch.nn.functional.pad(piece, (0, 0, 0, short))
        x = torch.fft.rfft(piece.unfold(1, size, hop), dim=-1)  # (B, blocks, D, F)
        x = x.permute(0, 3, 1, 2).reshape(b * frequencies, blocks, d)
        y = torch.bmm(x, spectra).view(b, frequencies, blocks, m)
        y = torch.fft.irfft(y, n=size, dim=1)[:, w - 1 :]  # (B, hop, blocks, M)
        out[:, start : start + n] = y.permute(0, 2, 1, 3).reshape(b, blocks * hop, m)[:, :n]
    return out


def window_sq_norms(series: Tensor, window: int) -> Tensor:
    """Squared norm of every window of ``series`` (B, T, D) -> (B, T - window + 1), by a running sum
    (in float64, so long series lose nothing to cancellation)."""
    steps = series.double().pow(2).sum(-1)
    running = torch.nn.functional.pad(steps.cumsum(1), (1, 0))
    return (running[:, window:] - running[:, :-window]).to(series.dtype)


class WindowKernels(NamedTuple):
    """How a detector that scores a window by its inner products with fixed windows of its episode
    (support windows, their mean, principal directions) scores a series: what it computes them on,
    with which windows, and how products and squared window norms become its scores.
    :func:`score_kernels` runs several of these over one series in one pass."""

    inputs: Tensor  # (B, T, D) the series as the detector sees it (columns chosen, scaled)
    kernels: Tensor  # (B, M, W, D) the fixed windows
    finish: Callable[[Tensor, Tensor], Tensor]  # products (B, S, M), |window|^2 (B, S) -> scores (B, S)


def _span(kernels: Tensor) -> tuple[Tensor, Tensor] | None:
    """An orthonormal basis of the kernels' span and each kernel's coefficients in it, ``(B, R, W, D)``
    and ``(B, M, R)``, when the span has fewer dimensions than there are kernels (else ``None``):
    the rank as ``numpy.linalg.matrix_rank`` takes it, the largest over the episodes."""
    b, m = kernels.shape[:2]
    flat = kernels.flatten(2)
    u, values, vh = torch.linalg.svd(flat, full_matrices=False)
    tolerance = values[:, :1] * max(flat.shape[1:]) * torch.finfo(flat.dtype).eps
    rank = int((values > tolerance).sum(1).max()) if values.numel() else 0
    if rank >= m:
        return None
    return vh[:, :rank].reshape(b, rank, *kernels.shape[2:]), u[:, :, :rank] * values[:, None, :rank]


def score_kernels(parts: Sequence[WindowKernels], window: int) -> list[Tensor]:
    """Each part's scores of every window ``(B, T - W + 1)``, in one pass per distinct input: parts
    on equal inputs (detectors that standardise alike) share their squared window norms and one
    :func:`window_products` with a basis of all their kernels' span, so kernels that are combinations
    of others (principal directions and the mean of the support windows are combinations of the
    support windows) cost nothing more."""
    groups: list[list[int]] = []
    for i, part in enumerate(parts):
        for group in groups:
            first = parts[group[0]].inputs
            if part.inputs is first or (
                part.inputs.shape == first.shape
                and part.inputs.dtype == first.dtype
                and torch.equal(part.inputs, first)
            ):
                group.append(i)
                break
        else:
            groups.append([i])
    scores: list[Tensor | None] = [None] * len(parts)
    for group in groups:
        inputs = parts[group[0]].inputs
        kernels = torch.cat([parts[i].kernels.to(inputs.dtype) for i in group], 1)
        # the basis costs an SVD of the kernels: worth it when the series is longer than that
        span = _span(kernels) if min(kernels.shape[1], kernels[0, 0].numel()) < inputs.shape[1] else None
        if span is None:
            products = window_products(inputs, kernels)
        else:
            basis, coefficients = span
            products = window_products(inputs, basis) @ coefficients.transpose(1, 2)
        sq_norms = window_sq_norms(inputs, window)
        start = 0
        for i in group:
            m = parts[i].kernels.shape[1]
            scores[i] = parts[i].finish(products[..., start : start + m], sq_norms)
            start += m
    return scores  # type: ignore[return-value]


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
