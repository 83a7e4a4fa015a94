"""Labelled arrays grouped into tasks, and the split of tasks into meta-train / val / test pools.

A *source* (see ``sources``) returns one :class:`LabelledData`; :func:`split_tasks` turns it into
a :class:`TaskPool` per split. It knows nothing of episodes or models.

No leak, by construction: every row belongs to at most one split (:func:`split_tasks` gives each
row one owner), and a pool draws its normals and its anomalies only from rows nobody else uses:

- a training episode never holds a row of a val or test pool, a validation episode never one of
  the test pool; a task listed in two splits has its rows dealt between them (seeded);
- with a source's own train/test partition (MNIST, Fashion-MNIST) meta-training uses only the
  source-train rows;
- ``anomalies_from="split"``: a one-vs-rest task's anomalies are the other tasks' rows of its own
  split; ``"source_test"`` (OC-MAML's MT-MNIST): val and test anomalies are source-test rows that
  no split uses (those of training tasks, and of val tasks for the test pool), never seen in
  meta-training, halved so val and test share none.

Cost O(rows): rows are grouped by task once (a stable sort), every task's normals are a slice of
one array, and "any row of the split whose task is not t" is drawn by sampling an index into the
split's rows with t's block cut out (offsetting), never by building per-task copies.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from metaad.data.errors import DataError
from metaad.data.preprocessing import Preprocessing
from metaad.data.values import refuse_extreme

__all__ = [
    "DataError",
    "LabelledData",
    "StreamParts",
    "TaskPool",
    "asked_tasks",
    "check_category_leaks",
    "check_time_leaks",
    "entity_folds",
    "split_tasks",
]

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
# periods of a series window (``data.series``): history, labelled before the time cut, after it
HISTORY, BEFORE, AFTER = 0, 1, 2
TRAIN_ANOMALIES = ("real", "synthetic", "real+synthetic", "one_vs_rest")
PARTITIONS = ("train", "test")
# 8-bit pixels as model inputs: float64 value * (1/255), rounded once to float32 (Preprocessing.transform)
_EIGHT_BIT = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
ROTATIONS = (90, 180, 270)
_CHUNK = 65536


@dataclass(frozen=True)
class StreamParts:
    """Where each entity's labelled test part lies in the stored series, to score it as a stream.

    One row per contiguous test part (one per entity for per-entity files, possibly several for a
    long table): ``entity`` its task code, ``start`` / ``cut`` / ``stop`` storage steps (its first
    step, its first step on or after the time cut, one past its last). ``anomalous`` holds the
    storage ``[start, stop)`` runs of labelled anomalous steps, sorted: a few numbers a segment,
    never a label per step kept in memory.
    """

    entity: np.ndarray  # (P,) int
    start: np.ndarray  # (P,) int64
    cut: np.ndarray  # (P,) int64
    stop: np.ndarray  # (P,) int64
    anomalous: np.ndarray  # (S, 2) int64

    def labels(self, start: int, stop: int) -> np.ndarray:
        """0/1 per storage step in ``[start, stop)``."""
        out = np.zeros(stop - start, np.int64)
        runs = self.anomalous
        first = int(np.searchsorted(runs[:, 1], start, side="right")) if len(runs) else 0
        for a, b in runs[first:]:
            if a >= stop:
                break
            out[max(a, start) - start : min(b, stop) - start] = 1
        return out


@dataclass(frozen=True)
class LabelledData:
    """Everything a source knows: samples, the task each belongs to, and (optionally) anomaly labels.

    ``anomalous is None`` means one-vs-rest tasks (a class is a task; its anomalies are other
    classes). Otherwise each task carries its own normals (``False``) and anomalies (``True``),
    as in the ADBench one-file-per-task format. ``partition`` is the source's own train/test split
    of the rows (``"train"`` / ``"test"``; None when it has none). ``preprocessing`` turns a user's
    raw samples into ``x`` the way the source did (default: identity on ``x.shape[1:]``).

    ``x`` may be a read-only memory map (a source read into a store, ``data.store``): nothing here
    reads all of it, and episodes read only their rows. With ``names``, ``task`` holds integer codes
    into it (millions of rows need no string per row). ``finite_checked`` says the source already
    refused NaN and inf while reading, so the check here need not read ``x`` again. Images may be
    held as 8-bit pixels (``uint8``, a quarter of the memory): a pool hands them out as
    ``value * (1/255)`` in float32, the arithmetic of :meth:`Preprocessing.transform`.

    Images with defect maps carry ``masks`` ``(N, H, W)`` bool (all False for a normal image; the
    size of the source's images, also when ``x`` later holds patch features). ``made_from``: for a
    row made from another (a synthetic anomaly pasted onto a normal image, a turned copy), that
    row; -1 for rows read from files. ``support_partition`` ("train"): a held-out task's support
    comes from its rows of that partition and its queries from the others (an image folder's
    ``train/good`` and ``test/``), while meta-training uses every row of its own tasks.
    """

    x: np.ndarray  # (N, *sample_shape) float32
    task: np.ndarray  # (N,) str: class or task name of each row; or int codes into ``names``
    anomalous: np.ndarray | None = None  # (N,) bool, or None for one-vs-rest
    name: str = "data"
    partition: np.ndarray | None = None  # (N,) "train" / "test": the source's own split, or None
    preprocessing: Preprocessing = field(default=None)  # type: ignore[assignment]
    names: tuple[str, ...] | None = None
    finite_checked: bool = False
    # series windows: each row's period (HISTORY / BEFORE / AFTER) and its [start, end] on the clock
    period: np.ndarray | None = None
    span: np.ndarray | None = None
    masks: np.ndarray | None = None  # (N, H, W) bool defect maps, or None
    made_from: np.ndarray | None = None  # (N,) int64: the row a synthetic row was made from, or -1
    support_partition: str | None = None
    # series: each entity's labelled test part in the stored series (scored as a stream)
    streams: StreamParts | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or len(self.x) == 0:
            raise DataError(
                f"{self.name}: expected a non-empty (N, features...) array, got shape {self.x.shape}"
            )
        n = len(self.x)
        if len(self.task) != n:
            raise DataError(f"{self.name}: {n} samples but {len(self.task)} task labels")
        if self.anomalous is not None and len(self.anomalous) != n:
            raise DataError(f"{self.name}: {n} samples but {len(self.anomalous)} anomaly labels")
        if self.partition is not None:
            if len(self.partition) != n:
                raise DataError(f"{self.name}: {n} samples but {len(self.partition)} partition labels")
            odd = sorted(set(np.unique(self.partition).tolist()) - set(PARTITIONS))
            if odd:
                raise DataError(f"{self.name}: partition labels must be 'train' or 'test', got {odd}")
        if (self.period is None) != (self.span is None):
            raise DataError(f"{self.name}: series rows need both a period and a span")
        if self.period is not None:
            if len(self.period) != n or self.span.shape != (n, 2):
                raise DataError(
                    f"{self.name}: {n} windows but periods {self.period.shape}, spans {self.span.shape}"
                )
            if self.anomalous is None:
                raise DataError(f"{self.name}: series windows need anomaly labels (all False where unknown)")
        self._check_images(n)
        if self.preprocessing is None:
            object.__setattr__(self, "preprocessing", Preprocessing(self.x.shape[1:]))
        elif self.preprocessing.sample_shape != self.x.shape[1:]:
            raise DataError(
                f"{self.name}: preprocessing gives samples of shape {self.preprocessing.sample_shape} "
                f"but x has {self.x.shape[1:]}"
            )
        if self.names is not None and not np.issubdtype(np.asarray(self.task).dtype, np.integer):
            raise DataError(f"{self.name}: with task names given, task must hold integer codes into them")
        codes = self.task if self.names is not None and len(self.task) else None
        if codes is not None and not 0 <= int(codes.min()) <= int(codes.max()) < len(self.names):
            raise DataError(f"{self.name}: task codes outside the {len(self.names)} task names")
        if self.finite_checked:
            return
        flat = self.x.reshape(n, -1)
        for start in range(0, n, _CHUNK):
            bad = ~np.isfinite(flat[start : start + _CHUNK]).all(axis=1)
            if bad.any():
                rows = np.flatnonzero(~np.isfinite(flat).all(axis=1))
                raise DataError(
                    f"{self.name}: {len(rows)} row(s) contain NaN or inf (first rows: {rows[:5].tolist()})"
                )
        refuse_extreme(self.x, self.name)

    def _check_images(self, n: int) -> None:
        if self.x.dtype == np.uint8 and self.x.ndim != 4:
            raise DataError(f"{self.name}: 8-bit samples are images (N, channels, H, W), got {self.x.shape}")
        if self.masks is not None:
            if self.anomalous is None:
                raise DataError(f"{self.name}: defect masks need anomaly labels (a task's own anomalies)")
            if self.masks.dtype != bool or self.masks.ndim != 3 or len(self.masks) != n:
                got = f"{self.masks.dtype} {self.masks.shape}"
                raise DataError(f"{self.name}: masks must be (N={n}, H, W) bool, got {got}")
            normal_marked = ~self.anomalous & self.masks.reshape(n, -1).any(axis=1)
            if normal_marked.any():
                raise DataError(
                    f"{self.name}: {int(normal_marked.sum())} normal row(s) have defect pixels in their "
                    f"masks (first rows: {np.flatnonzero(normal_marked)[:5].tolist()})"
                )
        if self.made_from is not None:
            made = np.asarray(self.made_from)
            if len(made) != n or made.dtype.kind not in "iu" or (len(made) and made.max() >= n):
                raise DataError(f"{self.name}: made_from must be (N={n},) row numbers or -1")
            derived = np.flatnonzero(made >= 0)
            if len(derived) and (made[made[derived]] >= 0).any():
                raise DataError(f"{self.name}: made_from must name rows read from files, not made ones")
        if self.support_partition is not None:
            if self.partition is None or self.support_partition not in PARTITIONS:
                raise DataError(
                    f"{self.name}: support_partition must name a partition ('train' or 'test') of "
                    f"partitioned data, got {self.support_partition!r}"
                )

    @cached_property
    def _grouping(self) -> tuple[list[str], np.ndarray]:
        if self.names is not None:
            unique, inverse = np.array(self.names), self.task
        else:
            unique, inverse = np.unique(self.task, return_inverse=True)
        names = sorted((str(u) for u in unique), key=_natural_key)
        position = {name: i for i, name in enumerate(names)}
        if len(position) < len(unique):
            raise DataError(f"{self.name}: a task name is listed twice in its names")
        remap = np.array([position[str(u)] for u in unique], np.int64)
        return names, remap[np.asarray(inverse).reshape(-1)]

    @property
    def task_names(self) -> list[str]:
        """The tasks in natural order (``2`` before ``10``); a task's index here is its id."""
        return self._grouping[0]

    @property
    def task_codes(self) -> np.ndarray:
        """``(N,)`` int64: each row's task as an index into :attr:`task_names`."""
        return self._grouping[1]

    def tasks_of(self, rows: np.ndarray) -> np.ndarray:
        """The task name of each of ``rows`` (whether ``task`` holds names or codes)."""
        return np.asarray(self.task_names)[self.task_codes[rows]]


def _natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


@dataclass(frozen=True, eq=False)
class TaskPool:
    """The tasks of one split: for each task the rows of its normals, and where its anomalies come from.

    ``task_id`` is the task's index in the full data (stable across splits) so learners that
    classify between tasks (N-way ProtoNet) can use it as a class label. ``normal_rows[t]`` is a
    slice of one grouped array. Anomalies are drawn with :meth:`draw_anomalies`; ``anomaly_rows``
    builds a task's full anomaly set on demand (for inspection: it is O(rows) per task).

    A training pool with ``rotations`` holds rotated copies of its images as extra tasks
    (``<task>/rot90`` ...): row ``r + j * len(x)`` is row ``r`` rotated by ``rotations[j - 1]``
    degrees. Read samples with :meth:`take` and their task ids with :meth:`task_ids`.
    """

    x: np.ndarray
    tasks: list[str]
    task_id: dict[str, int]
    normal_rows: dict[str, np.ndarray]
    row_task_id: np.ndarray  # (N,) task id of each row of x; -1 for in-task anomalies
    name: str = "data"  # the source's name, for messages
    rotations: tuple[int, ...] = ()
    # anomalies: one grouped array; a task's block is its own anomalies ("own") or the rows it must skip
    anomaly_pool: np.ndarray = field(default_factory=lambda: np.array([], np.int64), repr=False)
    anomaly_block: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    own_anomalies: bool = False
    n_task_ids: int = 0  # ids of rotated copies are offset by multiples of this
    # series: where a task's support comes from (its history) when not from its query normals
    support_rows: dict[str, np.ndarray] | None = field(default=None, repr=False)
    # injected anomalies (``data.series.SyntheticAnomalies``): row ``base + len(x) * (1 + variant)``
    synthetic: Any = field(default=None, repr=False)
    synthetic_share: float = 1.0  # of a task's anomalies, the share injected when it has real ones
    # series: a task short of anomalous windows has them drawn with replacement, one with none is
    # left out of its split (named in a warning) rather than stopping the run
    lenient: bool = False
    masks: np.ndarray | None = field(default=None, repr=False)  # the data's (N, H, W) defect maps

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def n_anomalies(self, task: str) -> int:
        if self.synthetic is not None:
            return len(self.normal_rows[task]) * self.synthetic.variants
        return self._n_real(task)

    def _n_real(self, task: str) -> int:
        start, stop = self.anomaly_block.get(task, (0, 0))
        return stop - start if self.own_anomalies else len(self.anomaly_pool) - (stop - start)

    def draw_anomalies(
        self, rng: np.random.Generator, task: str, n: int, replace: bool = False
    ) -> np.ndarray:
        """``n`` distinct anomaly rows of ``task``, drawn as ``rng.choice(anomaly_rows[task], n)`` would
        (``replace``: with replacement where the task has fewer; injected ones mixed in if asked)."""
        if self.synthetic is not None:
            have, share = self._n_real(task), self.synthetic_share
            injected = n if have == 0 or share >= 1 else int(rng.binomial(n, share)) if share > 0 else 0
            if not replace:
                injected = max(injected, n - have)
            base = rng.choice(self.normal_rows[task], injected)
            variant = rng.integers(self.synthetic.variants, size=injected)
            real = self._draw_real(rng, task, n - injected, replace) if n > injected else base[:0]
            return np.concatenate([real, base + len(self.x) * (1 + variant)])
        return self._draw_real(rng, task, n, replace)

    def _draw_real(self, rng: np.random.Generator, task: str, n: int, replace: bool) -> np.ndarray:
        start, stop = self.anomaly_block.get(task, (0, 0))
        if self.own_anomalies:
            block = self.anomaly_pool[start:stop]
            return rng.choice(block, n, replace=bool(replace and n > len(block)))
        index = rng.choice(len(self.anomaly_pool) - (stop - start), n, replace=False)
        return self.anomaly_pool[index + (index >= start) * (stop - start)]

    @property
    def anomaly_rows(self) -> Mapping[str, np.ndarray]:
        return _AnomalyRows(self)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The samples of ``rows`` (rotated copies, injected anomalies), ``(len(rows), *sample_shape)``;
        8-bit images as float32 ``value * (1/255)``."""
        out = self._take(rows)
        return _EIGHT_BIT[out] if out.dtype == np.uint8 else out

    def take_masks(self, rows: np.ndarray) -> np.ndarray | None:
        """The defect maps of ``rows`` ``(len(rows), H, W)`` bool (rotated as their images), or None."""
        if self.masks is None:
            return None
        turn, base = np.divmod(np.asarray(rows), len(self.x))
        out = self.masks[base]
        for j, degrees in enumerate(self.rotations, start=1):
            if (turn == j).any():
                out[turn == j] = np.rot90(out[turn == j], k=degrees // 90, axes=(-2, -1))
        return out

    def _take(self, rows: np.ndarray) -> np.ndarray:
        if self.synthetic is not None:
            variant, base = np.divmod(rows, len(self.x))
            out = self.x[base]
            injected = variant > 0
            if injected.any():
                out[injected] = self.synthetic.apply(out[injected], base[injected], variant[injected] - 1)
            return out
        if not self.rotations:
            return self.x[rows]
        turn, base = np.divmod(rows, len(self.x))
        out = self.x[base]
        for j, degrees in enumerate(self.rotations, start=1):
            mask = turn == j
            if mask.any():
                out[mask] = np.rot90(out[mask], k=degrees // 90, axes=(-2, -1))
        return out

    def task_ids(self, rows: np.ndarray) -> np.ndarray:
        """Task id of each row (-1 for an in-task anomaly); rotated copies have their own ids."""
        turn, base = np.divmod(rows, len(self.x))
        ids = self.row_task_id[base]
        if self.synthetic is not None:
            return np.where(turn > 0, -1, ids)
        return np.where(ids < 0, ids, ids + turn * self.n_task_ids)

    def source_rows(self, rows: np.ndarray) -> np.ndarray:
        """The row of the source's data behind each row (a rotated copy's original)."""
        return np.asarray(rows) % len(self.x)


class _AnomalyRows(Mapping):
    def __init__(self, pool: TaskPool) -> None:
        self.pool = pool

    def __getitem__(self, task: str) -> np.ndarray:
        pool = self.pool
        if task not in pool.normal_rows:
            raise KeyError(task)
        start, stop = pool.anomaly_block.get(task, (0, 0))
        if pool.own_anomalies:
            return pool.anomaly_pool[start:stop]
        return np.concatenate([pool.anomaly_pool[:start], pool.anomaly_pool[stop:]])

    def __iter__(self) -> Iterator[str]:
        return iter(self.pool.tasks)

    def __len__(self) -> int:
        return len(self.pool.tasks)


def split_tasks(
    data: LabelledData,
    train_tasks: Sequence | None,
    val_tasks: Sequence,
    test_tasks: Sequence,
    require_disjoint: bool = True,
    anomalies_from: str = "split",
    seed: int = 0,
    train_rotations: Sequence[int] = (),
    time_cut: bool = True,
    train_anomalies: str = "real",
    synthetic: Any = None,
    synthetic_share: float = 0.5,
) -> dict[str, TaskPool]:
    """Build the ``train`` / ``val`` / ``test`` pools.

    Series windows (``data.period`` given) follow the entity x time protocol (:func:`_series_pools`);
    ``time_cut=False`` builds the entity-only variant, which leaks through time (for measuring it).

    ``train_tasks: null`` means every task not used for val or test. A listed entry with shell
    wildcards (``Greek/*``, ``MVTec-AD_*``) stands for every task it matches. A task listed in
    several splits has its rows dealt between them (seeded; val and test sharing a task get the two
    halves), so no sample is both tuned on and tested on.

    ``anomalies_from`` (one-vs-rest tasks): ``split`` draws a task's anomalies from the other tasks
    of its own split. ``source_test`` follows OC-MAML's MT-MNIST (needs a source partition):
    meta-training as ``split`` on source-train rows; validation normals are the val tasks'
    source-train rows, test normals all rows of the test tasks; val and test anomalies are the
    source-test rows no split uses, each task's halved in row order (first half for test, second
    for val), so a test task's anomalies include the val tasks' source-test rows, a val task's do
    not include the test tasks'. OC-MAML cuts the MNIST test set at image 5,000 instead of per
    digit (the same halves up to a few images) and samples its 4,000-image test set once; metaad
    draws each episode's query from these pools.

    Photographs (``data.support_partition``, an image folder): a val/test task's support is drawn
    from its ``train`` rows (``train/good``), its queries from its ``test`` rows; meta-training
    uses every row of its tasks, their real defects and (``train_anomalies``) the synthetic ones
    (rows with ``made_from``), which go where the image they were made from goes;
    :func:`check_category_leaks` then checks that no held-out image reached meta-training.

    ``train_rotations`` (images): rotated copies (90, 180, 270 degrees) of the training tasks as
    new training tasks ``<task>/rot<degrees>`` (the Prototypical networks' Omniglot recipe); val
    and test tasks are never rotated.
    """
    if anomalies_from == "all":
        raise DataError(
            "dataset.anomalies_from=all is gone: it drew a training task's anomalies from every other "
            "task, val and test tasks included, so test rows reached meta-training (a leak); use 'split', "
            "or 'source_test' (OC-MAML's MT-MNIST: val/test anomalies from the source's unused test rows)"
        )
    if anomalies_from not in ("split", "source_test"):
        raise DataError(f"dataset.anomalies_from must be 'split' or 'source_test', got {anomalies_from!r}")
    if anomalies_from == "source_test":
        if data.partition is None:
            raise DataError(
                f"dataset.anomalies_from=source_test needs a source with its own train/test partition "
                f"(MNIST, Fashion-MNIST); {data.name} has none: use anomalies_from=split"
            )
        if data.anomalous is not None:
            raise DataError(
                f"dataset.anomalies_from=source_test is for one-vs-rest classes; the tasks of {data.name} "
                "carry their own anomalies (use anomalies_from=split)"
            )
    rotations = _check_rotations(data, train_rotations)
    names = data.task_names
    asked = _asked_tasks(data, names, train_tasks, val_tasks, test_tasks, require_disjoint)
    index = {t: i for i, t in enumerate(names)}
    codes = data.task_codes
    owner = _owners(data, codes, [[index[t] for t in asked[s]] for s in SPLITS], seed)
    if data.period is not None:
        if anomalies_from != "split":
            raise DataError(f"dataset.anomalies_from=split for series windows, got {anomalies_from!r}")
        pools = _series_pools(data, asked, owner, time_cut, train_anomalies, synthetic, synthetic_share)
        if time_cut:
            check_time_leaks(data, pools)
        return pools
    if data.support_partition is not None:
        _image_owners(data, owner, train_anomalies)
    elif data.partition is not None:
        source_test = data.partition == "test"
        owner[(owner == TRAIN) & source_test] = -1  # meta-training sees source-train rows only
        if anomalies_from == "source_test":
            owner[(owner == VAL) & source_test] = -1  # OC-MAML: val normals from the source-train rows
    row_task_id = codes if data.anomalous is None else np.where(data.anomalous, -1, codes)

    reservoirs = {}
    if anomalies_from == "source_test":
        first_half = _first_half_of_each_task(codes, data.partition == "test", len(names))
        unused = (owner == -1) & (data.partition == "test")
        reservoirs = {VAL: np.flatnonzero(unused & ~first_half), TEST: np.flatnonzero(unused & first_half)}

    pools = {}
    for split in ("val", "test", "train"):  # the order start-up checks report problems in
        s = SPLITS.index(split)
        tasks = asked[split]
        rows = np.flatnonzero(owner == s)
        turns = rotations if s == TRAIN else ()
        all_tasks = tasks + [f"{t}/rot{d}" for d in turns for t in tasks]
        # the split's rows grouped by task, in the split's task order (rotated copies after)
        position = np.full(len(names), -1, np.int64)
        position[[index[t] for t in tasks]] = np.arange(len(tasks))
        rows = np.concatenate([rows + j * len(data.x) for j in range(len(turns) + 1)])
        key = position[codes[rows % len(data.x)]] + len(tasks) * (rows // len(data.x))
        order = np.argsort(key, kind="stable")
        rows, key = rows[order], key[order]
        own = data.anomalous is not None
        if own:
            anomalous = data.anomalous[rows % len(data.x)]
            normal_rows = _views(rows[~anomalous], key[~anomalous], all_tasks)
            anomaly_pool, anomaly_key, anomaly_tasks = rows[anomalous], key[anomalous], all_tasks
        else:
            normal_rows = _views(rows, key, all_tasks)
            anomaly_pool, anomaly_key, anomaly_tasks = rows, key, all_tasks
        if s in reservoirs:  # source_test: grouped by task in the data's natural order
            anomaly_pool, anomaly_tasks = reservoirs[s], names
            anomaly_key = codes[anomaly_pool]  # ascending rows with codes: sort stably by code
            order = np.argsort(anomaly_key, kind="stable")
            anomaly_pool, anomaly_key = anomaly_pool[order], anomaly_key[order]
        starts = np.searchsorted(anomaly_key, np.arange(len(anomaly_tasks) + 1))
        block = {t: (int(starts[i]), int(starts[i + 1])) for i, t in enumerate(anomaly_tasks)}
        task_id = {t: index[t] for t in tasks}
        task_id |= {f"{t}/rot{d}": index[t] + j * len(names) for j, d in enumerate(turns, 1) for t in tasks}
        support_rows = None
        if data.support_partition is not None and s != TRAIN:  # held out: support and queries apart
            side = {t: data.partition[r] == data.support_partition for t, r in normal_rows.items()}
            support_rows = {t: r[side[t]] for t, r in normal_rows.items()}
            normal_rows = {t: r[~side[t]] for t, r in normal_rows.items()}
        pools[split] = TaskPool(
            x=data.x,
            tasks=all_tasks,
            task_id=task_id,
            normal_rows=normal_rows,
            row_task_id=row_task_id,
            name=data.name,
            rotations=turns,
            anomaly_pool=anomaly_pool,
            anomaly_block=block,
            own_anomalies=own,
            n_task_ids=len(names),
            support_rows=support_rows,
            masks=data.masks,
        )
    if data.support_partition is not None or data.made_from is not None:
        check_category_leaks(data, pools)
    return pools


def _image_owners(data: LabelledData, owner: np.ndarray, train_anomalies: str) -> None:
    """Rows nobody may use under the held-out-category protocol (``owner`` set to -1 in place).

    Val/test tasks: anomalies in the support partition (none in an image folder's ``train/good``)
    and synthetic rows (they exist for meta-training only). Meta-training: real anomalies with
    ``train_anomalies=synthetic``, synthetic ones with ``real``.
    """
    if train_anomalies not in TRAIN_ANOMALIES or train_anomalies == "one_vs_rest":
        raise DataError(
            "dataset.train_anomalies must be real, synthetic or real+synthetic for tasks with their own "
            f"anomalies, got {train_anomalies!r}"
        )
    anomalous = data.anomalous if data.anomalous is not None else np.zeros(len(owner), bool)
    made = data.made_from if data.made_from is not None else np.full(len(owner), -1)
    held_out = (owner == VAL) | (owner == TEST)
    owner[held_out & anomalous & (data.partition == data.support_partition)] = -1
    owner[held_out & (made >= 0)] = -1
    # a synthetic defect: an anomaly made from a normal image (a turned copy of a real defect is real)
    synthetic = anomalous & (made >= 0) & ~anomalous[np.maximum(made, 0)]
    if train_anomalies == "synthetic":
        owner[(owner == TRAIN) & anomalous & ~synthetic] = -1
    elif train_anomalies == "real":
        owner[(owner == TRAIN) & synthetic] = -1


def check_category_leaks(data: LabelledData, pools: dict[str, TaskPool]) -> None:
    """Raise :class:`DataError` if meta-training or validation can reach a held-out task's images.

    Every row the train and val pools can hand out (normals, anomalies, supports, rotated copies),
    and the row each synthetic one was made from, must belong to a task that is not held out
    (a test task not also listed in their split), and no row may be in two splits. Built so by
    :func:`split_tasks`; this checks it, so a synthesis or a split that leaks stops the run.
    """
    made = data.made_from if data.made_from is not None else np.full(len(data.x), -1)
    codes, names = data.task_codes, data.task_names
    test_rows = pool_rows(pools["test"])
    taken = {"test": np.unique(np.where(made[test_rows] >= 0, made[test_rows], test_rows))}
    for split in ("train", "val"):
        rows = pool_rows(pools[split])
        origin = np.where(made[rows] >= 0, made[rows], rows)
        listed = {names.index(t) for t in pools[split].tasks if t in names}
        held_out = np.array(
            sorted({names.index(t) for t in pools["test"].tasks if t in names} - listed), np.int64
        )
        leaked = np.isin(codes[origin], held_out)
        if leaked.any():
            row = int(rows[np.argmax(leaked)])
            source = int(origin[np.argmax(leaked)])
            made_note = f" (made from row {source})" if source != row else ""
            raise DataError(
                f"{data.name}: the {split} split can reach row {row}{made_note} of the held-out task "
                f"{names[codes[source]]!r}: a leak of a held-out task into {split}"
            )
        taken[split] = np.unique(origin)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = np.intersect1d(taken[a], taken[b])
        if len(shared):
            raise DataError(
                f"{data.name}: row {int(shared[0])} (task {names[codes[shared[0]]]!r}) is used by both the "
                f"{a} and the {b} split ({len(shared)} rows in all): a leak between splits"
            )


def _series_pools(
    data, asked, owner, time_cut, train_anomalies, synthetic, synthetic_share
) -> dict[str, TaskPool]:
    """The entity x time protocol on series windows (each row one window of one entity).

    - meta-training: the training entities' windows before the cut (history and labelled test
      part), normals and (``train_anomalies``) their real incidents, injected anomalies, or other
      training entities' normal windows (one-vs-rest);
    - validation: the support from each validation entity's history, queries from its labelled
      windows before the cut; nothing after the cut, so early stopping never sees that period. An
      entity without a real incident there (a telemanom channel's one incident may lie after the
      cut) has anomalies injected into its normal windows (``synthetic``), named in a warning;
    - test: the support from each held-out entity's history, queries after the cut; its labelled
      windows before the cut are used by nobody.

    ``time_cut=False`` is the entity-only split (meta-training and validation use every window of
    their entities, after the cut too): the leak the protocol exists to stop, kept to measure it.
    """
    if train_anomalies not in TRAIN_ANOMALIES:
        raise DataError(
            f"dataset.train_anomalies must be one of {list(TRAIN_ANOMALIES)}, got {train_anomalies!r}"
        )
    if "synthetic" in train_anomalies and synthetic is None:
        raise DataError(
            f"dataset.train_anomalies={train_anomalies} needs the injected kinds (dataset.synthetic_kinds)"
        )
    if not 0.0 <= float(synthetic_share) <= 1.0:
        raise DataError(f"dataset.synthetic_share must be in [0, 1], got {synthetic_share!r}")
    period, anomalous, codes, names = data.period, data.anomalous, data.task_codes, data.task_names
    owner = owner.copy()
    after, history = period == AFTER, period == HISTORY
    if time_cut:
        owner[((owner == TRAIN) | (owner == VAL)) & after] = -1
    owner[(owner == TEST) & ~after & ~history] = -1  # a held-out entity's labelled past: nobody's
    index = {t: i for i, t in enumerate(names)}
    row_task_id = np.where(anomalous, -1, codes)
    pools = {}
    for split in ("val", "test", "train"):
        s = SPLITS.index(split)
        tasks = asked[split]
        position = np.full(len(names), -1, np.int64)
        position[[index[t] for t in tasks]] = np.arange(len(tasks))
        rows = np.flatnonzero(owner == s)
        key = position[codes[rows]]
        order = np.argsort(key, kind="stable")  # by task, time order within each
        rows, key = rows[order], key[order]
        normal = ~anomalous[rows]
        support_rows = None
        if s == TRAIN:
            query = np.ones(len(rows), bool)
        else:
            support = normal & (period[rows] == HISTORY)
            support_rows = _views(rows[support], key[support], tasks)
            query = period[rows] != HISTORY
        normal_rows = _views(rows[normal & query], key[normal & query], tasks)
        own, share, injected = True, 1.0, None
        pick = ~normal & query
        if s == TRAIN and train_anomalies == "one_vs_rest":
            own, pick = False, normal  # other training entities' normal windows
        if s == TRAIN and "synthetic" in train_anomalies:
            injected, share = synthetic, (1.0 if train_anomalies == "synthetic" else float(synthetic_share))
            if train_anomalies == "synthetic":
                pick = np.zeros(len(rows), bool)
        if s == VAL and synthetic is not None:  # injected only into entities without a real incident
            injected, share = synthetic, 0.0
        anomaly_pool, anomaly_key = rows[pick], key[pick]
        starts = np.searchsorted(anomaly_key, np.arange(len(tasks) + 1))
        pools[split] = TaskPool(
            x=data.x,
            tasks=list(tasks),
            task_id={t: index[t] for t in tasks},
            normal_rows=normal_rows,
            row_task_id=row_task_id,
            name=data.name,
            anomaly_pool=anomaly_pool,
            anomaly_block={t: (int(starts[i]), int(starts[i + 1])) for i, t in enumerate(tasks)},
            own_anomalies=own,
            n_task_ids=len(names),
            support_rows=support_rows,
            synthetic=injected,
            synthetic_share=share,
            lenient=True,
        )
    return pools


def pool_rows(pool: TaskPool, supports: bool = True) -> np.ndarray:
    """Every source row a pool can hand out: normals, anomalies (injected ones' base rows), supports."""
    parts = [pool.normal_rows[t] for t in pool.tasks] + [pool.anomaly_pool]
    if supports and pool.support_rows is not None:
        parts += [pool.support_rows[t] for t in pool.tasks]
    return np.unique(np.concatenate(parts).astype(np.int64) % len(pool.x)) if parts else np.zeros(0, np.int64)


def check_time_leaks(data: LabelledData, pools: dict[str, TaskPool]) -> None:
    """Raise :class:`DataError` if meta-training or validation can see the held-out queries' time span.

    Reads the windows' spans on the clock, not their periods: every window the train and val
    pools can hand out (normals, anomalies, supports) must end before the earliest start of a
    test query window, and every test support must end before it too; no entity may be in two
    splits. Built so by :func:`_series_pools`; this checks it.
    """
    if data.span is None:
        return
    test = pools["test"]
    queries = pool_rows(test, supports=False)
    if not len(queries):
        return
    earliest = float(data.span[queries, 0].min())
    codes = data.task_codes
    seen = {}
    for split in ("train", "val"):
        rows = pool_rows(pools[split])
        late = rows[data.span[rows, 1] >= earliest]
        if len(late):
            raise DataError(
                f"{data.name}: {len(late)} {split} window(s) reach the held-out entities' query period "
                f"(clock >= {earliest:g}), e.g. of entity {data.task_names[codes[late[0]]]!r}: "
                "a leak through time"
            )
        seen[split] = set(codes[rows].tolist())
    if test.support_rows is not None:
        support = np.concatenate([test.support_rows[t] for t in test.tasks])
        if len(support) and float(data.span[support, 1].max()) >= earliest:
            raise DataError(f"{data.name}: a held-out entity's support reaches its query period")
    held_out = set(codes[queries].tolist())
    shared = (seen["train"] | seen["val"]) & held_out
    if shared or seen["train"] & seen["val"]:
        raise DataError(f"{data.name}: an entity is in two splits (a leak through entities)")


def entity_folds(names: Sequence[str], n_folds: int, fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(val, test) entities of ``fold`` of ``n_folds``: a seeded deal of the entities into folds;
    fold ``f`` tests its own and validates on fold ``f + 1``, so every entity is tested once."""
    for setting, value in (("n_folds", n_folds), ("fold", fold)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"dataset.{setting} must be an integer, got {value!r}")
    if not 3 <= n_folds <= len(names):
        raise DataError(
            f"dataset.n_folds must be in [3, {len(names)}] (train, val and test folds), got {n_folds}"
        )
    if not 0 <= fold < n_folds:
        raise DataError(f"dataset.fold must be in [0, {n_folds - 1}], got {fold}")
    order = np.random.default_rng([seed, 104729]).permutation(len(names))
    folds = [sorted((names[i] for i in part), key=_natural_key) for part in np.array_split(order, n_folds)]
    return folds[(fold + 1) % n_folds], folds[fold]


def asked_tasks(
    data: LabelledData,
    train_tasks: Sequence | None,
    val_tasks: Sequence,
    test_tasks: Sequence,
    require_disjoint: bool = True,
) -> dict[str, list[str]]:
    """The task names of each split as :func:`split_tasks` reads the settings (wildcards expanded,
    ``train_tasks: null`` = the rest), checked; for steps that must know the split first (synthetic
    anomalies are made from the training tasks' images only)."""
    return _asked_tasks(data, data.task_names, train_tasks, val_tasks, test_tasks, require_disjoint)


def _asked_tasks(data, names, train_tasks, val_tasks, test_tasks, require_disjoint) -> dict[str, list[str]]:
    known = set(names)
    asked: dict[str, list[str]] = {}
    for split, tasks in (("val", val_tasks), ("test", test_tasks), ("train", train_tasks)):
        if tasks is None:
            if split != "train":
                raise DataError(f"dataset.{split}_tasks must list tasks; only train_tasks may be null")
            used = set(asked["val"]) | set(asked["test"])
            tasks = [t for t in names if t not in used]
        tasks = _expand([str(t) for t in tasks], names)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise DataError(
                f"dataset.{split}_tasks: {unknown} not in {data.name} (it has {len(names)} tasks: "
                f"{names[:12]}{' ...' if len(names) > 12 else ''})"
            )
        if not tasks:
            raise DataError(f"dataset.{split}_tasks is empty: the {split} split needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise DataError(f"dataset.{split}_tasks lists a task twice: {tasks}")
        asked[split] = tasks
    if require_disjoint:
        overlap = set(asked["train"]) & (set(asked["val"]) | set(asked["test"]))
        if overlap:
            raise DataError(
                f"dataset.train_tasks overlaps val/test tasks {sorted(overlap, key=_natural_key)}; "
                "meta-testing must use unseen tasks (set dataset.require_disjoint=false to allow it)"
            )
    return {split: asked[split] for split in SPLITS}


def _owners(data: LabelledData, codes: np.ndarray, members: list[list[int]], seed: int) -> np.ndarray:
    """The split that owns each row (-1: none); a task listed in several splits has its rows dealt.
    A row made from another (``made_from``) goes where that row goes, so a synthetic variant of a
    validation image never lands in meta-training."""
    n_tasks = len(data.task_names)
    listed = np.zeros((len(SPLITS), n_tasks), bool)
    for s, tasks in enumerate(members):
        listed[s, tasks] = True
    count = listed.sum(0)
    owner = np.where(count == 1, listed.argmax(0), -1).astype(np.int8)[codes]
    shared = np.flatnonzero(count > 1)
    if len(shared):
        rng = np.random.default_rng([seed, 7919])
        order = np.argsort(codes, kind="stable")
        starts = np.searchsorted(codes[order], np.arange(n_tasks + 1))
        made = data.made_from
        for t in shared:  # in natural task order; val + test sharing: val gets [0::2], test [1::2]
            splits = np.flatnonzero(listed[:, t])
            rows = order[starts[t] : starts[t + 1]]
            rows = rng.permutation(rows if made is None else rows[made[rows] < 0])
            for j, s in enumerate(splits):
                owner[rows[j :: len(splits)]] = s
        if made is not None:
            derived = np.flatnonzero(made >= 0)
            owner[derived] = owner[made[derived]]
    return owner


def _first_half_of_each_task(codes: np.ndarray, rows_in: np.ndarray, n_tasks: int) -> np.ndarray:
    """Among the rows ``rows_in``, the first half (rounded up) of each task's rows, in row order."""
    selected = np.flatnonzero(rows_in)
    group = codes[selected]
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group, minlength=n_tasks)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rank = np.empty(len(selected), np.int64)
    rank[order] = np.arange(len(selected)) - starts[group[order]]
    first = np.zeros(len(codes), bool)
    first[selected[rank < (sizes[group] + 1) // 2]] = True
    return first


def _views(rows: np.ndarray, key: np.ndarray, tasks: list[str]) -> dict[str, np.ndarray]:
    """Each task's slice of ``rows``, which are sorted by ``key`` (the task's position in ``tasks``)."""
    starts = np.searchsorted(key, np.arange(len(tasks) + 1))
    return {t: rows[starts[i] : starts[i + 1]] for i, t in enumerate(tasks)}


def _check_rotations(data: LabelledData, train_rotations: Sequence[int]) -> tuple[int, ...]:
    turns = tuple(int(d) for d in (train_rotations or ()))
    if not turns:
        return ()
    bad = [d for d in turns if d not in ROTATIONS]
    if bad or len(set(turns)) != len(turns):
        raise DataError(
            f"dataset.train_rotations must be distinct values of {list(ROTATIONS)}, got {list(turns)}"
        )
    shape = data.x.shape[1:]
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DataError(
            f"dataset.train_rotations rotates square images (channels, size, size); {data.name} has "
            f"samples of shape {shape}"
        )
    names = set(data.task_names)
    clash = [f"{t}/rot{d}" for t in data.task_names for d in turns if f"{t}/rot{d}" in names]
    if clash:
        raise DataError(f"dataset.train_rotations: task names {clash[:5]} already exist in {data.name}")
    return turns


def _expand(entries: list[str], names: list[str]) -> list[str]:
    """Replace each wildcard entry that is not itself a task name by the tasks it matches, in order."""
    expanded, known = [], set(names)  # a set: with thousands of tasks, list membership was quadratic
    for entry in entries:
        matches = [] if entry in known else [n for n in names if fnmatch.fnmatchcase(n, entry)]
        expanded += matches or [entry]
    return expanded
