"""From anomaly scores to decisions: the support-normalised score and the threshold rules.

**Normalisation** (``threshold.normalise``). Raw scores of different episodes need not be on one
scale (a distance in one task's embedding is not a distance in another's), so by default
(``zscore``) a threshold applies to a normalised score that uses only the episode's own support
set. Each of the K normal support samples is scored by the detector adapted to the other K-1
(leave-one-out: one batched ``adapt``/``score`` call over all held-out samples of all episodes,
through the interface every detector answers). With ``loo`` those K scores, a query score ``s``
becomes

    z = (s - mean(loo)) / (std(loo) + 1e-6)        (std: sample standard deviation)

i.e. "how many support spreads above a typical held-out normal". Leave-one-out scores come from
a state adapted to K-1 samples, so they run slightly higher than the scores of normal queries
under the full support. ``none`` thresholds the raw scores: a learned embedding may already put
episodes on one scale, and then one raw threshold transfers better than a z-score estimated
from a handful of samples (measure it on validation episodes: both are a config switch away).

**Too few shots.** The z-score needs K >= 3: with K=2 a distance-based detector's two
leave-one-out scores are the same distance, so there is no spread. With K=1 there is no
leave-one-out score at all, so ``support_quantile`` needs K >= 2 even on raw scores, while
``f1_optimal`` and ``fixed`` on raw scores work from K=1. Below a rule's minimum, evaluation
reports the ranking metrics only (with a warning and a note in ``metrics.json``) and
``metaad-score`` refuses, saying how many normal samples it needs. No fallback invents a scale
the support set cannot give.

**Rules** (``conf/threshold/``); a query is an anomaly iff its score ``> threshold`` of its episode:

- ``f1_optimal``: the one threshold that maximises the mean per-episode F1 over the validation
  episodes (which contain anomalies); fitted on validation only, then applied to test episodes
  and to a user's data.
- ``support_quantile``: needs no anomalies: ``margin x`` the ``q``-quantile of the episode's own
  (normalised) leave-one-out support scores (``q=1``: their maximum), so a per-episode threshold.
- ``fixed``: a given value on the (normalised) scale.

A rule's settings and fitted value are plain data (``state_dict``), stored in checkpoints.

**A score that is not a number is never a decision.** ``NaN > t`` is false, so a NaN score would
read as "normal"; every rule checks the scores it decides on (:meth:`Threshold.decide`,
:meth:`F1Optimal.fit`) and raises :class:`NonFiniteScores` naming the episode and sample, and the
evaluator and the Python API report it instead of deciding.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metaad.data.errors import DataError
from metaad.detectors.base import Detector, anomaly_scores, leave_one_out_scores
from metaad.evaluation.metrics import decision_metrics

EPS = 1e-6
NORMALISATIONS = ("zscore", "none")


class NonFiniteScores(DataError):
    """Scores that are NaN or infinite where a decision (or a fit) needs numbers."""


def require_finite(values: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteScores` naming the first (episode, sample) positions of ``values`` (B, N)
    that are NaN or infinite."""
    bad = ~torch.isfinite(values)
    if bad.any():
        first = [tuple(p) for p in bad.nonzero()[:5].tolist()]
        raise NonFiniteScores(
            f"{int(bad.sum())} {what} are NaN or infinite (first (episode, sample): {first}); "
            "a score that is not a number is never a decision"
        )


def standardise(scores: Tensor, loo: Tensor) -> Tensor:
    """Scores (B, Q) in units of the support's leave-one-out spread (B, K): see the module docstring."""
    loo = loo.detach().double()
    mean, std = loo.mean(1, keepdim=True), loo.std(1, keepdim=True)
    return ((scores.detach().double() - mean) / (std + EPS)).float()


class Scored(NamedTuple):
    """Scores of a batch of episodes; ``normalised`` is None when the threshold cannot decide (K too low)."""

    scores: Tensor  # (B, Q) raw anomaly scores
    normalised: Tensor | None  # (B, Q) query scores on the threshold's scale
    support_normalised: Tensor | None  # (B, K) leave-one-out support scores on that scale, if used


