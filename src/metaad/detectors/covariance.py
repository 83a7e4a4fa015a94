"""Covariance-prior learner: a meta-learned prior on the metric, not a learned map of the inputs.

On strong fixed embeddings (MVTec AD ResNet-18) every learned map we tried scored below 1-NN
cosine, while no-learning covariance methods beat it: the metric, not the features, is what
transfers. This learner keeps the input space and learns, in the hierarchical-Bayes sense, a
prior over each task's covariance; ``adapt`` combines it with the support set::

    Sigma = S_K + strength * tau * P_g,    P_g = (1 - g) P + g I,    tau = trace(S_K) / D

``S_K`` is the support covariance (rank < K), ``tau`` its per-dimension scale (so the prior is
on the task's own scale; 1 when K = 1 or the support is constant), ``P`` the prior covariance
(trace D) and ``g`` in (0, 1) its isotropy. The score of a query is the Mahalanobis distance to
the support mean per dimension, ``(q - m)^T Sigma^-1 (q - m) / D``. ``S_K`` has rank < K, so the
inverse goes through the Woodbury identity in the eigenbasis of ``P``: O(K^2 D) per episode
after one D x D eigendecomposition per call.

What is learned, and how:

- ``P`` by empirical Bayes, in closed form: the mean trace-normalised within-episode covariance
  of the normals (support and normal queries) of every training episode seen, accumulated in
  buffers during training (all ranks' episodes; no gradient). It is a plain running estimate:
  the learner needs nothing but the episodes it is trained on.
- ``g`` (``learn_isotropy``) and ``strength`` (``learn_strength``), with the ranking
  temperature, by gradient on the training episodes, with ``loss``: ``ranking`` (pairwise
  logistic on log scores, every anomaly above every normal of the episode; a smooth
  1 - AUROC) or ``likelihood`` (Gaussian predictive negative log-likelihood of the normal
  queries: no anomaly labels). A prior estimated from the very
  tasks it is tuned on flatters it (the tuned ``g`` collapses toward the prior), so the fit is
  cross-fitted: the prior is kept in two halves by task-id parity and each episode is scored
  with the half that holds none of its task's episodes. Evaluation uses both halves.
- With neither learned, training only estimates ``P``; ``g`` and ``strength`` keep their values.

On MVTec AD (``scripts/mvtec_research.py``) the estimated ``P`` is what helps; rankings hardly
depend on ``strength`` while it is small (the support's own directions are then trusted), and a
``strength`` fitted by the ranking loss on other categories can grow until the support is
ignored, which hurt held-out categories: hence not learned by default.

It takes no backbone: it works on the (flattened) inputs, which for this learner should already
be good embeddings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, ranking_loss

LOSSES = ("ranking", "likelihood")


class CovarianceState(NamedTuple):
    """What ``adapt`` keeps of a support set, in the prior's eigenbasis."""

    basis: Tensor  # (1 or B, D, D) eigenvectors of the prior
    mean: Tensor  # (B, 1, D) support mean
    factor: Tensor  # (B, K, D) support deviations / sqrt(K - 1): S_K = factor^T factor
    diagonal: Tensor  # (B, D) strength * tau * eigenvalues of P_g
    chol: Tensor  # (B, K, K) Cholesky factor of I + factor diag(1/diagonal) factor^T


