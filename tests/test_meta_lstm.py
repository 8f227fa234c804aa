"""Meta-LSTM on the shared inner loop: the batched meta-gradient against a per-task float64
reference written with plain autograd and torch's own LSTMCell, the gates and c0 learning, the
BatchNorm policy at test time, and the configs (real learning: test_model_based_learning.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose
from hydra.utils import instantiate
from test_maml import episode, meta_grads  # the MAML tests' float64 episodes
from torch.func import functional_call

from fewshot_cli.algorithms.inner_loop import SGD, LSTMRule, preprocess
from fewshot_cli.algorithms.maml import MAML
from fewshot_cli.algorithms.meta_lstm import MetaLSTM
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.episode import Episode
from fewshot_cli.errors import FewshotError

REPO = Path(__file__).resolve().parents[1]


def make_algo(seed: int = 0, **options) -> MetaLSTM:
    torch.manual_seed(seed)
    return MetaLSTM(Conv4(1, 16, hidden=4), 3, **options).double()


def reference_loss(algo: MetaLSTM, ep: Episode, steps: int) -> torch.Tensor:
    """Ravi & Larochelle's meta-learner task by task: plain autograd for the learner's gradient
    (taken as a constant, no second derivatives) and torch's own nn.LSTMCell, [coordinates, 20]."""
    rule = algo.meta_learner
    params = {n: p for n, p in algo.named_parameters() if n.startswith(("backbone.", "head."))}
    names = list(params)

    def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
        body = {n[9:]: v for n, v in p.items() if n.startswith("backbone.")}
        return F.linear(functional_call(algo.backbone, body, (x,)), p["head.weight"],
                        p["head.bias"])

    def pre(x: torch.Tensor) -> torch.Tensor:  # Andrychowicz et al., Appendix A, p = 10
        big = x.abs() >= math.exp(-10)
        first = torch.where(big, x.abs().clamp_min(1e-300).log() / 10, torch.full_like(x, -1))
        return torch.stack([first, torch.where(big, x.sign(), x * math.exp(10))], -1)

    total = 0.0
    for b in range(ep.meta_batch):
        theta = torch.cat([params[n].reshape(-1) for n in names])
        coords = len(theta)
        h = c = theta.new_zeros(coords, rule.hidden)
        f_prev = i_prev = theta.new_zeros(coords, 1)
        for _ in range(steps):
            p = dict(zip(names, theta.split([params[n].numel() for n in names]), strict=True))
            p = {n: v.view_as(params[n]) for n, v in p.items()}
            loss = F.cross_entropy(forward(p, ep.support[b]), ep.support_y[b])
            g = torch.autograd.grad(loss, [p[n] for n in names])
            g = torch.cat([v.reshape(-1) for v in g]).detach()
            x = torch.cat([pre(g), pre(loss.detach()).expand(coords, 2)], 1)
            h, c = rule.lstm(x, (h, c))
            f = torch.sigmoid(rule.forget(torch.cat([h, theta[:, None], f_prev], 1)))
            i = torch.sigmoid(rule.input(torch.cat([h, theta[:, None], i_prev], 1)))
            theta = f[:, 0] * theta - i[:, 0] * g
            f_prev, i_prev = f, i
        p = dict(zip(names, theta.split([params[n].numel() for n in names]), strict=True))
        p = {n: v.view_as(params[n]) for n, v in p.items()}
        total = total + F.cross_entropy(forward(p, ep.query[b]), ep.query_y[b])
    return total / ep.meta_batch


def test_batched_meta_gradient_matches_per_task_reference() -> None:
    algo = make_algo(inner_steps=3)
    ep = episode(meta_batch=3)
    reference = meta_grads(algo, reference_loss(algo, ep, 3))
    for mode, chunk in (("vmap", None), ("vmap", 2), ("loop", None)):
        algo.batching, algo.task_chunk = mode, chunk
        loss, logits = algo.loss(ep)
        assert logits.shape == (3, 9, 3)
        for got, want in zip(meta_grads(algo, loss), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # With second derivatives the meta-gradient differs, so the test tells the paper's apart.
    second = meta_grads(algo, algo.adapted_loss(ep, 3, first_order=False)[0])
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(second, reference,
                                                                    strict=True))
    # The learned gates and c0 (the learner's initial weights) both receive gradients.
    names = [n for n, _ in algo.named_parameters()]
    grads = dict(zip(names, reference, strict=True))
    for name in ("meta_learner.forget.weight", "meta_learner.forget.bias",
                 "meta_learner.input.weight", "meta_learner.input.bias",
                 "meta_learner.lstm.weight_ih", "backbone.encoder.0.0.weight", "head.weight"):
        assert grads[name].abs().sum() > 0, name


