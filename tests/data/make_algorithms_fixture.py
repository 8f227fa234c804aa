"""Writes algorithms_<commit>.pt: every image algorithm's initial weights, its predictions on a
fixed episode and its first meta-training loss and gradients there, as one commit computes them.

tests/test_matrix.py loads the file with today's code and asks for the same numbers, so a
refactor that renames a checkpoint key or changes a figure is caught. Made from commit d01c6ce
(before the inner loop became a package)::

    git archive d01c6ce | tar -x -C /tmp/base && cd /tmp/base &&
    PYTHONPATH=. python <repo>/tests/data/make_algorithms_fixture.py \
        <repo>/tests/data/algorithms_d01c6ce.pt d01c6ce2f0ebb5a2ea181a29e536bf2a72f5f8e3
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fewshot_cli.build import build_algorithm
from fewshot_cli.config import conf_dir
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore

SHAPE = ["dataset=glyphs", "dataset.image_size=16", "train.ways=3", "train.shots=2",
         "train.queries=2", "train.meta_batch=2"]
CASES = {
    "protonet_resnet12_dropblock": ["algo=protonet", "backbone=resnet12",
                                    "backbone.widths=[4,4,4,4]", "backbone.keep_prob=0.9"],
    "maml": ["algo=maml", "backbone.hidden=4", "algo.batching=loop"],
    "metasgd_lslr": ["algo=metasgd", "backbone.hidden=4", "algo.per_step_lr=true",
                     "algo.inner_steps=2", "algo.batching=vmap"],
    "anil": ["algo=anil", "backbone.hidden=4", "algo.batching=loop"],
    "maml_msl": ["algo=fomaml", "backbone.hidden=4", "algo.inner_steps=2",
                 "algo.multi_step_loss=true", "algo.batching=vmap"],
    "meta_lstm": ["algo=meta_lstm", "backbone.hidden=4", "algo.inner_steps=2",
                  "algo.batching=loop"],
    "weightgen": ["algo=weightgen", "backbone.hidden=4", "algo.finetune_steps=1",
                  "algo.generators.attention.memory=8", "algo.batching=loop"],
    "matching_fce": ["algo=matching", "backbone.hidden=4", "algo.fce=true", "algo.fce_steps=2"],
    "relation": ["algo=relation", "backbone.hidden=4", "algo.channels=4"],
    "siamese": ["algo=siamese", "backbone.hidden=4"],
}


def store(seed: int) -> ClassStore:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (8, 6, 1, 16, 16), generator=g, dtype=torch.uint8)
    return ClassStore(images, [f"c{i}" for i in range(8)])


def record(overrides: list[str], episode) -> dict:
    """Initial weights, eval-mode logits, then the first meta-step's loss and gradients."""
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("train", overrides=[*SHAPE, *overrides])
    torch.manual_seed(0)
    algo = build_algorithm(cfg, store(0))
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    algo.eval()
    with torch.no_grad():
        logits = algo.predict(episode.support, episode.support_y, episode.query, 3)
    algo.set_step(0)
    algo.train()
    torch.manual_seed(1)
    loss, _ = algo.meta_loss(episode)
    named = [(n, p) for n, p in algo.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {"overrides": overrides, "config": OmegaConf.to_container(cfg, resolve=True),
            "model": state, "logits": logits, "loss": loss.detach(),
            "grads": {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}}


def main(path: str, commit: str) -> None:
    episode = EpisodeSampler(store(1), 3, 2, 2, 2, seed=1).sample()
    out = {"commit": commit, "episode": {k: getattr(episode, k) for k in
                                         ("support", "support_y", "query", "query_y")}}
    for name, overrides in CASES.items():
        out[name] = record(overrides, episode)
    torch.save(out, path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
