"""The MAML family on ``torch.func``: MAML, FOMAML, Meta-SGD, ANIL and one-class MAML, one class.

The network is the backbone plus a linear head to one logit, the anomaly score. The support set
holds only normal samples, so the inner loop is one-class as in OC-MAML (Frikha et al., AAAI
2021): a few gradient steps on the BCE of the support logits toward 0 (normal). The outer loss is
the BCE of the adapted logits on the query, weighting normals and anomalies equally.

Every task of a meta-batch is adapted at once: ``torch.func.grad`` for the inner gradient,
``functional_call`` to run the network on per-task weights, ``vmap`` over the tasks (``chunk_size``
bounds memory); ``loss`` adapts and scores each task in one per-task call. Second-order MAML
differentiates through the inner gradients; ``first_order`` stops them (FOMAML); ``meta_sgd``
learns one inner learning rate per parameter entry; ``anil`` adapts only the head, the body
staying as meta-learned.

At evaluation the meta-parameters are detached, so adapting (with gradients, hence
``enable_grad`` under Lightning's ``no_grad``) never builds the outer graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metaad.data.episodes import Episode
from metaad.detectors.base import Learner, windowed_stream_scores

Params = dict[str, Tensor]
SUPPORT = "support"  # the key of the support in a state, for backbones normalising with its statistics
Rates = dict[str, Tensor | float]


class ScoreNet(nn.Module):
    """Backbone (``body``) then a linear ``head`` to one logit per sample: (N, *x) -> (N,).

    A backbone that normalises with its task's support statistics (``uses_support``, e.g.
    ``Conv4(norm="support")``) takes ``n_support``: the first ``n_support`` rows of ``x`` are the
    support whose statistics normalise all of them.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = backbone
        self.head = nn.Linear(backbone.out_dim, 1)
        self.uses_support = bool(getattr(backbone, "uses_support", False))

    def forward(self, x: Tensor, n_support: int | None = None, stream: bool = False) -> Tensor:
        """``stream``: ``x`` is a series ``(N, T, D)`` and every window is scored in one causal pass
        of a backbone that can (``body.stream``) -> ``(N, T - W + 1)``."""
        if stream:
            return self.head(self.body.stream(x)).squeeze(-1)
        features = self.body(x, n_support) if self.uses_support else self.body(x)
        return self.head(features).squeeze(-1)


