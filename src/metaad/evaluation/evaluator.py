"""One evaluator for every detector: learners and baselines are scored alike, on the same episodes.

The evaluator keeps, per detector and split, what each episode gave (raw scores, labels and the
normalised scores a threshold decides on), tagged with the episode's index. Records are plain
tensors, so the shares of several processes are gathered into exactly the one-process set
(:meth:`Evaluator.gather`). :meth:`Evaluator.finish` then fits each threshold that learns from
validation on the validation records it already holds, turns scores into decisions and
summarises every metric over episodes (mean and 95% CI). It never asks a detector what it is:
the learner is the detector named ``learner`` (its config name: ``protonet``, ``maml``, ...), the one
the run's own threshold decides for.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metaad.data.episodes import Episode
from metaad.detectors.base import Detector
from metaad.evaluation.metrics import EpisodeMetrics
from metaad.evaluation.pixel_metrics import PIXEL_METRICS, episode_pixel_metrics
from metaad.evaluation.results import Summary
from metaad.evaluation.thresholds import NonFiniteScores, Scored, Threshold, score_episodes

FIELDS = ("index", "scores", "labels", "normalised", "support_normalised", "task", *PIXEL_METRICS)
CI_OVER = ("episode", "task")


@dataclass
class Records:
    """What one detector gave on the episodes of one split, in the order they were scored."""

    parts: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    k_shot: int = 0

    def add(
        self,
        index: Tensor,
        scored: Scored,
        labels: Tensor,
        k_shot: int,
        task: Tensor | None = None,
        pixels: dict[str, Tensor] | None = None,
    ) -> None:
        self.k_shot = k_shot
        values = (index, scored.scores.detach(), labels, scored.normalised, scored.support_normalised, task)
        values += tuple((pixels or {}).get(name) for name in PIXEL_METRICS)
        for name, value in zip(FIELDS, values):
            if value is not None:
                self.parts[name].append(value.cpu())

    def get(self, name: str) -> Tensor | None:
        return torch.cat(self.parts[name]) if self.parts.get(name) else None

    def state(self) -> dict[str, Any]:
        return {"k_shot": self.k_shot, **{name: self.get(name) for name in FIELDS}}

    @classmethod
    def merged(cls, states: list[dict[str, Any]]) -> Records:
        """The records of several processes as one, ordered by episode index."""
        records = cls(k_shot=max(s["k_shot"] for s in states))
        present = [s for s in states if s["index"] is not None]
        if not present:
            return records
        index = torch.cat([s["index"] for s in present])
        order = index.argsort()
        for name in FIELDS:
            if all(s[name] is not None for s in present):
                records.parts[name] = [torch.cat([s[name] for s in present])[order]]
        return records


@dataclass
class Report:
    """Every detector's metrics per split, and the thresholds behind the decisions."""

    learner: str  # the learner's name among the detectors
    metrics: dict[str, dict[str, dict[str, Summary]]]  # split -> detector -> metric -> summary
    thresholds: dict[str, Threshold]  # detector -> its (fitted) rule
    per_episode_thresholds: dict[tuple[str, str], Tensor]  # (split, detector) -> (E,) thresholds
    notes: dict[str, str]  # detector -> why its threshold could not decide
    records: dict[tuple[str, str], Records]


