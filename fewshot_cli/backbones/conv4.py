"""Conv4: the four-block convolutional embedding of Vinyals et al. and Snell et al."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError


def conv_block(in_channels: int, out_channels: int, pool: bool, padding: int = 1,
               track_running_stats: bool = True) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU (-> 2x2 max-pool), computed as conv -> BatchNorm ->
    max-pool -> ReLU: the same values and gradients (ReLU and max commute: both are monotone,
    and a window whose maximum is not positive gets no gradient either way), with the ReLU
    and its backward on a quarter of the activations, which on the CPU is a tenth of a
    ProtoNet step (``scripts/profile_preset.py``). Parameter names are unchanged."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=padding),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four conv blocks of ``hidden`` filters; any input size and channel count.

    ``pooled_blocks`` counts the blocks that end in max-pooling (4 in the papers; the Relation
    Network encoder pools only the first 2). ``flatten=False`` keeps the feature map
    ``[M, out_channels, h, w]``; otherwise the output is ``[M, out_features]``. States the
    :class:`~fewshot_cli.episode.Backbone` protocol.
    """

    task_kind = IMAGE_TASKS

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 out_channels: int | None = None, pooled_blocks: int = 4, padding: int = 1,
                 flatten: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        if image_size < 2 ** pooled_blocks:
            raise FewshotError(f"backbone=conv4 halves the image {pooled_blocks} times, so it "
                               f"needs images of at least {2 ** pooled_blocks} px; "
                               f"dataset.image_size={image_size} is too small")
        out_channels = out_channels or hidden
        widths = [in_channels, hidden, hidden, hidden, out_channels]
        self.encoder = nn.Sequential(*[
            conv_block(widths[i], widths[i + 1], pool=i < pooled_blocks, padding=padding,
                       track_running_stats=track_running_stats)
            for i in range(4)
        ])
        self.flatten = flatten
        with torch.no_grad():
            shape = self.encoder(torch.zeros(2, in_channels, image_size, image_size)).shape
        self.feature_map = tuple(shape[1:])  # the output is this map, or flattens it
        self.out_features = int(torch.tensor(self.feature_map).prod())

    def set_step(self, step: int) -> None:
        """Nothing in Conv4 follows the training step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, H, W]`` images to ``[M, out_features]`` (or feature maps)."""
        features = self.encoder(x)
        return features.flatten(1) if self.flatten else features