class AdaptedNet(nn.Module):
    """A :class:`ScoreNet` holding one task's adapted weights (and its support, for a backbone that
    normalises with it): ``(Q, *x) -> (Q,)`` logits, the support rows going first as in ``score``."""

    def __init__(self, net: ScoreNet, support: Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("support", support)

    def forward(self, x: Tensor) -> Tensor:
        if self.support is None:
            return self.net(x)
        k = self.support.shape[0]
        return self.net(torch.cat([self.support, x]), n_support=k)[k:]


def balanced_bce(logits: Tensor, label: Tensor) -> Tensor:
    """BCE over the last dim with normals and anomalies weighted equally (OC-MAML's class-balanced query)."""
    label = label.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    anomaly = (bce * label).sum(-1) / label.sum(-1).clamp(min=1)
    normal = (bce * (1 - label)).sum(-1) / (1 - label).sum(-1).clamp(min=1)
    return 0.5 * (anomaly + normal)


class MAML(Learner):
    """Gradient-based meta-learning of an initialisation that one-class fine-tuning turns into a detector."""

    def __init__(
        self,
        backbone: nn.Module,
        inner_steps: int = 1,
        inner_lr: float = 0.1,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        meta_sgd: bool = False,
        anil: bool = False,
        chunk_size: int | None = None,
        vectorize: bool = True,
    ) -> None:
        super().__init__()
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        for name, value, least in (
            ("inner_steps", inner_steps, 1),
            ("test_inner_steps", test_inner_steps, 0),
        ):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"model.{name} must be an integer >= {least}, got {value!r}")
        if not inner_lr > 0:
            raise ValueError(f"model.inner_lr must be positive, got {inner_lr!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"model.chunk_size must be a positive integer or null, got {chunk_size!r}")
        self.net = ScoreNet(backbone)
        self.inner_steps, self.test_inner_steps, self.inner_lr = inner_steps, test_inner_steps, inner_lr
        self.first_order, self.meta_sgd, self.anil = first_order, meta_sgd, anil
        self.chunk_size, self.vectorize = chunk_size, vectorize
        self.adapted_names = [n for n, _ in self.net.named_parameters() if not anil or n.startswith("head.")]
        # Meta-SGD: one learning rate per entry of every adapted parameter, starting at inner_lr.
        self.inner_lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(self.net.get_parameter(n), inner_lr)) for n in self.adapted_names]
            if meta_sgd
            else []
        )

    # --- the interface ---------------------------------------------------------------------
    def adapt(self, support: Tensor) -> Params:
        """Per-task adapted weights, each with a leading task dim ``B`` (and, for a backbone that
        normalises with support statistics, the ``support`` itself under that key).

        Training: ``inner_steps`` steps, differentiable w.r.t. the meta-parameters (through the
        inner gradients too unless ``first_order``). Evaluation: ``test_inner_steps`` steps on
        detached meta-parameters, so no outer graph is built.
        """
        adapted, fixed, lrs = self._meta_params()
        with torch.enable_grad():
            state = self._map(self._task_adapt(fixed, lrs), (adapted, support), (None, 0))
        return {**state, SUPPORT: support} if self.net.uses_support else state

    def score(self, state: Params, query: Tensor) -> Tensor:
        """The adapted network's logit for each query sample: (B, Q)."""
        _, fixed, _ = self._meta_params()
        weights = {n: p for n, p in state.items() if n != SUPPORT}
        support = state.get(SUPPORT)
        logits = partial(_task_logits, self.net, fixed)
        if support is None:
            return self._map(logits, (weights, query), (0, 0))
        return self._map(logits, (weights, query, support), (0, 0, 0))

    def scoring_module(self, state: Params) -> nn.Module:
        """One task's adapted network as a plain module, ``(Q, *x) -> (Q,)`` logits as ``score`` gives
        them: for export, as torch.func's ``functional_call`` cannot be traced. ``state`` of one task."""
        weights = {n: p for n, p in state.items() if n != SUPPORT}
        if next(iter(weights.values())).shape[0] != 1:
            raise ValueError("scoring_module takes the state of one task (B = 1)")
        net = copy.deepcopy(self.net).eval()
        with torch.no_grad():
            for name, value in weights.items():
                net.get_parameter(name).copy_(value[0])
        support = state.get(SUPPORT)
        return AdaptedNet(net.requires_grad_(False), None if support is None else support[0])

    def score_stream(self, state: Params, series: Tensor, window: int) -> Tensor:
        """Every window of ``series`` (B, T, D) in one causal pass of each task's adapted network,
        when the backbone can stream (and needs no support statistics)."""
        body = self.net.body
        if self.net.uses_support or not hasattr(body, "stream") or body.window != window:
            return windowed_stream_scores(self, state, series, window)
        _, fixed, _ = self._meta_params()
        weights = {n: p for n, p in state.items() if n != SUPPORT}
        return self._map(partial(_task_stream, self.net, fixed), (weights, series), (0, 0))

    def loss(self, batch: Episode) -> Tensor:
        return balanced_bce(self.anomaly_scores(batch.support, batch.query), batch.label).mean()

    def anomaly_scores(self, support: Tensor, query: Tensor) -> Tensor:
        """``score(adapt(support), query)`` in one pass over the tasks: each task adapts and scores
        its query in the same per-task call, so the adapted weights are never stacked into a
        meta-batch and taken apart again (same numbers as ``adapt`` then ``score``)."""
        adapted, fixed, lrs = self._meta_params()
        task_scores = partial(_adapted_logits, self.net, fixed, self._task_adapt(fixed, lrs))
        return self._map(task_scores, (adapted, support, query), (None, 0, 0))

    # --- helpers -----------------------------------------------------------------------------
    def _task_adapt(self, fixed: Params, lrs: Rates) -> Callable[[Params, Tensor], Params]:
        """One task's inner loop, ``(meta-weights, support) -> adapted weights``, as in this mode."""
        steps = self.inner_steps if self.training else self.test_inner_steps
        return partial(_adapt_task, self.net, fixed, lrs, steps, self.first_order)

    def _meta_params(self) -> tuple[Params, Params, Rates]:
        """(adapted, fixed, inner lrs) by parameter name; detached unless training."""
        params = dict(self.net.named_parameters())
        lrs = dict(zip(self.adapted_names, self.inner_lrs)) if self.meta_sgd else {}
        if not self.training:
            params = {n: p.detach() for n, p in params.items()}
            lrs = {n: lr.detach() for n, lr in lrs.items()}
        if self.meta_sgd:
            # As in OC-Meta-SGD (Frikha et al.): a negative rate would let the one-class inner loop
            # climb its own loss, so rates stay in [0, 1].
            lrs = {n: lr.clamp(0.0, 1.0) for n, lr in lrs.items()}
        else:
            lrs = dict.fromkeys(self.adapted_names, self.inner_lr)
        adapted = {n: params.pop(n) for n in self.adapted_names}
        return adapted, params, lrs

    def _map(self, fn: Callable, args: Sequence[Any], in_dims: Sequence[int | None]) -> Any:
        """Apply a per-task ``fn`` over the leading task dim: ``vmap`` or, if not ``vectorize``, a loop."""
        if self.vectorize:
            return vmap(fn, in_dims=tuple(in_dims), chunk_size=self.chunk_size)(*args)
        n_tasks = next(_leading(a) for a, d in zip(args, in_dims) if d == 0)
        outs = [fn(*(_index(a, b) if d == 0 else a for a, d in zip(args, in_dims))) for b in range(n_tasks)]
        if isinstance(outs[0], dict):
            return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        return torch.stack(outs)


