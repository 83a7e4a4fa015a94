"""``metaad-score``: score your own data with a trained checkpoint, on the CPU.

    metaad-score ckpt_path=outputs/train/.../checkpoints/best.ckpt support=normal.csv \\
        query=new.csv output=scores.csv

The model is rebuilt from the config stored in the checkpoint (loaded with ``weights_only=True``),
adapts to the given normal ``support`` samples exactly as in evaluation (same ``adapt``/``score``,
eval mode, no gradients), so it serves a category it never saw in training, and writes a CSV with
one row per ``query`` sample: ``id``, ``score`` (raw, higher = more anomalous),
``normalised_score`` (the score the threshold sees: in leave-one-out spreads of the support by
default, the raw score with ``normalise=none``; see ``metaad.thresholds``) and ``is_anomaly``
(1/0) at the threshold stored in the checkpoint (``threshold=...`` replaces it).

Inputs (see ``read_samples``) must be in the representation the model was trained on; a wrong
feature count or image size, an empty support set, fewer support samples than the threshold
needs (3 for the z-score) or a NaN is refused with a message naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from metaad.build import load_checkpoint, restore_model
from metaad.data import DataError
from metaad.thresholds import score_episodes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ID_NAMES = ("id", "ids")


def read_samples(
    path: str | Path, sample_shape: tuple[int, ...], role: str, invert_images: bool = False
) -> tuple[list[str], np.ndarray]:
    """Ids and samples ``(N, *sample_shape)`` float32 from a CSV, NPZ/NPY or a folder of images.

    CSV: one sample a row; an ``id`` column (optional) names the rows, every other column is a
    numeric feature; a file without a header row is read as all features. NPZ: the array ``X`` or
    ``x`` (or its only array), ids from ``id``/``ids``. Flattened rows are reshaped to the sample
    shape when the sizes agree. Without ids, rows are named by their 0-based position. Folder:
    every image file, sorted by name, read as grayscale or RGB for a 1- or 3-channel model,
    pixels / 255, never resized; ids are the file names.
    """
    path = Path(path)
    if path.is_dir():
        ids, x = _read_images(path, sample_shape, role, invert_images)
    elif not path.is_file():
        raise DataError(f"{role}={path}: no such file or folder")
    elif path.suffix.lower() == ".csv":
        ids, x = _read_csv(path, role)
    elif path.suffix.lower() in (".npz", ".npy"):
        ids, x = _read_numpy(path, role)
    else:
        raise DataError(f"{role}={path}: expected a .csv, .npz or .npy file or a folder of images")
    if len(x) == 0:
        raise DataError(f"{role}={path} holds no samples")
    width, expected = math.prod(x.shape[1:]), math.prod(sample_shape)
    if width != expected:
        raise DataError(
            f"{role}={path}: {width} features per sample, but the checkpoint's model takes {expected} "
            f"(sample shape {tuple(sample_shape)})"
        )
    x = x.reshape(len(x), *sample_shape).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        raise DataError(
            f"{role}={path}: {len(bad)} sample(s) hold NaN or inf (ids: {[ids[i] for i in bad[:5]]})"
        )
    return ids, x


def _read_csv(path: Path, role: str) -> tuple[list[str], np.ndarray]:
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    if frame.empty:
        return [], np.empty((0, 0))
    if _all_numbers(frame.columns):  # no header row: the first line was a sample
        frame = pd.read_csv(path, header=None)
        frame.columns = [str(c) for c in frame.columns]
    id_column = next((c for c in frame.columns if str(c).lower() in ID_NAMES), None)
    ids = frame.pop(id_column).astype(str).tolist() if id_column is not None else _positions(len(frame))
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise DataError(
            f"{role}={path}: column(s) {text[:10]} are not numeric; a sample file holds numeric feature "
            "columns and optionally an `id` column"
        )
    return ids, frame.to_numpy(np.float64)


def _all_numbers(names: Any) -> bool:
    try:
        [float(n) for n in names]
    except ValueError:
        return False
    return True


def _read_numpy(path: Path, role: str) -> tuple[list[str], np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{role}={path}: cannot read it ({error})") from error
    if isinstance(loaded, np.ndarray):
        return _positions(len(loaded)), _numeric(loaded, path, role)
    with loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    ids = next((arrays.pop(k) for k in ID_NAMES if k in arrays), None)
    key = next((k for k in ("X", "x") if k in arrays), None)
    if key is None and len(arrays) != 1:
        raise DataError(f"{role}={path}: expected an array X (or x) among {sorted(arrays)}")
    x = _numeric(arrays[key] if key else next(iter(arrays.values())), path, role)
    if ids is not None and len(ids) != len(x):
        raise DataError(f"{role}={path}: {len(ids)} ids for {len(x)} samples")
    return ([str(i) for i in ids] if ids is not None else _positions(len(x))), x


def _numeric(x: np.ndarray, path: Path, role: str) -> np.ndarray:
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"{role}={path}: expected a numeric (samples, features...) array, got {x.dtype} {x.shape}"
        )
    return x


def _read_images(
    folder: Path, sample_shape: tuple[int, ...], role: str, invert: bool
) -> tuple[list[str], np.ndarray]:
    from PIL import Image

    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise DataError(
            f"{role}={folder} is a folder of images, but the checkpoint's model takes samples of shape "
            f"{tuple(sample_shape)}, not (1 or 3, height, width) images; give a .csv or .npz"
        )
    channels, height, width = sample_shape
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.float32) / 255.0
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"{role}: {file}: cannot decode the image ({error})") from error
        if pixels.shape[:2] != (height, width):
            raise DataError(
                f"{role}: {file} is {pixels.shape[1]}x{pixels.shape[0]} pixels, but the checkpoint's model "
                f"takes {width}x{height} images; resize them as the training data was"
            )
        pixels = pixels.reshape(height, width, channels).transpose(2, 0, 1)
        images.append(1.0 - pixels if invert else pixels)
    x = np.stack(images) if images else np.empty((0, *sample_shape), np.float32)
    return [f.name for f in files], x


def _positions(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def score(cfg: DictConfig) -> pd.DataFrame:
    """Score ``cfg.query`` against ``cfg.support`` with ``cfg.ckpt_path``; writes and returns the table."""
    checkpoint, run_cfg = load_checkpoint(cfg.ckpt_path)
    if "metaad_sample_shape" not in checkpoint:
        raise ValueError(
            f"ckpt_path: {cfg.ckpt_path} does not record the sample shape its model takes (written by an "
            "older metaad-train); retrain to score with it"
        )
    sample_shape = tuple(checkpoint["metaad_sample_shape"])
    if cfg.get("threshold") is not None:
        run_cfg.threshold = cfg.threshold
    if not run_cfg.get("threshold"):
        raise ValueError(
            f"ckpt_path: {cfg.ckpt_path} was trained without a threshold; choose one with "
            "threshold=support_quantile or threshold=fixed"
        )
    run_cfg.baselines = None  # not scored here
    model = restore_model(checkpoint, run_cfg, sample_shape)
    threshold = model.threshold
    if threshold.fits_on_validation and threshold.value is None:
        raise ValueError(
            f"ckpt_path: {cfg.ckpt_path} holds no {threshold.rule} threshold fitted on validation episodes "
            f"with the settings {threshold.params()}; choose threshold=support_quantile or threshold=fixed"
        )
    support_ids, support = read_samples(cfg.support, sample_shape, "support", cfg.invert_images)
    if len(support) < threshold.min_k_shot:
        raise DataError(
            f"support={cfg.support} holds {len(support)} sample(s); {threshold.too_few(len(support))}"
        )
    query_ids, query = read_samples(cfg.query, sample_shape, "query", cfg.invert_images)
    torch.manual_seed(run_cfg.get("seed", 0))
    model.eval()
    with torch.no_grad():  # as in evaluation (Lightning's loops, inference_mode=false)
        scored = score_episodes(
            model, torch.from_numpy(support)[None], torch.from_numpy(query)[None], threshold
        )
    is_anomaly, thresholds = threshold.decide(scored.normalised, scored.support_normalised)
    table = pd.DataFrame(
        {
            "id": query_ids,
            "score": scored.scores[0].double().numpy(),
            "normalised_score": scored.normalised[0].double().numpy(),
            "is_anomaly": is_anomaly[0].int().numpy(),
        }
    )
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    print(
        f"{len(table)} query samples scored against {len(support_ids)} normal support samples: "
        f"{int(table.is_anomaly.sum())} anomalies at threshold {threshold.rule} = "
        f"{thresholds[0].item():.4g} (normalise={threshold.normalise}) -> {output}"
    )
    return table


@hydra.main(version_base="1.3", config_path="pkg://metaad.conf", config_name="score")
def main(cfg: DictConfig) -> None:
    score(cfg)


if __name__ == "__main__":
    main()
