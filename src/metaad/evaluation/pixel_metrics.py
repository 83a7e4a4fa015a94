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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PixelCurves:
    """The ROC and PRO curves of maps against masks, one point per distinct score as threshold
    (``score >= t``, from the highest), each starting at (0, 0); empty where a curve is undefined."""

    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray
    has_normal: bool
    has_defect: bool


def pixel_curves(maps: Tensor, masks: Tensor) -> PixelCurves:
    """One sort of every pixel gives both curves: the ROC of pixels, and PRO, where a pixel of a
    defect region of ``n`` pixels adds ``1 / (n * regions)`` (regions 8-connected, per image)."""
    scores = maps.reshape(-1, *maps.shape[-2:]).detach().float().cpu().numpy()
    truth = masks.reshape(-1, *masks.shape[-2:]).bool().cpu().numpy()
    structure = np.ones((3, 3), dtype=int)
    region_share = np.zeros(scores.shape)
    n_regions = 0
    for i, mask in enumerate(truth):
        labelled, n = ndimage.label(mask, structure)
        if n:
            sizes = np.bincount(labelled.ravel())
            inside = labelled > 0
            region_share[i][inside] = 1.0 / sizes[labelled[inside]]
            n_regions += n
    flat, defect = scores.ravel(), truth.ravel()
    n_pos = int(defect.sum())
    n_neg = defect.size - n_pos
    order = np.argsort(-flat)
    ordered = flat[order]
    last = np.append(ordered[1:] != ordered[:-1], True)  # a threshold takes every pixel of its score
    zero = np.zeros(1)
    fpr = np.cumsum(~defect[order])[last] / max(n_neg, 1)
    tpr = np.cumsum(defect[order])[last] / max(n_pos, 1)
    pro = np.cumsum(region_share.ravel()[order])[last] / max(n_regions, 1)
    return PixelCurves(
        np.concatenate([zero, fpr]),
        np.concatenate([zero, tpr]),
        np.clip(np.concatenate([zero, pro]), 0.0, 1.0),
        n_neg > 0,
        n_pos > 0,
    )


def _area(x: np.ndarray, y: np.ndarray, limit: float = 1.0) -> float:
    """Trapezoid area under (x, y), x ascending from 0, up to ``limit`` (the curve interpolated there)."""
    keep = x <= limit
    area = float(np.sum((x[keep][1:] - x[keep][:-1]) * (y[keep][1:] + y[keep][:-1]) / 2))
    after = int(keep.sum())
    if after < len(x) and x[after - 1] < limit:
        x0, x1, y0, y1 = x[after - 1], x[after], y[after - 1], y[after]
        area += (limit - x0) * (y0 + y0 + (y1 - y0) * (limit - x0) / (x1 - x0)) / 2
    return area


def curves_auroc(curves: PixelCurves) -> float:
    """Pixel AUROC from the curves (ties count half: a tied group is a diagonal step); NaN without
    both kinds."""
    if not (curves.has_normal and curves.has_defect):
        return math.nan
    return _area(curves.fpr, curves.tpr)


def curves_pro(curves: PixelCurves, limit: float = PRO_LIMIT) -> float:
    """Area under the PRO curve for FPR in [0, ``limit``], divided by ``limit``; NaN without both kinds."""
    if not 0 < limit <= 1:
        raise ValueError(f"the PRO integration limit must be in (0, 1], got {limit}")
    if not (curves.has_normal and curves.has_defect):
        return math.nan
    return _area(curves.fpr, curves.pro, limit) / limit


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """AUROC of every pixel: ``maps`` and ``masks`` of one shape ``(..., H, W)``; NaN without both kinds."""
    return curves_auroc(pixel_curves(maps, masks))


def pro_score(maps: Tensor, masks: Tensor, limit: float = PRO_LIMIT) -> float:
    """Area under the PRO curve up to FPR ``limit``, divided by ``limit`` (in [0, 1]); NaN without a
    defect region or without a normal pixel."""
    return curves_pro(pixel_curves(maps, masks), limit)


def episode_pixel_metrics(maps: Tensor, masks: Tensor, sigma: float = 0.0) -> dict[str, Tensor]:
    """Pixel AUROC and PRO of each episode: patch maps (B, Q, h, w), masks (B, Q, S, S) -> name: (B,),
    the maps upsampled to the masks' size; NaN for an episode without a defect pixel."""
    maps = maps.detach().float().cpu()
    masks = masks.cpu().bool()
    auroc, pro = [], []
    for m, gt in zip(maps, masks):
        curves = pixel_curves(upsample_maps(m, tuple(gt.shape[-2:]), sigma), gt)
        auroc.append(curves_auroc(curves))
        pro.append(curves_pro(curves))
    return {
        "pixel_auroc": torch.tensor(auroc, dtype=torch.float64),
        "pro": torch.tensor(pro, dtype=torch.float64),
    }
