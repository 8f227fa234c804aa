"""weightgen: generators are permutation-invariant maps of the support set, the fine-tuning on
the shared inner loop against a float64 autograd reference, and the configs (the CLI and real
learning: test_model_based_learning.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from fewshot_cli.algorithms.weightgen import AttentionGenerator, MeanGenerator, WeightGen
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.errors import FewshotError

REPO = Path(__file__).resolve().parents[1]


def tasks(b: int = 2, ways: int = 3, shots: int = 2, queries: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(b, ways * shots, 1, 16, 16, generator=g, dtype=torch.float64)
    query = torch.rand(b, ways * queries, 1, 16, 16, generator=g, dtype=torch.float64)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(b, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(b, -1)
    return support, support_y, query, query_y


def make_algo(generator: str = "attention", seed: int = 0, **options) -> WeightGen:
    torch.manual_seed(seed)
    return WeightGen(Conv4(1, 16, hidden=4), 3, generator=generator, **options).double()


@pytest.mark.parametrize("generator", [MeanGenerator, AttentionGenerator])
def test_generators_are_permutation_invariant(generator: type) -> None:
    torch.manual_seed(0)
    gen = generator(6).double()
    features = torch.randn(2, 6, 6, dtype=torch.float64)  # 3 ways, 2 shots
    labels = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, -1)
    weight, bias = gen(features, labels, 3)
    assert weight.shape == (2, 3, 6) and bias.shape == (2, 3)
    order = torch.tensor([5, 2, 0, 4, 1, 3])  # shuffled shots: the same classifier
    torch.testing.assert_close(gen(features[:, order], labels[:, order], 3), (weight, bias))
    relabel = torch.tensor([2, 0, 1])  # classes renamed: the weights follow their class
    shuffled, _ = gen(features, relabel[labels], 3)
    torch.testing.assert_close(shuffled[:, relabel], weight)


def test_mean_generator_starts_as_a_cosine_prototype_classifier() -> None:
    algo = make_algo("mean")
    support, support_y, query, _ = tasks()
    with torch.no_grad():  # train mode: BatchNorm statistics of all the images together
        logits = algo.predict(support, support_y, query, 3)
        features = algo.backbone(torch.cat([support, query], 1).flatten(0, 1)).unflatten(
            0, (2, -1))
    s, q = F.normalize(features[:, :6], dim=-1), F.normalize(features[:, 6:], dim=-1)
    prototypes = F.normalize(s.unflatten(1, (3, 2)).mean(2), dim=-1)
    torch.testing.assert_close(logits, 10.0 * q @ prototypes.transpose(1, 2))


def test_attention_memory_and_scales_learn_and_any_ways_at_test_time() -> None:
    algo = make_algo("attention")
    support, support_y, query, query_y = tasks()
    logits = algo.predict(support, support_y, query, 3)
    F.cross_entropy(logits.flatten(0, 1), query_y.flatten()).backward()
    for name in ("values", "keys", "query.weight", "temperature", "mean_gain",
                 "attention_gain"):
        assert getattr(algo.generator, name.split(".")[0]) is not None
        grad = dict(algo.generator.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert algo.scale.grad.abs() > 0
    support, support_y, query, _ = tasks(ways=5)  # trained 3-way, tested 5-way
    with torch.no_grad():
        assert algo.predict(support, support_y, query, 5).shape == (2, 15, 5)


def reference_finetuned_logits(algo: WeightGen, support, support_y, query, steps: int,
                               lr: float) -> torch.Tensor:
    """Task by task, plain autograd: generate, then ``steps`` SGD steps (second order)."""
    out = []
    for b in range(len(support)):
        features = algo.backbone(torch.cat([support[b], query[b]]))
        s, q = features[:len(support[b])], features[len(support[b]):]
        w, bias = algo.generator(s[None], support_y[b][None], 3)
        w, bias = w[0], bias[0]
        for _ in range(steps):
            logits = algo.scale * F.normalize(s, dim=-1) @ F.normalize(w, dim=-1).T + bias
            gw, gb = torch.autograd.grad(F.cross_entropy(logits, support_y[b]), [w, bias],
                                         create_graph=True)
            w, bias = w - lr * gw, bias - lr * gb
        out.append(algo.scale * F.normalize(q, dim=-1) @ F.normalize(w, dim=-1).T + bias)
    return torch.stack(out)


def test_finetuning_on_the_shared_inner_loop_matches_reference() -> None:
    support, support_y, query, query_y = tasks()
    for batching in ("vmap", "loop"):
        algo = make_algo("attention", finetune_steps=2, finetune_lr=0.5, batching=batching)
        algo.eval()  # BatchNorm with running statistics: tasks independent, as the reference
        params = list(algo.parameters())
        logits = algo.predict(support, support_y, query, 3)
        want = reference_finetuned_logits(algo, support, support_y, query, 2, 0.5)
        torch.testing.assert_close(logits, want)
        loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten())
        ref = F.cross_entropy(want.flatten(0, 1), query_y.flatten())
        got = torch.autograd.grad(loss, params)
        for a, b in zip(got, torch.autograd.grad(ref, params), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            plain = make_algo("attention").eval().predict(support, support_y, query, 3)
            assert not torch.allclose(plain, algo.predict(support, support_y, query, 3))


def test_config_picks_the_generator_by_name() -> None:
    for name, cls in (("attention", AttentionGenerator), ("mean", MeanGenerator)):
        cfg = compose(["algo=weightgen", f"algo.generator={name}",
                        "algo.generators.attention.memory=8"])
        algo = instantiate(cfg.algo, backbone=Conv4(1, 28, hidden=8), ways=cfg.train.ways)
        assert isinstance(algo, WeightGen) and type(algo.generator) is cls
    assert algo.finetune_steps == 0 and algo.scale.item() == 10.0
    cfg = compose(["algo=weightgen", "algo.generator=lstm"])
    with pytest.raises(InstantiationException) as error:  # the CLI prints the cause alone
        instantiate(cfg.algo, backbone=Conv4(1, 28, hidden=8), ways=5)
    assert isinstance(error.value.__cause__, FewshotError)
    assert "algo.generator=lstm is unknown" in str(error.value.__cause__)
