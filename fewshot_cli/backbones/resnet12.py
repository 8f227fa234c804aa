"""ResNet-12, the few-shot residual network of Lee et al. 2019 (MetaOptNet) and Tian et al. 2020.

Four residual blocks of widths 64-160-320-640; each is three 3x3 convs with BatchNorm (LeakyReLU
0.1 between them), a 1x1 conv + BatchNorm shortcut, LeakyReLU after the sum, then 2x2
max-pooling. With ``keep_prob < 1`` the first two blocks end in dropout and the last two in
DropBlock (Ghiasi et al. 2018), as in both papers. Global average pooling gives 640 features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli import draws
from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn by the task's seed (:mod:`fewshot_cli.draws`) when
    the algorithm gives one, so a task's mask does not depend on how the work is split;
    ``stream`` tells this layer's numbers from the other random layers'."""

    def __init__(self, p: float, stream: int) -> None:
        super().__init__(p)
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, ...] -> [M, ...]``; the identity in eval mode."""
        if not self.training or self.p <= 0 or draws.current() is None:
            return super().forward(x)
        keep = draws.uniform(x.shape, self.stream, x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class DropBlock(nn.Module):
    """Zeroes random ``block_size`` squares of each feature map while training, then rescales.

    ``drop_prob`` is the fraction of units dropped; with ``anneal_steps`` it ramps up linearly
    from 0 over that many meta-training steps (Lee et al. ramp over 40000 batches), told by
    :meth:`set_step` and kept in a buffer (saved with a checkpoint). The step is told outside
    ``forward``: the inner loop runs ``forward`` under ``torch.func``, where a layer may draw
    random numbers but not change a tensor it keeps.
    """

    def __init__(self, drop_prob: float, block_size: int, anneal_steps: int = 0,
                 stream: int = 0) -> None:
        super().__init__()
        self.drop_prob, self.block_size, self.anneal_steps = drop_prob, block_size, anneal_steps
        self.stream = stream  # tells its numbers from the other random layers' (fewshot_cli.draws)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def set_step(self, step: int) -> None:
        """The current meta-training step, for the ramp."""
        self.steps.fill_(step)

    def rate(self) -> float:
        """The drop probability at the current training step."""
        if not self.anneal_steps:
            return self.drop_prob
        return self.drop_prob * min(1.0, float(self.steps) / self.anneal_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, H, W] -> [M, C, H, W]``; the identity in eval mode."""
        if not self.training or self.drop_prob <= 0:
            return x
        rate = self.rate()
        if rate <= 0:
            return x
        m, c, h, w = x.shape
        size = min(self.block_size, h, w)
        # Block corners are drawn where a whole block fits; gamma makes the expected dropped
        # fraction equal to ``rate`` (Ghiasi et al., eq. 1).
        gamma = rate / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
        seeds = draws.uniform((m, c, h - size + 1, w - size + 1), self.stream, x.device) < gamma
        seeds = F.pad(seeds.to(x.dtype), (size - 1,) * 4)
        keep = 1 - F.max_pool2d(seeds, size, stride=1)  # each seed blanks the block below-right
        # Rescaled by the kept fraction (Ghiasi et al.'s count(M) / count_ones(M)): of the whole
        # batch, or, when the tasks draw by their seeds, of each task's own rows, so that a
        # task's features do not depend on the tasks computed beside it.
        given = draws.current()
        groups = 1 if given is None or not given.seeds.dim() else given.seeds.numel()
        per_task = keep.reshape(groups, -1)
        scale = per_task.shape[1] / per_task.sum(1).clamp_min(1.0)
        scale = scale.view(groups, 1).expand(groups, m // groups).reshape(m, 1, 1, 1)
        return x * keep * scale.to(x.dtype)


class ResidualBlock(nn.Module):
    """Three 3x3 conv/BN layers plus a 1x1 conv/BN shortcut, LeakyReLU, 2x2 max-pool, drop."""

    def __init__(self, in_channels: int, out_channels: int, slope: float, drop: nn.Module,
                 track_running_stats: bool = True) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, kernel: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                    nn.BatchNorm2d(cout, track_running_stats=track_running_stats)]

        self.body = nn.Sequential(
            *conv_bn(in_channels, out_channels, 3), nn.LeakyReLU(slope),
            *conv_bn(out_channels, out_channels, 3), nn.LeakyReLU(slope),
            *conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, 1))
        self.act = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C_in, H, W] -> [M, C_out, H/2, W/2]``."""
        return self.drop(self.pool(self.act(self.body(x) + self.shortcut(x))))


class ResNet12(nn.Module):
    """ResNet-12 embedding: ``[M, C, S, S]`` images to ``[M, out_features]`` (640 by default).

    States the :class:`~fewshot_cli.episode.Backbone` protocol; ``avg_pool=False`` flattens the
    last map (``feature_map``), global average pooling leaves none.
    """

    task_kind = IMAGE_TASKS

    def __init__(self, in_channels: int = 3, image_size: int = 84,
                 widths: list[int] | tuple[int, ...] = (64, 160, 320, 640),
                 keep_prob: float = 1.0, block_size: int = 5, anneal_steps: int = 0,
                 avg_pool: bool = True, slope: float = 0.1,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise FewshotError(f"backbone.widths={widths} must be four positive widths, e.g. "
                               "[64, 160, 320, 640]")
        if image_size < 16:
            raise FewshotError(f"backbone=resnet12 halves the image four times and needs "
                               f"dataset.image_size of at least 16, got {image_size}; raise it or "
                               "use backbone=conv4")
        if not 0 < keep_prob <= 1:
            raise FewshotError(f"backbone.keep_prob={keep_prob} must be in (0, 1]; 1.0 turns "
                               "DropBlock off, the papers use 0.9")
        drop = 1.0 - keep_prob
        # As in Lee et al. and Tian et al.: plain dropout early, DropBlock in the last two blocks.
        drops = [Dropout(drop, stream=i) if drop else nn.Identity() for i in range(2)] + \
            [DropBlock(drop, block_size, anneal_steps, stream=i) if drop else nn.Identity()
             for i in range(2, 4)]
        ins = [in_channels, *widths[:-1]]
        self.blocks = nn.Sequential(*[
            ResidualBlock(ins[i], widths[i], slope, drops[i], track_running_stats)
            for i in range(4)
        ])
        self.avg_pool = avg_pool
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu",
                                        a=slope)
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_map = None if avg_pool else (widths[-1], side, side)
        self.out_features = widths[-1] if avg_pool else widths[-1] * side * side

    def set_step(self, step: int) -> None:
        """Tells every DropBlock the meta-training step (its ramp)."""
        for module in self.modules():
            if isinstance(module, DropBlock):
                module.set_step(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, S, S]`` to ``[M, out_features]``."""
        features = self.blocks(x)
        return features.mean(dim=(-2, -1)) if self.avg_pool else features.flatten(1)
