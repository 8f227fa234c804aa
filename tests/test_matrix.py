"""Every algorithm with every backbone: checkpoints of an earlier commit load and give the same
numbers, and every combination that composes trains and evaluates or is refused in one
sentence before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fewshot_cli.build import build_algorithm
from fewshot_cli.episode import Episode

FIXTURE = Path(__file__).parent / "data" / "algorithms_d01c6ce.pt"
RECORDED = torch.load(FIXTURE, weights_only=True)  # tests/data/make_algorithms_fixture.py
CASES = [name for name in RECORDED if name not in ("commit", "episode")]


@pytest.mark.parametrize("name", CASES)
def test_checkpoints_of_d01c6ce_load_and_give_the_same_numbers(name: str) -> None:
    """The weights' names, the predictions and the first meta-step of every algorithm are
    those of commit d01c6ce, to the bit (the inner loop was one module then)."""
    case, e = RECORDED[name], RECORDED["episode"]
    episode = Episode(e["support"], e["support_y"], e["query"], e["query_y"], 3, 2, 2)
    algo = build_algorithm(OmegaConf.create(case["config"]), {"in_channels": 1, "image_size": 16})
    algo.load_state_dict(case["model"])  # strict: no key renamed, none missing
    algo.eval()
    with torch.no_grad():
        assert torch.equal(algo.predict(episode.support, episode.support_y, episode.query, 3),
                           case["logits"])
    algo.set_step(0)
    algo.train()
    torch.manual_seed(1)
    loss, _ = algo.meta_loss(episode)
    assert torch.equal(loss.detach(), case["loss"])
    named = [(n, p) for n, p in algo.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    got = {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}
    assert got.keys() == case["grads"].keys()
    for n, g in got.items():
        assert torch.equal(g, case["grads"][n]), n
