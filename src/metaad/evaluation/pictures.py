"""TensorBoard pictures of an evaluation: what the scores look like, not only their averages.

Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas (no pyplot state, no
global backend switch), written with ``add_figure``:

- ``<stage>/roc``: ROC curves of a few example episodes and the mean curve (per-episode step
  curves averaged at fixed false-positive rates): per episode, like the AUROC we report.
- ``<stage>/score_histogram``: the scores the threshold sees (z-scores, or raw scores with
  ``threshold.normalise=none``) of normal vs anomalous queries, pooled over episodes, with the
  threshold marked (a line, or for a per-episode rule its median and 5-95% band).
- ``<stage>/pr_curve`` (``add_pr_curve``): those pooled scores mapped into [0, 1] as
  ``sigmoid(z - t)`` with ``t`` the episode's threshold, so 0.5 is the decision boundary and the
  order within an episode is kept.
- ``test/embeddings`` (``add_embedding``, learners with ``embed``): support, query and support
  mean (the prototype) embeddings of a few test episodes, for TensorBoard's projector.
- ``<stage>/anomaly_maps`` (patch learners, episodes with defect masks): a few anomalous test
  queries, each its anomaly map beside its ground-truth mask (:func:`maps_figure`);
  :func:`heat_map_overlay` is the picture ``metaad-score`` writes per image (the map over the image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from metaad.data.episodes import Episode

FPR_GRID = np.linspace(0.0, 1.0, 101)


def roc_points(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(FPR, TPR) of each episode at every one of its scores as threshold (s >= t). (B, Q) -> 2 x (B, Q)."""
    above = scores.unsqueeze(1) >= scores.unsqueeze(2)  # [b, t, i]: query i at or above query t's score
    y = labels.bool().unsqueeze(1)
    tpr = (above & y).sum(2) / y.sum(2).clamp(min=1)
    fpr = (above & ~y).sum(2) / (~y).sum(2).clamp(min=1)
    return fpr, tpr


