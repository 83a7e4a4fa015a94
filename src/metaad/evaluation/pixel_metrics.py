"""Where the defect is: anomaly maps at image size and the pixel metrics of MVTec AD.

- :func:`upsample_maps`: patch scores ``(..., h, w)`` to the image ``(..., S, S)``, bilinearly,
  optionally blurred by a Gaussian as PatchCore does (sigma 4 pixels there).
- :func:`pixel_auroc`: the AUROC of every pixel of the maps against the masks, pooled (as MVTec
  AD and anomalib report it), ties counted half (Mann-Whitney).
- :func:`pro_score`: the area under the per-region-overlap curve up to a false-positive rate of
  0.3, divided by 0.3 (Bergmann et al., IJCV 2021). Each connected component of the masks
  (8-connected) is one region; at a threshold, a region's overlap is the fraction of its pixels
  above it, PRO the mean over regions, the FPR that of every pixel outside the masks. The curve
  is exact (every distinct score a threshold, as the MVTec AD evaluation code computes it), from
  (0, 0), integrated by the trapezoid rule with the value at 0.3 interpolated.

Either is NaN where it is undefined (no defect pixel, or no normal one), never a made-up value.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

PRO_LIMIT = 0.3
PIXEL_METRICS = ("pixel_auroc", "pro")


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur ``(N, H, W)`` maps with a Gaussian of ``sigma`` pixels (kernel ``2 * int(4 sigma + 0.5) + 1``,
    reflected edges), one separable pass per axis."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    pad = min(radius, out.shape[-1] - 1, out.shape[-2] - 1)
    out = F.pad(out, (pad, pad, pad, pad), mode="reflect") if pad > 0 else out
    if pad < radius:
        out = F.pad(out, (radius - pad,) * 4, mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def upsample_maps(maps: Tensor, size: int | tuple[int, int], sigma: float = 0.0) -> Tensor:
    """Patch maps ``(..., h, w)`` -> ``(..., H, W)`` (``size`` an int for square images): bilinear
    (corners not aligned: each patch score sits at its patch's centre), then a Gaussian blur of
    ``sigma`` output pixels unless 0."""
    if sigma < 0:
        raise ValueError(f"the anomaly-map blur sigma must be >= 0, got {sigma}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False).squeeze(1)
    if sigma > 0:
        out = gaussian_blur(out, sigma)
    return out.reshape(*lead, *size)


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """AUROC of every pixel: ``maps`` and ``masks`` of one shape ``(..., H, W)``; NaN without both kinds."""
    scores = maps.reshape(-1).double()
    truth = masks.reshape(-1).bool()
    n_pos = int(truth.sum())
    n_neg = truth.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` with ties given their mean rank."""
    values, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[inverse]
    return ranks


def pro_curve(maps: Tensor, masks: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score as threshold (``score >= t``), from (0, 0), ascending."""
    maps = maps.reshape(-1, *maps.shape[-2:]).double().cpu().numpy()
    masks = masks.reshape(-1, *masks.shape[-2:]).bool().cpu().numpy()
    structure = np.ones((3, 3), dtype=int)
    fp_change = np.zeros(maps.shape)
    pro_change = np.zeros(maps.shape)
    n_regions = 0
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure)
        n_regions += n
        fp_change[i][labelled == 0] = 1.0
        if n:
            sizes = np.bincount(labelled.ravel())
            inside = labelled > 0
            pro_change[i][inside] = 1.0 / sizes[labelled[inside]]
    n_ok = fp_change.sum()
    if n_regions == 0 or n_ok == 0:
        return np.array([0.0]), np.array([0.0])
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / n_ok
    pro = np.cumsum(pro_change.ravel()[order]) / n_regions
    last = np.append(scores[1:] != scores[:-1], True)  # a threshold takes every pixel of its score
    fpr, pro = np.clip(fpr[last], 0, 1), np.clip(pro[last], 0, 1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def pro_score(maps: Tensor, masks: Tensor, limit: float = PRO_LIMIT) -> float:
    """Area under the PRO curve for FPR in [0, ``limit``], divided by ``limit`` (in [0, 1]);
    NaN without a defect region or without a normal pixel."""
    if not 0 < limit <= 1:
        raise ValueError(f"the PRO integration limit must be in (0, 1], got {limit}")
    if not masks.any() or masks.all():
        return math.nan
    fpr, pro = pro_curve(maps, masks)
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    after = int(keep.sum())  # the first point beyond the limit: interpolate the curve at the limit
    if after < len(fpr) and x[-1] < limit:
        x0, x1, y0, y1 = fpr[after - 1], fpr[after], pro[after - 1], pro[after]
        at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + at_limit) / 2
    return area / limit


def episode_pixel_metrics(maps: Tensor, masks: Tensor, sigma: float = 0.0) -> dict[str, Tensor]:
    """Pixel AUROC and PRO of each episode: patch maps (B, Q, h, w), masks (B, Q, S, S) -> name: (B,),
    the maps upsampled to the masks' size; NaN for an episode without a defect pixel."""
    maps = maps.detach().float().cpu()
    masks = masks.cpu().bool()
    auroc, pro = [], []
    for m, gt in zip(maps, masks):
        full = upsample_maps(m, tuple(gt.shape[-2:]), sigma)
        auroc.append(pixel_auroc(full, gt))
        pro.append(pro_score(full, gt))
    return {
        "pixel_auroc": torch.tensor(auroc, dtype=torch.float64),
        "pro": torch.tensor(pro, dtype=torch.float64),
    }