def score_episodes(
    detector: Detector,
    support: Tensor,
    query: Tensor,
    threshold: Threshold | None = None,
    chunk_size: int | None = None,
) -> Scored:
    """Raw scores as in evaluation, plus what ``threshold`` needs to decide (leave-one-out if it must);
    the query goes through the detector ``chunk_size`` samples at a time (``score_chunk``)."""
    scores = anomaly_scores(detector, support, query, chunk_size)
    if threshold is None or support.shape[1] < threshold.min_k_shot:
        return Scored(scores, None, None)
    if threshold.normalise == "none" and not threshold.uses_support_scores:
        return Scored(scores, scores.detach().float(), None)
    loo = leave_one_out_scores(detector, support)
    return Scored(scores, threshold.normalised(scores, loo), threshold.normalised(loo, loo))


class Threshold:
    """A rule on the (normalised) score: ``per_episode`` gives each episode's threshold (B,).

    ``normalise``: ``zscore`` (the support-normalised score, needs K >= 3) or ``none`` (raw
    scores). ``baselines``: also decide for the baselines at test time (each then needs its own
    leave-one-out scores, K more adaptations per episode, and for ``f1_optimal`` a pass over the
    validation episodes: cheap for the torch baselines, several times the cost of the
    scikit-learn ones).
    """

    rule: ClassVar[str]
    fits_on_validation: ClassVar[bool] = False
    uses_support_scores: ClassVar[bool] = False

    def __init__(self, normalise: str = "zscore", baselines: bool = False) -> None:
        if normalise not in NORMALISATIONS:
            raise ValueError(f"threshold.normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        self.normalise = normalise
        self.baselines = bool(baselines)
        self.value: float | None = None

    @property
    def value_known(self) -> bool:
        """Whether the rule can decide now: a rule fitted on validation needs its fit first."""
        return not self.fits_on_validation or self.value is not None

    @property
    def min_k_shot(self) -> int:
        """Fewest support samples this rule can decide with."""
        return 3 if self.normalise == "zscore" else 2 if self.uses_support_scores else 1

    def too_few(self, k_shot: int) -> str:
        """Why ``k_shot`` support samples are too few for this rule."""
        why = (
            "the z-score divides by the spread of the support's leave-one-out scores, and with 2 samples a "
            "distance-based detector's two are equal; use threshold.normalise=none"
            if self.normalise == "zscore"
            else "it is set from the support's leave-one-out scores"
        )
        return (
            f"k_shot={k_shot}: threshold {self.rule} (normalise={self.normalise}) needs at least "
            f"{self.min_k_shot} support samples: {why}"
        )

    def params(self) -> dict[str, Any]:
        return {"normalise": self.normalise}

    def normalised(self, scores: Tensor, support_scores: Tensor | None) -> Tensor:
        """Scores (B, N) on this rule's scale, given the episodes' (B, K) leave-one-out support
        scores: the evaluator and the Python API both decide on exactly these."""
        if self.normalise == "zscore":
            return standardise(scores, support_scores)
        return scores.detach().float()

    def per_episode(
        self, support_normalised: Tensor | None, episodes: int = 1, device: torch.device | None = None
    ) -> Tensor:
        """Each episode's threshold (B,): the fitted value, or (rules that use them) from the episode's
        (B, K) normalised leave-one-out support scores; nothing else of an episode may set it."""
        if self.value is None:
            raise RuntimeError(
                f"threshold={self.rule} has not been fitted on validation episodes (no validation ran and "
                "none was available to fit it)"
            )
        # float64: the fitted value itself, not its float32 rounding (the API reports it as threshold_)
        return torch.full((episodes,), self.value, dtype=torch.float64, device=device)

    def fit(self, normalised: Tensor, labels: Tensor) -> None:
        """Fit on validation episodes' normalised scores (E, Q) and labels; most rules have nothing to fit."""

    def decide(self, normalised: Tensor, support_normalised: Tensor | None) -> tuple[Tensor, Tensor]:
        """(is_anomaly (B, Q), thresholds (B,)); :class:`NonFiniteScores` where a score is not a number."""
        require_finite(normalised, "query scores")
        if self.uses_support_scores:
            require_finite(support_normalised, "leave-one-out support scores")
        thresholds = self.per_episode(support_normalised, normalised.shape[0], normalised.device)
        require_finite(thresholds[:, None], "thresholds")
        return normalised > thresholds.unsqueeze(1), thresholds

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (loads with ``torch.load(weights_only=True)``)."""
        return {"rule": self.rule, **self.params(), "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Take the stored fitted value if it was fitted under this very rule and settings."""
        if state.get("rule") != self.rule or any(state.get(k) != v for k, v in self.params().items()):
            return False
        self.value = state.get("value")
        return True


class F1Optimal(Threshold):
    """The threshold maximising mean per-episode F1 on validation episodes."""

    rule = "f1_optimal"
    fits_on_validation = True

    def fit(self, normalised: Tensor, labels: Tensor) -> None:
        """Try every cut between two distinct pooled scores (and below/above all of them).

        Among equally good cuts the middle one is taken, so the threshold does not sit on the edge
        of the best range. Counts per episode come from sorted scores (``searchsorted``), so the
        search is exact and costs O(E x cuts x log Q).
        """
        z, labels = normalised.detach().double().cpu(), labels.detach().bool().cpu()
        require_finite(z, "validation scores (threshold=f1_optimal fits on them)")
        values = z.unique()  # sorted
        cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
        n_query = z.shape[1]
        cuts_b = cuts.expand(len(z), -1).contiguous()

        def above(mask: Tensor) -> Tensor:  # (E, cuts): how many of the masked scores exceed each cut
            masked = torch.where(mask, z, torch.tensor(float("-inf"), dtype=z.dtype)).sort(1).values
            return n_query - torch.searchsorted(masked, cuts_b, right=True)

        tp, fp = above(labels), above(~labels)
        positives, negatives = labels.sum(1, keepdim=True), (~labels).sum(1, keepdim=True)
        f1 = decision_metrics(tp, fp, positives - tp, negatives - fp)["f1"].mean(0)
        best = torch.nonzero(f1 >= f1.max() - 1e-12).flatten()
        self.value = cuts[best[len(best) // 2]].item()


class SupportQuantile(Threshold):
    """``margin`` x the ``q``-quantile of the episode's standardised leave-one-out support scores."""

    rule = "support_quantile"
    uses_support_scores = True

    def __init__(
        self, q: float = 1.0, margin: float = 1.0, normalise: str = "zscore", baselines: bool = False
    ) -> None:
        super().__init__(normalise, baselines)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"threshold.q must be in [0, 1] (1 = the maximum), got {q}")
        if margin <= 0:
            raise ValueError(f"threshold.margin must be positive, got {margin}")
        self.q, self.margin = float(q), float(margin)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "q": self.q, "margin": self.margin}

    def per_episode(
        self, support_normalised: Tensor | None, episodes: int = 1, device: torch.device | None = None
    ) -> Tensor:
        return self.margin * torch.quantile(support_normalised.double(), self.q, dim=1).float()


class Fixed(Threshold):
    """A given threshold on the normalised score."""

    rule = "fixed"

    def __init__(self, value: float, normalise: str = "zscore", baselines: bool = False) -> None:
        super().__init__(normalise, baselines)
        self.value = float(value)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "value": self.value}


class Logit(Fixed):
    """The MAML family's own rule, as OC-MAML reports it: anomalous when sigmoid(logit) > 0.5, that
    is a raw score (the adapted network's logit) above 0. Named for what it is, not as a fixed value."""

    rule = "logit"

    def __init__(self, baselines: bool = False) -> None:
        super().__init__(0.0, "none", baselines)
