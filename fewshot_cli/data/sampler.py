"""Episodes sampled from a ClassStore by tensor indexing on the training device."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from fewshot_cli.data.store import ClassStore
from fewshot_cli.episode import Episode
from fewshot_cli.errors import FewshotError

log = logging.getLogger(__name__)

# A split stays on the GPU only while it takes at most this share of the GPU's free memory;
# the rest is left to the model, its activations and (for MAML) the inner-loop graphs.
RESIDENT_SHARE = 0.5


def storage_device(nbytes: int, device: torch.device) -> torch.device:
    """Where a split of ``nbytes`` is kept: on ``device`` when it fits, else in host memory.

    On CUDA a split larger than ``RESIDENT_SHARE`` of the free memory stays in host memory;
    episodes are then gathered there and copied to the GPU one meta-batch at a time.
    """
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= RESIDENT_SHARE * free:
        return device
    log.warning("the split takes %.1f GiB, more than half of the %.1f GiB free on %s: it stays "
                "in host memory and each episode is copied over", nbytes / 2**30, free / 2**30,
                device)
    return torch.device("cpu")


def check_episode_shape(store: ClassStore, ways: int, shots: int, queries: int, split: str,
                        prefix: str = "train") -> None:
    """Raise a FewshotError naming the key when the split cannot supply such episodes."""
    if ways < 2:
        raise FewshotError(f"{prefix}.ways={ways} is impossible: an episode needs at least 2 ways")
    if shots < 1 or queries < 1:
        raise FewshotError(
            f"{prefix}.shots={shots} and {prefix}.queries={queries} must both be at least 1"
        )
    if ways > store.num_classes:
        raise FewshotError(
            f"{prefix}.ways={ways} exceeds the {store.num_classes} classes of the {split} split; "
            f"lower {prefix}.ways or choose a larger split"
        )
    need = shots + queries
    if need > store.min_images:
        counts = store.counts.tolist()
        short = [(c, n) for c, n in zip(counts, store.names, strict=True) if c < need]
        fix = f"lower {prefix}.shots or {prefix}.queries"
        if len(set(counts)) == 1:
            raise FewshotError(f"{prefix}.shots + {prefix}.queries = {need} exceeds the "
                               f"{store.min_images} images per class of the {split} split; {fix}")
        fewest, name = min(short)
        others = f" (and {len(short) - 1} more classes have fewer than {need})" if len(short) > 1 \
            else ""
        raise FewshotError(f"{prefix}.shots + {prefix}.queries = {need} exceeds the {fewest} "
                           f"images of class {name} in the {split} split{others}; {fix}, or "
                           "give that class more images")


class EpisodeSampler:
    """Draws episodes from a split held on ``device`` as uint8 (see ``storage_device``); no
    per-image Python.

    Indices are drawn on the CPU from a seeded generator, so the same seed gives the same
    episodes on every device, then the images are gathered on the device in one indexing op.
    """

    def __init__(self, store: ClassStore, ways: int, shots: int, queries: int, meta_batch: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, split: str = "train",
                 prefix: str = "train",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        check_episode_shape(store, ways, shots, queries, split, prefix)
        if meta_batch < 1:
            raise FewshotError(f"{prefix}.meta_batch={meta_batch} must be at least 1")
        self.store = store
        self.ways, self.shots, self.queries, self.meta_batch = ways, shots, queries, meta_batch
        self.device = torch.device(device)
        where = storage_device(store.images.nbytes, self.device)
        self.images = store.images.to(where)
        self.counts = store.counts.cpu()
        self.generator = torch.Generator().manual_seed(seed)
        self.transform = transform
        n, k, q = ways, shots, queries
        self._support_y = torch.arange(n).repeat_interleave(k).to(self.device)
        self._query_y = torch.arange(n).repeat_interleave(q).to(self.device)

    def _draw(self, g: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class indices ``[B, N]`` and distinct image indices ``[B, N, K+Q]`` (on the CPU)."""
        n, k, q = self.ways, self.shots, self.queries
        classes = torch.rand(b, self.store.num_classes, generator=g).argsort(dim=1)[:, :n]
        # A random key per image slot; padding slots of short classes sort last.
        slots = self.images.shape[1]
        keys = torch.rand(b, n, slots, generator=g)
        keys[torch.arange(slots) >= self.counts[classes].unsqueeze(-1)] = 2.0
        return classes, keys.argsort(dim=-1)[..., : k + q]

    def _gather(self, classes: torch.Tensor, picks: torch.Tensor) -> Episode:
        b, n, k, q = classes.shape[0], self.ways, self.shots, self.queries
        where = self.images.device
        classes, picks = classes.to(where), picks.to(where)
        images = self.images[classes.unsqueeze(-1), picks]  # [B, N, K+Q, C, H, W]
        images = images.to(self.device).float().div_(255)
        shape = images.shape[-3:]
        return Episode(
            support=images[:, :, :k].reshape(b, n * k, *shape),
            support_y=self._support_y.expand(b, -1),
            query=images[:, :, k:].reshape(b, n * q, *shape),
            query_y=self._query_y.expand(b, -1),
            ways=n,
            shots=k,
            queries=q,
        )

    def sample(self) -> Episode:
        """One meta-batch of ``meta_batch`` random tasks from the sampler's generator, with the
        training ``transform`` (if any) applied to every image on the device."""
        episode = self._gather(*self._draw(self.generator, self.meta_batch))
        if self.transform is not None:
            for name in ("support", "query"):
                images = getattr(episode, name)
                setattr(episode, name, self.transform(images.flatten(0, 1)).view_as(images))
        return episode

    def fixed(self, episodes: int, seed: int, batch: int | None = None) -> Iterator[Episode]:
        """``episodes`` tasks, identical for the same seed whatever ``batch`` groups them."""
        g = torch.Generator().manual_seed(seed)
        draws = [self._draw(g, 1) for _ in range(episodes)]
        batch = batch or self.meta_batch
        for start in range(0, episodes, batch):
            chunk = draws[start : start + batch]
            yield self._gather(torch.cat([c for c, _ in chunk]), torch.cat([p for _, p in chunk]))
