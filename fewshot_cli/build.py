"""The one place where config becomes objects: data set, backbone, algorithm, optimizer."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.data.augment import IDENTITY, legacy_augment
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.store import ClassStore
from fewshot_cli.engine.runtime import memory_format_for


def build_dataset(cfg: DictConfig) -> FewShotDataset:
    """The reader named by ``cfg.dataset._target_``."""
    return instantiate(cfg.dataset)


def build_augment(cfg: DictConfig) -> torch.nn.Module:
    """The training augmentation of ``augment=`` (or of the deprecated keys it replaces);
    none for checkpoints written before the group existed."""
    return instantiate(legacy_augment(cfg) or cfg.get("augment") or {"_target_": IDENTITY})


def build_algorithm(cfg: DictConfig, store: ClassStore,
                    device: torch.device | None = None) -> FewShotAlgorithm:
    """Backbone sized for the store's images, wrapped by the algorithm for ``train.ways``.

    Given a ``device``, the algorithm is moved there with the weight layout of
    ``device.memory_format`` (channels_last on the CPU unless the algorithm declines it).
    """
    backbone = instantiate(cfg.backbone, in_channels=store.channels, image_size=store.image_size)
    algo = instantiate(cfg.algo, backbone=backbone, ways=cfg.train.ways)
    if device is None:
        return algo
    layout = memory_format_for(device, cfg.device.get("memory_format", "auto"),
                               algo.prefers_channels_last)
    return algo.to(device, memory_format=layout)


def build_optimizer(cfg: DictConfig, algo: FewShotAlgorithm
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The meta-optimizer over all of the algorithm's parameters, and its schedule (or None)."""
    optimizer = instantiate(cfg.train.optimizer)(algo.parameters())
    scheduler = instantiate(cfg.train.scheduler)(optimizer) if cfg.train.scheduler else None
    return optimizer, scheduler
