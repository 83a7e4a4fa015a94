"""No-learning detectors, scored on the very same episodes as every learner.

They answer the same ``adapt`` / ``score`` interface as the learners (see ``metaad.detectors.base``),
work in input space on flattened samples, and have no parameters and no loss. The torch ones are
batched over episodes and cheap; the scikit-learn ones fit one estimator per episode
(``conf/baselines/all.yaml`` adds them).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from metaad.detectors.base import check_distance, pairwise_distance, window_products, window_sq_norms


class SupportMeanDistance:
    """Distance of each query to the mean of the support samples, in raw input space."""

    def __init__(self, distance: str = "euclidean") -> None:
        self.distance = check_distance(distance, "baseline distance")

    def adapt(self, support: Tensor) -> Tensor:
        return support.flatten(2).mean(1, keepdim=True)

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(query.flatten(2), state, self.distance).squeeze(-1)

    def score_stream(self, state: Tensor, series: Tensor, window: int) -> Tensor:
        """Every window of a series (B, T, D) in one pass (one convolution with the mean window)."""
        return _stream_distances(state, series, window, self.distance).squeeze(-1)


class NearestNeighbourDistance:
    """Distance of each query to its nearest support sample (1-NN), in raw input space."""

    def __init__(self, distance: str = "euclidean") -> None:
        self.distance = check_distance(distance, "baseline distance")

    def adapt(self, support: Tensor) -> Tensor:
        return support.flatten(2)

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(query.flatten(2), state, self.distance).min(-1).values

    def score_stream(self, state: Tensor, series: Tensor, window: int) -> Tensor:
        """Every window of a series (B, T, D) in one pass (one convolution with the support windows)."""
        return _stream_distances(state, series, window, self.distance).min(-1).values


def _stream_distances(rows: Tensor, series: Tensor, window: int, distance: str) -> Tensor:
    """``pairwise_distance`` of every window of ``series`` (B, T, D) to flattened windows ``rows``
    (B, M, W*D) -> (B, T - W + 1, M), without cutting out a window."""
    b, d = series.shape[0], series.shape[-1]
    products = window_products(series.double(), rows.double().view(b, -1, window, d))
    sq = window_sq_norms(series.double(), window).unsqueeze(-1)
    row_sq = rows.double().pow(2).sum(-1).unsqueeze(1)
    if distance == "euclidean":
        out = (sq - 2 * products + row_sq).clamp(min=0)
    else:
        out = 1.0 - products / (sq.sqrt() * row_sq.sqrt()).clamp(min=1e-12)
    return out.to(series.dtype)


class Mahalanobis:
    """Mahalanobis distance to the support mean under the Ledoit-Wolf shrunk support covariance.

    The covariance is ``(1 - s) S + s mu I`` as scikit-learn's ``LedoitWolf`` estimates it (``S``
    the support's maximum-likelihood covariance, ``mu = trace(S) / D``, ``s`` the Ledoit-Wolf
    shrinkage). Few-shot support sets have K << D, so ``S`` has rank < K and the distance goes
    through the Woodbury identity in K x K: O(K^2 D) per episode, batched, no D x D matrix.
    ``ridge * mu`` is added to the diagonal so the covariance stays invertible when the shrinkage
    is 0 (K >> D). With K = 1, or identical support samples, ``S = 0``: the covariance is taken as
    the identity, i.e. the squared Euclidean distance to the support mean.
    """

    def __init__(self, ridge: float = 1e-6) -> None:
        if not ridge > 0:
            raise ValueError(f"baseline Mahalanobis: ridge must be > 0, got {ridge}")
        self.ridge = ridge

    def adapt(self, support: Tensor) -> tuple[Tensor, ...]:
        x = support.flatten(2).double()
        k, d = x.shape[1:]
        mean = x.mean(1, keepdim=True)
        xc = x - mean  # (B, K, D)
        squares = xc.pow(2)
        trace = squares.sum((1, 2)) / k  # trace of S
        mu = trace / d
        frobenius = (xc @ xc.transpose(1, 2)).pow(2).sum((1, 2)) / k**2  # ||S||_F^2, via the K x K Gram
        beta = (squares.sum(2).pow(2).sum(1) / k - frobenius) / (d * k)
        delta = (frobenius - 2 * mu * trace + d * mu**2) / d
        beta = torch.minimum(beta, delta)
        shrinkage = torch.where(beta > 0, beta / delta.clamp(min=torch.finfo(delta.dtype).tiny), 0.0)
        degenerate = mu <= 0
        # covariance = b I + (a / K) xc^T xc
        a = torch.where(degenerate, 0.0, 1.0 - shrinkage)
        b = torch.where(degenerate, 1.0, (shrinkage + self.ridge) * mu)
        c = a / (k * b)
        inner = torch.eye(k, dtype=x.dtype, device=x.device) + c[:, None, None] * (xc @ xc.transpose(1, 2))
        return mean, xc, torch.linalg.cholesky(inner), b, c

    def score(self, state: tuple[Tensor, ...], query: Tensor) -> Tensor:
        mean, xc, chol, b, c = state
        r = query.flatten(2).double() - mean  # (B, Q, D)
        p = r @ xc.transpose(1, 2)  # (B, Q, K)
        solved = torch.cholesky_solve(p.transpose(1, 2), chol).transpose(1, 2)
        d2 = (r.pow(2).sum(-1) - c[:, None] * (p * solved).sum(-1)) / b[:, None]
        return d2.to(query.dtype)


class _SupportFitted:
    """Fits a fresh scikit-learn novelty detector on each episode's support set, in input space.

    The score is ``-score_samples`` (scikit-learn's is higher for more normal samples). Episodes
    are fitted one by one on the CPU, so these cost far more than the torch baselines; each runs
    single-threaded, as an episode is too small for threads to pay (on a busy machine OpenMP
    threads made LOF 100x slower). Below
    ``min_support`` samples the estimator cannot model anything: the scores are then constant
    (AUROC exactly 0.5) and a warning says why.
    """

    min_support = 1

    def estimator(self, k_shot: int):
        raise NotImplementedError

    def adapt(self, support: Tensor) -> list | None:
        x = support.flatten(2).detach().cpu().double().numpy()
        if x.shape[1] < self.min_support:
            warnings.warn(
                f"baseline {type(self).__name__} needs at least {self.min_support} support samples, got "
                f"{x.shape[1]}: its scores are constant (AUROC 0.5)",
                stacklevel=2,
            )
            return None
        with threadpool_limits(1):
            return [self.estimator(len(s)).fit(s) for s in x]

    def score(self, state: list | None, query: Tensor) -> Tensor:
        q = query.flatten(2).detach().cpu().double().numpy()
        if state is None:
            scores = np.zeros(q.shape[:2])
        else:
            with threadpool_limits(1):
                scores = np.stack([-m.score_samples(x) for m, x in zip(state, q)])
        return torch.from_numpy(scores).to(device=query.device, dtype=torch.float32)


class IsolationForest(_SupportFitted):
    """scikit-learn's IsolationForest on the support set; a fixed ``random_state`` keeps it deterministic.

    Its trees subsample ``min(256, K)`` points, so with a handful of shots they are shallow; with
    K <= 2 every query ends in a one-point leaf at the same depth, so K <= 2 gives constant scores.
    """

    min_support = 3

    def __init__(self, n_estimators: int = 100, random_state: int = 0) -> None:
        self.n_estimators, self.random_state = n_estimators, random_state

    def estimator(self, k_shot: int):
        from sklearn.ensemble import IsolationForest as Forest

        return Forest(n_estimators=self.n_estimators, random_state=self.random_state)


class OneClassSVM(_SupportFitted):
    """scikit-learn's OneClassSVM (RBF kernel by default) on the support set.

    Works from K = 1, where it ranks queries by their kernel similarity to the one support sample.
    """

    def __init__(self, kernel: str = "rbf", nu: float = 0.5, gamma: str | float = "scale") -> None:
        self.kernel, self.nu, self.gamma = kernel, nu, gamma

    def estimator(self, k_shot: int):
        from sklearn.svm import OneClassSVM as SVM

        return SVM(kernel=self.kernel, nu=self.nu, gamma=self.gamma)


class LocalOutlierFactor(_SupportFitted):
    """scikit-learn's LocalOutlierFactor in novelty mode, fitted on the support set.

    LOF needs ``n_neighbors < K``: it uses ``min(n_neighbors, K - 1)`` neighbours. K = 1: constant scores.
    """

    min_support = 2

    def __init__(self, n_neighbors: int = 20) -> None:
        if not isinstance(n_neighbors, int) or n_neighbors < 1:
            raise ValueError(
                f"baseline LocalOutlierFactor: n_neighbors must be a positive integer, got {n_neighbors!r}"
            )
        self.n_neighbors = n_neighbors

    def estimator(self, k_shot: int):
        from sklearn.neighbors import LocalOutlierFactor as LOF

        return LOF(n_neighbors=min(self.n_neighbors, k_shot - 1), novelty=True)
