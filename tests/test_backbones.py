"""Backbones: the conv net's support-statistics normalisation (OC-MAML's BatchNorm) is per task,
never transductive, and exact under vmap, also inside MAML's second-order meta-gradient."""

from __future__ import annotations

import pytest
import torch

from metaad.data.episodes import Episode
from metaad.detectors.backbones import Conv4
from metaad.detectors.maml import MAML


def episodes(b: int = 3, k: int = 4, q: int = 6, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    support, query = torch.rand(b, k, 1, 16, 16, generator=g), torch.rand(b, q, 1, 16, 16, generator=g)
    label = torch.tensor([[0, 1] * (q // 2)] * b)
    return Episode(support, query, label, torch.arange(b), label)


@pytest.mark.parametrize("norm", ["group", "support"])
def test_a_query_embedding_depends_on_its_task_support_only(norm):
    torch.manual_seed(0)
    net = Conv4([1, 16, 16], channels=8, blocks=2, norm_groups=4, norm=norm)
    x = torch.rand(3, 7, 1, 16, 16)
    out = net(x, n_support=4)
    other_queries = x.clone()
    other_queries[:, 5] += 3.0
    other_tasks = x.clone()
    other_tasks[1:] *= 2.0
    torch.testing.assert_close(net(other_queries, n_support=4)[:, [4, 6]], out[:, [4, 6]])
    torch.testing.assert_close(net(other_tasks, n_support=4)[0], out[0])
    torch.testing.assert_close(net(x[1], n_support=4), out[1])  # one task alone, the same
    if norm == "support":  # and the support does matter
        changed = x.clone()
        changed[:, :4] *= 2.0
        assert not torch.allclose(net(changed, n_support=4)[:, 4:], out[:, 4:])


def test_support_statistics_are_the_support_mean_and_biased_variance():
    torch.manual_seed(0)
    net = Conv4([1, 16, 16], channels=4, blocks=1, norm="support")
    x = torch.rand(1, 5, 1, 16, 16)
    h = net.convs[0](x[0])
    mean, var = h[:3].mean((0, 2, 3), keepdim=True), h[:3].var((0, 2, 3), unbiased=False, keepdim=True)
    expected = torch.nn.functional.max_pool2d(torch.relu((h - mean) / (var + 1e-3).sqrt()), 2).flatten(1)
    torch.testing.assert_close(net(x, n_support=3)[0], expected)


def test_maml_with_support_statistics_scores_without_looking_at_other_queries():
    torch.manual_seed(0)
    model = MAML(Conv4([1, 16, 16], channels=8, blocks=2, norm="support"), inner_steps=2).eval()
    batch = episodes()
    scores = model.score(model.adapt(batch.support), batch.query)
    torch.testing.assert_close(scores, model.anomaly_scores(batch.support, batch.query))
    alone = model.anomaly_scores(batch.support, batch.query[:, :1])
    torch.testing.assert_close(alone, scores[:, :1])


def test_maml_with_support_statistics_vmapped_equals_a_loop_second_order():
    """In float64, so a wrong batching rule (as torch has for fused layer norm) cannot hide in noise."""
    grads = []
    for vectorize in (True, False):
        torch.manual_seed(0)
        model = MAML(
            Conv4([1, 16, 16], channels=8, blocks=2, norm="support"), inner_steps=2, vectorize=vectorize
        )
        model = model.double()
        batch = episodes()
        model.loss(batch._replace(support=batch.support.double(), query=batch.query.double())).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
