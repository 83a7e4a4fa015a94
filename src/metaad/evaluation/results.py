"""A run's results as one typed object, and ``metrics.json``, its one file format.

``metaad-train`` and ``metaad-eval`` build a :class:`RunResults` from the evaluator's report and
write it; the benchmark and ``metaad-summarize`` read it back with
:meth:`RunResults.read`. JSON has no NaN or infinity, so a non-finite number is written as null
with the reason under ``null_reasons`` (keyed by its dotted path): a reader never mistakes a
missing value for a measured one, and reads it back as NaN.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaad import files

NULL_REASONS = "null_reasons"


@dataclass(frozen=True)
class Summary:
    """One metric over episodes: mean and 95% CI half-width (1.96 sd / sqrt(n)).

    ``n_groups`` is set when episodes were averaged within groups (e.g. entities) first: the CI is
    then over the ``n_groups`` group means, and pooling must count groups, not episodes.
    """

    mean: float
    ci95: float
    n_episodes: int
    n_groups: int | None = None

    @property
    def n(self) -> int:
        """How many independent values the CI is over."""
        return self.n_groups if self.n_groups is not None else self.n_episodes

    def to_json(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"mean": self.mean, "ci95": self.ci95, "n_episodes": self.n_episodes}
        if self.n_groups is not None:
            out["n_groups"] = self.n_groups
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Summary:
        """From ``metrics.json``, where a non-finite mean or CI was written as null."""

        def number(key: str) -> float:
            v = value[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ValueError(f"{key} is {v!r}, not a number")
            return math.nan if v is None else float(v)

        groups = value.get("n_groups")
        return cls(
            number("mean"), number("ci95"), int(value["n_episodes"]), None if groups is None else int(groups)
        )

    @classmethod
    def pooled(cls, parts: Sequence[Summary]) -> Summary:
        """The summary of all the parts' values together (e.g. a benchmark's folds), exactly: the
        sum of squares is rebuilt from each part's sd. Parts over groups pool their groups."""
        grouped = all(p.n_groups is not None for p in parts)
        n = sum(p.n for p in parts) if grouped else sum(p.n_episodes for p in parts)
        count = (lambda p: p.n) if grouped else (lambda p: p.n_episodes)
        mean = sum(p.mean * count(p) for p in parts) / n
        ss = 0.0
        for p in parts:
            m = count(p)
            sd = p.ci95 * math.sqrt(m) / 1.96 if m > 1 else 0.0
            ss += (m - 1) * sd**2 + m * (p.mean - mean) ** 2
        sd = math.sqrt(ss / (n - 1)) if n > 1 else math.nan
        return cls(mean, 1.96 * sd / math.sqrt(n), sum(p.n_episodes for p in parts), n if grouped else None)


VERDICTS = ("beats", "within CIs", "below")


def verdict(learner: Summary, baseline: Summary) -> str:
    """``beats`` / ``below`` when the two 95% CIs do not overlap, else ``within CIs``; ``""`` when
    either mean is unknown (NaN): an unknown is never a verdict."""
    if math.isnan(learner.mean) or math.isnan(baseline.mean):
        return ""
    # an unknown CI (one value) is never CIs apart: NaN compares false
    if learner.mean - learner.ci95 > baseline.mean + baseline.ci95:
        return "beats"
    if learner.mean + learner.ci95 < baseline.mean - baseline.ci95:
        return "below"
    return "within CIs"


Metrics = dict[str, Summary]  # metric name -> its summary over episodes


@dataclass
class StreamResults:
    """Each held-out entity's test part after the time cut, scored step by step
    (:mod:`metaad.evaluation.stream_metrics`): per detector (the learner first), each stream metric's
    mean and 95% CI over entities. ``entities`` were measured; ``notes`` say what was not and why
    (an entity without both kinds of step after the cut, a threshold that needs more support)."""

    detectors: dict[str, Metrics]
    entities: list[str]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        detectors = {
            name: {m: s.to_json() for m, s in metrics.items()} for name, metrics in self.detectors.items()
        }
        return {"entities": self.entities, "detectors": detectors, "notes": self.notes}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> StreamResults:
        detectors = {name: metrics_of(metrics) for name, metrics in value["detectors"].items()}
        return cls(detectors, [str(e) for e in value["entities"]], [str(n) for n in value.get("notes") or []])


