"""No-learning detectors, scored on the very same episodes as every learner.

They answer the same ``adapt`` / ``score`` interface as the learners (see ``metaad.detectors.base``),
work in input space on flattened samples, and have no parameters and no loss. The torch ones are
batched over episodes and cheap; the scikit-learn ones fit one estimator per episode
(``conf/baselines/all.yaml`` adds them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from metaad.detectors.base import WindowKernels, check_distance, pairwise_distance, score_kernels

_CHUNK_ELEMENTS = 2**24  # values of a chunk of pairwise distances (nearest-neighbour leave-one-out)
_CANDIDATES = 4  # nearest candidates of a rough distance whose exact distances are computed


class SupportMeanDistance:
    """Distance of each query to the mean of the support samples, in raw input space."""

    def __init__(self, distance: str = "euclidean") -> None:
        self.distance = check_distance(distance, "baseline distance")

    def adapt(self, support: Tensor) -> Tensor:
        return support.flatten(2).mean(1, keepdim=True)

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(query.flatten(2), state, self.distance).squeeze(-1)

    def leave_one_out(self, support: Tensor) -> Tensor:
        """Each sample's distance to the mean of the others, (B, K): that mean is (sum - x_i) / (K-1)."""
        x = support.flatten(2)
        means = (x.sum(1, keepdim=True) - x) / (x.shape[1] - 1)  # (B, K, D)
        return pairwise_distance(
            x.flatten(0, 1)[:, None], means.flatten(0, 1)[:, None], self.distance
        ).reshape(x.shape[:2])

    def score_stream(self, state: Tensor, series: Tensor, window: int) -> Tensor:
        """Every window of a series (B, T, D) in one pass (its products with the mean window)."""
        return score_kernels([self.stream_kernels(state, series, window)], window)[0].to(series.dtype)

    def stream_kernels(self, state: Tensor, series: Tensor, window: int) -> WindowKernels:
        return _distance_kernels(state, series, window, self.distance, lambda d: d.squeeze(-1))


class NearestNeighbourDistance:
    """Distance of each query to its nearest support sample (1-NN), in raw input space."""

    def __init__(self, distance: str = "euclidean") -> None:
        self.distance = check_distance(distance, "baseline distance")

    def adapt(self, support: Tensor) -> Tensor:
        return support.flatten(2)

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return pairwise_distance(query.flatten(2), state, self.distance).min(-1).values

    def leave_one_out(self, support: Tensor) -> Tensor:
        """Each sample's distance to its nearest other sample, (B, K), a chunk of samples at a time.

        Euclidean: the few nearest candidates are found from ``|a|^2 + |b|^2 - 2 a.b`` in float64
        (one matrix product, not K x K x D differences), then their distances are computed as
        :meth:`score` computes them, so the result is the exact one unless more than ``_CANDIDATES``
        samples tie within float64 rounding, where it is one of the tied distances.
        """
        x = support.flatten(2)
        b, k, d = x.shape
        if self.distance == "cosine":
            chunk = max(1, _CHUNK_ELEMENTS // max(1, b * k * d))
            parts = []
            for start in range(0, k, chunk):
                distances = pairwise_distance(x[:, start : start + chunk], x, self.distance)  # (B, c, K)
                rows = torch.arange(distances.shape[1], device=x.device)
                distances[:, rows, start + rows] = float("inf")  # not itself
                parts.append(distances.min(-1).values)
            return torch.cat(parts, 1)
        wide = x.double()
        norms = wide.pow(2).sum(-1)  # (B, K)
        n = min(_CANDIDATES, k - 1)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b * k))
        parts = []
        for start in range(0, k, chunk):
            block = wide[:, start : start + chunk]  # (B, c, D)
            products = block @ wide.transpose(1, 2)  # (B, c, K)
            rough = norms[:, start : start + chunk, None] + norms[:, None, :] - 2 * products
            rows = torch.arange(block.shape[1], device=x.device)
            rough[:, rows, start + rows] = float("inf")  # not itself
            nearest = rough.topk(n, dim=-1, largest=False).indices  # (B, c, n)
            candidates = torch.gather(x, 1, nearest.flatten(1).unsqueeze(-1).expand(-1, -1, d))
            candidates = candidates.reshape(b, block.shape[1], n, d)
            exact = (x[:, start : start + chunk, None, :] - candidates).pow(2).sum(-1)  # as score does
            parts.append(exact.min(-1).values)
        return torch.cat(parts, 1)

    def score_stream(self, state: Tensor, series: Tensor, window: int) -> Tensor:
        """Every window of a series (B, T, D) in one pass (its products with the support windows)."""
        return score_kernels([self.stream_kernels(state, series, window)], window)[0].to(series.dtype)

    def stream_kernels(self, state: Tensor, series: Tensor, window: int) -> WindowKernels:
        return _distance_kernels(state, series, window, self.distance, lambda d: d.min(-1).values)


