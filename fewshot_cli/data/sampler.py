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


def group_index(store: ClassStore, ways: int, split: str, prefix: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's group number ``[classes]`` and the groups with at least ``ways`` classes."""
    if store.groups is None:
        raise FewshotError(f"{prefix}.within_group=true needs classes in groups, but the {split} "
                           "split has none (Omniglot's alphabets, or class folders nested in "
                           "parent folders with dataset=folder); set it to false")
    names = sorted(set(store.groups))
    group_of = torch.tensor([names.index(g) for g in store.groups], dtype=torch.long)
    sizes = torch.bincount(group_of, minlength=len(names))
    eligible = (sizes >= ways).nonzero().squeeze(1)
    if len(eligible) == 0:
        raise FewshotError(f"{prefix}.within_group=true with {prefix}.ways={ways}: no group of "
                           f"the {split} split has {ways} classes (the largest has "
                           f"{int(sizes.max())}); lower {prefix}.ways")
    if len(eligible) < len(names):
        log.warning("%s.within_group: %d of the %d groups of the %s split have fewer than %d "
                    "classes and are left out", prefix, len(names) - len(eligible), len(names),
                    split, ways)
    return group_of, eligible


def drawer_index(store: ClassStore, needed: int, split: str, prefix: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image index of each (class, drawer) ``[classes, drawers]`` (-1: none) and the drawers
    that every class of the split has."""
    if store.drawers is None:
        raise FewshotError(f"{prefix}.distinct_drawers=true needs to know who drew each image, "
                           f"but the {split} split does not (Omniglot does); set it to false")
    valid = store.drawers >= 0
    drawers = int(store.drawers.max()) + 1 if bool(valid.any()) else 0
    by_drawer = torch.full((store.num_classes, max(drawers, 1)), -1, dtype=torch.long)
    rows, slots = valid.nonzero(as_tuple=True)
    by_drawer[rows, store.drawers[rows, slots]] = slots
    common = (by_drawer >= 0).all(dim=0).nonzero().squeeze(1)
    if len(common) < needed:
        raise FewshotError(f"{prefix}.distinct_drawers=true needs {needed} drawers "
                           f"({prefix}.shots + {prefix}.queries) who drew every class of the "
                           f"{split} split, but only {len(common)} did; lower {prefix}.shots or "
                           f"{prefix}.queries")
    return by_drawer, common


class EpisodeSampler:
    """Draws episodes from a split held on ``device`` as uint8 (see ``storage_device``); no
    per-image Python.

    Indices are drawn on the CPU from a seeded generator, so the same seed gives the same
    episodes on every device, then the images are gathered on the device in one indexing op.
    ``augment`` (``[M, C, H, W] -> [M, C, H, W]``, see ``data.augment``) is applied on the
    device to the episodes of :meth:`sample` (training) only, never to :meth:`fixed` ones.
    ``within_group``: each episode's classes come from one group (one alphabet), drawn
    uniformly among the groups with at least ``ways`` classes. ``distinct_drawers``: each
    episode draws ``shots + queries`` different drawers, shared by its classes; support image
    ``i`` of every class is by drawer ``i``, query ``j`` by drawer ``shots + j`` (Lake et al.'s
    one-shot protocol: all support images by one person, all queries by another).
    """

    def __init__(self, store: ClassStore, ways: int, shots: int, queries: int, meta_batch: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, split: str = "train",
                 prefix: str = "train",
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 within_group: bool = False, distinct_drawers: bool = False) -> None:
        check_episode_shape(store, ways, shots, queries, split, prefix)
        if meta_batch < 1:
            raise FewshotError(f"{prefix}.meta_batch={meta_batch} must be at least 1")
        self.groups = group_index(store, ways, split, prefix) if within_group else None
        self.drawers = drawer_index(store, shots + queries, split, prefix) if distinct_drawers \
            else None
        self.augment = augment
        self.store = store
        self.ways, self.shots, self.queries, self.meta_batch = ways, shots, queries, meta_batch
        self.device = torch.device(device)
        where = storage_device(store.images.nbytes, self.device)
        self.images = store.images.to(where)
        self.counts = store.counts.cpu()
        self.generator = torch.Generator().manual_seed(seed)
        n, k, q = ways, shots, queries
        self._support_y = torch.arange(n).repeat_interleave(k).to(self.device)
        self._query_y = torch.arange(n).repeat_interleave(q).to(self.device)

    def _draw(self, g: torch.Generator, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class indices ``[B, N]`` and distinct image indices ``[B, N, K+Q]`` (on the CPU)."""
        n, k, q = self.ways, self.shots, self.queries
        keys = torch.rand(b, self.store.num_classes, generator=g)
        if self.groups is not None:  # classes of other groups sort last
            group_of, eligible = self.groups
            chosen = eligible[torch.randint(len(eligible), (b,), generator=g)]
            keys[group_of.unsqueeze(0) != chosen.unsqueeze(1)] = 2.0
        classes = keys.argsort(dim=1)[:, :n]
        if self.drawers is not None:
            by_drawer, common = self.drawers
            order = torch.rand(b, len(common), generator=g).argsort(dim=1)[:, : k + q]
            return classes, by_drawer[classes.unsqueeze(-1), common[order].unsqueeze(1)]
        # A random key per image slot; padding slots of short classes sort last.
        slots = self.images.shape[1]
        keys = torch.rand(b, n, slots, generator=g)
        keys[torch.arange(slots) >= self.counts[classes].unsqueeze(-1)] = 2.0
        return classes, keys.argsort(dim=-1)[..., : k + q]

    def _gather(self, classes: torch.Tensor, picks: torch.Tensor, augment: bool = False
                ) -> Episode:
        b, n, k, q = classes.shape[0], self.ways, self.shots, self.queries
        where = self.images.device
        classes, picks = classes.to(where), picks.to(where)
        images = self.images[classes.unsqueeze(-1), picks]  # [B, N, K+Q, C, H, W]
        images = images.to(self.device).float().div_(255)
        shape = images.shape[-3:]
        if augment and self.augment is not None:  # one batched call for the whole meta-batch
            images = self.augment(images.flatten(0, 2)).view_as(images)
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
        """One meta-batch of ``meta_batch`` random tasks from the sampler's generator."""
        return self._gather(*self._draw(self.generator, self.meta_batch), augment=True)

    def fixed(self, episodes: int, seed: int, batch: int | None = None) -> Iterator[Episode]:
        """``episodes`` tasks, identical for the same seed whatever ``batch`` groups them."""
        g = torch.Generator().manual_seed(seed)
        draws = [self._draw(g, 1) for _ in range(episodes)]
        batch = batch or self.meta_batch
        for start in range(0, episodes, batch):
            chunk = draws[start : start + batch]
            yield self._gather(torch.cat([c for c, _ in chunk]), torch.cat([p for _, p in chunk]))
