"""The series field's no-learning detectors on windows ``(W, D)``, scored on the same episodes.

Each fits on the K support windows of its episode only (nothing from the queries or other
entities) and has the input choices a user of the field tries as settings:

- ``columns``: all metrics (null) or a chosen subset by index (e.g. the telemetry column of a
  telemanom channel, whose other columns are command flags);
- ``signlog``: ``sign(x) log(1 + |x|)`` first, for raw magnitudes spanning orders (it helps on
  unscaled service metrics and hurts on metrics already min-max scaled: a setting, not a rule);
- ``ignore_constant``: metrics constant over the support carry no scale to measure a deviation
  in; by default a change in one scores in the metric's own units, with this set it is left out.

A vector sample ``(D,)`` is taken as a window of one step (an image as one step of all its
values), so these also run on other data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from metaad.detectors.base import WindowKernels, leave_one_out_scores, score_kernels, score_stream
from metaad.detectors.baselines import NearestNeighbourDistance, SupportMeanDistance

MAD_TO_SD = 1.4826  # the MAD of a normal distribution is 0.6745 sd


def as_windows(x: Tensor) -> Tensor:
    """Samples ``(B, N, *x)`` as windows ``(B, N, W, D)``: a window stays, a vector ``(D,)`` is one
    step, any other sample (an image) is flattened into one step of all its values."""
    if x.dim() == 4:
        return x
    return x.flatten(2).unsqueeze(2)


def median(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """The median as numpy and statistics define it (the mean of the two middle values of an even
    count; ``torch.median`` takes the lower one)."""
    return torch.quantile(x, 0.5, dim=dim, keepdim=keepdim)


class SeriesInput:
    """The input choices shared by the series baselines (see the module docstring)."""

    def __init__(
        self, columns: Sequence[int] | None = None, signlog: bool = False, ignore_constant: bool = False
    ) -> None:
        if columns is not None:
            columns = list(columns)
            if not columns or not all(isinstance(c, int) and c >= 0 for c in columns):
                raise ValueError(
                    f"baseline columns must be null (all) or a non-empty list of indices, got {columns!r}"
                )
        self.columns, self.signlog, self.ignore_constant = columns, bool(signlog), bool(ignore_constant)

    def prepare(self, x: Tensor) -> Tensor:
        """``(B, N, W, D)`` or ``(B, N, D)`` -> ``(B, N, W, D')`` in float64, columns chosen, scaled."""
        x = as_windows(x)
        if self.columns is not None:
            if max(self.columns) >= x.shape[-1]:
                raise ValueError(
                    f"baseline columns {self.columns} name a column beyond the {x.shape[-1]} the data has"
                )
            x = x[..., self.columns]
        x = x.double()
        return torch.sign(x) * torch.log1p(x.abs()) if self.signlog else x

    def standardise_series(
        self, series: Tensor, centre: Tensor, scale: Tensor, weight: Tensor, mean: Tensor | None = None
    ) -> Tensor:
        """A series ``(B, T, D)`` -> ``((x - centre) / scale) weight - mean`` ``(B, T, D')`` in float64,
        ``x`` its values as :meth:`prepare` treats a window's. One pass over the series (a stream's
        cost is in such passes): the float64 result of a single multiply-add, no float64 copy first."""
        if self.columns is not None or self.signlog:
            series = self.prepare(series.unsqueeze(1))[:, 0]
        factor = weight / scale
        shift = -centre * factor if mean is None else -centre * factor - mean
        return torch.addcmul(shift, series, factor)


def _standardiser(steps: Tensor, ignore_constant: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-metric mean, scale and weight (0 for a metric left out) from support steps ``(B, N, D)``."""
    mean = steps.mean(1, keepdim=True)
    std = steps.std(1, keepdim=True, unbiased=False)
    constant = std <= 1e-12 * (1 + mean.abs())
    weight = (~constant).double() if ignore_constant else torch.ones_like(std)
    return mean, torch.where(constant, torch.ones_like(std), std), weight


class RobustZScore(SeriesInput):
    """Robust per-metric z-score against the support: ``|x - median| / (1.4826 MAD)``, each metric's
    median and MAD over all ``K x W`` support steps; a window's score is the ``max`` (or ``mean``)
    over its metrics and steps. A metric with MAD 0 (mostly constant) is scaled by its standard
    deviation instead, and one constant over the support by 1 (its own units), or left out.

    The classic per-metric threshold detector of monitoring, made scale-free by the support.
    """

    def __init__(self, reduce: str = "max", **kwargs) -> None:
        super().__init__(**kwargs)
        if reduce not in ("max", "mean"):
            raise ValueError(f"baseline RobustZScore: reduce must be 'max' or 'mean', got {reduce!r}")
        self.reduce = reduce

    def adapt(self, support: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        steps = self.prepare(support).flatten(1, 2)  # (B, K*W, D)
        centre = median(steps, 1, keepdim=True)
        mad = MAD_TO_SD * median((steps - centre).abs(), 1, keepdim=True)
        _, std, weight = _standardiser(steps, self.ignore_constant)
        scale = torch.where(mad > 1e-12 * (1 + centre.abs()), mad, std)
        return centre, scale, weight

    def _z(self, state: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
        median, scale, weight = state
        shape = (-1,) + (1,) * (x.dim() - 3) + median.shape[1:]
        return (x - median.view(shape)).abs() / scale.view(shape) * weight.view(shape)

    def score(self, state: tuple[Tensor, Tensor, Tensor], query: Tensor) -> Tensor:
        z = self._z(state, self.prepare(query))  # (B, Q, W, D)
        out = z.flatten(2).amax(-1) if self.reduce == "max" else z.flatten(2).mean(-1)
        return out.to(query.dtype)

    def score_stream(self, state: tuple[Tensor, Tensor, Tensor], series: Tensor, window: int) -> Tensor:
        """One pass: per-step z, then the max (mean) over metrics and a sliding one over ``window`` steps."""
        z = self.standardise_series(series, *state).abs_()  # (B, T, D)
        if self.reduce == "max":
            return F.max_pool1d(z.amax(-1).unsqueeze(1), window, stride=1)[:, 0].to(series.dtype)
        return F.avg_pool1d(z.mean(-1).unsqueeze(1), window, stride=1)[:, 0].to(series.dtype)


class PCAState(NamedTuple):
    mean: Tensor  # (B, 1, F) support mean of the standardised, flattened samples
    scale: Tensor  # (B, 1, D) per-metric scale (std over support steps)
    centre: Tensor  # (B, 1, D) per-metric mean over support steps
    weight: Tensor  # (B, 1, D) 0 for a metric left out
    components: Tensor  # (B, r, F) principal directions, rows; zero rows beyond an episode's own r


class PCAReconstruction(SeriesInput):
    """Squared reconstruction error from the top principal components of the support.

    Metrics are standardised by their support mean and standard deviation first (so no metric
    dominates by its units). ``unit``: ``window`` fits PCA on the K flattened support windows
    (at most K - 1 components: with K = 1, the distance to the one window); ``step`` fits it on
    the ``K x W`` support steps as vectors of D metrics (more samples than windows; the window's
    score is the ``max`` of its steps' errors). ``n_components``: an integer, or a fraction in
    (0, 1) of the support's variance to keep.
    """

    def __init__(self, n_components: float = 0.9, unit: str = "window", **kwargs) -> None:
        super().__init__(**kwargs)
        if unit not in ("window", "step"):
            raise ValueError(f"baseline PCAReconstruction: unit must be 'window' or 'step', got {unit!r}")
        if not (n_components >= 1 and float(n_components).is_integer()) and not 0 < n_components < 1:
            raise ValueError(
                "baseline PCAReconstruction: n_components must be a positive integer or a fraction in "
                f"(0, 1), got {n_components!r}"
            )
        self.n_components, self.unit = n_components, unit

    def _rows(self, x: Tensor, centre: Tensor, scale: Tensor, weight: Tensor) -> Tensor:
        """``(B, N, W, D)`` standardised -> rows ``(B, N, W*D)`` (window) or ``(B, N*W, D)`` (step)."""
        z = (x - centre.unsqueeze(1)) / scale.unsqueeze(1) * weight.unsqueeze(1)
        return z.flatten(2) if self.unit == "window" else z.flatten(1, 2)

    def adapt(self, support: Tensor) -> PCAState:
        x = self.prepare(support)
        centre, scale, weight = _standardiser(x.flatten(1, 2), self.ignore_constant)
        rows = self._rows(x, centre, scale, weight)
        mean = rows.mean(1, keepdim=True)
        _, values, vectors = torch.linalg.svd(rows - mean, full_matrices=False)  # values (B, r)
        variance = values.pow(2)
        if self.n_components >= 1:
            keep = torch.arange(variance.shape[1], device=x.device) < int(self.n_components)
            keep = keep & (variance > 1e-12 * variance.sum(1, keepdim=True).clamp(min=1e-300))
        else:
            share = variance.cumsum(1) / variance.sum(1, keepdim=True).clamp(min=1e-300)
            # the smallest r whose components hold the fraction: every one before the share is reached
            before = torch.cat([torch.zeros_like(share[:, :1]), share[:, :-1]], 1)
            keep = (before < self.n_components) & (variance > 0)
        return PCAState(mean, scale, centre, weight, vectors * keep.unsqueeze(-1))

    def score(self, state: PCAState, query: Tensor) -> Tensor:
        x = self.prepare(query)
        b, q, w = x.shape[:3]
        r = self._rows(x, state.centre, state.scale, state.weight) - state.mean
        residual = r - (r @ state.components.transpose(1, 2)) @ state.components
        error = residual.pow(2).sum(-1)
        if self.unit == "step":
            error = error.view(b, q, w).amax(-1)
        return error.to(query.dtype)

    def score_stream(self, state: PCAState, series: Tensor, window: int) -> Tensor:
        """One pass: ``|r|^2 - |C r|^2`` of every window from its products with the mean and the
        components (orthonormal rows) (:meth:`stream_kernels`), or per step then a sliding max."""
        parts = self.stream_kernels(state, series, window)
        if parts is not None:
            return score_kernels([parts], window)[0].to(series.dtype)
        r = self.standardise_series(series, state.centre, state.scale, state.weight, state.mean)
        # I - C'C projects onto what the components miss: one (D, D) product per step
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        residual = r @ (eye - state.components.transpose(1, 2) @ state.components)
        error = residual.pow(2).sum(-1).unsqueeze(1)
        return F.max_pool1d(error, window, stride=1)[:, 0].to(series.dtype)

    def stream_kernels(self, state: PCAState, series: Tensor, window: int) -> WindowKernels | None:
        """The window unit's kernels: the support mean and the components (``None`` for ``step``)."""
        if self.unit == "step":
            return None
        z = self.standardise_series(series, state.centre, state.scale, state.weight)
        b, d = z.shape[0], z.shape[-1]
        kept = int((state.components.abs().sum(-1) > 0).sum(1).max())  # rows beyond are zero
        components = state.components[:, :kept]
        kernels = torch.cat([state.mean, components], 1).view(b, -1, window, d)
        mean_sq = state.mean.pow(2).sum(-1)  # (B, 1)
        mean_projection = state.mean @ components.transpose(1, 2)  # (B, 1, r)

        def finish(products: Tensor, sq_norms: Tensor) -> Tensor:
            centred_sq = sq_norms - 2 * products[..., 0] + mean_sq
            projection = products[..., 1:] - mean_projection
            return (centred_sq - projection.pow(2).sum(-1)).clamp(min=0)

        return WindowKernels(z, kernels, finish)


class KNNDistance(SeriesInput):
    """Mean Euclidean distance of a query window to its ``k`` nearest support windows (``k`` at most
    K), after standardising each metric by its support mean and standard deviation."""

    def __init__(self, k: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"baseline KNNDistance: k must be a positive integer, got {k!r}")
        self.k = k

    def adapt(self, support: Tensor) -> tuple[Tensor, ...]:
        x = self.prepare(support)
        centre, scale, weight = _standardiser(x.flatten(1, 2), self.ignore_constant)
        return self._rows(x, centre, scale, weight), centre, scale, weight

    @staticmethod
    def _rows(x: Tensor, centre: Tensor, scale: Tensor, weight: Tensor) -> Tensor:
        return ((x - centre.unsqueeze(1)) / scale.unsqueeze(1) * weight.unsqueeze(1)).flatten(2)

    def score(self, state: tuple[Tensor, ...], query: Tensor) -> Tensor:
        rows, centre, scale, weight = state
        # through ||a||^2 + ||b||^2 - 2ab (float64): no (Q, K, W*D) difference tensor
        d = torch.cdist(self._rows(self.prepare(query), centre, scale, weight), rows)
        k = min(self.k, rows.shape[1])
        return d.topk(k, dim=-1, largest=False).values.mean(-1).to(query.dtype)

    def score_stream(self, state: tuple[Tensor, ...], series: Tensor, window: int) -> Tensor:
        """One pass: the squared distance of every window to every support window from their products."""
        return score_kernels([self.stream_kernels(state, series, window)], window)[0].to(series.dtype)

    def stream_kernels(self, state: tuple[Tensor, ...], series: Tensor, window: int) -> WindowKernels:
        """The kernels: the standardised support windows."""
        rows, centre, scale, weight = state
        z = self.standardise_series(series, centre, scale, weight)
        b, d = z.shape[0], z.shape[-1]
        row_sq = rows.pow(2).sum(-1).unsqueeze(1)  # (B, 1, K)
        k = min(self.k, rows.shape[1])

        def finish(products: Tensor, sq_norms: Tensor) -> Tensor:
            # the nearest by |s|^2 - 2 <x, s> (one pass over the K), |x|^2 added to those only
            partial = torch.add(row_sq, products, alpha=-2)
            if k == 1:
                return (partial.amin(-1) + sq_norms).clamp(min=0).sqrt()
            nearest = partial.topk(k, dim=-1, largest=False).values + sq_norms.unsqueeze(-1)
            return nearest.clamp(min=0).sqrt().mean(-1)

        return WindowKernels(z, rows.view(b, -1, window, d), finish)


# The detectors a learner may combine by name (metaad.detectors.combination): short names, no settings.
SERIES_BASELINES = {
    "zscore": lambda: RobustZScore(),
    "zscore_mean": lambda: RobustZScore(reduce="mean"),
    "pca": lambda: PCAReconstruction(),
    "pca_step": lambda: PCAReconstruction(unit="step"),
    "knn": lambda: KNNDistance(k=1),
    "zscore_signlog": lambda: RobustZScore(signlog=True),
    "pca_signlog": lambda: PCAReconstruction(signlog=True),
    "knn_signlog": lambda: KNNDistance(k=1, signlog=True),
}
SERIES_BASELINES |= {
    "mean": lambda: SupportMeanDistance("euclidean"),
    "nn": lambda: NearestNeighbourDistance("euclidean"),
}


class BaselineScores:
    """Named baselines' scores, each put on a scale-free footing by its episode's support alone.

    A learner that combines or corrects baselines needs their scores comparable across episodes
    and detectors: each query score ``s`` becomes ``log(s + eps) - log(mean(loo) + eps)``, ``loo``
    the support windows' leave-one-out scores (so 0 is "as far as a typical support window is from
    the others"; the baselines here score >= 0). With K = 1 there is no leave-one-out score: the log
    score itself, which is not scale-free.
    """

    eps = 1e-8

    def __init__(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in SERIES_BASELINES]
        if not names or unknown:
            raise ValueError(
                f"model.detectors must name baselines among {sorted(SERIES_BASELINES)}, got {list(names)!r}"
            )
        self.names = list(names)
        self.detectors = [SERIES_BASELINES[n]() for n in self.names]

    def adapt(self, support: Tensor) -> tuple[list, Tensor, Tensor]:
        """(each baseline's state, reference log scores (B, M), normalised support scores (B, K, M))."""
        states = [d.adapt(support) for d in self.detectors]
        b, k = support.shape[:2]
        if k < 2:
            zeros = torch.zeros(b, len(self.detectors), dtype=torch.float64, device=support.device)
            return (
                states,
                zeros,
                torch.zeros(b, k, len(self.detectors), dtype=torch.float64, device=support.device),
            )
        loo = torch.stack([leave_one_out_scores(d, support).double() for d in self.detectors], -1)
        reference = (loo.mean(1) + self.eps).log()
        return states, reference, (loo + self.eps).log() - reference.unsqueeze(1)

    def score(self, adapted: tuple[list, Tensor, Tensor], query: Tensor) -> Tensor:
        """Normalised scores ``(B, Q, M)`` in the query's dtype."""
        states, reference, _ = adapted
        raw = torch.stack([d.score(s, query).double() for d, s in zip(self.detectors, states)], -1)
        return ((raw.clamp(min=0) + self.eps).log() - reference.unsqueeze(1)).to(query.dtype)

    def score_stream(self, adapted: tuple[list, Tensor, Tensor], series: Tensor, window: int) -> Tensor:
        """Normalised scores of every window of ``series`` ``(B, T - W + 1, M)``: baselines that score
        by products with fixed windows in one shared pass (:func:`score_kernels`), each other in
        its own."""
        states, reference, _ = adapted
        dtype, series = series.dtype, series.double()  # once for all (each works in float64)
        kernels = {}
        for i, (d, s) in enumerate(zip(self.detectors, states)):
            parts = d.stream_kernels(s, series, window) if hasattr(d, "stream_kernels") else None
            if parts is not None:
                kernels[i] = parts
        shared = dict(zip(kernels, score_kernels(list(kernels.values()), window)))
        raw = torch.stack(
            [
                shared[i].double() if i in shared else score_stream(d, s, series, window).double()
                for i, (d, s) in enumerate(zip(self.detectors, states))
            ],
            -1,
        )
        return ((raw.clamp(min=0) + self.eps).log() - reference.unsqueeze(1)).to(dtype)
