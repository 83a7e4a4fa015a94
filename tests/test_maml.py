"""The MAML family: vmapped meta-gradients against a plain per-task loop, Meta-SGD, ANIL, evaluation."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.func import grad as func_grad

from metaad.data import Episode, EpisodeDataset, collate_episodes, split_tasks
from metaad.data.sources import digits
from metaad.detectors.backbones import MLP
from metaad.detectors.maml import MAML, _inner_loss, _task_logits, balanced_bce


@pytest.fixture(scope="module")
def batch() -> Episode:
    """A meta-batch of 4 real digits episodes (K=5, Q=10), in float64 so gradients compare to 1e-5."""
    pools = split_tasks(digits(), train_tasks=None, val_tasks=[6, 7, 8, 9], test_tasks=[6, 7, 8, 9])
    episodes = EpisodeDataset(
        pools["train"], "train", k_shot=5, n_query=10, anomaly_ratio=0.3, n_episodes=4, seed=0
    )
    meta_batch = collate_episodes([episodes[i] for i in range(4)])
    return meta_batch._replace(support=meta_batch.support.double(), query=meta_batch.query.double())


def make_maml(**kwargs) -> MAML:
    torch.manual_seed(0)
    args = dict(inner_steps=2, inner_lr=0.3) | kwargs
    model = MAML(MLP((64,), hidden=(16,), embed_dim=8), **args)
    return model.double().train()


def loop_meta_gradient(model: MAML, batch: Episode) -> dict[str, torch.Tensor]:
    """The textbook per-task loop with ``torch.autograd.grad``: an independent reference."""
    params = dict(model.net.named_parameters())
    adapted_names = model.adapted_names
    lrs = (
        dict(zip(adapted_names, model.inner_lrs))
        if model.meta_sgd
        else dict.fromkeys(adapted_names, model.inner_lr)
    )
    losses = []
    for b in range(batch.support.shape[0]):
        fast = dict(params)
        for _ in range(model.inner_steps):
            logits = functional_call(model.net, fast, (batch.support[b],))
            inner = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
            grads = torch.autograd.grad(
                inner, [fast[n] for n in adapted_names], create_graph=not model.first_order
            )
            fast |= {n: fast[n] - lrs[n] * g for n, g in zip(adapted_names, grads)}
        logits = functional_call(model.net, fast, (batch.query[b],))
        label = batch.label[b].double()
        weight = torch.where(label == 1, 0.5 / label.sum(), 0.5 / (1 - label).sum())
        losses.append((F.binary_cross_entropy_with_logits(logits, label, reduction="none") * weight).sum())
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(named.values()))
    return dict(zip(named, grads))


def module_meta_gradient(model: MAML, batch: Episode) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.loss(batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("variant", ["maml", "meta_sgd", "anil"])
def test_vmapped_meta_gradient_equals_per_task_loop(batch: Episode, first_order: bool, variant: str) -> None:
    flags = {"meta_sgd": variant == "meta_sgd", "anil": variant == "anil"}
    model = make_maml(first_order=first_order, **flags)
    expected = loop_meta_gradient(model, batch)
    got = module_meta_gradient(model, batch)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # The meta-gradient is real: every meta-parameter gets a non-zero share.
    assert all(g.abs().sum() > 0 for g in got.values())


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"first_order": True}, {"meta_sgd": True}, {"anil": True, "first_order": True}],
    ids=["maml", "fomaml", "meta_sgd", "anil_first_order"],
)
def test_speed_paths_give_bitwise_the_plain_meta_gradient(batch: Episode, kwargs: dict) -> None:
    """Adapting and scoring in one pass over the tasks, ``p + (-lr) * g`` and the first-order inner
    gradient taken on detached weights are speed-ups only: the meta-gradient equals, bit for bit,
    that of the plain formulation (``adapt``, then ``score``; ``p - lr * g``; the inner gradient
    detached after it is taken)."""
    model = make_maml(**kwargs)
    adapted, fixed, lrs = model._meta_params()

    def plain_adapt(adapted: dict, support: torch.Tensor) -> dict:
        for _ in range(model.inner_steps):
            grads = func_grad(_inner_loss)(adapted, model.net, fixed, support)
            if model.first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            adapted = {n: p - lrs[n] * grads[n] for n, p in adapted.items()}
        return adapted

    state = vmap(plain_adapt, in_dims=(None, 0))(adapted, batch.support)
    logits = vmap(partial(_task_logits, model.net, fixed))(state, batch.query)
    plain = torch.autograd.grad(balanced_bce(logits, batch.label).mean(), list(model.parameters()))
    fast = module_meta_gradient(model, batch)
    for (name, got), expected in zip(fast.items(), plain, strict=True):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_anomaly_scores_equal_adapt_then_score(batch: Episode, vectorize: bool) -> None:
    model = make_maml(test_inner_steps=3, vectorize=vectorize).eval()
    with torch.no_grad():
        scores = model.anomaly_scores(batch.support, batch.query)
        assert torch.equal(scores, model.score(model.adapt(batch.support), batch.query))
    assert not scores.requires_grad


def test_second_order_differs_from_first_order(batch: Episode) -> None:
    second = module_meta_gradient(make_maml(), batch)
    first = module_meta_gradient(make_maml(first_order=True), batch)
    assert not torch.allclose(second["net.body.net.1.weight"], first["net.body.net.1.weight"])


def test_loop_and_chunked_vmap_give_the_vmapped_gradient(batch: Episode) -> None:
    reference = module_meta_gradient(make_maml(), batch)
    for kwargs in ({"vectorize": False}, {"chunk_size": 3}):
        got = module_meta_gradient(make_maml(**kwargs), batch)
        for name, grad in reference.items():
            torch.testing.assert_close(got[name], grad, msg=f"{kwargs} {name}")


def test_meta_sgd_learning_rates_receive_gradients_and_learn(batch: Episode) -> None:
    model = make_maml(meta_sgd=True)
    assert len(model.inner_lrs) == len(list(model.net.parameters()))
    before = [lr.detach().clone() for lr in model.inner_lrs]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(batch).backward()
    for lr in model.inner_lrs:
        assert lr.grad is not None and torch.isfinite(lr.grad).all() and lr.grad.abs().sum() > 0
    optimizer.step()
    assert all(not torch.equal(b, lr) for b, lr in zip(before, model.inner_lrs))


def test_anil_adapts_only_the_head(batch: Episode) -> None:
    model = make_maml(anil=True)
    state = model.adapt(batch.support)
    assert set(state) == {"head.weight", "head.bias"}
    head = model.net.head
    assert not torch.allclose(state["head.weight"][0], head.weight)  # the head did adapt
    # Scores are the adapted head on the unchanged, meta-learned body.
    features = model.net.body(batch.query.flatten(0, 1)).unflatten(0, batch.query.shape[:2])
    expected = torch.einsum("bqd,bod->bq", features, state["head.weight"]) + state["head.bias"]
    torch.testing.assert_close(model.score(state, batch.query), expected)
    # The body still gets a meta-gradient through the adapted head.
    model.loss(batch).backward()
    assert model.net.body.net[1].weight.grad.abs().sum() > 0


def test_evaluation_adapts_with_gradients_but_no_outer_graph(batch: Episode) -> None:
    model = make_maml(test_inner_steps=3)
    model.eval()
    with torch.no_grad():
        state = model.adapt(batch.support)
        scores = model.score(state, batch.query)
    assert not any(t.requires_grad for t in state.values()) and not scores.requires_grad
    # Three steps of one-class adaptation on each support set lower its loss, task by task.
    params = dict(model.net.named_parameters())
    for b in range(batch.support.shape[0]):
        adapted = {n: t[b] for n, t in state.items()}
        before = F.softplus(functional_call(model.net, params, (batch.support[b],))).mean()
        after = F.softplus(functional_call(model.net, adapted, (batch.support[b],))).mean()
        assert after < before
    model.train()
    assert all(t.requires_grad for t in model.adapt(batch.support).values())


def test_test_inner_steps_zero_scores_with_the_initialisation(batch: Episode) -> None:
    model = make_maml(test_inner_steps=0).eval()
    with torch.no_grad():
        scores = model.anomaly_scores(batch.support, batch.query)
        torch.testing.assert_close(scores, model.net(batch.query.flatten(0, 1)).unflatten(0, scores.shape))


def test_balanced_bce_weights_classes_equally() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    label = torch.tensor([[1, 0, 0, 0]])
    bce = F.binary_cross_entropy_with_logits(logits, label.float(), reduction="none")[0]
    torch.testing.assert_close(balanced_bce(logits, label), 0.5 * (bce[0] + bce[1:].mean()).unsqueeze(0))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"inner_steps": 0}, "model.inner_steps"),
        ({"inner_lr": 0.0}, "model.inner_lr"),
        ({"chunk_size": 0}, "model.chunk_size"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_maml(**kwargs)
