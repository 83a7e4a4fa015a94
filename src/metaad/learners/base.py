"""The episodic LightningModule: loops, metrics, decisions and logging live here once.

A learner subclasses :class:`EpisodicModule` and says only what is its own:

- ``adapt(support)``: state from a support set ``(B, K, *x)`` of normal samples;
- ``score(state, query)``: ``(B, Q)`` anomaly scores, higher = more anomalous;
- ``loss(batch)``: its meta-training loss on a meta-batch of :class:`~metaad.data.Episode`.

No-learning baselines answer the same ``adapt``/``score`` pair and are scored on the very same
test episodes, so every result stands beside them. With a ``threshold`` (``conf/threshold/``),
scores are also normalised by the support set and turned into decisions (``metaad.thresholds``);
F1, precision, recall and balanced accuracy then stand beside AUROC/AUPR. A threshold fitted on
validation episodes is stored in every checkpoint. TensorBoard gets figures at validation and
test (``metaad.pictures``), and for learners with an ``embed(x)`` method a projector view.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import move_data_to_device, rank_zero_warn
from torch import Tensor

from metaad import pictures
from metaad.data.episodes import Episode
from metaad.detector import Detector
from metaad.metrics import EpisodeMetrics
from metaad.thresholds import Scored, Threshold, score_episodes

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
DECISION_METRICS = ("f1", "precision", "recall", "balanced_accuracy")


class _Collected:
    """Scores of one detector over an evaluation loop, kept (on CPU) until the threshold decides."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = defaultdict(list)
        self.k_shot = 0

    def add(self, scored: Scored, k_shot: int, labels: Tensor) -> None:
        self.k_shot = k_shot
        self.parts["scores"].append(scored.scores.detach().cpu())
        self.parts["labels"].append(labels.cpu())
        for name in ("normalised", "support_normalised"):
            if getattr(scored, name) is not None:
                self.parts[name].append(getattr(scored, name).cpu())

    def get(self, name: str) -> Tensor | None:
        return torch.cat(self.parts[name]) if self.parts.get(name) else None


