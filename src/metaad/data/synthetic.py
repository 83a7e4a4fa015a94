"""Synthetic defects on photographs, with their masks, and turned copies of training categories,
for meta-training only.

Few categories have real defects to learn from; these are made from the *training* categories'
normal images (never a held-out one: :func:`add_synthetic` is given the training tasks, and
:func:`metaad.data.tasks.check_category_leaks` refuses any row made from a held-out image):

- ``cutpaste``: a rectangle cut from the image (2-15% of its area, aspect 1:3.3 to 3.3:1, so thin
  scars too), colour-jittered (brightness and contrast), turned by a multiple of 90 degrees, and
  pasted elsewhere (CutPaste, Li et al. 2021);
- ``noise``: an elliptic blob where smooth coloured noise is blended in (50-90% opacity), as
  DRAEM-style noise anomalies.

A fixed number per task, each a pure function of (seed, source row, index), appended as rows of
the data (``made_from`` = the normal row it was made from), so that their patch features are
computed once and cached like any image's. The mask is exactly the changed region.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from metaad.data.errors import DataError
from metaad.data.tasks import LabelledData

log = logging.getLogger(__name__)

IMAGE_KINDS = ("cutpaste", "noise")


def check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(kinds or IMAGE_KINDS)
    bad = [k for k in chosen if k not in IMAGE_KINDS]
    if bad or len(set(chosen)) != len(chosen):
        raise DataError(
            f"dataset.synthetic_kinds for images must be distinct values of {list(IMAGE_KINDS)}, "
            f"got {list(chosen)}"
        )
    return chosen


def add_synthetic(
    data: LabelledData, tasks: Sequence[str], per_task: int, kinds: Sequence[str] | None = None, seed: int = 0
) -> LabelledData:
    """``data`` with ``per_task`` synthetic anomalies of each of ``tasks`` appended (see the module)."""
    kinds = check_kinds(kinds)
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise DataError(f"dataset.synthetic_per_task must be a positive integer, got {per_task!r}")
    if data.x.ndim != 4 or data.x.shape[1] not in (1, 3) or data.x.dtype != np.uint8:
        raise DataError(
            f"{data.name}: synthetic defects are made on 8-bit images (N, 1 or 3, H, W); got "
            f"{data.x.dtype} {data.x.shape}"
        )
    if data.anomalous is None or data.partition is None:
        raise DataError(f"{data.name}: synthetic defects need tasks with their own anomalies and a partition")
    names = data.task_names
    codes = data.task_codes
    normal = ~data.anomalous
    if data.made_from is not None:
        normal &= data.made_from < 0
    bases, variants = [], []
    for task in tasks:
        rows = np.flatnonzero((codes == names.index(task)) & normal)
        if not len(rows):
            raise DataError(f"{data.name}: task {task!r} has no normal image to make synthetic defects from")
        rng = np.random.default_rng([seed, 2087, names.index(task)])
        bases.append(rng.choice(rows, per_task, replace=len(rows) < per_task))
        variants.append(np.arange(per_task))
    base, variant = np.concatenate(bases), np.concatenate(variants)
    x = np.empty((len(base), *data.x.shape[1:]), np.uint8)
    masks = np.empty((len(base), *data.x.shape[2:]), bool)
    for i, (row, v) in enumerate(zip(base, variant, strict=True)):
        x[i], masks[i] = make_defect(
            data.x[row], kinds[v % len(kinds)], np.random.default_rng([seed, int(row), int(v)])
        )
    log.info(
        "%s: %d synthetic defects (%s) made from %d training tasks",
        data.name,
        len(x),
        "+".join(kinds),
        len(tasks),
    )
    n = len(data.x)
    made_from = data.made_from if data.made_from is not None else np.full(n, -1, np.int64)
    return LabelledData(
        x=np.concatenate([data.x, x]),
        task=np.concatenate([data.task, data.task[base]]),
        anomalous=np.concatenate([data.anomalous, np.ones(len(x), bool)]),
        name=data.name,
        partition=np.concatenate([data.partition, np.full(len(x), "train")]),
        preprocessing=data.preprocessing,
        names=data.names,
        finite_checked=True,
        masks=None if data.masks is None else np.concatenate([data.masks, masks]),
        made_from=np.concatenate([made_from, base.astype(np.int64)]),
        support_partition=data.support_partition,
    )


def add_rotations(data: LabelledData, tasks: Sequence[str], rotations: Sequence[int]) -> LabelledData:
    """``data`` with turned copies of the images of ``tasks`` (and their masks) as new tasks
    ``<task>/rot<degrees>``: the few-task remedy (``dataset.train_rotations``) done on the images,
    before their patch features, since features cannot be turned. Each copy's ``made_from`` is
    the file's row, so the leak check follows it."""
    from metaad.data.tasks import _check_rotations

    turns = _check_rotations(data, rotations)
    names = data.task_names
    rows = np.flatnonzero(np.isin(data.task_codes, [names.index(t) for t in tasks]))
    made = data.made_from if data.made_from is not None else np.full(len(data.x), -1, np.int64)
    origin = np.where(made[rows] >= 0, made[rows], rows)
    labels = data.tasks_of(np.arange(len(data.x)))
    x, task, masks = [data.x], [labels], [data.masks]
    for degrees in turns:
        x.append(np.rot90(data.x[rows], k=degrees // 90, axes=(2, 3)))
        task.append(np.char.add(labels[rows].astype(str), f"/rot{degrees}"))
        if data.masks is not None:
            masks.append(np.rot90(data.masks[rows], k=degrees // 90, axes=(1, 2)))
    log.info("%s: %d training tasks turned by %s degrees as extra tasks", data.name, len(tasks), list(turns))
    copies = len(turns)
    return LabelledData(
        x=np.ascontiguousarray(np.concatenate(x)),
        task=np.concatenate(task),
        anomalous=np.concatenate([data.anomalous, *[data.anomalous[rows]] * copies]),
        name=data.name,
        partition=np.concatenate([data.partition, *[data.partition[rows]] * copies]),
        preprocessing=data.preprocessing,
        finite_checked=True,
        masks=None if data.masks is None else np.ascontiguousarray(np.concatenate(masks)),
        made_from=np.concatenate([made, *[origin] * copies]),
        support_partition=data.support_partition,
    )


def make_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One 8-bit image ``(C, H, W)`` with a ``kind`` defect, and its mask ``(H, W)``: the changed pixels."""
    pixels = image.astype(np.float32) / 255
    for _ in range(8):  # a paste identical to what it covers (a flat image) is no defect: draw again
        out, region = (_cutpaste if kind == "cutpaste" else _noise)(pixels, rng)
        result = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
        changed = (result != image).any(axis=0)
        if changed.any():
            return result, changed & region
    raise DataError(f"a {kind} defect left the image unchanged 8 times (is it one flat colour?)")


def _cutpaste(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = pixels.shape
    area = rng.uniform(0.02, 0.15) * height * width
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    h = int(np.clip(round(np.sqrt(area * aspect)), 2, height - 1))
    w = int(np.clip(round(np.sqrt(area / aspect)), 2, width - 1))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    patch = pixels[:, top : top + h, left : left + w]
    turns = int(rng.integers(4))
    patch = np.rot90(patch, k=turns, axes=(1, 2))
    brightness, contrast = rng.uniform(-0.1, 0.1), rng.uniform(0.8, 1.2)
    mean = patch.mean(axis=(1, 2), keepdims=True)
    patch = np.clip((patch - mean) * contrast + mean + brightness, 0, 1)
    ph, pw = patch.shape[1:]
    ph, pw = min(ph, height), min(pw, width)
    patch = patch[:, :ph, :pw]
    top, left = rng.integers(0, height - ph + 1), rng.integers(0, width - pw + 1)
    out = pixels.copy()
    out[:, top : top + ph, left : left + pw] = patch
    region = np.zeros((height, width), bool)
    region[top : top + ph, left : left + pw] = True
    return out, region


def _noise(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = pixels.shape
    ry, rx = rng.uniform(0.05, 0.2) * height, rng.uniform(0.05, 0.2) * width
    cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
    yy, xx = np.mgrid[0:height, 0:width]
    region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    coarse = rng.uniform(0, 1, (channels, 8, 8)).astype(np.float32)
    rows = np.minimum((yy * 8) // height, 7)
    cols = np.minimum((xx * 8) // width, 7)
    noise = 0.5 * coarse[:, rows, cols] + 0.5 * rng.uniform(0, 1, (channels, height, width)).astype(
        np.float32
    )
    opacity = rng.uniform(0.5, 0.9)
    out = pixels.copy()
    out[:, region] = (1 - opacity) * pixels[:, region] + opacity * noise[:, region]
    return out, region
