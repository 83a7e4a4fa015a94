"""The one interface every detector answers, learned or not: adapt to a support set, then score."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Detector(Protocol):
    """``state = adapt(support)`` with support ``(B, K, *x)`` normal samples; then
    ``score(state, query)`` maps a query ``(B, Q, *x)`` to ``(B, Q)`` scores, higher = more anomalous.
    """

    def adapt(self, support: Tensor) -> Any: ...

    def score(self, state: Any, query: Tensor) -> Tensor: ...
