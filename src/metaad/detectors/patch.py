"""Patch detectors: a sample is a map of patch features ``(C, h, w)``, scored patch by patch.

The image score comes from the patch scores (:func:`aggregate`), and ``score_maps`` gives the
patch scores themselves, ``(B, Q, h, w)``, higher = more anomalous: the anomaly map.

- :class:`PatchKNN`: the support's patches are a memory bank, a query patch's score is its
  distance to the nearest of them (PatchCore, Roth et al. 2022; AnomalyDINO, Damm et al. 2025).
  PatchCore's image score is the largest patch score reweighted by how dense the memory bank is
  around that patch's neighbour (``1 - softmax`` over its ``b`` nearest; with ``b = 1`` the plain
  maximum); here it is the maximum (``reduce=max``) or, as AnomalyDINO, the mean of the top 1%
  (``reduce=top``), without the reweighting. PatchCore's coreset (greedy k-centre on a random
  projection) is the ``coreset`` setting.
- :class:`PaDiM`: a Gaussian per position (Defard et al. 2021), its covariance over the K support
  images shrunk as Ledoit and Wolf (K is small: PaDiM's ``+ 0.01 I`` is for hundreds of images),
  the Mahalanobis distance per position; both answer leave-one-out scores in closed form.

A sample of shape ``(C, *positions)`` has ``prod(positions)`` patches of ``C`` features; a
vector ``(D,)`` is one patch. Nothing here knows images: the feature step makes the maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metaad.detectors.baselines import Mahalanobis

REDUCTIONS = ("max", "top")
DISTANCES = ("euclidean", "cosine")
_ROWS_ELEMENTS = 2**23  # distances of a block of query patches to the memory bank formed at once
_CANDIDATES = 4  # nearest candidates by the fast product form whose exact distances are computed


def patch_grid(x: Tensor) -> tuple[int, ...]:
    """The positions of samples ``(B, N, C, *positions)``; ``(1,)`` for vectors ``(B, N, D)``."""
    return tuple(x.shape[3:]) if x.dim() > 3 else (1,)


def patches(x: Tensor) -> Tensor:
    """Samples ``(B, N, C, *positions)`` -> patches ``(B, N, P, C)`` (a vector is one patch)."""
    if x.dim() == 3:
        return x.unsqueeze(2)
    if x.dim() < 3:
        raise ValueError(
            f"patch detectors take (episodes, samples, channels, ...), got shape {tuple(x.shape)}"
        )
    return x.flatten(3).transpose(2, 3)


def check_reduce(reduce: str, top: float, setting: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"{setting}.reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if isinstance(top, bool) or not isinstance(top, int | float) or not 0 < top <= 1:
        raise ValueError(f"{setting}.top must be a fraction in (0, 1], got {top!r}")


def aggregate(patch_scores: Tensor, reduce: str = "top", top: float = 0.01) -> Tensor:
    """Image scores from patch scores ``(B, Q, P)`` -> ``(B, Q)``: the maximum, or the mean of the
    top ``top`` fraction of patches (at least one: ``ceil(top * P)``)."""
    if reduce == "max":
        return patch_scores.amax(-1)
    n = max(1, math.ceil(top * patch_scores.shape[-1]))
    return patch_scores.topk(n, dim=-1).values.mean(-1)


def nearest_distances(query: Tensor, bank: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Distance of each row of ``query`` (B, N, C) to its nearest row of ``bank`` (B, M, C) -> (B, N).

    Euclidean (not squared), as PatchCore. The nearest few candidates are found by the product form
    ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product), then their distances are computed from the
    differences, so near-duplicates lose nothing to cancellation and gradients are those of the
    true distance. Blocks of query rows keep memory at ``_ROWS_ELEMENTS`` distances.
    ``exclude`` (B, N, M) bool marks pairs that may not be nearest (leave-one-out).
    """
    b, n, c = query.shape
    m = bank.shape[1]
    k = min(_CANDIDATES, m)
    bank_sq = bank.detach().pow(2).sum(-1)  # (B, M)
    rows = max(1, _ROWS_ELEMENTS // max(1, b * m))
    parts = []
    for start in range(0, n, rows):
        block = query[:, start : start + rows]
        with torch.no_grad():
            rough = block.pow(2).sum(-1, keepdim=True) + bank_sq[:, None] - 2 * block @ bank.transpose(1, 2)
            if exclude is not None:
                rough = rough.masked_fill(exclude[:, start : start + rows], float("inf"))
            nearest = rough.topk(k, dim=-1, largest=False).indices  # (B, r, k)
        candidates = torch.gather(bank, 1, nearest.flatten(1).unsqueeze(-1).expand(-1, -1, c))
        candidates = candidates.view(b, block.shape[1], k, c)
        exact = (block.unsqueeze(2) - candidates).pow(2).sum(-1)
        if exclude is not None:
            exact = exact.masked_fill(
                torch.gather(exclude[:, start : start + rows], 2, nearest), float("inf")
            )
        parts.append(exact.amin(-1))
    return torch.cat(parts, 1).clamp(min=1e-12).sqrt()


def greedy_coreset(bank: Tensor, n: int, dim: int = 128, seed: int = 0) -> Tensor:
    """Indices (B, n) of a greedy k-centre coreset of each episode's bank (B, M, C), as PatchCore
    selects it: on a Gaussian random projection to ``dim`` features, start from a fixed row, then
    repeatedly add the row farthest from those chosen."""
    b, m, c = bank.shape
    generator = torch.Generator().manual_seed(seed)
    if c > dim:
        projection = torch.randn(c, dim, generator=generator).to(bank) / math.sqrt(dim)
        bank = bank @ projection
    first = torch.randint(m, (1,), generator=generator).item()
    chosen = torch.full((b, n), first, dtype=torch.long, device=bank.device)
    nearest = (bank - bank[:, first : first + 1]).pow(2).sum(-1)  # (B, M)
    for i in range(1, n):
        pick = nearest.argmax(-1)  # (B,)
        chosen[:, i] = pick
        row = bank[torch.arange(b), pick].unsqueeze(1)
        nearest = torch.minimum(nearest, (bank - row).pow(2).sum(-1))
    return chosen


class PatchKNN:
    """Memory bank of every support patch; a query patch's score is its distance to the nearest.

    ``distance``: ``euclidean`` (PatchCore) or ``cosine`` (AnomalyDINO; 1 - cosine similarity,
    computed as half the squared distance of unit vectors). ``coreset``: keep this fraction of the
    bank (greedy k-centre; null keeps every patch). ``reduce``/``top``: see :func:`aggregate`.
    """

    def __init__(
        self,
        reduce: str = "top",
        top: float = 0.01,
        distance: str = "euclidean",
        coreset: float | None = None,
        coreset_dim: int = 128,
        seed: int = 0,
    ) -> None:
        check_reduce(reduce, top, "baseline patch_knn")
        if distance not in DISTANCES:
            raise ValueError(f"baseline patch_knn.distance must be one of {DISTANCES}, got {distance!r}")
        if coreset is not None and not (isinstance(coreset, int | float) and 0 < coreset <= 1):
            raise ValueError(
                f"baseline patch_knn.coreset must be a fraction in (0, 1] or null, got {coreset!r}"
            )
        self.reduce, self.top, self.distance = reduce, top, distance
        self.coreset, self.coreset_dim, self.seed = coreset, coreset_dim, seed

    def _features(self, x: Tensor) -> Tensor:
        p = patches(x).float()
        return F.normalize(p, dim=-1) if self.distance == "cosine" else p

    def _distance(self, query: Tensor, bank: Tensor, exclude: Tensor | None = None) -> Tensor:
        d = nearest_distances(query, bank, exclude)
        return d.pow(2) / 2 if self.distance == "cosine" else d

    def adapt(self, support: Tensor) -> Tensor:
        bank = self._features(support).flatten(1, 2)  # (B, K P, C)
        if self.coreset is not None and self.coreset < 1:
            n = max(1, math.ceil(self.coreset * bank.shape[1]))
            keep = greedy_coreset(bank, n, self.coreset_dim, self.seed)
            bank = torch.gather(bank, 1, keep.unsqueeze(-1).expand(-1, -1, bank.shape[-1]))
        return bank

    def patch_scores(self, state: Tensor, query: Tensor) -> Tensor:
        """(B, Q, C, *positions) -> (B, Q, P)."""
        q = self._features(query)
        b, nq, p, c = q.shape
        return self._distance(q.reshape(b, nq * p, c), state).view(b, nq, p)

    def score_maps(self, state: Tensor, query: Tensor) -> Tensor:
        return self.patch_scores(state, query).unflatten(-1, patch_grid(query))

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return aggregate(self.patch_scores(state, query), self.reduce, self.top)

    def leave_one_out(self, support: Tensor) -> Tensor:
        """Each support image scored against the bank of the other K-1: the whole bank with its own
        patches excluded (with a coreset, the others' coreset is chosen again, K adaptations)."""
        b, k = support.shape[:2]
        if self.coreset is not None and self.coreset < 1:
            index = torch.arange(k)
            return torch.stack(
                [
                    self.score(self.adapt(support[:, index != i]), support[:, i : i + 1])[:, 0]
                    for i in range(k)
                ],
                1,
            )
        q = self._features(support)
        p, c = q.shape[2:]
        image = torch.arange(k, device=support.device).repeat_interleave(p)
        exclude = (image[:, None] == image[None, :]).expand(b, -1, -1)
        flat = q.reshape(b, k * p, c)
        scores = self._distance(flat, flat, exclude).view(b, k, p)
        return aggregate(scores, self.reduce, self.top)


class PaDiM:
    """A Gaussian per patch position over the K support images; Mahalanobis distance per position.

    Each position's covariance is the Ledoit-Wolf shrunk one of :class:`~metaad.detectors.baselines.
    Mahalanobis` (K x K Woodbury, batched over positions); K = 1 gives the Euclidean distance to
    the support's patch at that position. A patch score is the (not squared) distance, as PaDiM's.
    """

    def __init__(self, reduce: str = "top", top: float = 0.01, ridge: float = 1e-6) -> None:
        check_reduce(reduce, top, "baseline padim")
        self.reduce, self.top = reduce, top
        self.gaussian = Mahalanobis(ridge=ridge)

    @staticmethod
    def _by_position(x: Tensor) -> Tensor:
        """(B, N, C, *positions) -> (B P, N, C): each position an episode of its own."""
        p = patches(x)
        return p.permute(0, 2, 1, 3).flatten(0, 1)

    def adapt(self, support: Tensor) -> tuple[Tensor, ...]:
        return self.gaussian.adapt(self._by_position(support))

    def patch_scores(self, state: tuple[Tensor, ...], query: Tensor) -> Tensor:
        b, nq = query.shape[:2]
        d2 = self.gaussian.score(state, self._by_position(query))  # (B P, Q)
        return d2.clamp(min=0).sqrt().view(b, -1, nq).transpose(1, 2)

    def score_maps(self, state: tuple[Tensor, ...], query: Tensor) -> Tensor:
        return self.patch_scores(state, query).unflatten(-1, patch_grid(query))

    def score(self, state: tuple[Tensor, ...], query: Tensor) -> Tensor:
        return aggregate(self.patch_scores(state, query), self.reduce, self.top)

    def leave_one_out(self, support: Tensor) -> Tensor:
        """Closed form per position (the Mahalanobis baseline's), then aggregated per image."""
        b, k = support.shape[:2]
        d2 = self.gaussian.leave_one_out(self._by_position(support))  # (B P, K)
        scores = d2.clamp(min=0).sqrt().view(b, -1, k).transpose(1, 2)
        return aggregate(scores, self.reduce, self.top).to(support.dtype)
