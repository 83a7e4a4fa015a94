"""Data: sources -> task pools -> episodes -> the LightningDataModule."""

from metaad.data.datamodule import EpisodeDataModule
from metaad.data.episodes import Episode, EpisodeDataset, EpisodeSampler
from metaad.data.tasks import DataError, LabelledData, TaskPool, split_tasks

__all__ = [
    "DataError",
    "Episode",
    "EpisodeDataModule",
    "EpisodeDataset",
    "EpisodeSampler",
    "LabelledData",
    "TaskPool",
    "split_tasks",
]