def test_checkpointed_steps_give_the_same_gradients() -> None:
    grads = []
    for checkpoint_steps in (False, True):
        algo = make_algo(inner_steps=3, checkpoint_steps=checkpoint_steps, batching="vmap")
        algo.loss(episode(meta_batch=3))[0].backward()  # reentrant checkpointing needs .backward()
        grads.append([p.grad for p in algo.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_preprocessing_and_initial_update_are_the_papers() -> None:
    x = torch.tensor([1.0, -1e-3, 1e-6, 0.0], dtype=torch.float64)
    expected = [[0.0, 1.0], [math.log(1e-3) / 10, -1.0], [-1.0, 1e-6 * math.exp(10)], [-1.0, 0.0]]
    torch.testing.assert_close(preprocess(x), torch.tensor(expected, dtype=torch.float64))
    torch.manual_seed(0)
    rule = LSTMRule({"w": torch.Size([50])})
    assert 4 <= rule.forget.bias.item() <= 5 and -5 <= rule.input.bias.item() <= -4
    fast, grads = {"w": torch.randn(50)}, {"w": torch.randn(50)}
    new, state = rule.step(fast, grads, torch.tensor(1.3), 0, rule.initial_state(fast))
    # Close to gradient descent with a small rate at first: f ~ sigmoid(4.5), i ~ sigmoid(-4.5).
    assert 0.97 < state["f"].min() and state["f"].max() < 1
    assert 0.002 < state["i"].min() and state["i"].max() < 0.03
    torch.testing.assert_close(new["w"], state["f"] * fast["w"] - state["i"] * grads["w"])


def test_support_batchnorm_never_takes_statistics_from_test_images() -> None:
    algo = make_algo(inner_steps=2)
    ep = episode(queries=4, meta_batch=3)
    with torch.no_grad():
        full = algo.predict(ep.support, ep.support_y, ep.query, 3)
        some = algo.predict(ep.support, ep.support_y, ep.query[:, ::3], 3)
        algo.batching = "vmap"
        torch.testing.assert_close(algo.predict(ep.support, ep.support_y, ep.query, 3), full)
    # Each query's logits depend on the support set only, not on the other queries ...
    torch.testing.assert_close(some, full[:, ::3])
    # ... whereas the task policy (MAML's) normalises the queries with their own statistics.
    algo.batchnorm = "task"
    with torch.no_grad():
        own = algo.predict(ep.support, ep.support_y, ep.query, 3)
        own_some = algo.predict(ep.support, ep.support_y, ep.query[:, ::3], 3)
    assert not torch.allclose(own_some, own[:, ::3])


@pytest.mark.parametrize("option, message", [
    ({"inner_steps": 0}, "algo.inner_steps"), ({"batchnorm": "running"}, "algo.batchnorm"),
    ({"batching": "fast"}, "algo.batching"),
])
def test_bad_options_name_the_key(option: dict, message: str) -> None:
    with pytest.raises(FewshotError, match=message):
        make_algo(**option)


def test_config_and_a_new_update_rule_is_one_yaml_key() -> None:
    cfg = compose(["algo=meta_lstm"])
    algo = instantiate(cfg.algo, backbone=Conv4(1, 28, hidden=8), ways=cfg.train.ways)
    assert isinstance(algo, MetaLSTM) and isinstance(algo.rule, LSTMRule)
    assert algo.inner_steps == algo.eval_inner_steps == 12
    # MAML stepping with the meta-learner LSTM, and Meta-LSTM stepping with SGD: one key each.
    lstm = "{_target_:fewshot_cli.algorithms.inner_loop.LSTMRule,_partial_:true}"
    cfg = compose(["algo=maml", f"algo.update_rule={lstm}"])
    maml = instantiate(cfg.algo, backbone=Conv4(1, 16, hidden=4), ways=3).double()
    assert isinstance(maml, MAML) and isinstance(maml.rule, LSTMRule)
    assert torch.isfinite(maml.loss(episode(meta_batch=2))[0])
    sgd = "{_target_:fewshot_cli.algorithms.inner_loop.SGD,_partial_:true,lr:0.1}"
    cfg = compose(["algo=meta_lstm", f"algo.update_rule={sgd}"])
    algo = instantiate(cfg.algo, backbone=Conv4(1, 16, hidden=4), ways=3)
    assert isinstance(algo.rule, SGD) and algo.rule.lr == 0.1
