"""One-class episodes drawn from a :class:`TaskPool`; knows nothing of models.

An episode picks a task, takes ``k_shot`` of its normal samples as the support set, and a query
set of ``n_query`` samples of which ``round(n_query * anomaly_ratio)`` are anomalies. Every
episode is a pure function of ``(seed, split, epoch, index)``: the same whatever the worker or
process count, fixed for val/test, fresh each epoch for training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from metaad.data.tasks import DataError, TaskPool

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
    ) -> None:
        self.pool, self.split, self.fixed = pool, split, fixed or split != "train"
        self.k_shot, self.n_query, self.n_episodes, self.seed = k_shot, n_query, n_episodes, seed
        self.n_anomalies = int(round(n_query * anomaly_ratio))
        self.n_normals = n_query - self.n_anomalies
        self._check()

    def _check(self) -> None:
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
        normals = rng.choice(pool.normal_rows[task], self.k_shot + self.n_normals, replace=False)
        anomalies = pool.draw_anomalies(rng, task, self.n_anomalies)
        query_rows = np.concatenate([normals[self.k_shot :], anomalies])
        label = np.concatenate([np.zeros(self.n_normals), np.ones(self.n_anomalies)])
        order = rng.permutation(self.n_query)
        query_rows, label = query_rows[order], label[order]
        return Episode(
            support=torch.from_numpy(pool.take(normals[: self.k_shot])),
            query=torch.from_numpy(pool.take(query_rows)),
            label=torch.from_numpy(label).long(),
            task=torch.tensor(pool.task_id[task]),
            query_task=torch.from_numpy(pool.task_ids(query_rows)).long(),
        )


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
