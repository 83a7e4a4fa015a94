"""Patch adapter: patch kNN in a space meta-learned across categories.

A small map of each patch's features (a linear projection, started at the identity, plus a
residual 1x1 MLP whose output starts at zero) is learned on the training categories; a query
patch's score is its distance to the nearest support patch in that space, the image score the
mean of the top patch scores (:func:`~metaad.detectors.patch.aggregate`), the distance Euclidean
or cosine (``distance``). Untrained, it *is* patch kNN (of that distance) on the frozen features:
meta-training can only move it from that baseline.

The loss, within each episode, ranks every anomaly above every normal (a smooth 1 - AUROC):

- image level, on the image scores (``ranking_loss``), always;
- patch level, where the episode carries ``query_masks`` (B, Q, S, S): the masks are averaged
  down to the patch grid, a patch covering at least ``mask_fraction`` of defect pixels is
  anomalous, a patch of a normal query or with no defect pixel is normal, and a sample of at most
  ``patch_pairs`` of each kind per episode are ranked, weighted by ``patch_weight``.

It takes no backbone: its inputs are patch features ``(C, h, w)`` from the feature step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, ranking_loss
from metaad.detectors.patch import DISTANCES, aggregate, check_reduce, nearest_distances, patch_grid, patches


class PatchAdapter(Learner):
    def __init__(
        self,
        sample_shape: list[int] | tuple[int, ...],
        dim: int | None = None,
        hidden: int = 128,
        reduce: str = "top",
        top: float = 0.01,
        distance: str = "euclidean",
        patch_weight: float = 1.0,
        mask_fraction: float = 0.25,
        patch_pairs: int = 512,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_reduce(reduce, top, "model")
        if distance not in DISTANCES:
            raise ValueError(f"model.distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        channels = int(sample_shape[0])
        dim = channels if dim is None else int(dim)
        if dim < 1 or hidden < 0:
            raise ValueError(f"model.dim must be >= 1 and model.hidden >= 0, got {dim} and {hidden}")
        if not 0 < mask_fraction <= 1:
            raise ValueError(f"model.mask_fraction must be in (0, 1], got {mask_fraction!r}")
        if patch_weight < 0 or patch_pairs < 1:
            raise ValueError("model.patch_weight must be >= 0 and model.patch_pairs >= 1")
        self.reduce, self.top = reduce, top
        self.patch_weight, self.mask_fraction, self.patch_pairs = patch_weight, mask_fraction, patch_pairs
        self.projection = nn.Linear(channels, dim, bias=False)
        with torch.no_grad():  # the identity, or orthonormal rows: distances start as the features'
            start = torch.empty(max(dim, channels), max(dim, channels))
            nn.init.orthogonal_(start, generator=torch.Generator().manual_seed(seed))
            self.projection.weight.copy_(
                torch.eye(dim, channels) if dim == channels else start[:dim, :channels]
            )
        self.residual = (
            nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, dim)) if hidden else None
        )
        if self.residual is not None:
            nn.init.zeros_(self.residual[-1].weight)
            nn.init.zeros_(self.residual[-1].bias)
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())

    def embed(self, x: Tensor) -> Tensor:
        """Samples (B, N, C, *positions) -> adapted patches (B, N, P, D)."""
        p = patches(x).float()
        if p.shape[-1] != self.projection.in_features:
            raise ValueError(
                f"the patch adapter takes patches of {self.projection.in_features} features, got samples "
                f"of shape {tuple(x.shape[2:])} ({p.shape[-1]} features)"
            )
        out = self.projection(p)
        out = out + self.residual(p) if self.residual is not None else out
        return F.normalize(out, dim=-1) if self.distance == "cosine" else out

    def _nearest(self, query: Tensor, bank: Tensor, exclude: Tensor | None = None) -> Tensor:
        d = nearest_distances(query, bank, exclude)
        return d.pow(2) / 2 if self.distance == "cosine" else d  # cosine: 1 - cos of unit vectors

    def adapt(self, support: Tensor) -> Tensor:
        return self.embed(support).flatten(1, 2)  # (B, K P, D): the memory bank

    def patch_scores(self, state: Tensor, query: Tensor) -> Tensor:
        q = self.embed(query)
        b, nq, p, d = q.shape
        return self._nearest(q.reshape(b, nq * p, d), state).view(b, nq, p)

    def score_maps(self, state: Tensor, query: Tensor) -> Tensor:
        return self.patch_scores(state, query).unflatten(-1, patch_grid(query))

    def score(self, state: Tensor, query: Tensor) -> Tensor:
        return aggregate(self.patch_scores(state, query), self.reduce, self.top)

    def leave_one_out(self, support: Tensor) -> Tensor:
        """Each support image against the bank of the other K-1 (its own patches excluded)."""
        e = self.embed(support)
        b, k, p, d = e.shape
        image = torch.arange(k, device=support.device).repeat_interleave(p)
        exclude = (image[:, None] == image[None, :]).expand(b, -1, -1)
        flat = e.reshape(b, k * p, d)
        return aggregate(self._nearest(flat, flat, exclude).view(b, k, p), self.reduce, self.top)

    def loss(self, batch: Episode) -> Tensor:
        patch_scores = self.patch_scores(self.adapt(batch.support), batch.query) / self.log_temperature.exp()
        loss = ranking_loss(aggregate(patch_scores, self.reduce, self.top), batch.label)
        masks = getattr(batch, "query_masks", None)
        if masks is None or self.patch_weight == 0:
            return loss
        anomalous, normal = self.patch_labels(masks, batch.label, patch_grid(batch.query))
        return loss + self.patch_weight * self._patch_ranking(patch_scores, anomalous, normal)

    def patch_labels(self, masks: Tensor, label: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Masks (B, Q, S, S) -> anomalous and normal patches (B, Q, P) bool. A patch of an anomalous
        query with some defect pixels but under ``mask_fraction`` is neither."""
        b, nq = masks.shape[:2]
        if len(grid) != 2:
            raise ValueError(f"query_masks need patch maps (C, h, w); these samples have positions {grid}")
        fraction = F.adaptive_avg_pool2d(masks.float().flatten(0, 1).unsqueeze(1), grid).view(b, nq, -1)
        anomalous = (fraction >= self.mask_fraction) & label.bool().unsqueeze(-1)
        normal = (fraction == 0) | ~label.bool().unsqueeze(-1)
        return anomalous, normal

    def _patch_ranking(self, scores: Tensor, anomalous: Tensor, normal: Tensor) -> Tensor:
        """Pairwise logistic loss of a sample of anomalous vs normal patches per episode."""
        losses = []
        for s, a, n in zip(scores.flatten(1), anomalous.flatten(1), normal.flatten(1)):
            if not a.any():
                continue
            a_scores, n_scores = s[a], s[n]
            a_scores = a_scores[torch.randperm(len(a_scores), device=s.device)[: self.patch_pairs]]
            n_scores = n_scores[torch.randperm(len(n_scores), device=s.device)[: self.patch_pairs]]
            losses.append(F.softplus(n_scores[None, :] - a_scores[:, None]).mean())
        return torch.stack(losses).mean() if losses else scores.sum() * 0
