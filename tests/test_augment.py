"""Training augmentation (augment=): the Kornia ops, Koch's per-component draws, the removed
keys refused, and the sampler applying it to training episodes only."""

from __future__ import annotations

import pytest
import torch
from helpers import compose, one_sentence
from omegaconf import OmegaConf

from fewshot_cli.build import build_algorithm, build_augment, build_dataset
from fewshot_cli.data.augment import Affine, Identity, Standard
from fewshot_cli.data.sampler import EpisodeSampler
from fewshot_cli.data.store import ClassStore
from fewshot_cli.errors import FewshotError


def test_standard_keeps_shape_and_range_and_follows_the_torch_seed():
    images = torch.rand(12, 3, 20, 20)
    op = Standard(crop_padding=4, flip=True, color_jitter=0.4)
    torch.manual_seed(0)
    out = op(images)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, images)
    torch.manual_seed(0)
    assert torch.equal(op(images), out)  # seeded by the trainer's torch seed: resumable
    off = Standard(crop_padding=0, flip=False, color_jitter=0)
    assert torch.equal(off(images), images)


def test_random_crop_is_a_shift_and_flip_a_mirror():
    images = torch.arange(4 * 6 * 6, dtype=torch.float).view(4, 1, 6, 6) / 200 + 0.1
    torch.manual_seed(1)
    out = Standard(crop_padding=2, flip=False, color_jitter=0)(images)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for m in range(4):  # each crop is some 6x6 window of the zero-padded image
        assert any(torch.allclose(out[m], padded[m, :, y : y + 6, x : x + 6])
                   for y in range(5) for x in range(5))
    flipped = Standard(crop_padding=0, flip=True, color_jitter=0)(images[:1].expand(64, 1, 6, 6))
    mirrored = [torch.equal(f, images[0].flip(-1)) for f in flipped]
    assert all(m or torch.equal(f, images[0]) for m, f in zip(mirrored, flipped, strict=True))
    assert 10 < sum(mirrored) < 54  # about half of them


def test_color_jitter_works_on_grey_and_keeps_grey_colour_images_grey():
    grey = torch.rand(8, 1, 5, 5)
    assert Standard(0, False, 0.4)(grey).shape == grey.shape
    out = Standard(0, False, 0.4)(grey.expand(8, 3, 5, 5))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5)


def test_bad_values_name_the_key():
    with pytest.raises(FewshotError, match="augment.crop_padding=-1"):
        Standard(crop_padding=-1)
    with pytest.raises(FewshotError, match="augment.color_jitter=2"):
        Standard(color_jitter=2)
    with pytest.raises(FewshotError, match="augment.prob=1.5"):
        Affine(prob=1.5)


def test_affine_is_the_identity_at_probability_zero_and_keeps_the_background():
    images = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(Affine(prob=0.0)(images), images, atol=1e-5, rtol=0)
    distorted = Affine(prob=1.0)(images)
    assert distorted.shape == images.shape and not torch.allclose(distorted, images)
    white = torch.ones(6, 1, 28, 28)  # border padding: no dark frame around a white page
    torch.testing.assert_close(Affine(prob=1.0)(white), white)


def test_affine_draws_each_component_with_its_probability():
    op = Affine(prob=0.5).op
    torch.manual_seed(0)
    p = op.forward_parameters(torch.Size([4000, 1, 28, 28]))
    rates = [(p["angle"] != 0).float().mean(), (p["shear_x"] != 0).float().mean(),
             (p["scale"] != 1).any(1).float().mean(), (p["translations"] != 0).any(1).float()
             .mean()]
    assert all(0.45 < float(r) < 0.55 for r in rates), rates
    assert float(p["angle"].abs().max()) <= 10
    assert float(p["shear_x"].abs().max()) <= 16.71  # atan(0.3) in degrees
    assert 0.8 <= float(p["scale"].min()) and float(p["scale"].max()) <= 1.2
    assert float(p["translations"].abs().max()) <= 28 * 0.019 * 1.01  # px


def test_the_group_builds_each_option():
    assert isinstance(build_augment(compose([])), Identity)
    assert isinstance(build_augment(compose(["augment=standard"])), Standard)
    affine = build_augment(compose(["augment=affine", "augment.prob=0.3"]))
    assert isinstance(affine, Affine) and affine.op.component_p == 0.3
    siamese = compose(["experiment=siamese_omniglot_20w1s"])
    assert isinstance(build_augment(siamese), Affine)
    old = OmegaConf.create({"dataset": {}, "algo": {}})  # a checkpoint from before augment=
    assert isinstance(build_augment(old), Identity)


def test_removed_keys_name_their_replacement_and_old_defaults_still_load(fewshot):
    """dataset.augment.* and algo.distortions were replaced by augment=: asking for them is one
    sentence naming the new key, from the command line or from an old checkpoint's config;
    an old checkpoint holding them at their old defaults (asking for nothing) still builds."""
    one_sentence(fewshot("train", "dataset=miniimagenet", "dataset.augment.flip=true"),
                 "dataset.augment.flip was removed; use augment=standard", code=2)
    one_sentence(fewshot("train", "algo=siamese", "algo.distortions=true"),
                 "algo.distortions was removed; use augment=affine", code=2)
    old = OmegaConf.to_container(compose(["algo=siamese", "dataset=glyphs"]))
    old["algo"].update(distortions=False, distortion_prob=0.5)  # as configs before issue 21
    inputs = {"in_channels": 1, "image_size": 28}
    build_algorithm(OmegaConf.create(old), inputs)
    old["algo"]["distortions"] = True
    with pytest.raises(FewshotError, match="algo.distortions was removed; use augment=affine"):
        build_algorithm(OmegaConf.create(old), inputs)
    old = OmegaConf.to_container(compose(["dataset=miniimagenet", "dataset.root=unused"]))
    old["dataset"]["augment"] = {"crop_padding": 0, "flip": False, "color_jitter": 0.0}
    build_dataset(OmegaConf.create(old))
    old["dataset"]["augment"]["flip"] = True
    with pytest.raises(FewshotError, match="dataset.augment was removed; use augment=standard"):
        build_dataset(OmegaConf.create(old))


def test_the_sampler_augments_training_episodes_only():
    images = torch.zeros(6, 5, 1, 4, 4, dtype=torch.uint8)
    store = ClassStore(images, [f"c{i}" for i in range(6)])
    sampler = EpisodeSampler(store, 3, 1, 2, meta_batch=2, augment=lambda x: x + 1)
    episode = sampler.sample()
    assert (episode.support == 1).all() and (episode.query == 1).all()
    fixed = next(sampler.fixed(2, seed=0))
    assert (fixed.support == 0).all() and (fixed.query == 0).all()
