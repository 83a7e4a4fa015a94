"""Multi-entity time series as windows: three layouts in, one :class:`LabelledData` of windows out.

A *row* here is a window ``(window, metrics)`` of one entity, cut from the stored series only when
an episode reads it (:class:`Windows`): memory is the raw series plus a few numbers a window,
never windows x length. Each window carries its entity (the task), whether any step in it is
labelled anomalous, the *period* it lies in and its *span* on the data's clock:

- ``HISTORY``: the entity's unlabelled history (assumed normal), before the cut;
- ``BEFORE``: its labelled test part before the time cut;
- ``AFTER``: its labelled test part from the cut on.

Windows never cross the history / test boundary nor the cut, so every window is wholly in one
period. :func:`metaad.data.tasks.split_tasks` uses the periods to keep meta-training and
validation before the cut and the held-out entities' queries after it (``tasks`` explains the
protocol); the spans let :func:`metaad.data.tasks.check_time_leaks` verify it.

Clocks: per-entity folders and telemanom channels have no shared timestamps, so a step's clock is
its relative position in its entity's test part (0 at its first step, 1 at its end; history
negative): the cut at fraction ``f`` is the same instant for entities whose test parts cover the
same span (SMD, JumpStarter), and the same relative position otherwise (telemanom). A long table
uses its time column, one clock for every entity.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaad.data import store
from metaad.data.errors import DataError
from metaad.data.preprocessing import Preprocessing
from metaad.data.tasks import AFTER, BEFORE, HISTORY, LabelledData, StreamParts

log = logging.getLogger(__name__)

SUFFIXES = (".npy", ".txt", ".csv")
KINDS = ("spike", "level_shift", "trend", "noise", "stuck", "dropped", "swap")


# --- windows cut when drawn ----------------------------------------------------------------------


class Windows:
    """``windows[rows]`` -> ``(len(rows), window, metrics)`` float32, cut from ``values`` on demand.

    ``values`` is the raw series of every entity one after another, ``(steps, metrics)``: an
    array in memory or a store's :class:`~metaad.data.store.RowFile` (read a window at a time).
    ``starts[r]`` is the first step of window ``r``. Looks like an array to the task pools
    (``shape``, ``ndim``, ``len``, integer-array indexing).
    """

    def __init__(self, values: np.ndarray | store.RowFile, starts: np.ndarray, window: int) -> None:
        self.values, self.starts, self.window = values, np.asarray(starts, np.int64), int(window)
        self.shape = (len(self.starts), self.window, int(values.shape[1]))
        self.dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError("windows take a slice or a 1-D array of row numbers")
        starts = self.starts[rows]
        if isinstance(self.values, np.ndarray):
            return self.values[starts[:, None] + np.arange(self.window)].astype(np.float32, copy=False)
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        for i, start in enumerate(starts.tolist()):
            out[i] = self.values.block(start, start + self.window)
        return out

    def steps(self, start: int, stop: int) -> np.ndarray:
        """The stored steps ``[start, stop)``, ``(stop - start, metrics)`` float32 (a stream's series)."""
        if isinstance(self.values, np.ndarray):
            return np.asarray(self.values[start:stop], np.float32)
        return np.asarray(self.values.block(start, stop), np.float32)


# --- the windows of one entity -------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Where the protocol cuts: ``time_cut`` on the clock (a fraction of the test part, or a time)."""

    window: int
    stride: int
    time_cut: float


class _Collector:
    """Accumulates entities' windows (starts, labels, periods, spans) as their series are read."""

    def __init__(self, cut: Cut) -> None:
        self.cut = cut
        self.starts: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.anomalous: list[np.ndarray] = []
        self.period: list[np.ndarray] = []
        self.span: list[np.ndarray] = []
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.straddling = 0
        self.parts: list[tuple[int, int, int, int]] = []  # test parts: (entity, start, cut, stop)
        self.runs: list[np.ndarray] = []  # their anomalous [start, stop) runs, storage steps

    def add(self, entity: str, offset: int, labels: np.ndarray, clock: np.ndarray, history: bool) -> None:
        """The windows of one contiguous part (history or test) of ``entity`` at storage ``offset``."""
        code = self.index.setdefault(entity, len(self.index))
        if code == len(self.names):
            self.names.append(entity)
        w, n = self.cut.window, len(labels)
        if n < w:
            return
        if not history:
            first_after = int(np.searchsorted(clock, self.cut.time_cut, side="left"))
            self.parts.append((code, offset, offset + first_after, offset + n))
            edges = np.diff(np.concatenate([[0], labels.astype(np.int8), [0]]))
            self.runs.append(
                np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1) + offset
            )
        local = np.arange(0, n - w + 1, self.cut.stride, dtype=np.int64)
        ends = local + w - 1
        counts = np.concatenate([[0], np.cumsum(labels, dtype=np.int64)])
        anomalous = counts[local + w] > counts[local]
        start_clock, end_clock = clock[local], clock[ends]
        before, after = end_clock < self.cut.time_cut, start_clock >= self.cut.time_cut
        keep = before | after
        self.straddling += int((~keep).sum())
        period = np.where(after, AFTER, HISTORY if history else BEFORE).astype(np.int8)
        self.starts.append(local[keep] + offset)
        self.codes.append(np.full(int(keep.sum()), code, np.int32))
        self.anomalous.append(anomalous[keep])
        self.period.append(period[keep])
        self.span.append(np.stack([start_clock[keep], end_clock[keep]], axis=1))

    def data(
        self, values, name: str, feature_names: Sequence[str], source_columns: Sequence[str]
    ) -> LabelledData:
        if not self.starts or not sum(len(s) for s in self.starts):
            raise DataError(
                f"{name}: no entity has a part of at least dataset.source.window={self.cut.window} steps"
            )
        starts = np.concatenate(self.starts)
        windows = Windows(values, starts, self.cut.window)
        log.info(
            "%s: %d entities, %d windows of %d steps x %d metrics (stride %d; %d straddling the cut "
            "left out)",
            name,
            len(self.names),
            len(starts),
            self.cut.window,
            windows.shape[2],
            self.cut.stride,
            self.straddling,
        )
        return LabelledData(
            x=windows,
            task=np.concatenate(self.codes),
            names=tuple(self.names),
            anomalous=np.concatenate(self.anomalous),
            name=name,
            preprocessing=series_preprocessing(
                self.cut.window, self.cut.stride, feature_names, source_columns
            ),
            finite_checked=True,
            period=np.concatenate(self.period),
            span=np.concatenate(self.span),
            streams=self.streams(),
        )

    def streams(self) -> StreamParts:
        parts = np.array(self.parts, np.int64).reshape(-1, 4)
        runs = np.concatenate(self.runs).astype(np.int64) if self.runs else np.zeros((0, 2), np.int64)
        return StreamParts(parts[:, 0], parts[:, 1], parts[:, 2], parts[:, 3], runs.reshape(-1, 2))


