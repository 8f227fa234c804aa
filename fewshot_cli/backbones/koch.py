"""The Siamese twin of Koch, Zemel & Salakhutdinov (ICML 2015 deep learning workshop)."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError

KERNELS = (10, 7, 4, 4)


class Koch(nn.Module):
    """Conv 10x10, 7x7, 4x4, 4x4 (ReLU, max-pool after the first three), then a sigmoid FC.

    The paper's net is ``widths=[64, 128, 128, 256]``, ``fc=4096`` on 105x105 images; narrower
    widths keep the same shape of network for CPU runs. Needs images of at least 65 pixels.
    States the :class:`~fewshot_cli.episode.Backbone` protocol: its dense layer leaves no map.
    """

    task_kind = IMAGE_TASKS
    feature_map = None

    def __init__(self, in_channels: int = 1, image_size: int = 105,
                 widths: tuple[int, ...] = (64, 128, 128, 256), fc: int = 4096,
                 init: str = "paper") -> None:
        super().__init__()
        if init not in ("paper", "pytorch"):
            raise FewshotError(f"backbone.init={init} is unknown; choose paper (Koch et al.'s "
                               "normal initialisation) or pytorch (the library default)")
        if len(widths) != 4:
            raise FewshotError(f"backbone.widths={list(widths)} must list 4 conv widths, as "
                               "in the paper's [64, 128, 128, 256]")
        size = image_size
        for kernel in KERNELS[:3]:
            size = (size - kernel + 1) // 2
        if size - KERNELS[3] + 1 < 1:
            raise FewshotError(f"backbone=koch needs images of at least 65 pixels, got "
                               f"{image_size}; set dataset.image_size=105 (the paper's size)")
        chans = [in_channels, *widths]
        layers: list[nn.Module] = []
        for i, kernel in enumerate(KERNELS):
            layers += [nn.Conv2d(chans[i], chans[i + 1], kernel), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.encoder = nn.Sequential(*layers)
        flat = widths[3] * (size - KERNELS[3] + 1) ** 2
        self.fc = nn.Sequential(nn.Linear(flat, fc), nn.Sigmoid())
        self.out_features = fc
        if init == "paper":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: weights N(0, 0.01) (convs) and N(0, 0.2) (FC), biases
        N(0.5, 0.01)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = 1e-2 if isinstance(m, nn.Conv2d) else 0.2
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.normal_(m.bias, 0.5, 1e-2)

    def set_step(self, step: int) -> None:
        """Nothing in the twin follows the training step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, H, W]`` images to ``[M, fc]`` codes in (0, 1)."""
        return self.fc(self.encoder(x).flatten(1))
