"""What a figure depends on: the data and the model, nothing else.

The invariance matrix. Each property below is stated once, with its tolerance, and run over
every image algorithm of ``ALGORITHMS`` (and the backbone options of ``BACKBONES`` that change
the graph). A new algorithm joins every property by being added to ``ALGORITHMS``; where an
algorithm legitimately depends on something a property varies, ``EXCEPTIONS`` names it with the
paper's reason, and docs/runs.md ("What a figure depends on") says so.

Properties (sections below, in this order):
- names and order: class folder names (labels permuted consistently) and file order;
- how the work is split: eval.batch, algo.batching, algo.checkpoint_steps, torchrun processes;
- how the pixels are stored: pickle, PNGs, folders at every image size; EXIF orientation;
- copies: a support image given k times;
- resume: stopped and resumed equals uninterrupted;
- the protocol key: every eval/device option either passes an invariance or is in the key.
"""

from __future__ import annotations

import pytest

# The image algorithms, each with the overrides that make it build on the tiny glyphs used
# here (the options of the matrix in test_matrix.py choose the graph). A new algorithm joins
# every property below by being added here.
ALGORITHMS: dict[str, list[str]] = {
    "protonet": [],
    "matching": [],
    "matching_fce": ["algo=matching", "algo.fce=true"],
    "relation": ["backbone=conv4_relation"],
    "siamese": [],
    "maml": ["algo.eval_inner_steps=1"],
    "fomaml": [],
    "metasgd": [],
    "anil": [],
    "meta_lstm": ["algo.inner_steps=2"],
    "reptile": ["algo.inner_steps=2", "algo.eval_inner_steps=2"],
    "weightgen": [],
    "baseline": [],
    "rfs": [],
}

# Backbone options that change the graph: random layers (dropout, DropBlock) and a pretrained-
# shaped network. Tiny widths; nothing downloaded.
BACKBONES: dict[str, list[str]] = {
    "conv4": ["backbone=conv4", "backbone.hidden=4"],
    "resnet12_dropblock": ["backbone=resnet12", "backbone.widths=[4,4,4,4]",
                           "backbone.keep_prob=0.9"],
    "torchvision": ["backbone=torchvision", "backbone.arch=resnet18", "backbone.weights=null"],
}

# (property, algorithm) -> why the algorithm legitimately depends on what the property varies,
# with the paper that says so. Every entry is listed in docs/runs.md.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def algorithm_overrides(name: str) -> list[str]:
    """The overrides that select algorithm ``name`` of ``ALGORITHMS``."""
    extra = ALGORITHMS[name]
    chosen = [o for o in extra if o.startswith("algo=")]
    return ([] if chosen else [f"algo={name}"]) + extra


def test_the_list_names_every_image_algorithm_of_the_config_tree() -> None:
    from fewshot_cli.config import group_targets

    algos = {o.split("=")[1] for name in ALGORITHMS for o in algorithm_overrides(name)
             if o.startswith("algo=")}
    assert algos | {"rl2"} == set(group_targets("algo"))


def exception(prop: str, name: str) -> None:
    """Skip (with the documented reason) where ``name`` legitimately fails ``prop``."""
    if (prop, name) in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[prop, name])


# ================================================================ names and order
# (section: names and order)

# ================================================================ how the work is split
# (section: how the work is split)

# ================================================================ how the pixels are stored
# (section: how the pixels are stored)

# ================================================================ copies
# (section: copies)

# ================================================================ resume
# (section: resume)

# ================================================================ the protocol key
# (section: the protocol key)