@dataclass
class RunResults:
    """What one run measured: the learner and each baseline on the test episodes, every detector
    on the validation episodes, and the threshold behind the learner's decisions.

    ``names`` are the run's names (``model``: the learner's name, ``dataset``, any others); they
    are written at the top level of ``metrics.json``, as the fields that follow them. ``stream``
    (series data only): the learner and every baseline scoring each held-out entity's test part
    after the cut step by step.
    """

    names: dict[str, str]
    k_shot: int
    seed: int
    data: str | None
    checkpoint: str
    tasks: dict[str, Any]
    test: Metrics
    baselines: dict[str, Metrics] = field(default_factory=dict)
    val: dict[str, Metrics] = field(default_factory=dict)
    threshold: dict[str, Any] | None = None
    # meta-training only (metaad-train): the selection metric and how long it trained
    val_auroc_best: float | None = None
    global_step: int | None = None
    null_reasons: dict[str, str] = field(default_factory=dict)
    stream: StreamResults | None = None

    @property
    def learner(self) -> str:
        return self.names.get("model", "learner")

    def detectors(self) -> dict[str, Metrics]:
        """The learner's test metrics first, then each baseline's."""
        return {self.learner: self.test, **self.baselines}

    @classmethod
    def from_report(cls, report: Any, **fields: Any) -> RunResults:
        """The results of an evaluator's :class:`~metaad.evaluation.evaluator.Report`; ``fields``
        are the run's own (names, k_shot, seed, data, checkpoint, tasks, ...)."""
        learner = report.learner
        test = report.metrics["test"]
        threshold = None
        rule = report.thresholds.get(learner)
        if rule is not None:
            threshold = rule.state_dict()
            values = report.per_episode_thresholds.get(("test", learner))
            if values is not None:
                threshold["mean_per_episode"] = values.mean().item()
            if learner in report.notes:
                threshold["skipped"] = report.notes[learner]
        return cls(
            test=test[learner],
            baselines={name: value for name, value in test.items() if name != learner},
            val=report.metrics.get("val", {}),
            threshold=threshold,
            **fields,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` layout, non-finite numbers as null with their reasons."""

        def detectors(values: dict[str, Metrics]) -> dict[str, Any]:
            return {name: {m: s.to_json() for m, s in metrics.items()} for name, metrics in values.items()}

        out: dict[str, Any] = {**self.names, "k_shot": self.k_shot, "seed": self.seed, "data": self.data}
        if self.global_step is not None:
            out |= {"val_auroc_best": self.val_auroc_best, "global_step": self.global_step}
        out |= {
            "checkpoint": self.checkpoint,
            "tasks": self.tasks,
            "test": {m: s.to_json() for m, s in self.test.items()},
            "baselines": detectors(self.baselines),
            "val": detectors(self.val),
        }
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.stream is not None:
            out["stream"] = self.stream.to_json()
        return finite(out, self.null_reasons)

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def from_json(cls, value: dict[str, Any], where: Any = "metrics.json") -> RunResults:
        """From what :meth:`to_json` wrote; a file of another shape is named with what it lacks."""
        from metaad.errors import RunFolderError

        try:

            def detectors(values: dict[str, Any]) -> dict[str, Metrics]:
                return {name: metrics_of(metrics) for name, metrics in values.items()}

            test = metrics_of(value["test"])
            best = value.get("val_auroc_best")
            if best is not None and (isinstance(best, bool) or not isinstance(best, int | float)):
                raise ValueError(f"val_auroc_best is {best!r}, not a number")
            known = {f for f in cls.__dataclass_fields__ if f != "names"}
            stream = value.get("stream")
            return cls(
                names={k: v for k, v in value.items() if k not in known and isinstance(v, str)},
                k_shot=int(value["k_shot"]),
                seed=int(value["seed"]),
                data=value.get("data"),
                checkpoint=value.get("checkpoint", ""),
                tasks=value.get("tasks") or {},
                test=test,
                baselines=detectors(value.get("baselines") or {}),
                val=detectors(value.get("val") or {}),
                threshold=value.get("threshold"),
                val_auroc_best=math.nan if best is None and "val_auroc_best" in value else best,
                global_step=value.get("global_step"),
                null_reasons=dict(value.get(NULL_REASONS) or {}),
                stream=None if stream is None else StreamResults.from_json(stream),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            what = f"no {error}" if isinstance(error, KeyError) else str(error)
            raise RunFolderError(f"{where}: not the metrics.json of a metaad run ({what})") from error

    @classmethod
    def read(cls, path: Path) -> RunResults:
        """``path`` (a ``metrics.json``) read back; unreadable or truncated files are named."""
        from metaad.errors import RunFolderError

        try:
            value = json.loads(Path(path).read_text())
        except OSError as error:
            raise RunFolderError(f"{path}: cannot read it ({error.strerror})") from error
        except ValueError as error:
            raise RunFolderError(
                f"{path}: not valid JSON ({error}); was the run killed while writing?"
            ) from error
        if not isinstance(value, dict):
            raise RunFolderError(f"{path}: not the metrics.json of a metaad run (not a JSON object)")
        return cls.from_json(value, path)


def metrics_of(value: dict[str, Any]) -> Metrics:
    return {metric: Summary.from_json(summary) for metric, summary in value.items()}


def finite(metrics: dict[str, Any], reasons: dict[str, str] | None = None) -> dict[str, Any]:
    """``metrics`` with every non-finite number (NaN, infinity) replaced by null, and under
    ``null_reasons`` why, keyed by its dotted path. ``reasons`` gives the why for known paths."""
    reasons = dict(reasons or {})
    found: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            found[key] = reasons.pop(key, f"not a finite number ({value})")
            return None
        return value

    out = clean(metrics, "")
    if found:
        out[NULL_REASONS] = {**out.get(NULL_REASONS, {}), **found}
    return out


def write_json(path: Path, metrics: dict[str, Any], reasons: dict[str, str] | None = None) -> None:
    """``metrics`` as valid JSON, written whole or not at all (a temporary file renamed over it),
    so a full disk or a kill leaves the previous file or none, never half of one."""
    from metaad.errors import RunFolderError

    text = json.dumps(finite(metrics, reasons), indent=2, allow_nan=False)
    try:
        files.write_atomically(path, lambda partial: partial.write_text(text))
    except OSError as error:
        why = (
            "no space left on the device (or the file size limit, ulimit -f, reached)"
            if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            else error.strerror or str(error)
        )
        raise RunFolderError(
            f"{path.parent}: cannot write {path.name}: {why}; nothing was written"
        ) from error
