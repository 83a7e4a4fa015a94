"""One-class episodes drawn from a :class:`TaskPool`; knows nothing of models.

An episode picks a task, takes ``k_shot`` of its normal samples as the support set, and a query
set of ``n_query`` samples of which ``round(n_query * anomaly_ratio)`` are anomalies. Every
episode is a pure function of ``(seed, split, epoch, index)``: the same whatever the worker or
process count, fixed for val/test, fresh each epoch for training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from metaad.data.tasks import DataError, StreamParts, TaskPool

log = logging.getLogger(__name__)

SPLIT_ID = {"train": 0, "val": 1, "test": 2}
POSITIVE_INTS = (
    "k_shot",
    "n_query",
    "meta_batch_size",
    "train_episodes",
    "val_episodes",
    "test_episodes",
    "eval_batch_size",
)


def check_episode_settings(settings: Mapping[str, Any], error: type[Exception] = DataError) -> None:
    """The episode settings (``dataset.*``) that are present, checked once for the config gate
    (``metaad.apps.checks``, before any data is read) and the datamodule alike; raises ``error``."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for key in POSITIVE_INTS:
        if key in settings and not whole(settings[key]):
            raise error(f"dataset.{key} must be a positive integer, got {settings[key]!r}")
    for key in ("val_n_query", "test_n_query"):
        value = settings.get(key)
        if value is not None and not whole(value):
            raise error(f"dataset.{key} must be a positive integer or null (= n_query), got {value!r}")
    if "anomaly_ratio" in settings:
        ratio = settings["anomaly_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio):
            raise error(f"dataset.anomaly_ratio must be a number, got {ratio!r}")
        if not 0.0 < ratio < 1.0:
            raise error(f"dataset.anomaly_ratio must be in (0, 1) so queries hold both kinds, got {ratio}")
        for key in ("n_query", "val_n_query", "test_n_query"):
            size = settings.get(key)  # a null val/test size is n_query, checked as such
            if isinstance(size, int) and not 0 < round(size * ratio) < size:
                raise error(
                    f"dataset.{key}={size} with anomaly_ratio={ratio} gives {round(size * ratio)} anomalies; "
                    "a query needs at least one normal and one anomaly"
                )
    episodes, batch = settings.get("train_episodes"), settings.get("meta_batch_size")
    if isinstance(episodes, int) and isinstance(batch, int) and episodes < batch:
        raise error(
            f"dataset.train_episodes ({episodes}) is smaller than dataset.meta_batch_size ({batch}), "
            "so an epoch holds no meta-batch"
        )


class Episode(NamedTuple):
    """One episode, or a meta-batch of them after collation (a leading ``B`` on every field)."""

    support: Tensor  # (K, *x) normal samples of the task
    query: Tensor  # (Q, *x)
    label: Tensor  # (Q,) 1 = anomaly, 0 = normal
    task: Tensor  # () task id of the normal task
    query_task: Tensor  # (Q,) task id each query sample comes from (-1: an in-task anomaly)
    index: Tensor | None = None  # () the episode's index in its split (EpisodeDataset sets it)
    query_masks: Tensor | None = None  # (Q, H, W) bool defect maps (all False for normals), or None


def collate_episodes(episodes: list[Episode]) -> Episode:
    """A meta-batch: each field stacked (a leading ``B``); a field None in every episode stays None."""
    from torch.utils.data import default_collate

    fields = []
    for values in zip(*episodes, strict=True):
        absent = [v is None for v in values]
        if any(absent) and not all(absent):
            raise DataError("a meta-batch mixes episodes with and without a field (query_masks or index)")
        fields.append(None if absent[0] else default_collate(list(values)))
    return Episode(*fields)


class EpisodeDataset(Dataset):
    """Map-style episodes; an index is ``(epoch, i)`` so training episodes change between epochs
    (unless ``fixed``: the same episodes every epoch, as val/test always are; ``debug=overfit``)."""

    def __init__(
        self,
        pool: TaskPool,
        split: str,
        k_shot: int,
        n_query: int,
        anomaly_ratio: float,
        n_episodes: int,
        seed: int,
        fixed: bool = False,
        support_draw: str = "random",
        scaling: str = "none",
        scale_clip: float = 100.0,
    ) -> None:
        self.pool, self.split, self.fixed = pool, split, fixed or split != "train"
        self.k_shot, self.n_query, self.n_episodes, self.seed = k_shot, n_query, n_episodes, seed
        self.n_anomalies = int(round(n_query * anomaly_ratio))
        self.n_normals = n_query - self.n_anomalies
        if support_draw not in ("random", "first"):
            raise DataError(f"dataset.support_draw must be 'random' or 'first', got {support_draw!r}")
        if scaling not in ("none", "support"):
            raise DataError(f"dataset.scaling must be 'none' or 'support', got {scaling!r}")
        if isinstance(scale_clip, bool) or not isinstance(scale_clip, int | float) or not scale_clip > 0:
            raise DataError(f"dataset.scale_clip must be a positive number, got {scale_clip!r}")
        self.support_draw, self.scaling, self.scale_clip = support_draw, scaling, float(scale_clip)
        self._check()

    def _check(self) -> None:
        if self.pool.lenient:
            self._check_series()
            return
        if self.pool.support_rows is not None:
            self._check_held_out()
            return
        need_normal = self.k_shot + self.n_normals
        for t in self.pool.tasks:
            have_n, have_a = len(self.pool.normal_rows[t]), self.pool.n_anomalies(t)
            if have_n < need_normal:
                raise DataError(
                    f"{self.pool.name}: {self.split} task {t!r} has {have_n} normal samples but an "
                    f"episode needs dataset.k_shot ({self.k_shot}) + normal queries ({self.n_normals}) "
                    f"= {need_normal}; lower k_shot or n_query"
                )
            if have_a < self.n_anomalies:
                alone = " (it is alone in its split: list more tasks or use anomalies_from=source_test)"
                one_vs_rest_alone = have_a == 0 and len(self.pool.tasks) == 1 and not self.pool.own_anomalies
                alone = alone if one_vs_rest_alone else ""
                raise DataError(
                    f"{self.pool.name}: {self.split} task {t!r} has {have_a} anomalies but an episode needs "
                    f"{self.n_anomalies} (dataset.n_query x dataset.anomaly_ratio); "
                    f"lower n_query or anomaly_ratio{alone}"
                )

    def _check_held_out(self) -> None:
        """Held-out tasks with their own support rows (an image folder's ``train/good``): K of those,
        the queries from the task's other rows, all drawn without replacement."""
        pool = self.pool
        for t in pool.tasks:
            counts = (len(pool.support_rows[t]), len(pool.normal_rows[t]), pool.n_anomalies(t))
            needs = (self.k_shot, self.n_normals, self.n_anomalies)
            what = ("support normals (train/good)", "normal queries (test/good)", "anomalous queries")
            for have, need, name in zip(counts, needs, what, strict=True):
                if have < need:
                    raise DataError(
                        f"{pool.name}: {self.split} task {t!r} has {have} {name} but an episode needs "
                        f"{need} (dataset.k_shot={self.k_shot}, n_query={self.n_query}, "
                        f"{self.n_normals} normal and {self.n_anomalies} anomalous queries); lower k_shot, "
                        "n_query or anomaly_ratio"
                    )

    def _check_series(self) -> None:
        """Series val/test pools: the support from history, queries from the task's own periods.

        An entity with too little history for K support windows is an error naming it; one with
        no anomalous (or no normal) query window in its period cannot be scored and is left out of
        the split, named in a warning; one with fewer anomalous windows than a query holds has
        them drawn with replacement (named too); a validation entity without any has them injected."""
        pool, kept, dropped, repeated, injected = self.pool, [], [], [], []
        for t in pool.tasks:
            history = pool.support_rows is not None
            have_s = len(pool.support_rows[t] if history else pool.normal_rows[t])
            need = self.k_shot if history else self.k_shot + self.n_normals
            if have_s < need:
                raise DataError(
                    f"{pool.name}: {self.split} entity {t!r} has {have_s} normal "
                    f"{'history ' if history else ''}windows but an episode needs {need} (dataset.k_shot="
                    f"{self.k_shot}{'' if history else ' + normal queries'}); "
                    "lower k_shot or the window / stride"
                )
            have_n, have_a = len(pool.normal_rows[t]), pool.n_anomalies(t)
            if pool.synthetic is not None and pool.synthetic_share == 0 and have_n and not pool._n_real(t):
                injected.append(t)
            if have_n == 0 or have_a == 0:
                dropped.append(f"{t} ({have_n} normal, {have_a} anomalous)")
                continue
            if have_a < self.n_anomalies or have_n < self.n_normals:
                repeated.append(f"{t} ({have_n} normal, {have_a} anomalous)")
            kept.append(t)
        if dropped:
            log.warning(
                "%s: %d %s entities have no anomalous or no normal query window in their period and "
                "are left out of the %s split: %s",
                pool.name, len(dropped), self.split, self.split, ", ".join(dropped[:10]),
            )  # fmt: skip
        if repeated:
            log.warning(
                "%s: %d %s entities have fewer query windows than an episode holds; theirs are drawn "
                "with replacement: %s",
                pool.name, len(repeated), self.split, ", ".join(repeated[:10]),
            )  # fmt: skip
        if injected:
            log.warning(
                "%s: %d %s entities have no real incident in their period; theirs are injected: %s",
                pool.name, len(injected), self.split, ", ".join(injected[:10]),
            )  # fmt: skip
        if not kept:
            raise DataError(
                f"{pool.name}: no {self.split} entity has both normal and anomalous query windows"
            )
        if dropped:
            self.pool = dataclasses.replace(pool, tasks=kept)

    def __len__(self) -> int:
        return self.n_episodes

    def __getitem__(self, index: tuple[int, int] | int) -> Episode:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        if self.fixed:
            epoch = 0  # Lightning sets the epoch on eval samplers too; val/test episodes stay fixed
        rng = np.random.default_rng([self.seed, SPLIT_ID[self.split], epoch, i])
        pool = self.pool
        # Training draws tasks at random; evaluation cycles through them so every task is covered evenly.
        task = (
            pool.tasks[rng.integers(len(pool.tasks))]
            if self.split == "train"
            else pool.tasks[i % len(pool.tasks)]
        )
        if pool.support_rows is None:
            normals = rng.choice(pool.normal_rows[task], self.k_shot + self.n_normals, replace=False)
            support_rows, normals = normals[: self.k_shot], normals[self.k_shot :]
            anomalies = pool.draw_anomalies(rng, task, self.n_anomalies, replace=pool.lenient)
        else:  # series: the support from the entity's history, queries from its own period
            support_rows = self._history_support(rng, task)
            own = pool.normal_rows[task]
            repeat = pool.lenient and len(own) < self.n_normals
            normals = rng.choice(own, self.n_normals, replace=repeat)
            anomalies = pool.draw_anomalies(rng, task, self.n_anomalies, replace=pool.lenient)
        query_rows = np.concatenate([normals, anomalies])
        label = np.concatenate([np.zeros(self.n_normals), np.ones(self.n_anomalies)])
        order = rng.permutation(self.n_query)
        query_rows, label = query_rows[order], label[order]
        support, query = pool.take(support_rows), pool.take(query_rows)
        if self.scaling == "support":
            support, query = scale_by_support(support, query, self.scale_clip)
        masks = pool.take_masks(query_rows)
        return Episode(
            support=torch.from_numpy(support),
            query=torch.from_numpy(query),
            label=torch.from_numpy(label).long(),
            task=torch.tensor(pool.task_id[task]),
            query_task=torch.from_numpy(pool.task_ids(query_rows)).long(),
            index=torch.tensor(i),
            query_masks=None if masks is None else torch.from_numpy(masks),
        )

    def _history_support(self, rng: np.random.Generator, task: str) -> np.ndarray:
        history = self.pool.support_rows[task]
        if self.support_draw == "first":
            return history[: self.k_shot]
        return rng.choice(history, self.k_shot, replace=False)

    def streams(self, parts: StreamParts) -> Iterator[Stream | str]:
        """Each entity's test part from the time cut on, as a :class:`Stream`, one at a time.

        The ``W - 1`` steps before the cut are context (so the window ending at the cut's first
        step is scored); the support is the one of the entity's first episode here (the same draw,
        ``support_draw`` included) and the series is scaled by it as its episodes are. A part that
        cannot be measured (shorter than a window, or only normal or only anomalous steps from
        the cut on) gives a line saying so instead.
        """
        pool, values = self.pool, self.pool.x
        window = int(values.shape[1])
        names = {pool.task_id[t]: t for t in pool.tasks}
        for p in range(len(parts.entity)):
            task = names.get(int(parts.entity[p]))
            if task is None:  # not an entity of this split (or left out of it)
                continue
            first = max(int(parts.start[p]), int(parts.cut[p]) - (window - 1))
            stop = int(parts.stop[p])
            if stop - first < window:
                yield f"{task}: {stop - first} step(s) from the cut on (with context), fewer than a window"
                continue
            labels = parts.labels(first + window - 1, stop)
            if labels.all() or not labels.any():
                kind = "anomalous" if labels.all() else "normal"
                yield f"{task}: every step from the cut on is {kind}; a stream metric needs both"
                continue
            i = pool.tasks.index(task)  # evaluation cycles the tasks: episode i is entity i's first
            rng = np.random.default_rng([self.seed, SPLIT_ID[self.split], 0, i])
            support, series = pool.take(self._history_support(rng, task)), values.steps(first, stop)
            if self.scaling == "support":
                mean, spread = support_statistics(support)
                support = scale_with(support, mean, spread, self.scale_clip)
                series = scale_with(series, mean, spread, self.scale_clip)
            yield Stream(task, support, series, labels)


@dataclasses.dataclass(frozen=True)
class Stream:
    """One entity's series to score step by step: ``support`` ``(K, W, D)`` (what the detector adapts
    to), ``series`` ``(T, D)`` whose first ``W - 1`` steps are context, ``labels`` ``(T - W + 1,)``
    0/1 of the steps that get a score (the last of each window)."""

    entity: str
    support: np.ndarray
    series: np.ndarray
    labels: np.ndarray


def scale_by_support(
    support: np.ndarray, query: np.ndarray, clip: float = 100.0
) -> tuple[np.ndarray, np.ndarray]:
    """Support and query standardised per metric (the last axis) with the support's mean and spread
    only, as a deployment sees a new entity: nothing of the query period sets the scale. A spread
    below ``1e-3 * (1 + |mean|)`` (a constant metric) is raised to it; values are clipped to
    ``+-clip`` so that a metric constant in the support cannot blow up the inputs."""
    mean, spread = support_statistics(support)
    return scale_with(support, mean, spread, clip), scale_with(query, mean, spread, clip)


def support_statistics(support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each metric's (last axis) mean and spread over every step of ``support``, in float64; the
    spread raised to ``1e-3 * (1 + |mean|)`` where smaller (see :func:`scale_by_support`)."""
    steps = support.reshape(-1, support.shape[-1]).astype(np.float64)
    mean, spread = steps.mean(axis=0), steps.std(axis=0)
    return mean, np.maximum(spread, 1e-3 * (1.0 + np.abs(mean)))


def scale_with(x: np.ndarray, mean: np.ndarray, spread: np.ndarray, clip: float) -> np.ndarray:
    """``x`` standardised by :func:`support_statistics`, clipped to ``+-clip``, as float32."""
    return np.clip((x - mean) / spread, -clip, clip).astype(np.float32)


class EpisodeSampler(Sampler):
    """Yields ``(epoch, i)`` for this process's share of the episodes.

    Ranks take interleaved indices (rank ``r`` of ``W`` the episodes ``r, r + W, ...``), so the
    union over ranks is the single-process set of episodes and none is padded or repeated. For
    training a remainder of fewer than ``world_size`` is left out so every rank takes the same
    number of optimizer steps; evaluation (``drop_remainder=False``) keeps every episode.
    Lightning calls ``set_epoch`` every epoch.

    A run resumed mid-epoch calls :meth:`skip` so the episodes already trained on are not drawn
    again; ``len`` stays the epoch's full share because Lightning counts the batches already done.
    """

    def __init__(
        self, n_episodes: int, rank: int = 0, world_size: int = 1, drop_remainder: bool = True
    ) -> None:
        self.n_episodes, self.rank, self.world_size = n_episodes, rank, world_size
        self.drop_remainder = drop_remainder
        self.epoch = 0
        self.skipped: tuple[int, int] = (0, 0)  # (epoch, this rank's leading indices left out in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, epoch: int, n: int) -> None:
        """Leave out this rank's first ``n`` indices of ``epoch`` (consumed before a restart)."""
        self.skipped = (epoch, n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, indices = self.epoch, self._indices()
        start = self.skipped[1] if self.skipped[0] == epoch else 0
        return ((epoch, i) for i in indices[start:])

    def __len__(self) -> int:
        return len(self._indices())

    def _indices(self) -> range:
        end = self.n_episodes - self.n_episodes % self.world_size if self.drop_remainder else self.n_episodes
        return range(self.rank, end, self.world_size)
