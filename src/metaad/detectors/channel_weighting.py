"""Learned scaling and channel weighting: the series counterpart of the covariance prior.

The covariance prior learns, across tasks, how to measure a deviation in input space rather than
a map of the inputs. On series the open questions are the same kind: which metrics matter (on
telemanom channels only one column is telemetry), how to scale raw magnitudes (sign-log helped on
one dataset and hurt on another) and how much to trust a support that is nearly constant. This
learner keeps each entity's own support statistics and learns those choices across entities::

    x'_d   = (1 - a_d) x_d + a_d sign(x_d) log(1 + |x_d|)          learned mix per metric
    z_td   = (x'_td - median_d) / sqrt(s_d^2 + f_rel^2 median_d^2 + f_abs^2)
    score  = log sum_d w_d [ b max_t z_td^2 + (1 - b) mean_t z_td^2 ]

``median_d`` and ``s_d`` (1.4826 MAD, or the sd where the MAD is 0) come from the K support
windows' steps only; ``w`` (softmax over metrics, so weights are shares), ``a``, the floors
``f_rel`` / ``f_abs`` (how far a metric constant over the support may move before it counts)
and ``b`` are meta-learned with the pairwise ranking loss. Untrained, it is the robust z-score
with equal weights, a little sign-log and small floors.

Metric ``d`` must mean the same thing in every entity (true within one dataset); the number of
metrics is fixed by the sample shape (``backbone.sample_shape``, the backbone itself is not used).
A vector sample ``(D,)`` is taken as a window of one step, an image as one step of all its values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, ranking_loss
from metaad.detectors.series_baselines import MAD_TO_SD, as_windows, median


class ChannelWeighting(Learner):
    def __init__(
        self,
        backbone: nn.Module,
        signlog: float = 0.1,
        floor: float = 1e-3,
        peak: float = 0.5,
        learn_scaling: bool = True,
    ) -> None:
        super().__init__()
        shape = getattr(backbone, "sample_shape", None)
        if shape is None:
            raise ValueError("model=channel_weighting needs a backbone that knows its sample_shape")
        for name, value in (("signlog", signlog), ("peak", peak)):
            if not 0 < value < 1:
                raise ValueError(f"model.{name} must be in (0, 1), got {value!r}")
        if not floor > 0:
            raise ValueError(f"model.floor must be > 0, got {floor!r}")
        metrics = shape[-1] if len(shape) <= 2 else math.prod(shape)  # an image: one step of all values
        self.metric_logits = nn.Parameter(torch.zeros(metrics))
        self.signlog_logits = nn.Parameter(
            torch.full((metrics,), math.log(signlog / (1 - signlog))), requires_grad=learn_scaling
        )
        self.log_floors = nn.Parameter(torch.full((2,), math.log(floor)), requires_grad=learn_scaling)
        self.peak_logit = nn.Parameter(torch.tensor(math.log(peak / (1 - peak))))

    def _transform(self, x: Tensor) -> Tensor:
        """Windows ``(..., D)`` -> the learned per-metric mix of raw and sign-log values (float64)."""
        x = x.double()
        built = self.metric_logits.numel()
        if x.shape[-1] != built:
            raise ValueError(f"model=channel_weighting was built for {built} metrics, got {x.shape[-1]}")
        a = torch.sigmoid(self.signlog_logits).double()
        return (1 - a) * x + a * torch.sign(x) * torch.log1p(x.abs())

    def adapt(self, support: Tensor) -> tuple[Tensor, Tensor]:
        x = self._transform(as_windows(support))
        steps = x.flatten(1, 2)  # (B, K*W, D)
        centre = median(steps, 1)
        mad = MAD_TO_SD * median((steps - centre.unsqueeze(1)).abs(), 1)
        sd = steps.std(1, unbiased=False)
        scale = torch.where(mad > 1e-12 * (1 + centre.abs()), mad, sd)
        f_rel, f_abs = self.log_floors.double().exp()
        return centre, (scale.pow(2) + (f_rel * centre).pow(2) + f_abs.pow(2)).sqrt()

    def _score_steps(self, state: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
        """Per-step, per-metric squared deviations ``z^2`` of transformed values ``(B, ..., D)``."""
        median, scale = state
        shape = (median.shape[0],) + (1,) * (x.dim() - 2) + (median.shape[-1],)
        return ((x - median.view(shape)) / scale.view(shape)).pow(2)

    def _reduce(self, peak_part: Tensor, mean_part: Tensor, dtype: torch.dtype) -> Tensor:
        b = torch.sigmoid(self.peak_logit).double()
        weights = torch.softmax(self.metric_logits.double(), 0)
        return ((b * peak_part + (1 - b) * mean_part) @ weights + 1e-12).log().to(dtype)

    def score(self, state: tuple[Tensor, Tensor], query: Tensor) -> Tensor:
        z2 = self._score_steps(state, self._transform(as_windows(query)))
        return self._reduce(z2.amax(2), z2.mean(2), query.dtype)  # over steps: (B, Q, D)

    def score_stream(self, state: tuple[Tensor, Tensor], series: Tensor, window: int) -> Tensor:
        """One pass: per-step deviations, then sliding max and mean over ``window`` steps."""
        z2 = self._score_steps(state, self._transform(series)).transpose(1, 2)  # (B, D, T)
        peak = F.max_pool1d(z2, window, stride=1).transpose(1, 2)
        mean = F.avg_pool1d(z2, window, stride=1).transpose(1, 2)
        return self._reduce(peak, mean, series.dtype)

    def loss(self, batch: Episode) -> Tensor:
        return ranking_loss(self.anomaly_scores(batch.support, batch.query), batch.label)