def roc_figure(scores: Tensor, labels: Tensor, n_examples: int = 4) -> Figure:
    """ROC of the first ``n_examples`` episodes (thin) and the mean over all episodes (thick)."""
    fpr, tpr = roc_points(scores.double(), labels)
    grid = torch.from_numpy(FPR_GRID)
    # Each episode's (step) ROC read at fixed false-positive rates, then averaged over episodes.
    reachable = fpr.unsqueeze(-1) <= grid + 1e-12  # (B, Q, G)
    mean_tpr = torch.where(reachable, tpr.unsqueeze(-1), 0.0).amax(1).mean(0)
    fig = Figure(figsize=(5, 4.5), dpi=100)
    ax = fig.add_subplot()
    for b in range(min(n_examples, len(scores))):
        order = np.lexsort((tpr[b].numpy(), fpr[b].numpy()))
        ax.plot(
            np.r_[0, fpr[b].numpy()[order]],
            np.r_[0, tpr[b].numpy()[order]],
            lw=1,
            alpha=0.6,
            label=f"episode {b}",
        )
    ax.plot(FPR_GRID, mean_tpr.numpy(), color="black", lw=2.5, label=f"mean of {len(scores)} episodes")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC per episode", aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def histogram_figure(normalised: Tensor, labels: Tensor, thresholds: Tensor, zscore: bool = True) -> Figure:
    """Normalised scores of normals vs anomalies with the threshold marked; outliers in the edge bins."""
    z, y, t = normalised.flatten().numpy(), labels.flatten().bool().numpy(), thresholds.numpy()
    lo, hi = np.percentile(z, [0.5, 99.5])
    lo, hi = min(lo, t.min()), max(hi, t.max())
    bins = np.linspace(lo, hi + 1e-9, 61)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for mask, name, color in ((~y, "normal", "tab:blue"), (y, "anomaly", "tab:red")):
        ax.hist(np.clip(z[mask], lo, hi), bins=bins, alpha=0.55, density=True, color=color, label=name)
    if np.ptp(t) == 0:
        ax.axvline(t[0], color="black", ls="--", label=f"threshold {t[0]:.3g}")
    else:
        low, mid, high = np.percentile(t, [5, 50, 95])
        ax.axvspan(low, high, color="grey", alpha=0.2, label="threshold 5-95% of episodes")
        ax.axvline(mid, color="black", ls="--", label=f"median threshold {mid:.3g}")
    xlabel = "normalised score (support leave-one-out spreads)" if zscore else "score"
    ax.set(xlabel=xlabel, ylabel="density")
    ax.set_title("scores of normal vs anomalous queries (outliers clipped to the edges)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pr_probabilities(normalised: Tensor, thresholds: Tensor) -> Tensor:
    """``sigmoid(z - t)``: the decision threshold at 0.5, order within each episode unchanged."""
    return torch.sigmoid(normalised - thresholds.unsqueeze(1))


def log_evaluation(
    writer: Any,
    stage: str,
    step: int,
    scores: Tensor,
    labels: Tensor,
    normalised: Tensor | None = None,
    thresholds: Tensor | None = None,
    zscore: bool = True,
) -> None:
    """ROC figure always; histogram and PR curve when a threshold decided (on z-scores or raw scores)."""
    writer.add_figure(f"{stage}/roc", roc_figure(scores, labels), global_step=step)
    if normalised is None or thresholds is None:
        return
    writer.add_figure(
        f"{stage}/score_histogram", histogram_figure(normalised, labels, thresholds, zscore), global_step=step
    )
    writer.add_pr_curve(
        f"{stage}/pr_curve",
        labels.flatten(),
        pr_probabilities(normalised, thresholds).flatten(),
        global_step=step,
    )


def episode_embeddings(
    embed: Callable[[Tensor], Tensor], batch: Episode, n_episodes: int = 3
) -> dict[str, Any]:
    """``add_embedding`` arguments: support, query and support-mean embeddings of the first episodes."""
    n = min(n_episodes, len(batch.support))
    with torch.no_grad():
        support = embed(batch.support[:n]).flatten(2).cpu()  # (n, K, D)
        query = embed(batch.query[:n]).flatten(2).cpu()  # (n, Q, D)
    vectors = torch.cat([support, query, support.mean(1, keepdim=True)], 1).flatten(0, 1)
    metadata = []
    for b in range(n):
        task = f"task {batch.task[b].item()}"
        metadata += [[f"episode {b}", task, "support"]] * support.shape[1]
        metadata += [
            [f"episode {b}", task, "query anomaly" if y else "query normal"] for y in batch.label[b].tolist()
        ]
        metadata.append([f"episode {b}", task, "support mean"])
    return {"mat": vectors, "metadata": metadata, "metadata_header": ["episode", "task", "kind"]}


def heat_map_overlay(
    image: np.ndarray, amap: np.ndarray, low: float, high: float, alpha: float = 0.5
) -> np.ndarray:
    """The image (H, W) or (H, W, 3), any range (shown min to max), with ``amap`` (H, W) over it in
    the ``inferno`` colours, ``low`` to ``high`` mapped to the scale's ends: (H, W, 3) uint8."""
    from matplotlib import colormaps

    gray = image.astype(np.float64)
    span = np.ptp(gray)
    gray = (gray - gray.min()) / span if span > 0 else np.zeros_like(gray)
    rgb = np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray
    level = np.clip((amap - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(amap)
    colours = colormaps["inferno"](level)[..., :3]
    return np.round(255 * ((1 - alpha) * rgb + alpha * colours)).astype(np.uint8)


def maps_figure(maps: Tensor, masks: Tensor, n_examples: int = 4) -> Figure:
    """Anomaly maps (N, S, S) beside their masks (N, S, S), one row per query, each map on its own scale."""
    n = min(n_examples, len(maps))
    fig = Figure(figsize=(4.4, 2.2 * n), dpi=100)
    for i in range(n):
        left, right = fig.add_subplot(n, 2, 2 * i + 1), fig.add_subplot(n, 2, 2 * i + 2)
        left.imshow(maps[i].numpy(), cmap="inferno")
        right.imshow(masks[i].float().numpy(), cmap="gray", vmin=0, vmax=1)
        left.set_title("anomaly map" if i == 0 else "", fontsize=8)
        right.set_title("defect mask" if i == 0 else "", fontsize=8)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def episode_maps(detector: Any, batch: Episode, n_examples: int = 4, sigma: float = 0.0) -> Figure | None:
    """:func:`maps_figure` of the first anomalous queries of a batch with masks (None without)."""
    from metaad.evaluation.pixel_metrics import upsample_maps

    masks = getattr(batch, "query_masks", None)
    if masks is None or not callable(getattr(detector, "score_maps", None)):
        return None
    with torch.no_grad():
        maps = detector.score_maps(detector.adapt(batch.support[:1]), batch.query[:1])[0].float().cpu()
    chosen = batch.label[0].bool().cpu()
    if not chosen.any():
        return None
    full = upsample_maps(maps[chosen], tuple(masks.shape[-2:]), sigma)
    return maps_figure(full, masks[0].cpu()[chosen], n_examples)