class CovariancePrior(Learner):
    def __init__(
        self,
        isotropy: float = 0.5,
        strength: float = 0.03,
        loss: str = "ranking",
        learn_isotropy: bool = True,
        learn_strength: bool = False,
        temperature: float = 1.0,
        refresh: float = 0.25,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}, got {loss!r}")
        if not 0.0 < isotropy < 1.0:
            raise ValueError(f"model.isotropy must be in (0, 1), got {isotropy!r}")
        if not strength > 0:
            raise ValueError(f"model.strength must be > 0, got {strength!r}")
        if not temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature!r}")
        if not refresh >= 0:
            raise ValueError(f"model.refresh must be >= 0, got {refresh!r}")
        self.loss_kind, self.refresh = loss, refresh
        self.learn = learn_isotropy or learn_strength
        self.isotropy_logit = nn.Parameter(torch.logit(torch.tensor(isotropy)), requires_grad=learn_isotropy)
        self.log_strength = nn.Parameter(torch.tensor(math.log(strength)), requires_grad=learn_strength)
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=self.learn and loss == "ranking"
        )
        # Prior statistics by task-id parity: sums of trace-normalised covariances (2, D, D), sized
        # by the first training batch, and the number of episodes in each sum.
        self.register_buffer("prior_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("prior_count", torch.zeros(2, dtype=torch.float64))
        self._eigen_cache: dict[tuple[int, ...], tuple[float, Tensor, Tensor]] = {}

    @property
    def isotropy(self) -> Tensor:
        return torch.sigmoid(self.isotropy_logit)

    @property
    def strength(self) -> Tensor:
        return self.log_strength.exp()

    # --- the prior ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_prior(self, batch: Episode) -> None:
        """Add each episode's trace-normalised covariance of its normals to its task's half."""
        support = batch.support.flatten(2).double()
        query = batch.query.flatten(2).double()
        rows = torch.cat([support, query], 1)  # (B, K + Q, D)
        weight = torch.cat([torch.ones_like(support[..., 0]), (batch.label == 0).double()], 1)
        count = weight.sum(1)
        mean = (weight.unsqueeze(-1) * rows).sum(1, keepdim=True) / count[:, None, None]
        deviations = (rows - mean) * weight.unsqueeze(-1).sqrt()
        trace = deviations.pow(2).sum((1, 2))
        keep = (count >= 2) & (trace > 0)
        dim = rows.shape[-1]
        # Each episode's covariance is scaled to trace D, so every episode weighs the same.
        deviations = deviations * (dim / trace.clamp(min=torch.finfo(trace.dtype).tiny)).sqrt()[:, None, None]
        half = batch.task % 2
        sums = torch.zeros(2, dim, dim, dtype=torch.float64, device=rows.device)
        counts = torch.zeros(2, dtype=torch.float64, device=rows.device)
        for h in (0, 1):
            chosen = deviations[keep & (half == h)].flatten(0, 1)
            sums[h] = chosen.T @ chosen
            counts[h] = (keep & (half == h)).sum()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        if self.prior_sum.numel() == 0:
            self.prior_sum = torch.zeros_like(sums)
        self._check_dim(dim)
        self.prior_sum += sums
        self.prior_count += counts

    def _check_dim(self, dim: int) -> None:
        if self.prior_sum.numel() and self.prior_sum.shape[-1] != dim:
            raise ValueError(
                f"samples have {dim} features but the prior was estimated on {self.prior_sum.shape[-1]}"
            )

    def prior(self, halves: tuple[int, ...] = (0, 1)) -> Tensor | None:
        """The prior covariance P (trace D) from the given halves; None before any training data."""
        count = self.prior_count[list(halves)].sum()
        if self.prior_sum.numel() == 0 or count == 0:
            return None
        return self.prior_sum[list(halves)].sum(0) / count

    def _eigen(
        self, halves: tuple[int, ...], dim: int, device: torch.device, staleness: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """Eigenvalues (D,) and eigenvectors (D, D) of P; the identity's before any training data.

        The decomposition is cached; with ``staleness`` > 0 (the training loss) it is reused until
        the prior holds that fraction more episodes than when it was computed.
        """
        self._check_dim(dim)
        prior = self.prior(halves)
        if prior is None:
            identity = torch.eye(dim, dtype=torch.float64, device=device)
            return identity.diagonal(), identity
        count = self.prior_count[list(halves)].sum().item()
        cached = self._eigen_cache.get(halves)
        fresh = cached is not None and cached[0] <= count <= cached[0] * (1 + staleness)
        if not fresh or cached[1].device != device:
            values, vectors = torch.linalg.eigh(prior)
            cached = self._eigen_cache[halves] = (count, values.clamp(min=0), vectors)
        return cached[1], cached[2]

    # --- adapt and score ---------------------------------------------------------------------
    def adapt(self, support: Tensor) -> CovarianceState:
        x = support.flatten(2)
        values, vectors = self._eigen((0, 1), x.shape[-1], x.device)
        return self._adapt(x, values.unsqueeze(0), vectors.unsqueeze(0))

    def _adapt(self, x: Tensor, values: Tensor, vectors: Tensor) -> CovarianceState:
        """``x`` (B, K, D); prior eigenvalues (1 or B, D) and eigenvectors (1 or B, D, D)."""
        z = x.double() @ vectors
        k, dim = z.shape[1:]
        mean = z.mean(1, keepdim=True)
        factor = (z - mean) / math.sqrt(max(k - 1, 1))
        tau = factor.pow(2).sum((1, 2)) / dim
        tau = torch.where(tau > 0, tau, torch.ones_like(tau))  # K = 1 or a constant support
        g = self.isotropy.double()
        diagonal = self.strength.double() * tau[:, None] * ((1 - g) * values + g)
        inner = torch.eye(k, dtype=z.dtype, device=z.device) + (
            factor / diagonal[:, None]
        ) @ factor.transpose(1, 2)
        return CovarianceState(vectors, mean, factor, diagonal, torch.linalg.cholesky(inner))

    def _mahalanobis(self, state: CovarianceState, query: Tensor) -> Tensor:
        """(q - m)^T Sigma^-1 (q - m) / D for a query (B, Q, *x) -> (B, Q), in float64."""
        r = query.flatten(2).double() @ state.basis - state.mean
        scaled = r / state.diagonal[:, None]
        projected = scaled @ state.factor.transpose(1, 2)  # (B, Q, K)
        solved = torch.cholesky_solve(projected.transpose(1, 2), state.chol).transpose(1, 2)
        return ((r * scaled).sum(-1) - (projected * solved).sum(-1)) / r.shape[-1]

    def score(self, state: CovarianceState, query: Tensor) -> Tensor:
        return self._mahalanobis(state, query).to(query.dtype)

    # --- meta-training ------------------------------------------------------------------------
    def loss(self, batch: Episode) -> Tensor | None:
        """The prior takes in the batch; then the configured loss, each episode scored with the prior
        of the other half of the tasks (None when nothing is learned by gradient)."""
        self.update_prior(batch)
        if not self.learn:
            return None  # the prior estimate is all there is to fit
        x, half = batch.support.flatten(2), batch.task % 2
        losses = []
        for h in (0, 1):
            chosen = half == h
            if chosen.any():
                values, vectors = self._eigen((1 - h,), x.shape[-1], x.device, self.refresh)
                state = self._adapt(x[chosen], values.unsqueeze(0), vectors.unsqueeze(0))
                distance = self._mahalanobis(state, batch.query[chosen])
                label = batch.label[chosen]
                if self.loss_kind == "likelihood":
                    losses.append(self._likelihood_loss(state, distance, label))
                else:
                    losses.append(self._ranking_loss(distance, label))
        return torch.cat(losses).mean().float()

    def _ranking_loss(self, distance: Tensor, label: Tensor) -> Tensor:
        """Per episode: mean over (normal, anomaly) pairs of softplus(-(log d_a - log d_n) / T)."""
        scores = distance.clamp(min=torch.finfo(distance.dtype).tiny).log() / self.log_temperature.exp()
        return ranking_loss(scores, label, per_episode=True)

    def _likelihood_loss(self, state: CovarianceState, distance: Tensor, label: Tensor) -> Tensor:
        """Per episode: Gaussian NLL per dimension of the normal queries under N(m, (1 + 1/K) Sigma),
        the predictive covariance once the mean's own uncertainty is counted."""
        k, dim = state.factor.shape[1:]
        inflation = 1 + 1 / k
        logdet = state.diagonal.log().sum(-1) + 2 * state.chol.diagonal(dim1=1, dim2=2).log().sum(-1)
        nll = 0.5 * (distance / inflation + (logdet[:, None] + dim * math.log(inflation)) / dim)
        normal = (label == 0).double()
        return (nll * normal).sum(1) / normal.sum(1).clamp(min=1)

    # --- checkpoints -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """The prior's size is known only once data is seen: take it from the checkpoint."""
        stored = state_dict.get(prefix + "prior_sum")
        if stored is not None and stored.shape != self.prior_sum.shape:
            self.prior_sum = torch.zeros_like(stored, device=self.prior_sum.device)
        self._eigen_cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