def series_preprocessing(
    window: int, stride: int, columns: Sequence[str], source_columns: Sequence[str]
) -> Preprocessing:
    """What turns a raw series of ``source_columns`` into this source's windows (the datamodule adds
    the scaling rule): stored with a model, so that its API and ``metaad-score`` cut the same."""
    return Preprocessing(
        (window, len(columns)),
        window=window,
        stride=stride,
        source_columns=tuple(str(c) for c in source_columns),
        columns=tuple(str(c) for c in columns),
    )


def _check_cut(window: int, stride: int, time_cut: float) -> Cut:
    for setting, value in (("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"dataset.source.{setting} must be a positive integer, got {value!r}")
    if isinstance(time_cut, bool) or not isinstance(time_cut, int | float) or not 0 < time_cut < 1:
        raise DataError(
            f"dataset.source.time_cut must be a fraction in (0, 1) of each test part, got {time_cut!r}"
        )
    return Cut(window, stride, float(time_cut))


def _relative_clock(n_history: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Clocks of a history part and a test part: position in the test part, history negative."""
    test = np.arange(n_test, dtype=np.float64) / n_test
    history = (np.arange(n_history, dtype=np.float64) - n_history) / n_test
    return history, test


# --- reading one matrix or label file ------------------------------------------------------------


def _stem(path: Path) -> str | None:
    name = path.name.removesuffix(".gz")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as file:
            return file.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read it ({error})") from error


def read_matrix(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """A series file as ``(steps, columns)`` float64 and its header names (None without a header).

    ``.npy`` is read without unpickling; ``.txt`` / ``.csv`` are comma- or whitespace-separated
    numbers with an optional header row; any of them may be gzip-compressed (``.gz``).
    """
    raw = _read_bytes(path)
    if path.name.removesuffix(".gz").endswith(".npy"):
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as error:
            raise DataError(f"{path}: not a numeric .npy array ({error}); metaad never unpickles") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise DataError(f"{path}: holds {getattr(array, 'dtype', type(array))}, not numbers")
        header = None
    else:
        array, header = _read_text(path, raw)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not len(array):
        raise DataError(f"{path}: expected a (steps, metrics) table, got shape {array.shape}")
    return np.asarray(array, np.float64), header


def _read_text(path: Path, raw: bytes) -> tuple[np.ndarray, list[str] | None]:
    import pandas as pd

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text table") from None
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise DataError(f"{path}: the file is empty")
    delimiter = "," if "," in first else r"\s+"
    fields = next(csv.reader([first])) if delimiter == "," else first.split()
    header = None if _numbers(fields) else [c.strip() for c in fields]
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=delimiter, header=0 if header else None, skip_blank_lines=True,
            engine="c" if delimiter == "," else "python",
        )  # fmt: skip
    except (ValueError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: cannot read it as a table of numbers ({error})") from None
    text_columns = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text_columns:
        column = text_columns[0]
        values = pd.to_numeric(frame[column], errors="coerce")
        row = int(np.flatnonzero(values.isna() & frame[column].notna())[0])
        raise DataError(
            f"{path}: row {row} (0-based, data rows) holds {frame[column].iloc[row]!r}, not a number"
        )
    return frame.to_numpy(np.float64), header


def _numbers(fields: Sequence[str]) -> bool:
    try:
        [float(f) for f in fields if f.strip()]
    except ValueError:
        return False
    return True


def _labels(values: np.ndarray, path: Path | str, rows: int | None = None, entity: str = "") -> np.ndarray:
    """A 0/1 label column as bool; other values, or a length other than ``rows``, name the row."""
    if values.ndim == 2 and values.shape[1] != 1:
        raise DataError(f"{path}: a label file holds one 0/1 per step, this one {values.shape[1]} columns")
    values = values.reshape(-1)
    bad = np.flatnonzero(~np.isin(values, (0, 1)))
    if len(bad):
        raise DataError(
            f"{path}{entity}: labels must be 0 (normal) or 1 (anomalous); row {bad[0]} holds "
            f"{values[bad[0]]:g} ({len(bad)} bad row(s))"
        )
    if rows is not None and len(values) != rows:
        raise DataError(f"{path}{entity}: {len(values)} labels but the test series has {rows} steps")
    return values == 1


def _finite(values: np.ndarray, path: Path | str, entity: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise DataError(
            f"{path} (entity {entity}): {len(bad)} step(s) hold NaN, inf or an empty value "
            f"(first rows, 0-based: {bad[:5].tolist()})"
        )


def select_features(features, names: Sequence[str], where: str) -> list[int]:
    """Column indices of the ``features`` setting: null (all), integers (by index), names."""
    if features is None:
        return list(range(len(names)))
    if isinstance(features, str | int) or not isinstance(features, Sequence):
        raise DataError(
            f"dataset.source.features must be null (all), a list of column indices or a list of names; "
            f"got {features!r}"
        )
    index = {str(n): i for i, n in enumerate(names)}
    chosen = []
    for entry in features:
        if isinstance(entry, bool):
            raise DataError(f"dataset.source.features: {entry!r} is neither a column index nor a name")
        if isinstance(entry, int):
            if not -len(names) <= entry < len(names):
                raise DataError(
                    f"{where}: dataset.source.features names column {entry}, but there are {len(names)}"
                )
            chosen.append(entry % len(names))
        elif str(entry) in index:
            chosen.append(index[str(entry)])
        else:
            raise DataError(
                f"{where}: dataset.source.features names {entry!r}, not a column "
                f"(columns: {list(names)[:20]})"
            )
    if not chosen or len(set(chosen)) != len(chosen):
        raise DataError(f"dataset.source.features must name distinct columns, got {list(features)}")
    return chosen


# --- per-entity folders --------------------------------------------------------------------------


def series_folders(
    root: str,
    window: int = 32,
    stride: int = 8,
    time_cut: float = 0.5,
    features: Sequence | None = None,
    group: str | None = None,
    train_folder: str = "train",
    test_folder: str = "test",
    label_folder: str = "test_label",
) -> LabelledData:
    """One file per entity in ``train/`` (history), ``test/`` and ``test_label/`` (one 0/1 a step).

    Files are ``.npy``, ``.txt`` or ``.csv``, any of them ``.gz``, matched by name. ``root`` holds
    the three folders, or sub-groups that do (JumpStarter's ``Dataset2/``): then every group is
    read (or only ``group``) and entities are named ``<group>/<file>``.
    """
    cut = _check_cut(window, stride, time_cut)
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"dataset.source.root: {folder} is not a folder")
    if (folder / train_folder).is_dir():
        groups = [("", folder)]
    else:
        groups = sorted((p.name, p) for p in folder.iterdir() if p.is_dir() and (p / train_folder).is_dir())
        if group is not None:
            groups = [g for g in groups if g[0] == group]
        if not groups:
            raise DataError(
                f"{folder}: no {train_folder}/ folder in it, nor in a sub-group folder"
                + (f" named {group!r}" if group else "")
            )
    entities = []  # (name, train file, test file, label file)
    for prefix, base in groups:
        found = {name: _files(base / name, name) for name in (train_folder, test_folder, label_folder)}
        for stem, train_file in sorted(found[train_folder].items()):
            missing = [name for name in (test_folder, label_folder) if stem not in found[name]]
            if missing:
                raise DataError(
                    f"{train_file}: entity {stem!r} has no file in {[str(base / m) for m in missing]}"
                )
            name = f"{prefix}/{stem}" if prefix else stem
            entities.append((name, train_file, found[test_folder][stem], found[label_folder][stem]))
        extra = sorted(set(found[test_folder]) - set(found[train_folder]))
        if extra:
            raise DataError(
                f"{base / test_folder}: entities {extra[:5]} have no history file in {base / train_folder}"
            )
    if not entities:
        raise DataError(f"{folder}: no series files ({', '.join(SUFFIXES)}, optionally .gz)")

    collector, parts, offset = _Collector(cut), [], 0
    columns, chosen, first = None, None, None
    for name, train_file, test_file, label_file in entities:
        history, header = read_matrix(train_file)
        test, _ = read_matrix(test_file)
        if columns is None:
            columns = header or [str(i) for i in range(history.shape[1])]
            chosen, first = select_features(features, columns, str(train_file)), train_file
        for path, part in ((train_file, history), (test_file, test)):
            if part.shape[1] != len(columns):
                raise DataError(
                    f"{path} (entity {name}): {part.shape[1]} columns, but {first} has {len(columns)}; "
                    "every series of a dataset needs the same metrics"
                )
        history, test = history[:, chosen], test[:, chosen]
        _finite(history, train_file, name)
        _finite(test, test_file, name)
        labels = _labels(read_matrix(label_file)[0], label_file, len(test), f" (entity {name})")
        history_clock, test_clock = _relative_clock(len(history), len(test))
        collector.add(name, offset, np.zeros(len(history), bool), history_clock, history=True)
        collector.add(name, offset + len(history), labels, test_clock, history=False)
        parts += [history.astype(np.float32), test.astype(np.float32)]
        offset += len(history) + len(test)
    return collector.data(np.concatenate(parts), f"series ({root})", [columns[i] for i in chosen], columns)


def _files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder.parent}: the {what}/ folder is missing")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is None or not path.is_file():
            continue
        if stem in files:
            raise DataError(f"{folder}: entity {stem!r} has two files ({files[stem].name}, {path.name})")
        files[stem] = path
    return files


# --- telemanom (SMAP / MSL) ----------------------------------------------------------------------


def telemanom(
    root: str,
    window: int = 32,
    stride: int = 8,
    time_cut: float = 0.5,
    features: Sequence | None = None,
    spacecraft: str | None = None,
    labels_file: str = "labeled_anomalies.csv",
    end_inclusive: bool = True,
) -> LabelledData:
    """telemanom's layout: ``train/<chan>.npy``, ``test/<chan>.npy`` (``.gz`` too) and a CSV of
    anomaly index ranges per channel (``chan_id``, ``spacecraft``, ``anomaly_sequences``,
    ``num_values``). Ranges are ``[start, end]`` with ``end`` inclusive (OmniAnomaly's reading;
    ``end_inclusive: false`` for the other). A channel listed twice gets the union of its ranges;
    channel files without a CSV row are left out (logged). Channels share no clock: the cut is at
    the same relative position of each test part.
    """
    cut = _check_cut(window, stride, time_cut)
    folder = Path(root)
    table = folder / labels_file
    if not table.is_file():
        raise DataError(f"dataset.source.root: {folder} has no {labels_file}")
    ranges: dict[str, list[tuple[int, int]]] = {}
    lengths: dict[str, int] = {}
    with open(table, newline="") as file:
        reader = csv.DictReader(file)
        needed = {"chan_id", "anomaly_sequences", "num_values"}
        if not needed <= set(reader.fieldnames or ()):
            raise DataError(f"{table}: needs the columns {sorted(needed)}, has {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if spacecraft is not None and row.get("spacecraft") != spacecraft:
                continue
            chan = row["chan_id"]
            try:
                spans = json.loads(row["anomaly_sequences"])
                length = int(row["num_values"])
                spans = [(int(a), int(b)) for a, b in spans]
            except (ValueError, TypeError) as error:
                raise DataError(
                    f"{table}: line {line} (channel {chan}): cannot read its ranges ({error})"
                ) from None
            if lengths.setdefault(chan, length) != length:
                raise DataError(
                    f"{table}: channel {chan} is listed with num_values {lengths[chan]} and {length}"
                )
            for a, b in spans:
                if not 0 <= a <= b < length + (0 if end_inclusive else 1):
                    raise DataError(
                        f"{table}: line {line} (channel {chan}): range [{a}, {b}] outside its {length} steps"
                    )
            ranges.setdefault(chan, []).extend(spans)
    if not ranges:
        raise DataError(
            f"{table}: no channel rows" + (f" for spacecraft {spacecraft!r}" if spacecraft else "")
        )
    train_files, test_files = _files(folder / "train", "train"), _files(folder / "test", "test")
    unlisted = sorted(set(train_files) - set(ranges))
    if unlisted:
        log.info(
            "%s: %d channel file(s) without a row in %s left out: %s",
            folder,
            len(unlisted),
            labels_file,
            unlisted[:10],
        )
    collector, parts, offset, columns, chosen = _Collector(cut), [], 0, None, None
    for chan in sorted(ranges):
        missing = [p for p, files in (("train", train_files), ("test", test_files)) if chan not in files]
        if missing:
            raise DataError(f"{table}: channel {chan} has no file in {[str(folder / m) for m in missing]}")
        history, _ = read_matrix(train_files[chan])
        test, _ = read_matrix(test_files[chan])
        if columns is None:
            columns = [str(i) for i in range(history.shape[1])]
            chosen = select_features(features, columns, str(train_files[chan]))
        for path, part in ((train_files[chan], history), (test_files[chan], test)):
            if part.shape[1] != len(columns):
                raise DataError(
                    f"{path} (entity {chan}): {part.shape[1]} columns, other channels {len(columns)}"
                )
        if len(test) != lengths[chan]:
            raise DataError(
                f"{test_files[chan]} (entity {chan}): {len(test)} steps, "
                f"but {table} says num_values {lengths[chan]}"
            )
        history, test = history[:, chosen], test[:, chosen]
        _finite(history, train_files[chan], chan)
        _finite(test, test_files[chan], chan)
        labels = np.zeros(len(test), bool)
        for a, b in ranges[chan]:
            labels[a : b + 1 if end_inclusive else b] = True
        history_clock, test_clock = _relative_clock(len(history), len(test))
        collector.add(chan, offset, np.zeros(len(history), bool), history_clock, history=True)
        collector.add(chan, offset + len(history), labels, test_clock, history=False)
        parts += [history.astype(np.float32), test.astype(np.float32)]
        offset += len(history) + len(test)
    return collector.data(np.concatenate(parts), f"telemanom ({root})", [columns[i] for i in chosen], columns)


# --- a long table --------------------------------------------------------------------------------


def series_table(
    path: str,
    entity_column: str,
    time_column: str,
    features: Sequence | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    history_end: float = 0.5,
    window: int = 32,
    stride: int = 8,
    time_cut: float = 0.5,
    cache: str | None = None,
) -> LabelledData:
    """A long table (CSV / Parquet): one row per entity and step, metric columns, optional 0/1 labels.

    The history / test division is ``split_column`` (values ``train`` / ``test``) or, without it,
    ``history_end``: the fraction of the table's time range where the test part starts. The cut
    is ``time_cut`` of the test part's time range, one instant for every entity (the time column
    is a shared clock). Without ``label_column`` every step is normal (anomalies then come from
    injection or other entities). ``features``: null (every other numeric column), indices or names.

    In memory (``cache: null``) the rows may come in any order (they are sorted by entity and
    time). With ``cache`` (a folder) the table is read in chunks into a store there and each
    window read from disk when drawn, so tables larger than memory train; the file must then be
    grouped by entity with time ascending (a monitoring export usually is; sort it otherwise).
    """
    import pandas as pd

    from metaad.data.sources import _TableReader

    _check_cut(window, stride, time_cut)
    if isinstance(history_end, bool) or not isinstance(history_end, int | float) or not 0 < history_end < 1:
        raise DataError(f"dataset.source.history_end must be a fraction in (0, 1), got {history_end!r}")
    reader = _TableReader(Path(path), str(entity_column))
    columns = reader.columns
    special = [c for c in (entity_column, time_column, label_column, split_column) if c is not None]
    unknown = [c for c in special if c not in columns]
    if unknown:
        raise DataError(
            f"{path}: {unknown} named in dataset.source are not columns of the table {columns[:20]}"
        )
    candidates = [c for c in columns if c not in special]
    names = [candidates[i] for i in select_features(features, candidates, str(path))]
    wanted = names + special

    settings = dict(
        entity_column=entity_column, time_column=time_column, features=names, label_column=label_column,
        split_column=split_column, history_end=history_end, window=window, stride=stride, time_cut=time_cut,
    )  # fmt: skip
    ident = store.identity("series_table", Path(path), [Path(path)], settings)
    found = store.find(cache, Path(path).name, ident)
    folder = store.store_folder(cache, Path(path).name, ident) if cache is not None else None
    if found is not None and (folder / "windows.npz").is_file():
        saved = np.load(folder / "windows.npz", allow_pickle=False)
        return LabelledData(
            x=Windows(found.x, saved["starts"], window),
            task=saved["codes"],
            names=tuple(json.loads(str(saved["names"]))),
            anomalous=saved["anomalous"],
            name=f"series table ({path})",
            preprocessing=series_preprocessing(window, stride, names, candidates),
            finite_checked=True,
            period=saved["period"],
            span=saved["span"],
            streams=_saved_streams(saved),
        )

    # first pass: the clock's range (time, and the split column if any), to place the cut
    t_test = [math.inf, -math.inf]
    t_all = [math.inf, -math.inf]
    for frame in reader.chunks([time_column] + ([split_column] if split_column else [])):
        t = _times(frame[time_column], path, time_column)
        if split_column is not None:
            test = _split_values(frame[split_column], path, split_column)
            if test.any():
                t_test = [min(t_test[0], t[test].min()), max(t_test[1], t[test].max())]
        if len(t):
            t_all = [min(t_all[0], t.min()), max(t_all[1], t.max())]
    if not math.isfinite(t_all[0]):
        raise DataError(f"{path}: the table has no data rows")
    if split_column is None:
        start = t_all[0] + history_end * (t_all[1] - t_all[0])
        t_test = [start, t_all[1]]
    elif not math.isfinite(t_test[0]):
        raise DataError(f"{path}: no row has {split_column}=test")
    cut_time = t_test[0] + time_cut * (t_test[1] - t_test[0])
    cut = Cut(window, stride, cut_time)

    sink = store.writer(cache, Path(path).name, ident, (len(names),), False, reader.rows)
    collector = _Collector(cut)
    try:
        if cache is None:
            frame = pd.concat(list(reader.chunks(wanted)), ignore_index=True)
            frame["__row"] = np.arange(len(frame))
            frame = frame.sort_values([entity_column, time_column], kind="stable")
            chunks: Iterator = iter([frame])
        else:
            chunks = _numbered(reader.chunks(wanted))
        _stream_entities(chunks, sink, collector, names, settings, t_test[0], path)
        arrays = sink.finish(collector.names)
    except BaseException:
        sink.abort()
        raise
    data = collector.data(arrays.x, f"series table ({path})", names, candidates)
    if folder is not None:
        np.savez(
            folder / "windows.npz",
            starts=data.x.starts,
            codes=data.task,
            names=json.dumps(list(data.names)),
            anomalous=data.anomalous,
            period=data.period,
            span=data.span,
            stream_parts=np.stack(
                [data.streams.entity, data.streams.start, data.streams.cut, data.streams.stop], axis=1
            ),
            stream_runs=data.streams.anomalous,
        )
    return data


def _saved_streams(saved) -> StreamParts | None:
    """The test parts a store's ``windows.npz`` recorded (None from a store written before streams)."""
    if "stream_parts" not in saved.files:
        return None
    parts = saved["stream_parts"].reshape(-1, 4)
    return StreamParts(
        parts[:, 0], parts[:, 1], parts[:, 2], parts[:, 3], saved["stream_runs"].reshape(-1, 2)
    )


def _numbered(chunks):
    offset = 0
    for frame in chunks:
        frame = frame.copy()
        frame["__row"] = np.arange(offset, offset + len(frame))
        offset += len(frame)
        yield frame


def _times(column, path, name) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column):
        t = column.to_numpy(np.float64)
    else:
        try:
            t = pd.to_datetime(column).to_numpy("datetime64[ns]").astype(np.int64).astype(np.float64)
        except (ValueError, TypeError) as error:
            raise DataError(
                f"{path}: time column {name!r} holds values that are neither numbers nor dates ({error})"
            ) from None
    bad = np.flatnonzero(~np.isfinite(t))
    if len(bad):
        raise DataError(f"{path}: time column {name!r} is empty or not finite in {len(bad)} row(s)")
    return t


def _split_values(column, path, name) -> np.ndarray:
    values = column.astype(str).str.strip().str.lower().to_numpy()
    bad = np.flatnonzero(~np.isin(values, ("train", "test")))
    if len(bad):
        raise DataError(f"{path}: column {name!r} must say train or test; a row holds {values[bad[0]]!r}")
    return values == "test"


def _stream_entities(chunks, sink, collector, names, settings, test_start, path) -> None:
    """Append each entity's rows to ``sink`` and its windows to ``collector``, one entity at a time."""
    entity_column, time_column = settings["entity_column"], settings["time_column"]
    label_column, split_column = settings["label_column"], settings["split_column"]
    done: set[str] = set()
    pending: list = []  # frames of the current entity
    current = None
    offset = 0

    def flush() -> None:
        nonlocal offset
        if current is None:
            return
        import pandas as pd

        frame = pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0]
        rows = frame["__row"].to_numpy()
        x = frame[names]
        text = [c for c in names if not pd.api.types.is_numeric_dtype(x[c])]
        if text:
            raise DataError(
                f"{path}: feature column(s) {text[:10]} are not numeric; choose dataset.source.features"
            )
        values = x.to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if len(bad):
            raise DataError(
                f"{path} (entity {current}): {len(bad)} row(s) hold NaN, inf or an empty value "
                f"(first data rows, 0-based: {rows[bad[:5]].tolist()})"
            )
        t = _times(frame[time_column], path, time_column)
        steps = np.diff(t)
        if (steps <= 0).any():
            r = int(np.flatnonzero(steps <= 0)[0]) + 1
            raise DataError(
                f"{path} (entity {current}): data row {rows[r]} has time {t[r]!r}, not after the previous "
                f"row's {t[r - 1]!r}; each entity's times must increase "
                "(a repeated time, or rows out of order)"
            )
        labels = np.zeros(len(frame), bool)
        if label_column is not None:
            raw = frame[label_column].to_numpy(np.float64)
            bad = np.flatnonzero(~np.isin(raw, (0, 1)))
            if len(bad):
                raise DataError(
                    f"{path} (entity {current}): column {label_column!r} must be 0 or 1; data row "
                    f"{rows[bad[0]]} holds {frame[label_column].iloc[bad[0]]}"
                )
            labels = raw == 1
        test = _split_values(frame[split_column], path, split_column) if split_column else t >= test_start
        sink.append(values.astype(np.float32), np.full(len(frame), len(done) - 1, np.int32))
        # contiguous runs of history and of test rows, each cut into windows of its own
        edges = np.flatnonzero(np.diff(test.astype(np.int8))) + 1
        for a, b in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(frame)]]), strict=True):
            collector.add(current, offset + a, labels[a:b], t[a:b], history=not test[a])
        offset += len(frame)

    for frame in chunks:
        entities = frame[entity_column].astype(str).to_numpy()
        bounds = np.flatnonzero(entities[1:] != entities[:-1]) + 1
        for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(frame)]]), strict=True):
            entity = entities[a]
            if entity != current:
                flush()
                if entity in done:
                    raise DataError(
                        f"{path}: data row {frame['__row'].iloc[a]} starts entity {entity!r} "
                        "again after other "
                        "entities; reading through the store (dataset.source.cache) needs the table grouped "
                        "by entity with time ascending: sort it, or read it in memory (cache: null)"
                    )
                done.add(entity)
                current, pending = entity, []
            pending.append(frame.iloc[a:b])
    flush()