def _distance_kernels(
    rows: Tensor, series: Tensor, window: int, distance: str, reduce: Callable[[Tensor], Tensor]
) -> WindowKernels:
    """``pairwise_distance`` of every window of ``series`` (B, T, D) to flattened windows ``rows``
    (B, M, W*D), reduced over the M, as products with ``rows`` (float64, no window cut out)."""
    b, d = series.shape[0], series.shape[-1]
    rows = rows.double()
    row_sq = rows.pow(2).sum(-1).unsqueeze(1)

    def finish(products: Tensor, sq_norms: Tensor) -> Tensor:
        sq = sq_norms.unsqueeze(-1)
        if distance == "euclidean":
            return reduce((sq - 2 * products + row_sq).clamp(min=0))
        return reduce(1.0 - products / (sq.sqrt() * row_sq.sqrt()).clamp(min=1e-12))

    return WindowKernels(series.double(), rows.view(b, -1, window, d), finish)


class Mahalanobis:
    """Mahalanobis distance to the support mean under the Ledoit-Wolf shrunk support covariance.

    The covariance is ``(1 - s) S + s mu I`` as scikit-learn's ``LedoitWolf`` estimates it (``S``
    the support's maximum-likelihood covariance, ``mu = trace(S) / D``, ``s`` the Ledoit-Wolf
    shrinkage). Few-shot support sets have K << D, so ``S`` has rank < K and the distance goes
    through the Woodbury identity in K x K: O(K^2 D) per episode, batched, no D x D matrix; with
    K > D (10,000 rows of 64 features) the D x D covariance is factored instead, so memory grows
    linearly in K.
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
        small = k <= d  # the K x K Gram (Woodbury) when K <= D, else the D x D covariance itself
        gram = xc @ xc.transpose(1, 2) if small else xc.transpose(1, 2) @ xc
        frobenius = gram.pow(2).sum((1, 2)) / k**2  # ||S||_F^2: the same for either Gram
        beta = (squares.sum(2).pow(2).sum(1) / k - frobenius) / (d * k)
        delta = (frobenius - 2 * mu * trace + d * mu**2) / d
        beta = torch.minimum(beta, delta)
        shrinkage = torch.where(beta > 0, beta / delta.clamp(min=torch.finfo(delta.dtype).tiny), 0.0)
        degenerate = mu <= 0
        # covariance = b I + (a / K) xc^T xc
        a = torch.where(degenerate, 0.0, 1.0 - shrinkage)
        b = torch.where(degenerate, 1.0, (shrinkage + self.ridge) * mu)
        c = a / (k * b)
        if not small:  # covariance / b = I + c xc^T xc, factored directly (D x D)
            inner = torch.eye(d, dtype=x.dtype, device=x.device) + c[:, None, None] * gram
            return mean, None, torch.linalg.cholesky(inner), b, c
        inner = torch.eye(k, dtype=x.dtype, device=x.device) + c[:, None, None] * gram
        return mean, xc, torch.linalg.cholesky(inner), b, c

    def score(self, state: tuple[Tensor, ...], query: Tensor) -> Tensor:
        mean, xc, chol, b, c = state
        r = query.flatten(2).double() - mean  # (B, Q, D)
        if xc is None:  # K > D: r^T (b (I + c xc^T xc))^-1 r
            solved = torch.cholesky_solve(r.transpose(1, 2), chol).transpose(1, 2)
            return ((r * solved).sum(-1) / b[:, None]).to(query.dtype)
        p = r @ xc.transpose(1, 2)  # (B, Q, K)
        solved = torch.cholesky_solve(p.transpose(1, 2), chol).transpose(1, 2)
        d2 = (r.pow(2).sum(-1) - c[:, None] * (p * solved).sum(-1)) / b[:, None]
        return d2.to(query.dtype)

    def leave_one_out(self, support: Tensor) -> Tensor:
        """Each support sample scored under the other K-1, in closed form: (B, K), O(K D + D^2) memory.

        Without sample i (``u`` its deviation from the full mean, ``n = K - 1``, ``kappa = K / n``)
        the others' mean moves by ``-u / n`` and their covariance is a rank-one downdate,
        ``S_i = (C - kappa u u^T) / n`` with ``C = xc^T xc``; every Ledoit-Wolf statistic of ``S_i``
        (trace, Frobenius norm, the sum of fourth powers of row norms) follows from ``u``'s
        projections on C's eigenvectors, and the held-out distance from Sherman-Morrison:
        ``d2 = kappa^2 q / (1 - alpha kappa q)``, ``q = u^T (b I + alpha C)^-1 u``, ``alpha = a / n``.
        It equals adapting to the K-1 others and scoring sample i, within float64 rounding.
        """
        x = support.flatten(2).double()
        k, d = x.shape[1:]
        n, kappa = k - 1, k / (k - 1)
        xc = x - x.mean(1, keepdim=True)
        _, sv, vh = torch.linalg.svd(xc, full_matrices=False)  # C = V diag(sv^2) V^T
        lam = sv.pow(2)  # (B, r)
        p = xc @ vh.transpose(1, 2)  # (B, K, r): projections of each u on C's eigenvectors
        norms = xc.pow(2).sum(2)  # (B, K): |u|^2 = a_j
        trace_c, frobenius_c = norms.sum(1, keepdim=True), lam.pow(2).sum(1, keepdim=True)
        ucu = (p.pow(2) * lam[:, None]).sum(2)  # u^T C u = sum_j G_ij^2
        uw = xc @ (xc.transpose(1, 2) @ norms.unsqueeze(2))  # u . sum_j a_j xc_j = sum_j a_j G_ij
        uw = uw.squeeze(2)
        trace = (trace_c - kappa * norms) / n
        frobenius = (frobenius_c - 2 * kappa * ucu + kappa**2 * norms.pow(2)) / n**2
        # sum over j != i of |x_j - mean_i|^4, |x_j - mean_i|^2 = a_j + h G_ij + e
        h, e = 2 / n, norms / n**2
        fourth = (
            norms.pow(2).sum(1, keepdim=True)
            + h**2 * ucu
            + k * e.pow(2)
            + 2 * h * uw
            + 2 * e * trace_c
            - (norms * (1 + h) + e).pow(2)
        )
        mu = trace / d
        beta = (fourth / n - frobenius) / (d * n)
        delta = (frobenius - 2 * mu * trace + d * mu**2) / d
        beta = torch.minimum(beta, delta)
        shrinkage = torch.where(beta > 0, beta / delta.clamp(min=torch.finfo(delta.dtype).tiny), 0.0)
        degenerate = mu <= 0
        a = torch.where(degenerate, 0.0, 1.0 - shrinkage)
        b = torch.where(degenerate, 1.0, (shrinkage + self.ridge) * mu)
        alpha = a / n
        q = (p.pow(2) / (b.unsqueeze(2) + alpha.unsqueeze(2) * lam[:, None])).sum(2)
        d2 = kappa**2 * q / (1 - alpha * kappa * q)
        return d2.to(support.dtype)


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


class PyOD(_SupportFitted):
    """Any PyOD detector by its class name (``IForest``, ``LOF``, ``KNN``, ``ECOD``, ...), fitted on
    each episode's support set; the score is PyOD's ``decision_function`` (higher = more anomalous).

    PyOD is an optional extra (``pip install pyod``). ``settings`` are the detector's constructor
    arguments; a detector that takes ``random_state`` gets 0 unless one is given, so the same episodes
    give the same scores. A support set too small for the detector (e.g. KNN's ``n_neighbors``) is
    refused with PyOD's reason.
    """

    def __init__(self, name: str, **settings: object) -> None:
        self.name, self.settings = name, settings
        self.detector_class = pyod_class(name)
        self.settings.update(_default_random_state(self.detector_class, settings))
        self.detector_class(**self.settings)  # bad settings fail here, not in the first episode

    def estimator(self, k_shot: int):
        return self.detector_class(**self.settings)

    def adapt(self, support: Tensor) -> list | None:
        try:
            return super().adapt(support)
        except Exception as error:  # PyOD's own failures on a tiny support set, named
            raise ValueError(
                f"baseline pyod:{self.name} cannot fit a support set of {support.shape[1]} samples: {error}"
            ) from error

    def score(self, state: list | None, query: Tensor) -> Tensor:
        q = query.flatten(2).detach().cpu().double().numpy()
        with threadpool_limits(1):
            scores = np.stack([m.decision_function(x) for m, x in zip(state, q)])
        return torch.from_numpy(scores.astype(np.float64)).to(device=query.device, dtype=torch.float32)


def pyod_class(name: str) -> type:
    """PyOD's detector class ``name``, from ``pyod.models.<module>`` (``IForest`` from ``iforest``,
    ``AutoEncoder`` from ``auto_encoder``); only subclasses of PyOD's ``BaseDetector`` are taken."""
    import importlib
    import re

    try:
        from pyod.models.base import BaseDetector
    except ImportError:
        raise ImportError(
            f"baseline pyod:{name} needs PyOD, an optional extra: pip install pyod "
            "(or pip install 'metaad[pyod]')"
        ) from None
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise ValueError(f"baseline pyod:{name}: expected a PyOD class name such as IForest, LOF or ECOD")
    modules = dict.fromkeys([name.lower(), re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()])
    for module in modules:
        try:
            found = getattr(importlib.import_module(f"pyod.models.{module}"), name, None)
        except ModuleNotFoundError:
            continue
        if isinstance(found, type) and issubclass(found, BaseDetector):
            return found
    raise ValueError(
        f"baseline pyod:{name}: PyOD has no detector class {name} (looked in "
        f"{', '.join(f'pyod.models.{m}' for m in modules)}); names are PyOD's class names, e.g. "
        "IForest, LOF, KNN, ECOD, COPOD, HBOS"
    )


def _default_random_state(detector_class: type, settings: dict) -> dict:
    import inspect

    takes = "random_state" in inspect.signature(detector_class.__init__).parameters
    return {"random_state": 0} if takes and "random_state" not in settings else {}
