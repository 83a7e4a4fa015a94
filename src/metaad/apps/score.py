"""``metaad-score``: score your own data with a trained checkpoint, on the CPU, without Lightning.

    metaad-score ckpt_path=outputs/train/.../checkpoints/best.ckpt support=normal.csv \\
        query=new.csv output=scores.csv

Built on the Python API (:func:`metaad.load`): the learner adapts to the given normal ``support``
samples exactly as in evaluation and the ``query`` samples are scored; the CSV has one row per
query sample: ``id``, ``score`` (raw, higher = more anomalous), ``normalised_score`` (the score
the threshold sees) and ``is_anomaly`` (1/0) at the threshold stored in the checkpoint
(``threshold=...`` replaces it).

Inputs are raw, as the user has them: the checkpoint's preprocessing (scaling, image resizing and
inversion, feature order by column name) is applied to them; for a checkpoint trained without
column names, the query's columns are matched to the support's by name. See :func:`read_samples`.
Settings, the output path and the files are checked before the model is loaded or anything scored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from metaad import files
from metaad.apps.cli import app
from metaad.data.tasks import DataError
from metaad.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ID_NAMES = ("id", "ids")


def read_samples(
    path: str | Path, role: str, channels: int = 1, any_size: bool = False
) -> tuple[list[str], Any]:
    """Ids and raw samples from a CSV (a data frame: columns are matched by name), an NPZ/NPY, or a
    folder of images (an array of raw pixel values, grayscale or RGB for a 1- or 3-channel model).

    CSV: one sample a row; an ``id`` column (optional) names the rows. A file whose first row is
    not a header (every entry a number, other than the column positions 0, 1, ... pandas writes)
    is read as all samples. NPZ: the array ``X`` or ``x`` (or its only array), ids from
    ``id``/``ids``. Without ids, rows are named by their 0-based position.
    """
    path = Path(path)
    if path.is_dir():
        ids, x = _read_images(path, role, channels, any_size)
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
    return ids, x


def _read_csv(path: Path, role: str) -> tuple[list[str], Any]:
    import pandas as pd

    from metaad.data.sources import all_numbers, csv_header, refuse_repeated

    where = f"{role}={path}"
    refuse_repeated(where, csv_header(path, where=where))
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"{role}={path}: cannot read it as a CSV ({error})") from error
    if frame.empty:
        return [], np.empty((0, 0))
    if not frame.index.equals(pd.RangeIndex(len(frame))):
        raise DataError(
            f"{role}={path}: its rows have more fields than its header names ({len(frame.columns)}); "
            "every row needs one value per column"
        )
    if all_numbers(frame.columns) and list(frame.columns) != [str(i) for i in range(len(frame.columns))]:
        # no header row: the first line was a sample
        frame = pd.read_csv(path, header=None)
        frame.columns = [str(c) for c in frame.columns]
    id_column = next((c for c in frame.columns if str(c).lower() in ID_NAMES), None)
    ids = frame.pop(id_column).astype(str).tolist() if id_column is not None else _positions(len(frame))
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed: ")]
    if unnamed:
        raise DataError(
            f"{role}={path}: the header leaves column(s) unnamed ({unnamed[:5]} are pandas' names for them; "
            "a frame's index written without index=False?); remove them, or name a column of row names `id`"
        )
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise DataError(
            f"{role}={path}: column(s) {text[:10]} are not numeric; a sample file holds numeric feature "
            "columns and optionally an `id` column"
        )
    return ids, frame


def _read_numpy(path: Path, role: str) -> tuple[list[str], np.ndarray]:
    from metaad.data.sources import load_arrays

    try:
        loaded = load_arrays(path, path.suffix.lower())
    except DataError as error:
        raise DataError(f"{role}={error}") from None
    if isinstance(loaded, np.ndarray):
        return _positions(len(loaded)), _numeric(loaded, path, role)
    arrays = dict(loaded)
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
    folder: Path, role: str, channels: int, any_size: bool = False
) -> tuple[list[str], np.ndarray | list[np.ndarray]]:
    """Pixel values (0-255) of every image in ``folder`` as a viewer shows them (upright, 16-bit scaled;
    :mod:`metaad.data.images`), sorted by name: (N, H, W) or (N, 3, H, W); with ``any_size`` (a model
    that resizes) images of several sizes come as a list of (H, W) or (3, H, W) arrays."""
    from metaad.data.images import read_image

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for file in files:
        pixels = read_image(file, channels, where=f"{role}: {file}").astype(np.float32)
        if images and pixels.shape != images[0].shape and not any_size:
            raise DataError(
                f"{role}: {file} is {pixels.shape[1]}x{pixels.shape[0]} pixels but {files[0].name} is "
                f"{images[0].shape[1]}x{images[0].shape[0]}; the images of a folder need one size"
            )
        images.append(pixels)
    if not images:
        return [], np.empty((0,))
    if len({image.shape for image in images}) > 1:
        return [f.name for f in files], [im if channels == 1 else im.transpose(2, 0, 1) for im in images]
    x = np.stack(images)
    return [f.name for f in files], x if channels == 1 else x.transpose(0, 3, 1, 2)


def check_images_fit(path: str, role: str, shape: tuple[int, ...]) -> None:
    """A folder of images only for a model of (1 or 3, height, width) images."""
    if Path(path).is_dir() and not (len(shape) == 3 and shape[0] in (1, 3)):
        raise DataError(
            f"{role}={path} is a folder of images, but the checkpoint's model takes samples of "
            f"shape {shape}, not (1 or 3, height, width) images; give a .csv or .npz"
        )


def read_for_model(
    path: str, role: str, shape: tuple[int, ...], any_size: bool = False
) -> tuple[list[str], Any]:
    """:func:`read_samples` with the channels of a model of samples of ``shape`` (``any_size``: a
    folder's images may differ in size, the model resizing them)."""
    return read_samples(path, role, shape[0] if len(shape) == 3 else 1, any_size)


def fit_support(detector: Any, support: Any, where: str) -> None:
    """``detector.fit(support)``, a data error named by where the support came from."""
    try:
        detector.fit(support)
    except DataError as error:
        raise DataError(f"{where}: {error}") from error


def _positions(n: int) -> list[str]:
    return [str(i) for i in range(n)]


COLUMNS = ("id", "score", "normalised_score", "is_anomaly")


def check_output(output: Path, inputs: list[Path], overwrite: Any) -> None:
    """Never write onto an input; replace an existing file only if it is a previous scores table
    (or ``overwrite=true``)."""
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be true or false, got {overwrite!r}")
    if not output.exists():
        return
    for path in inputs:
        if path.exists() and os.path.samefile(output, path):
            raise DataError(
                f"output={output} is one of the inputs ({path}); give another path for the scores"
            )
    if not overwrite and not _is_scores_table(output):
        raise DataError(
            f"output={output} exists and is not a scores table written by metaad-score (its header is not "
            f"{','.join(COLUMNS)}); give another path, or overwrite=true to replace it"
        )


def _is_scores_table(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().strip() in (",".join(COLUMNS), ",".join(SERIES_COLUMNS))
    except (OSError, UnicodeDecodeError):
        return False


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """:func:`metaad.files.write_atomically`, a failure named as the ``output``."""
    try:
        files.write_atomically(path, write)
    except OSError as error:
        raise DataError(
            f"output={path}: cannot write it ({error.strerror or error}); nothing was replaced"
        ) from None


SERIES_COLUMNS = ("step", "score", "normalised_score", "is_anomaly")
PAIRS = {"samples": ("support", "query"), "series": ("history", "series")}


def read_series(path: str | Path, role: str) -> Any:
    """A raw series ``(steps, columns)``: a data frame where the file names its columns (CSV/TXT with
    a header row; columns are then matched to the model's by name), else an array read by position.
    ``.csv``/``.txt``/``.npy``, each optionally ``.gz``, or ``.npz`` (array ``X``/``x`` or its only one)."""
    import pandas as pd

    from metaad.data.series import _stem, read_matrix

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role}={path}: no such file")
    if path.suffix.lower() == ".npz":
        return _read_numpy(path, role)[1]
    if _stem(path) is None:
        raise DataError(f"{role}={path}: expected a .csv, .txt or .npy file (optionally .gz) or a .npz")
    try:
        values, header = read_matrix(path)
    except DataError as error:
        raise DataError(f"{role}={error}") from None
    return pd.DataFrame(values, columns=header) if header else values


def _inputs_kind(cfg: DictConfig) -> str:
    """``samples`` (support + query) or ``series`` (history + series), from the files given."""
    given = {role for pair in PAIRS.values() for role in pair if cfg.get(role) is not None}
    for role in given:
        if not isinstance(cfg[role], str) or not cfg[role]:
            raise ConfigError(f"{role} must be the path of a file or folder, got {cfg[role]!r}")
    kinds = [kind for kind, pair in PAIRS.items() if given & set(pair)]
    if len(kinds) != 1 or given != set(PAIRS[kinds[0]]):
        raise ConfigError(
            f"metaad-score takes support=<file> query=<file> (a sample model) or history=<file> "
            f"series=<file> (a series model), got {sorted(given) or 'none of them'}"
        )
    return kinds[0]


def score(cfg: DictConfig) -> Any:
    """Score ``cfg.query`` against ``cfg.support`` (or ``cfg.series`` after ``cfg.history``) with
    ``cfg.ckpt_path``; writes and returns the table."""
    from hydra.utils import instantiate

    from metaad.api import load
    from metaad.apps.checks import check_settings_of, check_threshold

    check_settings_of(cfg, "score")
    for key in ("ckpt_path", "output"):
        if not isinstance(cfg.get(key), str) or not cfg.get(key):
            raise ConfigError(f"{key} must be the path of a file or folder, got {cfg.get(key)!r}")
    kind = _inputs_kind(cfg)
    output = Path(cfg.output)
    if output.is_dir():
        raise DataError(f"output={output} is a folder; give the path of the .csv file to write")
    if output.suffix.lower() != ".csv":
        raise DataError(f"output={output}: metaad-score writes a CSV table; give a path ending in .csv")
    blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DataError(f"output={output}: {blocking} is a file, so the folder to write in cannot be made")
    check_output(output, [Path(cfg[role]) for role in ("ckpt_path", *PAIRS[kind])], cfg.get("overwrite"))
    if kind == "samples" and (maps := maps_folder(cfg, output)) is not None:
        check_maps_folder(maps)
    check_threshold(cfg.get("threshold"))
    threshold = instantiate(cfg.threshold) if cfg.get("threshold") is not None else None
    detector = load(cfg.ckpt_path, threshold=threshold)
    if detector.threshold_rule is None:
        raise ConfigError(
            f"ckpt_path: {cfg.ckpt_path} was trained without a threshold; choose one with "
            "threshold=support_quantile or threshold=fixed"
        )
    series_model = detector._is_series
    if series_model != (kind == "series"):
        wanted = (
            "a series model: give history=<file> and series=<file> (normal steps, then steps to score)"
            if series_model
            else "a model that scores samples: give support=<file> and query=<file>"
        )
        raise DataError(f"ckpt_path={cfg.ckpt_path} is {wanted}")
    if series_model:
        return _score_series(cfg, detector, output)
    return _score_samples(cfg, detector, output)


def _score_samples(cfg: DictConfig, detector: Any, output: Path) -> Any:
    import pandas as pd

    steps = detector.preprocessing
    shape = tuple(getattr(steps, "input_shape", steps.sample_shape))  # a patch-feature model's images
    resizes = steps.image_size is not None  # photos of any size: each is resized as in training
    for role in ("support", "query"):
        check_images_fit(cfg[role], role, shape)
    support_ids, support = read_for_model(cfg.support, "support", shape, any_size=resizes)
    query_ids, query = read_for_model(cfg.query, "query", shape, any_size=resizes)
    support = _to_model_size(support, steps)
    photos, query = query, _to_model_size(query, steps)
    fit_support(detector, support, f"support={cfg.support}")
    try:
        scores, normalised = detector.decision_function(query), detector.normalised_scores(query)
    except DataError as error:
        raise DataError(f"query={cfg.query}: {error}") from error
    is_anomaly = (normalised > detector.threshold_).astype(int)
    table = pd.DataFrame(dict(zip(COLUMNS, (query_ids, scores, normalised, is_anomaly), strict=True)))
    write_atomically(output, lambda path: table.to_csv(path, index=False))
    maps = maps_folder(cfg, output)
    written = ""
    if maps is not None and callable(getattr(detector.detector, "score_maps", None)):
        write_heat_maps(detector, query_ids, query, maps, float(cfg.get("map_sigma") or 0.0), photos)
        written = f", a heat map per image -> {maps}"
    print(
        f"{len(table)} query samples scored against {len(support_ids)} normal support samples: "
        f"{int(is_anomaly.sum())} anomalies at threshold {detector.threshold_rule.rule} = "
        f"{detector.threshold_:.4g} (normalise={detector.threshold_rule.normalise}) -> {output}{written}"
    )
    return table


def _to_model_size(images: Any, steps: Any) -> np.ndarray:
    """Photos of several sizes (a list) resized to the model's input by its own preprocessing's
    resize, one at a time (what ``transform`` does to an array of them), so they stack."""
    if not isinstance(images, list):
        return images
    planes = [image if image.ndim == 3 else image[None] for image in images]
    resized = np.stack([steps._resize(image[None])[0] for image in planes])
    return resized if images[0].ndim == 3 else resized[:, 0]


MAPS_MARK = ".metaad-score-maps"  # in a maps folder metaad-score made: its PNGs may be replaced


def maps_folder(cfg: DictConfig, output: Path) -> Path | None:
    """Where the heat maps of a folder of query images go: ``maps_dir``, or beside the scores table
    (``<output stem>_maps/``); None when the query is not a folder of images or ``maps_dir=false``."""
    if cfg.get("maps_dir") is False or not Path(cfg.query).is_dir():
        return None
    given = cfg.get("maps_dir")
    if given is not None and (not isinstance(given, str) or not given):
        raise ConfigError(
            f"maps_dir must be the path of a folder, null (beside output) or false, got {given!r}"
        )
    sigma = cfg.get("map_sigma") or 0.0
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or sigma < 0:
        raise ConfigError(f"map_sigma must be a number of pixels >= 0, got {sigma!r}")
    return Path(given) if given else output.with_name(f"{output.stem}_maps")


def check_maps_folder(folder: Path) -> None:
    """The heat maps go into a new or empty folder, or one metaad-score made: never among the user's files."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"maps_dir={folder} is a file; give a folder for the heat maps")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MAPS_MARK).is_file():
        raise DataError(
            f"maps_dir={folder} holds files metaad-score did not write; the heat maps go into a new or empty "
            "folder (or one an earlier metaad-score made): give another maps_dir"
        )


def heat_map_name(image_id: str) -> str:
    """``<image file name>.map.png``: one per input file, whatever its extension."""
    return f"{Path(image_id).name}.map.png"


def write_heat_maps(
    detector: Any, ids: list[str], images: np.ndarray, folder: Path, sigma: float, photos: Any = None
) -> None:
    """Each query image with its anomaly map over it, one PNG per image, every map on one colour
    scale (the lowest to the highest patch score of these images). ``images`` as the model takes
    them; ``photos`` (default: ``images``) as given, possibly of several sizes: each picture is its
    photo, at its own size, the map upsampled to it."""
    import torch
    from PIL import Image

    from metaad.evaluation.pictures import heat_map_overlay
    from metaad.evaluation.pixel_metrics import upsample_maps

    photos = images if photos is None else photos
    patch_maps = detector.anomaly_maps(images)
    low, high = float(patch_maps.min()), float(patch_maps.max())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MAPS_MARK).write_text("heat maps written by metaad-score; it may replace its *.map.png here\n")
    for image_id, photo, patch_map in zip(ids, photos, patch_maps, strict=True):
        pixels = photo.transpose(1, 2, 0) if photo.ndim == 3 else photo
        amap = upsample_maps(torch.from_numpy(patch_map), tuple(pixels.shape[:2]), sigma).double().numpy()
        picture = Image.fromarray(heat_map_overlay(pixels, amap, low, high))
        write_atomically(folder / heat_map_name(image_id), lambda path, p=picture: p.save(path, format="PNG"))


def _score_series(cfg: DictConfig, detector: Any, output: Path) -> Any:
    """One row a step of the series; the steps before the first full window get empty cells."""
    import pandas as pd

    history, series = read_series(cfg.history, "history"), read_series(cfg.series, "series")
    fit_support(detector, history, f"history={cfg.history}")
    try:
        scores, normalised = detector.decision_function(series), detector.normalised_scores(series)
    except DataError as error:
        raise DataError(f"series={cfg.series}: {error}") from error
    n_steps, first = len(series), detector.window_ - 1
    table = pd.DataFrame({"step": np.arange(n_steps)})
    table["score"] = np.concatenate([np.full(first, np.nan), scores])
    table["normalised_score"] = np.concatenate([np.full(first, np.nan), normalised])
    decisions = (normalised > detector.threshold_).astype(np.int64)
    table["is_anomaly"] = pd.array([pd.NA] * first + decisions.tolist(), dtype="Int64")
    write_atomically(output, lambda path: table.to_csv(path, index=False))
    print(
        f"{len(scores)} of {n_steps} steps scored (steps {first}..{n_steps - 1}: the first {first} have no "
        f"full window of {detector.window_}) after the last {detector.n_support_} history windows: "
        f"{int(decisions.sum())} anomalous at threshold {detector.threshold_rule.rule} = "
        f"{detector.threshold_:.4g} (normalise={detector.threshold_rule.normalise}) -> {output}"
    )
    return table


@app("score")
def main(cfg: DictConfig) -> None:
    score(cfg)


if __name__ == "__main__":
    main()
