"""``fewshot data [dataset=...]``: the checks ``fewshot train`` makes on a data set, without
training, and what the files hold.

Per split it prints the classes, images per class (min / median / max), the distinct image files
with their modes and sizes; then every problem: files that cannot be decoded, classes left out
under ``dataset.min_images``, a class in two splits, identical images within and across splits,
and, as notes, transparency composited over white and deep grey scaled to 8 bits. It exits
non-zero only when a problem would stop ``fewshot train``, and writes nothing but the decoded
cache that ``fewshot train`` would write (none when a file cannot be decoded).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from fewshot_cli.build import build_dataset
from fewshot_cli.data.base import SPLITS, FewShotDataset
from fewshot_cli.data.images import (
    COMPOSITED,
    FAILED,
    RESCALED,
    collecting_failures,
    mode_name,
)
from fewshot_cli.data.splits import Problem, checked, integrity_problems
from fewshot_cli.data.store import ClassStore
from fewshot_cli.errors import FewshotError

LISTED = 20  # cases listed under a problem; the count says how many there are


@dataclass
class Findings:
    """What ``fewshot data`` found: the loaded splits and the problems, in the order shown."""

    stores: dict[str, ClassStore] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        if all(p.what != problem.what for p in self.problems):  # a reader's error per split
            self.problems.append(problem)


def files_of(dataset: FewShotDataset, store: ClassStore) -> torch.Tensor:
    """bool ``[classes, max_images]``: the distinct source files of a store (a rotated copy of
    a class holds the same files as its source, so only the first copy counts)."""
    seen: set[str] = set()
    first = []
    for name in store.names:
        ident = dataset.identity(name)
        first.append(ident not in seen)
        seen.add(ident)
    slots = torch.arange(store.images.shape[1]) < store.counts.unsqueeze(1)
    return slots & torch.tensor(first, dtype=torch.bool).unsqueeze(1)


def _flagged(dataset: FewShotDataset, stores: Mapping[str, ClassStore], flag: int) -> list[str]:
    """The files of every split whose origin carries ``flag``."""
    cases = []
    for split, store in stores.items():
        if store.origin is None:
            continue
        hit = files_of(dataset, store) & (store.origin[..., 3] & flag != 0)
        cases += [f"{dataset.image_path(split, store.names[c], i)} ({split})"
                  for c, i in hit.nonzero().tolist()]
    return cases


def notes(dataset: FewShotDataset, stores: Mapping[str, ClassStore]) -> list[Problem]:
    """Classes left out, transparency composited, deep grey scaled: reported, never stopping."""
    found = []
    small = dataset.left_out()
    if small:
        least = dataset.details().get("min_images", "?")
        found.append(Problem(f"{len(small)} class(es) have fewer than dataset.min_images={least} "
                             "images and are left out", False,
                             [f"{n} ({k})" for n, k in small.items()]))
    composited = _flagged(dataset, stores, COMPOSITED)
    if composited:
        found.append(Problem(f"{len(composited)} image(s) have transparent pixels, composited "
                             "over a white page as a viewer shows them", False, composited))
    scaled = _flagged(dataset, stores, RESCALED)
    if scaled:
        found.append(Problem(f"{len(scaled)} image(s) have 16-bit, 32-bit or float pixels, "
                             "scaled to 8 bits as a viewer shows them", False, scaled))
    return found


def examine(dataset: FewShotDataset) -> Findings:
    """Load every split as ``fewshot train`` would, collecting every problem instead of
    stopping at the first."""
    found = Findings()
    with collecting_failures() as failures:
        for split in SPLITS:
            try:
                found.stores[split] = dataset.load(split)
            except FewshotError as err:
                found.add(Problem(str(err), True))
    if failures:
        found.problems.insert(0, Problem(f"{len(failures)} file(s) cannot be decoded", True,
                                         failures))
    for problem in notes(dataset, found.stores) + integrity_problems(dataset, found.stores):
        found.add(problem)
    return found


# ---------------------------------------------------------------- the printed report


def _counted(counter: Counter, most: int = 4) -> str:
    shown = ", ".join(f"{key} {n}" for key, n in counter.most_common(most))
    rest = len(counter) - most
    return shown + (f" (+{rest} more)" if rest > 0 else "")


def _sizes(sizes: Counter) -> str:
    """``105x105 20560``, or the range when there are many: ``24..72 x 24..72 (31 sizes)``."""
    if len(sizes) <= 3:
        return ", ".join(f"{w}x{h} {n}" for (w, h), n in sizes.most_common())
    widths, heights = zip(*sizes, strict=True)
    return f"{min(widths)}..{max(widths)} x {min(heights)}..{max(heights)} ({len(sizes)} sizes)"


def split_row(dataset: FewShotDataset, split: str, store: ClassStore) -> list[str]:
    """``split, classes, images per class min/median/max, files, modes, sizes`` (of the files
    that could be decoded)."""
    counts = store.counts
    per_class = "-" if not len(counts) else \
        f"{int(counts.min())} / {int(counts.median())} / {int(counts.max())}"
    files = files_of(dataset, store)
    modes, sizes = Counter(), Counter()
    if store.origin is not None:
        origin = store.origin[files & (store.origin[..., 3] & FAILED == 0)]  # [files, 4]
        for (code,), n in zip(*torch.unique(origin[:, :1], dim=0, return_counts=True),
                              strict=True):
            modes[mode_name(int(code))] += int(n)
        for (width, height), n in zip(*torch.unique(origin[:, 1:3], dim=0, return_counts=True),
                                      strict=True):
            sizes[int(width), int(height)] += int(n)
    return [split, str(store.num_classes), per_class, str(int(files.sum())),
            _counted(modes) or "-", _sizes(sizes) or "-"]


def table(rows: list[list[str]]) -> str:
    head = ["split", "classes", "images/class min/median/max", "files", "modes", "sizes"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join(line(r).rstrip() for r in [head, *rows])


def render(title: str, dataset: FewShotDataset, found: Findings) -> str:
    """The whole report: the title, the split table, every problem with its cases."""
    lines = [title, ""]
    rows = [split_row(dataset, s, found.stores[s]) for s in SPLITS if s in found.stores]
    if rows:
        lines += [table(rows), ""]
    if not found.problems:
        return "\n".join([*lines, "no problem found"])
    stopping = sum(p.stops for p in found.problems)
    lines.append(f"{len(found.problems)} finding(s), {stopping} of them would stop fewshot "
                 "train:")
    for problem in found.problems:
        fix = f"; {problem.fix}" if problem.fix else ""
        lines.append(f"{'STOPS TRAIN' if problem.stops else 'note'}: {problem.what}{fix}")
        lines += [f"    {case}" for case in problem.cases[:LISTED]]
        if len(problem.cases) > LISTED:
            lines.append(f"    ... and {len(problem.cases) - LISTED} more")
    return "\n".join(lines)


def check_data(cfg: DictConfig, name: str | None = None) -> Findings:
    """``fewshot data``: print what the data set holds and every problem; raise one sentence
    when a problem would stop ``fewshot train``."""
    dataset = build_dataset(cfg)
    label = f"dataset={name}" if name else type(dataset).__name__
    if not checked(dataset):
        print(f"{label} draws its tasks on the fly ({dataset.task_kind} tasks): there are no "
              "files and no splits to check")
        return Findings()
    if not dataset.present():
        raise FewshotError(f"{label} finds no data in dataset.root={dataset.root}, so nothing was "
                           "checked; set dataset.root=<the folder that holds it> (fewshot train "
                           "would download what can be downloaded there)")
    found = examine(dataset)
    settings = ", ".join(f"{k}={v}" for k, v in dataset.details().items() if v is not None)
    print(render(f"{label} ({settings})", dataset, found))
    stopping = [p for p in found.problems if p.stops]
    if stopping:
        raise FewshotError(f"{len(stopping)} problem(s) above would stop fewshot train; fix "
                           "them and run fewshot data again")
    return found

