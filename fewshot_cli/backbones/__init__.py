"""Backbones: plain ``nn.Module`` image (or trial) encoders, built from ``conf/backbone``.

A backbone that starts from pretrained weights (``backbone=torchvision``) loads them when it is
built, except inside :func:`restoring`, where a fewshot checkpoint supplies every weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

#: False inside :func:`restoring`: the weights come from a fewshot checkpoint
LOAD_PRETRAINED: ContextVar[bool] = ContextVar("load_pretrained", default=True)


@contextlib.contextmanager
def restoring() -> Iterator[None]:
    """Within the block, backbones are built to receive a checkpoint's weights: pretrained
    weights (a torchvision download, a local file) are neither fetched nor read, so a run
    evaluates on a machine without the file it started from."""
    token = LOAD_PRETRAINED.set(False)
    try:
        yield
    finally:
        LOAD_PRETRAINED.reset(token)
