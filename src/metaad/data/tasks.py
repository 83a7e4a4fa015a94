"""Labelled arrays grouped into tasks, and the split of tasks into meta-train / val / test.

A *source* (see ``sources``) returns one :class:`LabelledData`; this module turns it into a
:class:`TaskPool` per split. It knows nothing of episodes or models.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Bad data or a bad data setting; the message names the file, field or setting."""


@dataclass(frozen=True)
class LabelledData:
    """Everything a source knows: samples, the task each belongs to, and (optionally) anomaly labels.

    ``anomalous is None`` means one-vs-rest tasks (a class is a task; its anomalies are other
    classes). Otherwise each task carries its own normals (``False``) and anomalies (``True``),
    as in the ADBench one-file-per-task format.
    """

    x: np.ndarray  # (N, *sample_shape) float32
    task: np.ndarray  # (N,) str: class or task name of each row
    anomalous: np.ndarray | None = None  # (N,) bool, or None for one-vs-rest
    name: str = "data"

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or len(self.x) == 0:
            raise DataError(
                f"{self.name}: expected a non-empty (N, features...) array, got shape {self.x.shape}"
            )
        if len(self.task) != len(self.x):
            raise DataError(f"{self.name}: {len(self.x)} samples but {len(self.task)} task labels")
        if self.anomalous is not None and len(self.anomalous) != len(self.x):
            raise DataError(f"{self.name}: {len(self.x)} samples but {len(self.anomalous)} anomaly labels")
        bad = ~np.isfinite(self.x.reshape(len(self.x), -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataError(
                f"{self.name}: {len(rows)} row(s) contain NaN or inf (first rows: {rows[:5].tolist()})"
            )

    @property
    def task_names(self) -> list[str]:
        return sorted(set(self.task.tolist()), key=_natural_key)


def _natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


@dataclass(frozen=True)
class TaskPool:
    """The tasks of one split: for each task, the rows of its normals and of its anomalies.

    ``task_id`` is the task's index in the full data (stable across splits) so learners that
    classify between tasks (N-way ProtoNet) can use it as a class label.
    """

    x: np.ndarray
    tasks: list[str]
    task_id: dict[str, int]
    normal_rows: dict[str, np.ndarray]
    anomaly_rows: dict[str, np.ndarray]
    row_task_id: np.ndarray  # (N,) task id of each row; -1 for in-task anomalies
    name: str = "data"  # the source's name, for messages

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def split_tasks(
    data: LabelledData,
    train_tasks: Sequence | None,
    val_tasks: Sequence,
    test_tasks: Sequence,
    require_disjoint: bool = True,
    anomalies_from: str = "split",
    seed: int = 0,
) -> dict[str, TaskPool]:
    """Build the ``train`` / ``val`` / ``test`` pools.

    ``train_tasks: null`` means every task not used for val or test. A listed entry with shell
    wildcards (``Greek/*``, ``MVTec-AD_*``) stands for every task it matches. When val and test share a
    task, its rows are halved (seeded) so no sample is both tuned on and tested on.
    ``anomalies_from``: ``split`` draws a one-vs-rest task's anomalies from the other classes of
    the same split; ``all`` from every other class (OC-MAML's MT-MNIST protocol).
    """
    if anomalies_from not in ("split", "all"):
        raise DataError(f"dataset.anomalies_from must be 'split' or 'all', got {anomalies_from!r}")
    names = data.task_names
    known = set(names)
    asked = {}
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

    task_id = {t: i for i, t in enumerate(names)}
    rows_of = {t: np.flatnonzero(data.task == t) for t in names}
    shared = set(asked["val"]) & set(asked["test"])
    rng = np.random.default_rng([seed, 7919])
    halves: dict[str, dict[str, np.ndarray]] = {"val": {}, "test": {}}
    for t in sorted(shared, key=_natural_key):
        rows = rng.permutation(rows_of[t])
        halves["val"][t], halves["test"][t] = np.sort(rows[0::2]), np.sort(rows[1::2])

    pools = {}
    for split, tasks in asked.items():
        own = {t: halves.get(split, {}).get(t, rows_of[t]) for t in tasks}
        pools[split] = _pool(data, tasks, own, task_id, rows_of, anomalies_from)
    return pools


def _expand(entries: list[str], names: list[str]) -> list[str]:
    """Replace each wildcard entry that is not itself a task name by the tasks it matches, in order."""
    expanded = []
    for entry in entries:
        matches = [] if entry in names else [n for n in names if fnmatch.fnmatchcase(n, entry)]
        expanded += matches or [entry]
    return expanded


def _pool(data, tasks, own_rows, task_id, rows_of, anomalies_from) -> TaskPool:
    normal, anomaly = {}, {}
    if data.anomalous is None:
        others_of = own_rows if anomalies_from == "split" else rows_of
        for t in tasks:
            normal[t] = own_rows[t]
            anomaly[t] = np.concatenate([r for o, r in others_of.items() if o != t] or [np.array([], int)])
        row_task_id = np.array([task_id[t] for t in data.task])
    else:
        for t in tasks:
            rows = own_rows[t]
            normal[t], anomaly[t] = rows[~data.anomalous[rows]], rows[data.anomalous[rows]]
        row_task_id = np.where(data.anomalous, -1, [task_id[t] for t in data.task])
    return TaskPool(
        x=data.x,
        tasks=list(tasks),
        task_id={t: task_id[t] for t in tasks},
        normal_rows=normal,
        anomaly_rows=anomaly,
        row_task_id=row_task_id,
        name=data.name,
    )
