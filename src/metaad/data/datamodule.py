"""The LightningDataModule: a source, a task split and episode settings in; episode loaders out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from metaad.data.episodes import (
    EpisodeDataset,
    EpisodeSampler,
    Stream,
    check_episode_settings,
    collate_episodes,
)
from metaad.data.preprocessing import Preprocessing
from metaad.data.tasks import (
    DataError,
    LabelledData,
    StreamParts,
    TaskPool,
    asked_tasks,
    entity_folds,
    split_tasks,
)

log = logging.getLogger(__name__)


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch through Lightning's loader ``state_dict`` protocol.

    Its state (saved in every checkpoint) is the epoch and how many meta-batches the fit loop has
    trained on in it; loading it makes the sampler leave those episodes out, so a resumed run
    draws exactly the episode stream of an uninterrupted one. (Lightning restarts a plain
    map-style loader at the epoch's first batch, repeating episodes.)
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.skip(state["epoch"], state["batches_done"] * self.batch_size)


class EpisodeDataModule(pl.LightningDataModule):
    """Yields meta-batches of one-class episodes; val/test episodes are a fixed set.

    Under DDP each process scores a disjoint share of the fixed val/test episodes (interleaved,
    nothing padded or repeated) and the evaluator gathers them, so the metrics are exactly the
    single-process ones and evaluation time falls with the process count. The test stage runs
    over the validation episodes first (thresholds are fitted on them), then the test episodes
    (:meth:`test_dataloader` returns both). Training episodes are
    sharded across ranks by :class:`EpisodeSampler`, and ``meta_batch_size`` is the meta-batch
    of one optimizer step over all ranks (each takes ``meta_batch_size / world_size`` episodes):
    DDP averages the gradients of exactly the episodes one process would use for that step, so
    the run does not depend on the process count (up to float summation order).
    """

    def __init__(
        self,
        source: Callable[[], LabelledData],
        val_tasks: Sequence | None,
        test_tasks: Sequence | None,
        train_tasks: Sequence | None = None,
        k_shot: int = 5,
        n_query: int = 20,
        anomaly_ratio: float = 0.5,
        val_n_query: int | None = None,
        test_n_query: int | None = None,
        meta_batch_size: int = 8,
        train_episodes: int = 800,
        val_episodes: int = 200,
        test_episodes: int = 1000,
        eval_batch_size: int = 50,
        anomalies_from: str = "split",
        require_disjoint: bool = True,
        train_rotations: Sequence[int] = (),
        fixed_train_episodes: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        n_folds: int | None = None,
        fold: int = 0,
        fold_seed: int = 0,
        protocol: str = "entity_time",
        train_anomalies: str = "real",
        synthetic_kinds: Sequence[str] | None = None,
        synthetic_share: float = 0.5,
        support_draw: str = "random",
        scaling: str = "none",
        scale_clip: float = 100.0,
        synthetic_per_task: int = 64,
        extractor: Any = None,
        feature_cache: str = "outputs/cache/features",
        feature_batch: int = 32,
    ) -> None:
        """Series settings (``conf/dataset/_series.yaml``): ``n_folds`` / ``fold`` deal the entities
        into folds (``val_tasks`` and ``test_tasks`` then null); ``protocol`` entity_time (the
        default) or entity (the leaking variant, to measure the leak); ``train_anomalies`` real |
        synthetic | real+synthetic | one_vs_rest; ``support_draw`` random | first (the first K
        history windows); ``scaling: support`` standardises each episode by its support alone.

        Photographs (a source of 8-bit images, ``conf/dataset/image_folder.yaml``):
        ``train_anomalies`` real | synthetic | real+synthetic, the synthetic ones
        ``synthetic_per_task`` per training task of ``synthetic_kinds`` (cutpaste, noise), made from
        the training tasks' normal images only; ``extractor`` (a frozen feature extractor, given by
        ``metaad.apps.build`` when ``backbone`` is one) turns every image into patch features once,
        cached under ``feature_cache``, ``feature_batch`` images at a time."""
        super().__init__()
        if protocol not in ("entity_time", "entity"):
            raise DataError(f"dataset.protocol must be 'entity_time' or 'entity', got {protocol!r}")
        if n_folds is not None and (val_tasks is not None or test_tasks is not None):
            raise DataError(
                "dataset.n_folds deals the val and test entities; "
                "set dataset.val_tasks and test_tasks to null"
            )
        if n_folds is None and (val_tasks is None or test_tasks is None):
            raise DataError(
                "dataset.val_tasks and dataset.test_tasks must list tasks (or set dataset.n_folds)"
            )
        self.folds = None if n_folds is None else (n_folds, fold, fold_seed)
        # injected anomalies for training (train_anomalies) and for validation entities without a
        # real incident before the cut; only series pools use them
        # injected anomalies of series windows (the series pools use them), or the kinds of
        # synthetic image defects (data.synthetic)
        from metaad.data.series import KINDS, SyntheticAnomalies
        from metaad.data.synthetic import IMAGE_KINDS, check_kinds

        kinds = tuple(synthetic_kinds or ())
        image_kinds = bool(kinds) and set(kinds) <= set(IMAGE_KINDS)
        synthetic = SyntheticAnomalies(KINDS if image_kinds else kinds or KINDS, seed=seed)
        self.synthetic_kinds = check_kinds(kinds if image_kinds else None)
        self.synthetic_per_task = synthetic_per_task
        self.extractor, self.feature_cache, self.feature_batch = extractor, feature_cache, feature_batch
        self.fixed_train_episodes = bool(fixed_train_episodes)
        n_queries = {
            "train": n_query,
            "val": n_query if val_n_query is None else val_n_query,
            "test": n_query if test_n_query is None else test_n_query,
        }
        check_episode_settings(
            dict(
                k_shot=k_shot,
                n_query=n_query,
                val_n_query=val_n_query,
                test_n_query=test_n_query,
                anomaly_ratio=anomaly_ratio,
                meta_batch_size=meta_batch_size,
                train_episodes=train_episodes,
                val_episodes=val_episodes,
                test_episodes=test_episodes,
                eval_batch_size=eval_batch_size,
            )
        )
        self.source = source
        self.split_args = dict(
            train_tasks=train_tasks,
            val_tasks=val_tasks,
            test_tasks=test_tasks,
            require_disjoint=require_disjoint,
            anomalies_from=anomalies_from,
            seed=seed,
            train_rotations=tuple(train_rotations or ()),
            time_cut=protocol == "entity_time",
            train_anomalies=train_anomalies,
            synthetic=synthetic,
            synthetic_share=synthetic_share,
        )
        self.protocol = protocol
        self.episode_args = dict(
            k_shot=k_shot,
            anomaly_ratio=anomaly_ratio,
            seed=seed,
            support_draw=support_draw,
            scaling=scaling,
            scale_clip=scale_clip,
        )
        self.n_queries = n_queries
        self.n_episodes = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.meta_batch_size, self.eval_batch_size = meta_batch_size, eval_batch_size
        self.num_workers = num_workers
        # meta-batches the fit loop has trained on in the current epoch: the training layer, which
        # knows the loop, sets this (metaad.training.module); 0 outside fitting
        self.batches_done: Callable[[], int] = lambda: 0
        self.pools: dict[str, TaskPool] = {}
        self.datasets: dict[str, EpisodeDataset] = {}
        self._preprocessing: Preprocessing | None = None
        self._data_name: str | None = None
        self._streams: StreamParts | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the source and check every split can supply its episodes (idempotent)."""
        if self.datasets:
            return
        data = self.source()
        args = dict(self.split_args)
        if self.folds is not None:
            args["val_tasks"], args["test_tasks"] = entity_folds(data.task_names, *self.folds)
        data = self._images(data, args)
        if self.protocol == "entity" and data.period is not None:
            log.warning(
                "%s: dataset.protocol=entity: meta-training and validation see the held-out entities' "
                "query period (a leak through time, kept only to measure it)",
                data.name,
            )
        self.pools = split_tasks(data, **args)
        self._preprocessing, self._data_name = data.preprocessing, data.name
        self._streams = data.streams
        if data.preprocessing.is_series:  # the scaling rule travels with the model's windows
            self._preprocessing = dataclasses.replace(
                data.preprocessing,
                scaling=self.episode_args["scaling"],
                scale_clip=float(self.episode_args["scale_clip"]),
            )
        self.datasets = {
            split: EpisodeDataset(
                pool,
                split,
                n_query=self.n_queries[split],
                n_episodes=self.n_episodes[split],
                fixed=self.fixed_train_episodes,
                **self.episode_args,
            )
            for split, pool in self.pools.items()
        }

    def _images(self, data: LabelledData, args: dict[str, Any]) -> LabelledData:
        """8-bit images: synthetic defects of the training tasks, then patch features (if asked)."""
        if data.x.dtype != np.uint8:
            if self.extractor is not None:
                raise DataError(
                    f"{data.name}: the backbone is a frozen feature extractor of photographs, but this "
                    "dataset holds no 8-bit images (use dataset=image_folder or elpv)"
                )
            return data
        from metaad.data.synthetic import add_rotations, add_synthetic

        asked = asked_tasks(
            data, args["train_tasks"], args["val_tasks"], args["test_tasks"], args["require_disjoint"]
        )
        if "synthetic" in args["train_anomalies"]:
            seed = self.episode_args["seed"]
            data = add_synthetic(data, asked["train"], self.synthetic_per_task, self.synthetic_kinds, seed)
        if self.extractor is None:
            return data
        turns = args["train_rotations"]
        if turns:  # features cannot be turned: the turned images become tasks of their own
            data = add_rotations(data, asked["train"], turns)
            args["train_rotations"] = ()
            if args["train_tasks"] is not None:
                args["train_tasks"] = [
                    *asked["train"],
                    *(f"{t}/rot{d}" for d in turns for t in asked["train"]),
                ]
        from metaad.data.features import FeatureCache, with_features

        return with_features(data, FeatureCache(self.feature_cache, self.extractor, self.feature_batch))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(64,)`` or ``(1, 28, 28)``; needs :meth:`setup` first."""
        if not self.pools:
            raise RuntimeError("call setup() before asking for sample_shape")
        return self.pools["train"].sample_shape

    def task_names(self, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, list[str]]:
        """The tasks of each split (rotated copies of training tasks left out); needs :meth:`setup`."""
        if not self.pools:
            raise RuntimeError("call setup() before asking for task_names")
        named = {}
        for split in splits:
            pool = self.pools[split]
            named[split] = [str(t) for t in pool.tasks[: len(pool.tasks) // (1 + len(pool.rotations))]]
        return named

    def test_streams(self) -> Iterator[Stream | str] | None:
        """Each held-out entity's test part after the cut, one at a time (:meth:`EpisodeDataset.streams`;
        a line where one cannot be measured); None for data that is not a series of entities."""
        if not self.datasets:
            raise RuntimeError("call setup() before asking for test_streams")
        if self._streams is None:
            return None
        return self.datasets["test"].streams(self._streams)

    @property
    def preprocessing(self) -> Preprocessing:
        """What the source did to raw samples (store ``.to_dict()`` with a model); needs :meth:`setup`."""
        if self._preprocessing is None:
            raise RuntimeError("call setup() before asking for preprocessing")
        return self._preprocessing

    @property
    def data_name(self) -> str:
        """The data the source read, e.g. ``mnist (full, ../shared/data/mnist)``; needs :meth:`setup`."""
        if self._data_name is None:
            raise RuntimeError("call setup() before asking for data_name")
        return self._data_name

    def _loader(self, split: str, batch_size: int, sampler: EpisodeSampler, **kwargs: Any) -> DataLoader:
        return (ResumableLoader if split == "train" else DataLoader)(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            drop_last=split == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_episodes,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        if self.meta_batch_size % world:
            raise DataError(
                f"dataset.meta_batch_size ({self.meta_batch_size}) must be divisible by the number of "
                f"processes ({world}): it is the meta-batch of one optimizer step, split across them"
            )
        sampler = EpisodeSampler(self.n_episodes["train"], rank, world)
        return self._loader(
            "train", self.meta_batch_size // world, sampler, batches_done=lambda: self.batches_done()
        )

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the fixed validation episodes (gathered by the evaluator)."""
        return self.evaluation_loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        """The validation episodes, on which thresholds are fitted, then the test episodes."""
        return [self.evaluation_loader("val"), self.evaluation_loader("test")]

    def evaluation_loader(self, split: str) -> DataLoader:
        sampler = EpisodeSampler(self.n_episodes[split], *self._rank(), drop_remainder=False)
        return self._loader(split, self.eval_batch_size, sampler)
