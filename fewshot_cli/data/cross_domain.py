"""Another data set's images as a trained model reads them, for cross-domain tests
(``fewshot eval ckpt=... dataset=cub``; Chen et al. 2019, section 4.3: miniImageNet -> CUB).

The model fixes the input: its channels and image size. Images are decoded at the model's size
by the reader itself where it has ``dataset.image_size`` (every image reader does), else resized
here by the readers' own filter (:func:`~fewshot_cli.data.images.resize_pixels`); channels
are converted as an image viewer converts them: RGB to grey by luminance (PIL's
``convert("L")``, ITU-R 601-2: L = R 299/1000 + G 587/1000 + B 114/1000), grey to RGB by
repeating the one channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.images import resize_pixels
from fewshot_cli.data.store import ClassStore

#: PIL's fixed-point luminance weights (libImaging/Convert.c, L24): (R, G, B) / 2**16
LUMA = (19595, 38470, 7471)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Grey ``uint8 [..., 1, H, W]`` of RGB ``uint8 [..., 3, H, W]``, exactly as PIL's
    ``Image.convert("L")`` computes it (rounded fixed point)."""
    weights = torch.tensor(LUMA, dtype=torch.int32).view(3, 1, 1)
    grey = (images.to(torch.int32) * weights).sum(dim=-3, keepdim=True)
    return ((grey + 0x8000) >> 16).to(torch.uint8)


def as_model_input(store: ClassStore, channels: int, size: int) -> ClassStore:
    """``store`` with ``channels`` (1 or 3) channels of ``size`` x ``size`` px; the same store
    when it already is. Names, counts, groups, drawers and digests (of the source images) are
    kept. Resizing here (for readers without ``dataset.image_size``) is the readers' Lanczos
    filter, so the pixels are those the reader would have decoded at ``size``."""
    images = store.images
    if images.shape[-1] != size or images.shape[-2] != size:
        flat = resize_pixels(images.flatten(0, 1), size)
        images = flat.unflatten(0, images.shape[:2])
    if images.shape[2] == 3 and channels == 1:
        images = luminance(images)
    elif images.shape[2] == 1 and channels == 3:
        images = images.expand(-1, -1, 3, -1, -1).contiguous()
    return store if images is store.images else replace(store, images=images)


class ModelInput(FewShotDataset):
    """An image data set seen through a trained model's input (``in_channels``,
    ``image_size``): its splits converted by :func:`as_model_input`, each once."""

    def __init__(self, dataset: FewShotDataset, in_channels: int, image_size: int) -> None:
        self.dataset = dataset
        self.channels, self.image_size = in_channels, image_size
        self.root, self.rotatable = dataset.root, dataset.rotatable
        self._stores: dict[str, ClassStore] = {}

    def load(self, split: str) -> ClassStore:
        if split not in self._stores:
            self._stores[split] = as_model_input(self.dataset.load(split), self.channels,
                                                 self.image_size)
        return self._stores[split]

    def present(self) -> bool:
        return self.dataset.present()

    def describe(self, shape: Mapping[str, Any]) -> str:
        return self.dataset.describe(shape)

    def baselines(self, tasks: Any) -> dict[str, torch.Tensor]:
        return self.dataset.baselines(tasks)