class Evaluator:
    """Scores detectors on episodes and summarises them; ``threshold`` is the learner's rule.

    ``baselines`` are scored wherever :meth:`detectors` is asked for the test split. Each baseline
    decides by its own copy of ``baseline_threshold`` (or, with ``threshold.baselines``, of the
    learner's rule), fitted on its own validation scores: so a learner with a rule of its own
    (OC-MAML's sigmoid > 0.5) stands beside baselines thresholded on validation tasks.

    ``ci_over``: ``episode`` (each episode one value) or ``task`` (episodes of one task, e.g. one
    entity of a series dataset, averaged first; the CI is over tasks, ``n_groups`` of them).
    ``score_chunk``: query samples of a batch scored at once (None: all), which bounds memory.

    Test episodes that carry ``query_masks`` (B, Q, S, S) get pixel AUROC and PRO per episode from
    every detector that answers ``score_maps`` (not validation ones: nothing is selected on them),
    its maps upsampled to (S, S) (blurred by ``map_sigma`` pixels unless 0); summarised over
    episodes like the others (an episode whose anomalies have no defect pixel has none, and is left
    out of those two).
    """

    def __init__(
        self,
        baselines: Mapping[str, Detector] | None = None,
        threshold: Threshold | None = None,
        baseline_threshold: Threshold | None = None,
        ci_over: str = "episode",
        learner: str = "learner",
        score_chunk: int | None = None,
        map_sigma: float = 0.0,
    ):
        if ci_over not in CI_OVER:
            raise ValueError(f"ci_over must be one of {CI_OVER}, got {ci_over!r}")
        if isinstance(map_sigma, bool) or not isinstance(map_sigma, int | float) or not map_sigma >= 0:
            raise ValueError(
                f"map_sigma (the anomaly maps' blur, pixels) must be a number >= 0, got {map_sigma!r}"
            )
        self.ci_over = ci_over
        self.score_chunk = score_chunk
        self.map_sigma = float(map_sigma)
        self.baselines = dict(baselines or {})
        if learner in self.baselines:
            raise ValueError(
                f"the learner {learner!r} has the name of a baseline; rename one (names.model=...)"
            )
        self.learner = learner
        self.threshold = threshold
        if baseline_threshold is None and threshold is not None and threshold.baselines:
            baseline_threshold = threshold
        self.baseline_threshold = baseline_threshold
        self._baseline_thresholds: dict[str, Threshold] = {}
        self.reset()

    def reset(self) -> None:
        self.records: dict[tuple[str, str], Records] = {}
        self._seen: dict[tuple[str, str], int] = defaultdict(int)

    def detectors(self, learner: Detector, with_baselines: bool) -> dict[str, Detector]:
        return {self.learner: learner, **(self.baselines if with_baselines else {})}

    def threshold_of(self, name: str) -> Threshold | None:
        if name == self.learner:
            return self.threshold
        rule = self.baseline_threshold
        if rule is None:
            return None
        if name not in self._baseline_thresholds:
            self._baseline_thresholds[name] = copy.deepcopy(rule)
            self._baseline_thresholds[name].value = None if rule.fits_on_validation else rule.value
        return self._baseline_thresholds[name]

    def add(self, split: str, detectors: Mapping[str, Detector], batch: Episode) -> None:
        """Score a batch of episodes with every detector; records are keyed by the episodes' index in
        their split (``batch.index``; numbered in arrival order for episodes built without one)."""
        for name, detector in detectors.items():
            key = (split, name)
            n = batch.support.shape[0]
            ids = (
                batch.index if batch.index is not None else torch.arange(self._seen[key], self._seen[key] + n)
            )
            self._seen[key] += n
            threshold = self.threshold_of(name)
            scored = score_episodes(detector, batch.support, batch.query, threshold, self.score_chunk)
            masks = getattr(batch, "query_masks", None)
            pixels = None
            if split == "test" and masks is not None and callable(getattr(detector, "score_maps", None)):
                maps = detector.score_maps(detector.adapt(batch.support), batch.query)
                pixels = episode_pixel_metrics(maps, masks, self.map_sigma)
            self.records.setdefault(key, Records()).add(
                ids, scored, batch.label, batch.support.shape[1], batch.task, pixels
            )

    def gather(self) -> None:
        """Merge the records of every process (a no-op in one process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        mine = {key: records.state() for key, records in self.records.items()}
        everyone: list[dict] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(everyone, mine)
        keys = sorted({key for states in everyone for key in states})
        self.records = {key: Records.merged([s[key] for s in everyone if key in s]) for key in keys}

    def finish(self) -> Report:
        """Fit thresholds on the validation records, decide, and summarise every detector and split."""
        metrics: dict[str, dict[str, Any]] = defaultdict(dict)
        per_episode: dict[tuple[str, str], Tensor] = {}
        thresholds, notes = {}, {}
        names = sorted({name for _, name in self.records}, key=lambda n: (n != self.learner, n))
        for name in names:
            threshold = self.threshold_of(name)
            validation = self.records.get(("val", name))
            if threshold is not None:
                thresholds[name] = threshold
                if threshold.fits_on_validation and validation is not None:
                    if validation.get("normalised") is not None:
                        try:
                            threshold.fit(validation.get("normalised"), validation.get("labels"))
                        except NonFiniteScores as error:
                            notes[name] = f"no decisions: the val split's {error}"
            for split in ("val", "test"):
                records = self.records.get((split, name))
                if records is None:
                    continue
                summary = EpisodeMetrics()
                summary.update(records.get("scores"), records.get("labels"))
                for metric in PIXEL_METRICS:
                    if records.get(metric) is not None:
                        summary.values[metric].append(records.get(metric))
                normalised = records.get("normalised")
                if threshold is not None and normalised is None:
                    notes[name] = threshold.too_few(records.k_shot)
                elif threshold is not None and threshold.value_known:
                    try:
                        is_anomaly, values = threshold.decide(normalised, records.get("support_normalised"))
                    except NonFiniteScores as error:
                        notes[name] = f"no decisions on {split}: {error}"
                    else:
                        summary.add_decisions(is_anomaly, records.get("labels"))
                        per_episode[(split, name)] = values
                metrics[split][name] = summary.compute(
                    records.get("task") if self.ci_over == "task" else None
                )
        return Report(self.learner, dict(metrics), thresholds, per_episode, notes, dict(self.records))