# --- per-task functions (vmapped over the tasks of a meta-batch) ------------------------------
def _task_logits(
    net: nn.Module, fixed: Params, adapted: Params, x: Tensor, support: Tensor | None = None
) -> Tensor:
    """One task's logits of ``x``; normalised with ``support``'s statistics when the backbone uses
    them (the support rows go first through the network and are dropped from the output)."""
    if support is None or not net.uses_support:
        return functional_call(net, {**fixed, **adapted}, (x,))
    k = support.shape[0]
    return functional_call(net, {**fixed, **adapted}, (torch.cat([support, x]),), {"n_support": k})[k:]


def _task_stream(net: nn.Module, fixed: Params, adapted: Params, series: Tensor) -> Tensor:
    """One task's scores of every window of its series ``(T, D)`` -> ``(T - W + 1,)``."""
    return functional_call(net, {**fixed, **adapted}, (series.unsqueeze(0),), {"stream": True})[0]


def _inner_loss(adapted: Params, net: nn.Module, fixed: Params, support: Tensor) -> Tensor:
    """One-class inner loss: BCE of the (all normal) support logits toward 0."""
    return F.softplus(_task_logits(net, fixed, adapted, support)).mean()


def _adapt_task(
    net: nn.Module,
    fixed: Params,
    lrs: Rates,
    steps: int,
    first_order: bool,
    adapted: Params,
    support: Tensor,
) -> Params:
    # p + (-lr) * g is bitwise p - lr * g, and its backward needs no negation of each gradient.
    descent = {n: -lr for n, lr in lrs.items()}
    for _ in range(steps):
        if first_order:
            # FOMAML takes the inner gradient as a constant: computed on detached weights, the
            # inner forward and backward are not recorded in the outer graph only to be dropped
            # (same values as detaching the gradient afterwards, in less time).
            grads = grad(_inner_loss)(_detached(adapted), net, _detached(fixed), support)
        else:
            grads = grad(_inner_loss)(adapted, net, fixed, support)
        adapted = {n: p + descent[n] * grads[n] for n, p in adapted.items()}
    return adapted


def _adapted_logits(
    net: nn.Module, fixed: Params, task_adapt: Callable, adapted: Params, support: Tensor, query: Tensor
) -> Tensor:
    """One task's ``adapt`` then ``score``: the query logits of the weights adapted on the support."""
    with torch.enable_grad():
        adapted = task_adapt(adapted, support)
    return _task_logits(net, fixed, adapted, query, support)


def _detached(params: Params) -> Params:
    return {n: p.detach() for n, p in params.items()}


def _leading(a: Tensor | Params) -> int:
    return next(iter(a.values())).shape[0] if isinstance(a, dict) else a.shape[0]


def _index(a: Tensor | Params, b: int) -> Tensor | Params:
    return {k: v[b] for k, v in a.items()} if isinstance(a, dict) else a[b]
