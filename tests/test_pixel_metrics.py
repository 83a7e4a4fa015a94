"""Pixel metrics: pixel AUROC equals scikit-learn's on the flattened pixels, PRO equals a hand
computation and a threshold-by-threshold brute force of its definition, maps upsample bilinearly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from metaad.evaluation.pixel_metrics import gaussian_blur, pixel_auroc, pro_score, upsample_maps


def test_pixel_auroc_equals_sklearn_on_the_flattened_pixels_ties_included() -> None:
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(3, 16, 16, generator=g) * 8).round()  # many ties
    masks = torch.rand(3, 16, 16, generator=g) < 0.2
    maps[masks] += 1.5
    expected = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_is_nan_without_a_defect_pixel() -> None:
    assert math.isnan(pixel_auroc(torch.rand(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)))


def test_pro_of_a_hand_made_case() -> None:
    """Two regions (8-connected): A = the top-left pair, B = the bottom-right pixel; 6 normal pixels.
    Thresholds from the top: 0.9 (half of A: PRO 0.25), 0.7 (a normal pixel: FPR 1/6), 0.6 (B:
    PRO 0.75), 0.5 (all of A: PRO 1). Area up to 0.3: 0.25 * 1/6 + 1 * (0.3 - 1/6) = 0.175."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    maps = torch.tensor([[0.9, 0.5, 0.7], [0.3, 0.2, 0.1], [0.0, 0.05, 0.6]])
    assert pro_score(maps[None], mask[None]) == pytest.approx(0.175 / 0.3)
    # a diagonal neighbour joins a region (8-connectivity): one region of 3, the curve changes
    joined = mask.clone()
    joined[1, 2] = True  # diagonal to (0, 1) of A, beside (2, 2) of B
    assert ndimage.label(joined.numpy(), np.ones((3, 3)))[1] == 1


def brute_pro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """PRO by its definition: every distinct score a threshold, overlaps region by region."""
    regions = []
    for m, gt in zip(maps, masks):
        labelled, n = ndimage.label(gt, np.ones((3, 3)))
        regions += [m[labelled == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        points.append(((normal >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_equals_a_brute_force_of_its_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 20), bool)
    for i in range(3):  # blobs of several sizes; the fourth image is normal
        for _ in range(2):
            y, x, r = rng.integers(2, 18), rng.integers(2, 18), rng.integers(1, 4)
            masks[i, max(0, y - r) : y + r, max(0, x - r) : x + r] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    maps = np.round(maps, 1)  # ties
    got = pro_score(torch.from_numpy(maps), torch.from_numpy(masks))
    assert got == pytest.approx(brute_pro(maps, masks), abs=1e-9)
    assert 0.0 < got < 1.0


def test_pro_is_one_for_a_perfect_map_and_nan_without_regions() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:5] = masks[1, 6:, :2] = True
    assert pro_score(masks.float(), masks) == pytest.approx(1.0)
    assert math.isnan(pro_score(torch.rand(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool)))


def test_maps_upsample_bilinearly_with_patch_centres() -> None:
    maps = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = upsample_maps(maps, 4)
    torch.testing.assert_close(up[0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(up[:, 0], torch.tensor([0.0, 0.5, 1.5, 2.0]))
    assert upsample_maps(torch.rand(2, 3, 5, 7), (40, 56)).shape == (2, 3, 40, 56)


def test_the_blur_keeps_a_constant_and_spreads_a_peak() -> None:
    flat = torch.full((1, 9, 9), 2.0)
    torch.testing.assert_close(gaussian_blur(flat, 4.0), flat)
    peak = torch.zeros(1, 15, 15)
    peak[0, 7, 7] = 1.0
    blurred = upsample_maps(peak, 15, sigma=1.0)
    assert blurred[0, 7, 7] < 0.5 and blurred[0, 7, 8] > 0 and blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0].argmax() == 7 * 15 + 7


def test_the_run_summary_names_pixel_metrics_of_the_detectors_with_maps(tmp_path) -> None:
    from rich.console import Console

    from metaad.evaluation.report import print_summary
    from metaad.evaluation.results import RunResults, Summary

    def s(mean):
        return Summary(mean, 0.02, 10)

    results = RunResults(
        names={"model": "patch_adapter", "dataset": "image_folder"},
        k_shot=4,
        seed=0,
        data=None,
        checkpoint="best.ckpt",
        tasks={},
        test={"auroc": s(0.8), "aupr": s(0.8), "pixel_auroc": s(0.91), "pro": s(0.75)},
        baselines={"nn": {"auroc": s(0.7), "aupr": s(0.7)}},
    )
    console = Console(record=True, width=200)
    print_summary(results, tmp_path, console)
    text = console.export_text()
    assert "anomaly maps of patch_adapter: pixel_auroc 0.910 ± 0.020, pro 0.750 ± 0.020" in text
    assert "anomaly maps of nn" not in text
