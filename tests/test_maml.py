"""MAML family: batched (vmap) and per-task (loop) meta-gradients against a plain autograd
reference in float64, the BatchNorm policy, the memory option, configs, and real learning."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import eval_result
from helpers import compose
from hydra.utils import instantiate
from torch import nn
from torch.func import functional_call

from fewshot_cli.algorithms.maml import MAML
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore
from fewshot_cli.episode import IMAGE_TASKS, Episode
from fewshot_cli.errors import FewshotError

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "maml": {},
    "fomaml": {"first_order": True},
    "metasgd": {"learn_inner_lr": True, "inner_lr_range": (0.05, 0.5)},
    "anil": {"adapt": "head"},
}


class PlainConv(nn.Module):
    """A backbone without BatchNorm: conv-ReLU-pool twice, flattened."""

    task_kind, feature_map = IMAGE_TASKS, None  # the Backbone protocol

    def __init__(self, in_channels: int = 1, image_size: int = 16, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Conv2d(hidden, hidden, 3, padding=1),
                                 nn.Tanh(), nn.MaxPool2d(2), nn.Flatten())
        self.out_features = hidden * (image_size // 4) ** 2

    def set_step(self, step: int) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_algo(with_bn: bool, ways: int = 3, seed: int = 0, **options) -> MAML:
    torch.manual_seed(seed)
    backbone = Conv4(1, 16, hidden=8) if with_bn else PlainConv()
    return MAML(backbone, ways, inner_lr=0.3, **options).double()


def episode(ways: int = 3, shots: int = 2, queries: int = 3, meta_batch: int = 4,
            seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (10, 8, 1, 16, 16), generator=g, dtype=torch.uint8)
    store = ClassStore(images, [f"c{i}" for i in range(10)])
    ep = EpisodeSampler(store, ways, shots, queries, meta_batch, seed=seed).sample()
    return replace(ep, support=ep.support.double(), query=ep.query.double())


def reference_loss(algo: MAML, ep: Episode, steps: int, first_order: bool,
                   msl: list[float] | None = None) -> torch.Tensor:
    """Per-task MAML written with plain autograd: torch.autograd.grad(create_graph=True)."""
    params = {n: p for n, p in algo.named_parameters() if not n.startswith("inner_lrs")}
    fast_names = [n for n in params if not algo.head_only or n.startswith("head.")]

    def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
        body = {n[9:]: v for n, v in p.items() if n.startswith("backbone.")}
        return F.linear(functional_call(algo.backbone, body, (x,)), p["head.weight"],
                        p["head.bias"])

    def lr(name: str, s: int):
        if not algo.inner_lrs:
            return algo.inner_lr
        value = algo.inner_lrs[name.replace(".", "__")]
        return value[min(s, algo.inner_steps - 1)] if algo.per_step_lr else value

    total = 0.0
    for b in range(ep.meta_batch):
        p = dict(params)
        for s in range(steps):
            support_loss = F.cross_entropy(forward(p, ep.support[b]), ep.support_y[b])
            grads = torch.autograd.grad(support_loss, [p[n] for n in fast_names],
                                        create_graph=not first_order)
            p.update({n: p[n] - lr(n, s) * g for n, g in zip(fast_names, grads, strict=True)})
            weight = msl[s] if msl else float(s == steps - 1)
            total = total + weight * F.cross_entropy(forward(p, ep.query[b]), ep.query_y[b])
    return total / ep.meta_batch


def meta_grads(algo: MAML, loss: torch.Tensor) -> list[torch.Tensor]:
    params = list(algo.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("batchnorm", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_gradients_match_reference(variant: str, batchnorm: bool) -> None:
    algo = make_algo(batchnorm, inner_steps=2, **VARIANTS[variant])
    ep = episode()
    reference = meta_grads(algo, reference_loss(algo, ep, 2, algo.first_order))
    for mode, chunk in (("vmap", None), ("vmap", 3), ("loop", None)):
        algo.batching, algo.task_chunk = mode, chunk  # loop and chunks backpropagate eagerly
        loss, logits = algo.loss(ep)
        assert logits.shape == (4, 9, 3)
        for got, want in zip(meta_grads(algo, loss), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # second order must differ from first order, or the test above would not tell them apart
    if variant == "maml":
        fo = meta_grads(algo, reference_loss(algo, ep, 2, first_order=True))
        assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fo, reference,
                                                                        strict=True))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_maml_plus_plus_options_match_reference(batching: str) -> None:
    algo = make_algo(True, inner_steps=3, per_step_lr=True, multi_step_loss=True,
                     msl_anneal_steps=10, first_order_until=5, batching=batching)
    ep = episode(meta_batch=3)
    algo.set_step(2)  # first order (DA) and an MSL weighting half-way through its annealing
    weights = algo._msl_weights()
    assert weights[0] > 0.03 / 3 and abs(sum(weights) - 1) < 1e-12
    reference = meta_grads(algo, reference_loss(algo, ep, 3, True, weights))
    for got, want in zip(meta_grads(algo, algo.loss(ep)[0]), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    algo.set_step(20)  # second order, all weight on the last step but the floor
    weights = algo._msl_weights()
    assert weights[0] == pytest.approx(0.01)
    reference = meta_grads(algo, reference_loss(algo, ep, 3, False, weights))
    for got, want in zip(meta_grads(algo, algo.loss(ep)[0]), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert algo.inner_lrs["head__weight"].shape == (3,)


def test_checkpointed_inner_steps_give_the_same_gradients() -> None:
    grads = []
    for checkpoint_steps in (False, True):
        algo = make_algo(True, inner_steps=3, learn_inner_lr=True,
                         checkpoint_steps=checkpoint_steps, batching="vmap")
        algo.loss(episode())[0].backward()  # reentrant checkpointing needs .backward()
        grads.append([p.grad for p in algo.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_predict_uses_eval_steps_and_same_batchnorm_in_train_and_eval() -> None:
    algo = make_algo(True, inner_steps=1, eval_inner_steps=4, batching="vmap")
    assert not any("running" in k for k in algo.state_dict())  # per-task statistics only
    ep = episode()
    with torch.no_grad():
        algo.eval()
        evaluated = algo.predict(ep.support, ep.support_y, ep.query, 3)
        algo.train()
        trained = algo.predict(ep.support, ep.support_y, ep.query, 3)
        algo.batching = "loop"
        looped = algo.predict(ep.support, ep.support_y, ep.query, 3)
    torch.testing.assert_close(evaluated, trained)
    torch.testing.assert_close(evaluated, looped)
    fast = algo.adapt_and_classify(ep.support, ep.support_y, ep.query, 4, True, "loop")[0]
    torch.testing.assert_close(evaluated, fast.detach())
    one = algo.adapt_and_classify(ep.support, ep.support_y, ep.query, 1, True, "loop")[0]
    assert not torch.allclose(evaluated, one.detach())
    with pytest.raises(FewshotError, match="trained for 3"):
        algo.predict(ep.support, ep.support_y, ep.query, 5)


def test_auto_batching_follows_the_device_and_trains() -> None:
    algo = make_algo(True, batching="auto").float()
    assert algo._mode(torch.device("cpu")) == "loop"
    assert algo._mode(torch.device("cuda")) == "vmap"
    ep = episode()
    ep = replace(ep, support=ep.support.float(), query=ep.query.float())
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    for _ in range(2):
        loss, _ = algo.loss(ep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("option, message", [
    ({"batching": "fast"}, "algo.batching"), ({"adapt": "body"}, "algo.adapt"),
    ({"inner_steps": 0}, "algo.inner_steps"), ({"batchnorm": "running"}, "algo.batchnorm"),
    ({"task_chunk": 0}, "algo.task_chunk"),
])
def test_bad_options_name_the_key(option: dict, message: str) -> None:
    with pytest.raises(FewshotError, match=message):
        make_algo(True, **option)


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "anil"])
def test_algo_configs_instantiate(name: str) -> None:
    cfg = compose([f"algo={name}"])
    algo = instantiate(cfg.algo, backbone=Conv4(1, 28, hidden=8), ways=cfg.train.ways)
    assert isinstance(algo, MAML)
    assert algo.eval_inner_steps >= algo.inner_steps


@pytest.mark.real_data
def test_maml_learns_omniglot(omniglot_root: Path, cli, tmp_path: Path) -> None:
    if not (REPO / "fewshot_cli" / "data" / "omniglot.py").exists():
        pytest.skip("the Omniglot reader has not landed yet")
    run = tmp_path / "run"
    done = cli("train", "algo=maml", "dataset=omniglot", f"dataset.root={omniglot_root}",
               "dataset.split=minimal", "device=cpu", "backbone.hidden=32", "train.ways=5",
               "train.shots=1", "train.queries=5", "train.meta_batch=8", "train.steps=150",
               "train.val_every=150", "train.val_episodes=50", "train.lr=0.003",
               "train.scheduler=null", "algo.inner_steps=1", "algo.eval_inner_steps=3",
               # vmap: with 8 small tasks it trains this run ~2x faster than auto (loop) on CPU
               "algo.batching=vmap",
               f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    done = cli("eval", f"ckpt={run / 'best.pt'}", "eval.episodes=200")
    assert done.returncode == 0, done.stderr[-2000:]
    result = eval_result(run, 5, 1)
    print(f"MAML Omniglot 5w1s: {100 * result['accuracy']:.1f}% ± {100 * result['ci95']:.1f}%")
    assert result["accuracy"] - result["ci95"] >= 0.65, result  # chance is 20%
