"""From anomaly scores to decisions: the support-normalised score and the threshold rules.

**Normalisation.** Raw scores of different episodes are not on one scale (a distance in one task's
embedding is not a distance in another's), so every threshold applies to a normalised score that
uses only the episode's own support set. Each of the K normal support samples is scored by the
detector adapted to the other K-1 (leave-one-out, one batched ``adapt``/``score`` call over all
held-out samples of all episodes, through the same interface every detector answers). With
``loo`` those K scores, a query score ``s`` becomes

    z = (s - mean(loo)) / (std(loo) + 1e-6)        (std: sample standard deviation)

i.e. "how many support spreads above a typical held-out normal". Leave-one-out scores come from
a state adapted to K-1 samples, so they run slightly higher than the scores of normal queries
under the full support: thresholds placed on them err towards fewer false alarms.

**K=1.** With a single support sample there is no leave-one-out score, so no normalised score
and no decision: evaluation then reports the ranking metrics only (with a warning and a note in
``metrics.json``) and ``metaad-score`` refuses, asking for at least two normal samples. No
fallback invents a scale the support set cannot give.

**Rules** (``conf/threshold/``); a query is an anomaly iff ``z > threshold`` of its episode:

- ``f1_optimal``: the one threshold that maximises the mean per-episode F1 over the validation
  episodes (which contain anomalies); fitted on validation only, then applied to test episodes
  and to a user's data.
- ``support_quantile``: needs no anomalies: ``margin x`` the ``q``-quantile of the episode's own
  standardised leave-one-out scores (``q=1``: their maximum), so a per-episode threshold.
- ``fixed``: a given value on the normalised scale.

A rule's settings and fitted value are plain data (``state_dict``), stored in checkpoints.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metaad.detector import Detector
from metaad.metrics import decision_metrics

EPS = 1e-6


def anomaly_scores(detector: Detector, support: Tensor, query: Tensor) -> Tensor:
    """``score(adapt(support), query)``, through a learner's own ``anomaly_scores`` where it has one."""
    own = getattr(detector, "anomaly_scores", None)
    return own(support, query) if own is not None else detector.score(detector.adapt(support), query)


def leave_one_out_scores(detector: Detector, support: Tensor) -> Tensor:
    """Score of each support sample by the detector adapted to the others. (B, K, *x) -> (B, K)."""
    b, k = support.shape[:2]
    if k < 2:
        raise ValueError(f"leave-one-out scores need at least 2 support samples, got {k}")
    index = torch.arange(k, device=support.device)
    others = torch.stack([index[index != i] for i in range(k)])  # (K, K-1)
    rest = support[:, others].flatten(0, 1)  # (B*K, K-1, *x)
    held_out = support.flatten(0, 1).unsqueeze(1)  # (B*K, 1, *x)
    return anomaly_scores(detector, rest, held_out).reshape(b, k)


def standardise(scores: Tensor, loo: Tensor) -> Tensor:
    """Scores (B, Q) in units of the support's leave-one-out spread (B, K): see the module docstring."""
    loo = loo.detach().double()
    mean, std = loo.mean(1, keepdim=True), loo.std(1, keepdim=True)
    return ((scores.detach().double() - mean) / (std + EPS)).float()


class Scored(NamedTuple):
    """Scores of a batch of episodes; the normalised fields are None when K=1."""

    scores: Tensor  # (B, Q) raw anomaly scores
    normalised: Tensor | None  # (B, Q) query scores on the support-normalised scale
    support_normalised: Tensor | None  # (B, K) standardised leave-one-out scores of the support


def score_episodes(detector: Detector, support: Tensor, query: Tensor, normalise: bool = True) -> Scored:
    """Raw scores as in evaluation, plus (when asked and K >= 2) their normalised versions."""
    scores = anomaly_scores(detector, support, query)
    if not normalise or support.shape[1] < 2:
        return Scored(scores, None, None)
    loo = leave_one_out_scores(detector, support)
    return Scored(scores, standardise(scores, loo), standardise(loo, loo))


class Threshold:
    """A rule on the normalised score: ``per_episode`` gives each episode's threshold (B,).

    ``baselines``: also decide for the baselines at test time (each then needs its leave-one-out
    scores, K more adaptations per episode, and for ``f1_optimal`` a pass over the validation
    episodes: cheap for the torch baselines, several times the cost of the scikit-learn ones).
    """

    rule: ClassVar[str]
    fits_on_validation: ClassVar[bool] = False

    def __init__(self, baselines: bool = False) -> None:
        self.value: float | None = None
        self.baselines = bool(baselines)

    def params(self) -> dict[str, float]:
        return {}

    def per_episode(self, support_normalised: Tensor) -> Tensor:
        """(B, K) standardised leave-one-out support scores -> (B,) thresholds."""
        if self.value is None:
            raise RuntimeError(
                f"threshold={self.rule} has not been fitted on validation episodes (no validation ran and "
                "none was available to fit it)"
            )
        return torch.full(support_normalised.shape[:1], self.value, device=support_normalised.device)

    def fit(self, normalised: Tensor, labels: Tensor) -> None:
        """Fit on validation episodes' normalised scores (E, Q) and labels; most rules have nothing to fit."""

    def decide(self, normalised: Tensor, support_normalised: Tensor) -> tuple[Tensor, Tensor]:
        """(is_anomaly (B, Q), thresholds (B,))."""
        thresholds = self.per_episode(support_normalised)
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

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v:g}" for k, v in self.params().items())
        value = "per episode" if self.value is None else f"{self.value:.4g}"
        return f"{self.rule}({settings}) = {value} on the normalised score"


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
        if not torch.isfinite(z).all():
            raise ValueError("threshold=f1_optimal: the normalised validation scores contain NaN or inf")
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

    def __init__(self, q: float = 1.0, margin: float = 1.0, baselines: bool = False) -> None:
        super().__init__(baselines)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"threshold.q must be in [0, 1] (1 = the maximum), got {q}")
        if margin <= 0:
            raise ValueError(f"threshold.margin must be positive, got {margin}")
        self.q, self.margin = float(q), float(margin)

    def params(self) -> dict[str, float]:
        return {"q": self.q, "margin": self.margin}

    def per_episode(self, support_normalised: Tensor) -> Tensor:
        return self.margin * torch.quantile(support_normalised.double(), self.q, dim=1).float()


class Fixed(Threshold):
    """A given threshold on the normalised score."""

    rule = "fixed"

    def __init__(self, value: float, baselines: bool = False) -> None:
        super().__init__(baselines)
        self.value = float(value)

    def params(self) -> dict[str, float]:
        return {"value": self.value}