# --- synthetic anomalies -------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticAnomalies:
    """Anomalies injected into normal training windows: spikes, level shifts, trends, noise bursts,
    a stuck or dropped metric, a swapped segment (``kinds``).

    An injected window is a pure function of (seed, base row, variant): a task pool encodes it as
    row ``base + n_rows * (1 + variant)`` and calls :meth:`apply` when the episode reads it.
    Sizes are relative to the window's own spread per metric, so they mean the same at any scale.
    """

    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    variants_per_kind: int = 64

    def __post_init__(self) -> None:
        kinds = tuple(self.kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise DataError(
                f"dataset.synthetic_kinds must be a non-empty list of {list(KINDS)}, got {list(kinds)}"
            )
        object.__setattr__(self, "kinds", kinds)

    @property
    def variants(self) -> int:
        return len(self.kinds) * self.variants_per_kind

    def apply(self, windows: np.ndarray, base: np.ndarray, variant: np.ndarray) -> np.ndarray:
        """``windows`` (n, W, D) with anomaly ``variant[i]`` injected into window i (a copy)."""
        out = np.array(windows, np.float32, copy=True)
        for i in range(len(out)):
            rng = np.random.default_rng([self.seed, int(base[i]), int(variant[i])])
            before = out[i].copy()
            chosen, size = self._inject(out[i], self.kinds[int(variant[i]) % len(self.kinds)], rng)
            if np.array_equal(out[i], before):  # e.g. a stuck metric that was flat already: shift it
                out[i][:, chosen] += size
        return out

    @staticmethod
    def _inject(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        steps, metrics = w.shape
        spread = w.std(axis=0)
        spread = np.maximum(spread, 0.1 * np.abs(w.mean(axis=0)))
        spread = np.where(spread > 0, spread, 1.0)
        chosen = rng.choice(metrics, rng.integers(1, max(1, metrics // 4) + 1), replace=False)
        start = int(rng.integers(0, steps))
        stop = int(rng.integers(start + 1, steps + 1))
        size = rng.uniform(3.0, 8.0) * rng.choice((-1.0, 1.0)) * spread[chosen]
        if kind == "spike":
            w[start, chosen] += size
        elif kind == "level_shift":
            w[start:, chosen] += size
        elif kind == "trend":
            ramp = np.linspace(0.0, 1.0, steps - start)[:, None]
            w[start:, chosen] += ramp * size
        elif kind == "noise":
            w[start:stop, chosen] += rng.normal(size=(stop - start, len(chosen))) * np.abs(size) / 2
        elif kind == "stuck":
            start = min(start, steps - 2) if steps > 1 else 0
            w[start:, chosen] = w[start, chosen]
        elif kind == "dropped":
            w[start:, chosen] = 0.0
        elif kind == "swap":
            length = max(1, steps // 4)
            a, b = rng.choice(steps - length + 1, 2, replace=False) if steps - length + 1 >= 2 else (0, 0)
            first, second = w[a : a + length, chosen].copy(), w[b : b + length, chosen].copy()
            w[a : a + length, chosen], w[b : b + length, chosen] = second, first
        return chosen, size
