"""ResNet-12 and Conv4 at miniImageNet's 84x84x3: shapes, size, DropBlock, config tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose
from hydra.utils import instantiate

from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.backbones.resnet12 import DropBlock, ResNet12
from fewshot_cli.errors import FewshotError

REPO = Path(__file__).resolve().parents[1]


def test_paper_network_at_84px_has_640_features_and_12_4m_weights():
    net = ResNet12(in_channels=3, image_size=84)
    assert net.out_features == 640 and net.feature_map is None  # averaged: no map left
    assert ResNet12(in_channels=3, image_size=84, avg_pool=False).feature_map == (640, 5, 5)
    # Tian et al. 2020 report 12.4M parameters for this ResNet-12
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 12.4
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 640)


def test_small_widths_other_sizes_and_flattened_map():
    net = ResNet12(in_channels=1, image_size=32, widths=[4, 8, 8, 16], avg_pool=False)
    assert net.out_features == 16 * 2 * 2
    out = net(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, net.out_features)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_conv4_at_84px_rgb():
    net = Conv4(in_channels=3, image_size=84)
    assert net.out_features == 64 * 5 * 5
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 1600)


def test_dropblock_drops_squares_at_the_rate_in_training_only():
    drop = DropBlock(0.1, block_size=3)
    x = torch.ones(400, 8, 10, 10)
    torch.manual_seed(0)
    out = drop(x)
    zeros = out == 0
    assert abs(zeros.float().mean().item() - 0.1) < 0.01
    assert torch.allclose(out.mean(), torch.tensor(1.0), atol=1e-5)  # rescaled to keep the mean
    # every dropped unit lies in a dropped 3x3 square: the map equals its morphological opening
    eroded = -torch.nn.functional.max_pool2d(-zeros.float(), 3, stride=1)
    opened = torch.nn.functional.max_pool2d(torch.nn.functional.pad(eroded, (2, 2, 2, 2)), 3,
                                            stride=1)
    assert torch.equal(opened.bool(), zeros)
    drop.eval()
    assert drop(x) is x


def test_dropblock_anneals_with_the_step_it_is_told_and_evaluates_deterministically():
    net = ResNet12(image_size=20, widths=[4, 4, 4, 4], keep_prob=0.8, anneal_steps=4)
    drop = net.blocks[3].drop
    x = torch.ones(2, 1, 5, 5)
    rates = []
    for step in range(6):
        net.set_step(step)  # what the trainer tells the algorithm before each meta-step
        rates.append(drop.rate())
        drop(x)
        drop(x)  # forward passes do not move the ramp: the inner loop runs them transformed
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert int(drop.state_dict()["steps"]) == 5  # saved with the checkpoint: resume continues
    net = ResNet12(image_size=20, widths=[4, 4, 4, 4], keep_prob=0.9).eval()
    images = torch.rand(2, 3, 20, 20)
    assert torch.equal(net(images), net(images))


def test_bad_settings_name_the_key():
    with pytest.raises(FewshotError, match="dataset.image_size of at least 16"):
        ResNet12(image_size=8)
    with pytest.raises(FewshotError, match="backbone.keep_prob=0"):
        ResNet12(keep_prob=0)
    with pytest.raises(FewshotError, match="backbone.widths"):
        ResNet12(widths=[64, 160])


def test_config_builds_with_the_trainer_kwargs():
    cfg = compose(["backbone=resnet12", "backbone.keep_prob=0.9"])
    net = instantiate(cfg.backbone, in_channels=3, image_size=84)
    assert isinstance(net, ResNet12) and net.out_features == 640
    assert isinstance(net.blocks[3].drop, DropBlock) and net.blocks[3].drop.drop_prob == \
        pytest.approx(0.1)
