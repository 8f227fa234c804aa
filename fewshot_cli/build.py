"""The one place where config becomes objects: data set, backbone, algorithm, optimizer."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.store import ClassStore


def build_dataset(cfg: DictConfig) -> FewShotDataset:
    """The reader named by ``cfg.dataset._target_``."""
    return instantiate(cfg.dataset)


def build_algorithm(cfg: DictConfig, store: ClassStore) -> FewShotAlgorithm:
    """Backbone sized for the store's images, wrapped by the algorithm for ``train.ways``."""
    backbone = instantiate(cfg.backbone, in_channels=store.channels, image_size=store.image_size)
    return instantiate(cfg.algo, backbone=backbone, ways=cfg.train.ways)


def build_optimizer(cfg: DictConfig, algo: FewShotAlgorithm
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The meta-optimizer over all of the algorithm's parameters, and its schedule (or None)."""
    optimizer = instantiate(cfg.train.optimizer)(algo.parameters())
    scheduler = instantiate(cfg.train.scheduler)(optimizer) if cfg.train.scheduler else None
    return optimizer, scheduler