class EpisodicModule(pl.LightningModule):
    """Base class of every learner. Subclasses implement ``adapt``, ``score`` and ``loss``."""

    def __init__(
        self,
        optimizer: OptimizerFactory,
        baselines: Mapping[str, Detector] | None = None,
        threshold: Threshold | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.baselines: dict[str, Detector] = dict(baselines or {})
        self.threshold = threshold
        self.val_auroc_best = float("-inf")
        self.test_results: dict[str, Any] = {}
        self._metrics: dict[str, EpisodeMetrics] = {}
        self._collected: dict[str, _Collected] = {}
        self._thresholds: dict[str, Threshold] = {}
        self._embeddings: dict[str, Any] | None = None

    # --- what a learner says -------------------------------------------------------------
    def adapt(self, support: Tensor) -> Any:
        raise NotImplementedError

    def score(self, state: Any, query: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, batch: Episode) -> Tensor:
        raise NotImplementedError

    # --- the episodic loops ----------------------------------------------------------------
    def anomaly_scores(self, support: Tensor, query: Tensor) -> Tensor:
        return self.score(self.adapt(support), query)

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.support.shape[0])
        return loss

    def _start_evaluation(self, names: Iterable[str]) -> None:
        self._metrics = {name: EpisodeMetrics() for name in names}
        self._collected = {name: _Collected() for name in self._metrics}

    def _evaluate(self, name: str, detector: Detector, batch: Episode) -> None:
        scored = score_episodes(detector, batch.support, batch.query, self._thresholds.get(name))
        self._metrics[name].update(scored.scores, batch.label)
        self._collected[name].add(scored, batch.support.shape[1], batch.label)

    def _decide(self, name: str) -> Tensor | None:
        """Decisions of one detector at its threshold, added to its metrics; its per-episode thresholds."""
        collected, threshold = self._collected[name], self._thresholds.get(name)
        normalised = collected.get("normalised")
        if threshold is None or normalised is None:
            return None
        is_anomaly, thresholds = threshold.decide(normalised, collected.get("support_normalised"))
        self._metrics[name].add_decisions(is_anomaly, collected.get("labels"))
        return thresholds

    def _too_few_shots(self, stage: str) -> str | None:
        """Why the threshold could not decide (too few support samples), warned once a loop; else None."""
        collected = self._collected["model"]
        if self.threshold is None or collected.get("normalised") is not None:
            return None
        note = self.threshold.too_few(collected.k_shot)
        rank_zero_warn(f"{stage}: no decision metrics: {note}")
        return note

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation(["model"])
        self._thresholds = {"model": self.threshold} if self.threshold is not None else {}

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate("model", self, batch)

    def on_validation_epoch_end(self) -> None:
        collected = self._collected["model"]
        if (
            self.threshold is not None
            and self.threshold.fits_on_validation
            and not self._too_few_shots("validation")
        ):
            self.threshold.fit(collected.get("normalised"), collected.get("labels"))
        thresholds = self._decide("model")
        summary = self._metrics["model"].compute()
        auroc = summary["auroc"]["mean"]
        if not self.trainer.sanity_checking:
            self.val_auroc_best = max(self.val_auroc_best, auroc)
        # Every rank evaluates the same fixed episodes, so the sync is a mean of equal values.
        best = max(self.val_auroc_best, auroc)
        self.log("val/auroc", auroc, prog_bar=True, sync_dist=True)
        logged = {"val/aupr": summary["aupr"]["mean"], "val/auroc_best": best, "hp/val_auroc": best}
        logged |= {f"val/{m}": summary[m]["mean"] for m in DECISION_METRICS if m in summary}
        if thresholds is not None:
            logged["val/threshold"] = thresholds.mean().item()
        self.log_dict(logged, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._log_pictures("val", thresholds)

    def on_test_epoch_start(self) -> None:
        self._start_evaluation(["model", *self.baselines])
        self._embeddings = None
        self._thresholds = self._test_thresholds()

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate("model", self, batch)
        for name, detector in self.baselines.items():
            self._evaluate(name, detector, batch)
        if batch_idx == 0 and callable(getattr(self, "embed", None)):
            self._embeddings = pictures.episode_embeddings(self.embed, batch)

    def on_test_epoch_end(self) -> None:
        too_few = self._too_few_shots("test")
        thresholds = {name: self._decide(name) for name in self._metrics}
        results = {name: metrics.compute() for name, metrics in self._metrics.items()}
        logged = {f"test/{metric}": value["mean"] for metric, value in results["model"].items()}
        logged["hp/test_auroc"] = results["model"]["auroc"]["mean"]
        if thresholds["model"] is not None:
            logged["test/threshold"] = thresholds["model"].mean().item()
        for name in self.baselines:
            logged.update({f"test/baseline/{name}/{m}": v["mean"] for m, v in results[name].items()})
        self.log_dict(logged, sync_dist=True)
        self.test_results = {
            "test": results["model"],
            "baselines": {name: results[name] for name in self.baselines},
        }
        if self.threshold is not None:
            stored = self.threshold.state_dict()
            if thresholds["model"] is not None:
                stored["mean_per_episode"] = thresholds["model"].mean().item()
            if too_few:
                stored["skipped"] = too_few
            self.test_results["threshold"] = stored
        self._log_pictures("test", thresholds["model"])

    def _test_thresholds(self) -> dict[str, Threshold]:
        """The threshold of each detector that decides: the learner, and the baselines if the rule says so.

        The learner's own fitted threshold comes from its last validation (or the checkpoint);
        if it has none (no validation ran), it is fitted here on the validation episodes. A rule
        fitted on validation is fitted for each baseline on the same validation episodes.
        """
        if self.threshold is None:
            return {}
        deciding = self.baselines if self.threshold.baselines else {}
        if not self.threshold.fits_on_validation:
            return dict.fromkeys(["model", *deciding], self.threshold)
        if self.threshold.value is None:
            self._fit_on_validation(self, self.threshold)
        thresholds = {"model": self.threshold}
        for name, detector in deciding.items():
            thresholds[name] = copy.deepcopy(self.threshold)
            self._fit_on_validation(detector, thresholds[name])
        return thresholds

    def _fit_on_validation(self, detector: Detector, threshold: Threshold) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError(
                f"threshold={threshold.rule} needs validation episodes to fit on; test with a datamodule"
            )
        normalised, labels = [], []
        for batch in datamodule.val_dataloader():
            batch = move_data_to_device(batch, self.device)
            scored = score_episodes(detector, batch.support, batch.query, threshold)
            if scored.normalised is None:
                return  # too few shots to decide: reported at the end of the test
            normalised.append(scored.normalised.cpu())
            labels.append(batch.label.cpu())
        threshold.fit(torch.cat(normalised), torch.cat(labels))

    # --- TensorBoard pictures (rank 0 only) --------------------------------------------------
    def _log_pictures(self, stage: str, thresholds: Tensor | None) -> None:
        writer = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None or not self.trainer.is_global_zero:
            return
        collected = self._collected["model"]
        pictures.log_evaluation(
            writer,
            stage,
            self.global_step,
            collected.get("scores"),
            collected.get("labels"),
            collected.get("normalised") if thresholds is not None else None,
            thresholds,
            zscore=self.threshold is not None and self.threshold.normalise == "zscore",
        )
        if stage == "test" and self._embeddings is not None:
            writer.add_embedding(**self._embeddings, tag="test/embeddings", global_step=self.global_step)

    # --- optimisation and checkpoint state -------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_auroc_best"] = self.val_auroc_best
        if self.threshold is not None:
            checkpoint["metaad_threshold"] = self.threshold.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_auroc_best = checkpoint.get("val_auroc_best", float("-inf"))
        if self.threshold is not None and "metaad_threshold" in checkpoint:
            self.threshold.load_state_dict(checkpoint["metaad_threshold"])
