"""Training augmentation, the ``augment=`` group: applied by the sampler, on the training device,
to the float images of each training episode (``[M, C, H, W] -> [M, C, H, W]``, each image its
own random draw); validation and test episodes are never augmented.

The ops are Kornia's (``kornia.augmentation``): batched, per-image parameters, on any device.
Their random numbers come from torch's global generator, which the trainer seeds and stores in
its checkpoints, so a seeded CPU run and its resume repeat exactly. ``scripts/bench_augment.py``
compares their speed with the hand-written ops they replaced: small next to a meta-step either
way.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import nn

from fewshot_cli.errors import FewshotError

IDENTITY = "fewshot_cli.data.augment.Identity"


class Identity(nn.Module):
    """``augment=none``: the images unchanged."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Standard(nn.Module):
    """``augment=standard``: random crop after zero padding, horizontal flip, colour jitter.

    ``color_jitter`` scales brightness, contrast and (on colour images) saturation by factors
    from ``[1 - x, 1 + x]``; 0 (or false) turns an op off. Tian et al. 2020: 8 px, flip, 0.4.
    """

    def __init__(self, crop_padding: int = 8, flip: bool = True, color_jitter: float = 0.4
                 ) -> None:
        super().__init__()
        if not isinstance(crop_padding, int) or isinstance(crop_padding, bool) or crop_padding < 0:
            raise FewshotError(f"augment.crop_padding={crop_padding} must be a whole number of "
                               "pixels, 0 for no random crop (8 in Tian et al.)")
        if not isinstance(color_jitter, (int, float)) or not 0 <= float(color_jitter) < 1:
            raise FewshotError(f"augment.color_jitter={color_jitter} must be in [0, 1), 0 for "
                               "none (0.4 in Tian et al.)")
        self.crop_padding, self.flip = crop_padding, bool(flip)
        self.color_jitter = float(color_jitter)
        self._ops: dict[tuple[int, int, int], nn.Module] = {}

    def _pipeline(self, channels: int, height: int, width: int) -> nn.Module:
        """The Kornia ops for this image shape (the crop needs the size, saturation colour)."""
        ops: list[nn.Module] = []
        if self.crop_padding:
            ops.append(K.RandomCrop((height, width), padding=self.crop_padding))
        if self.flip:
            ops.append(K.RandomHorizontalFlip())
        if self.color_jitter:
            x = self.color_jitter
            ops.append(K.ColorJitter(brightness=x, contrast=x,
                                     saturation=x if channels == 3 else 0.0, p=1.0))
        return nn.Sequential(*ops)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape[1:])
        if shape not in self._ops:
            self._ops[shape] = self._pipeline(*shape)
        return self._ops[shape](images) if len(self._ops[shape]) else images


class _ComponentAffine(K.RandomAffine):
    """Kornia's RandomAffine, each component (rotation, shear, scale, shift) kept with
    probability ``component_p`` per image and neutral otherwise, as Koch et al. draw them."""

    def __init__(self, component_p: float, **kwargs: object) -> None:
        super().__init__(p=1.0, **kwargs)
        self.component_p = component_p

    def forward_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        params = super().forward_parameters(batch_shape)
        m = batch_shape[0]
        keep = lambda: torch.rand(m) < self.component_p
        params["angle"] = torch.where(keep(), params["angle"], 0.0)
        k = keep()
        params["shear_x"] = torch.where(k, params["shear_x"], 0.0)
        params["shear_y"] = torch.where(k, params["shear_y"], 0.0)
        params["scale"] = torch.where(keep().unsqueeze(1), params["scale"], 1.0)
        params["translations"] = torch.where(keep().unsqueeze(1), params["translations"], 0.0)
        return params


class Affine(nn.Module):
    """``augment=affine``: Koch et al.'s small random affine distortions for characters.

    Rotation within ``±degrees``, shear coefficients within ``±shear`` (x and y), scale factors
    within ``scale`` (x and y apart), shift within ``±translate`` of the image side; each
    component applied with probability ``prob`` per image. Border padding repeats the
    background instead of drawing a dark frame.
    """

    def __init__(self, degrees: float = 10.0, shear: float = 0.3,
                 scale: tuple[float, float] | list[float] = (0.8, 1.2),
                 translate: float = 2 / 105, prob: float = 0.5) -> None:
        super().__init__()
        if not 0 <= float(prob) <= 1:
            raise FewshotError(f"augment.prob={prob} must be a probability in [0, 1]")
        low, high = (float(s) for s in scale)
        if not 0 < low <= high:
            raise FewshotError(f"augment.scale={list(scale)} must be [low, high] with "
                               "0 < low <= high (Koch et al.: [0.8, 1.2])")
        angle = math.degrees(math.atan(float(shear)))  # Kornia shears by an angle: tan = shear
        self.op = _ComponentAffine(float(prob), degrees=float(degrees),
                                   translate=(float(translate), float(translate)),
                                   scale=(low, high, low, high),
                                   shear=(-angle, angle, -angle, angle), padding_mode="border")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.op(images)
