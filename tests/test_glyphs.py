"""Glyphs: generated characters with the right shapes, seeded, disjoint splits, real variation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose
from hydra.utils import instantiate

from fewshot_cli.data.glyphs import Glyphs, draw_glyphs
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.errors import FewshotError

SMALL = {"train": 30, "val": 20, "test": 20}
CONF = Path(__file__).resolve().parents[1] / "conf"


def test_built_from_its_yaml():
    cfg = compose(["dataset=glyphs", "dataset.classes.train=12"])
    ds = instantiate(cfg.dataset)
    train = ds.load("train")
    assert isinstance(ds, Glyphs) and train.num_classes == 12 * len(cfg.dataset.rotations)
    assert ds.load("test").images.shape == (100, 20, 1, 28, 28)


def test_shapes_and_rotations():
    ds = Glyphs({"train": 6, "val": 3, "test": 4}, images_per_class=5, image_size=20,
                rotations=[0, 90])
    train, val, test = (ds.load(s) for s in ("train", "val", "test"))
    assert train.images.shape == (12, 5, 1, 20, 20) and train.images.dtype == torch.uint8
    assert val.images.shape == (3, 5, 1, 20, 20) and test.num_classes == 4
    assert torch.equal(train.images[6:], torch.rot90(train.images[:6], 1, dims=(-2, -1)))
    # black strokes on white, like Omniglot
    assert (val.images == 255).float().mean() > 0.6 and val.images.min() < 40


def test_deterministic_per_seed():
    a = draw_glyphs(8, 3, 16, seed=3)
    assert torch.equal(a, draw_glyphs(8, 3, 16, seed=3))  # drawn twice, not read from a cache
    assert not torch.equal(a, draw_glyphs(8, 3, 16, seed=4))
    b = Glyphs(SMALL, seed=3).load("val").images
    assert torch.equal(b, Glyphs(SMALL, seed=3).load("val").images)
    assert not torch.equal(b, Glyphs(SMALL, seed=4).load("val").images)


def class_means(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(1).flatten(1)


def test_splits_are_disjoint():
    ds = Glyphs(SMALL)
    means = {s: class_means(ds.load(s).images) for s in ("train", "val", "test")}
    # the closest class of another split is farther than the closest other class of the
    # same split would be if a program were repeated (distance 0 up to noise)
    within = torch.cdist(means["val"], means["val"]) + torch.eye(20) * 1e9
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        across = torch.cdist(means[a], means[b]).min()
        assert across > 0.5 * within.min(), (a, b)


def test_instances_vary_less_within_than_across_classes():
    images = Glyphs(SMALL).load("val").images.float().flatten(2)  # [classes, images, pixels]
    within = torch.stack([torch.pdist(c).mean() for c in images]).mean()
    across = torch.cdist(images[:, 0], images[:, 0]).sum() / (20 * 19)
    assert 0 < within < 0.9 * across
    assert (images[:, 0] != images[:, 1]).any(-1).all()  # every class shows visible variation


def test_one_shot_is_possible_but_not_trivial_in_pixel_space():
    store = Glyphs({"train": 5, "val": 100, "test": 5}).load("val")
    ep = next(EpisodeSampler(store, 5, 1, 5).fixed(200, seed=1, batch=200))
    hit = torch.cdist(ep.query.flatten(2), ep.support.flatten(2)).argmin(-1) == ep.query_y
    assert 0.3 < hit.float().mean() < 0.8  # chance is 0.2; a network must learn the rest


@pytest.mark.parametrize("key, value", [("classes", {"train": 0, "val": 2, "test": 2}),
                                        ("images_per_class", 1), ("image_size", 0)])
def test_bad_config_names_the_key(key, value):
    kwargs = {"classes": SMALL, key: value}
    with pytest.raises(FewshotError, match=f"dataset.{key}"):
        Glyphs(**kwargs)
