"""Data: sources -> task pools -> episodes -> the LightningDataModule.

The datamodule (which imports Lightning) is loaded on first use, so reading data and scoring with
a trained detector never pay for importing Lightning.
"""

from typing import Any

from metaad.data.episodes import Episode, EpisodeDataset, EpisodeSampler, collate_episodes
from metaad.data.errors import DataError
from metaad.data.preprocessing import Preprocessing
from metaad.data.tasks import LabelledData, TaskPool, split_tasks

__all__ = [
    "DataError",
    "Episode",
    "EpisodeDataModule",
    "EpisodeDataset",
    "EpisodeSampler",
    "LabelledData",
    "Preprocessing",
    "TaskPool",
    "collate_episodes",
    "split_tasks",
]


def __getattr__(name: str) -> Any:
    if name == "EpisodeDataModule":
        from metaad.data.datamodule import EpisodeDataModule

        return EpisodeDataModule
    raise AttributeError(f"module 'metaad.data' has no attribute {name!r}")
