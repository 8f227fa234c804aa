"""Device-dependent choices: weight layout, evaluation batch, and the host heap."""

from __future__ import annotations

import pytest
import torch

from fewshot_cli.algorithms.maml import MAML
from fewshot_cli.algorithms.protonet import ProtoNet
from fewshot_cli.backbones.conv4 import Conv4
from fewshot_cli.engine.runtime import episodes_per_batch, memory_format_for, pad_host_heap
from fewshot_cli.errors import FewshotError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_layout_is_channels_last_on_cpu_unless_the_algorithm_declines():
    assert memory_format_for(CPU, "auto") == torch.channels_last
    assert memory_format_for(CPU, "auto", prefers_channels_last=False) == torch.contiguous_format
    assert memory_format_for(CUDA, "auto") == torch.contiguous_format
    assert memory_format_for(CUDA, "channels_last") == torch.channels_last
    assert memory_format_for(CPU, "contiguous") == torch.contiguous_format
    with pytest.raises(FewshotError, match="memory_format=nhwc is unknown"):
        memory_format_for(CPU, "nhwc")
    assert ProtoNet.prefers_channels_last and not MAML.prefers_channels_last


def test_channels_last_weights_give_the_same_embeddings():
    torch.manual_seed(0)
    net = Conv4(hidden=16).eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        plain = net(images)
        net.to(memory_format=torch.channels_last)
        assert net.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(net(images), plain, rtol=1e-4, atol=1e-5)
    state = net.state_dict()  # loads into a contiguous network unchanged
    fresh = Conv4(hidden=16).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), plain, rtol=1e-4, atol=1e-5)


def test_eval_batch():
    assert episodes_per_batch(CPU, "auto") == 4
    assert episodes_per_batch(CUDA, "auto") == 16
    assert episodes_per_batch(CPU, 7) == 7
    for bad in (0, "many"):
        with pytest.raises(FewshotError, match="eval.batch"):
            episodes_per_batch(CPU, bad)


def test_pad_host_heap_is_harmless():
    applied = pad_host_heap(1 << 20)
    assert isinstance(applied, bool)
    assert torch.ones(1000).sum() == 1000  # allocation still works after the change
