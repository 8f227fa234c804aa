"""``fewshot predict ckpt=PATH support=DIR query=PATH``: classify your own images with a few
examples of your own classes.

``support`` holds one folder per class (any number of images each, unequal counts allowed);
``query`` is a folder of images or one image. Images of any size and mode are decoded as the
training data was (same size, channels and filter). With no training at all, ``backbone=``
instead of ``ckpt=`` classifies with a pretrained backbone's features (``backbone=torchvision
backbone.weights=DEFAULT``: torchvision's ImageNet weights), each query going to the nearest
class prototype: five photos of each class are enough to start. Every input is checked and
decoded before anything is written; the predictions go to ``predictions.csv`` (or ``out=``) in
one atomic write.

Predictions are inductive: a file's answer depends only on the support set and that file, not on
which other files are in the query folder or how they are batched (:func:`inductive_rule`). Nor
does it depend on the names of the class folders or files: the model is given the support set in
an order of its pixels (:func:`in_content_order`), averaged over the assignments of classes to
labels where its head binds them to outputs (the MAML family; :func:`assignments`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fewshot_cli.algorithms.base import FewShotAlgorithm
from fewshot_cli.algorithms.protonet import ProtoNet
from fewshot_cli.build import build
from fewshot_cli.data.images import decode_files, list_images, pixel_digests
from fewshot_cli.data.store import ClassStore
from fewshot_cli.engine.checkpoint import load_checkpoint
from fewshot_cli.engine.runtime import autocast_for, pad_host_heap, resolve_device
from fewshot_cli.errors import FewshotError
from fewshot_cli.evaluate import POLICIES, batch_statistics, load_model
from fewshot_cli.files import atomic_write_text

log = logging.getLogger(__name__)
COLUMNS = ("file", "predicted", "probability", "runner_up", "runner_up_probability")


def support_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name -> image files of ``support=``: one sub-folder per class."""
    if not folder.is_dir():
        raise FewshotError(f"support={folder} is not a folder; give a folder holding one "
                           "sub-folder of images per class")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    empty = [p.name for p in subfolders if not list_images(p)]
    if empty:
        raise FewshotError(f"the support class folder {folder / empty[0]} holds no images; put "
                           "at least one image of that class in it, or remove it")
    if len(subfolders) < 2:
        raise FewshotError(f"support={folder} holds {len(subfolders)} class folder(s); a "
                           "few-shot task needs at least 2 classes, one sub-folder of images each")
    return {p.name: list_images(p) for p in subfolders}


def query_files(path: Path) -> list[Path]:
    """The images of ``query=``: the file itself, or the images directly inside the folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FewshotError(f"query={path} does not exist; give an image or a folder of images")
    files = list_images(path)
    if not files:
        raise FewshotError(f"query={path} holds no images; give an image or a folder of images")
    return files


def in_content_order(store: ClassStore) -> tuple[ClassStore, torch.Tensor]:
    """The support set ``store`` in an order given by its pixels alone, and the index in
    ``store`` of each class of it ``long [classes]``.

    Each class's images are ordered by their content digests (of the decoded pixels, what the
    model sees), and the classes by their sorted digests, so renaming the class folders or the
    files changes nothing the model is given: not the order its support is read in (Matching
    Networks' full-context LSTM, Reptile's and Baseline's minibatches), not the label each class
    gets (a trained head whose outputs are bound to labels). Classes of the very same images
    keep their order by name."""
    digests = pixel_digests(store.images, store.counts)
    counts = store.counts.tolist()
    rows = [sorted(range(n), key=lambda i, c=c: int(digests[c, i])) for c, n in enumerate(counts)]
    keys = [sorted(int(d) for d in digests[c, :n]) for c, n in enumerate(counts)]
    classes = sorted(range(len(counts)), key=keys.__getitem__)
    images = torch.zeros_like(store.images)
    for new, c in enumerate(classes):
        images[new, :counts[c]] = store.images[c, rows[c]]
    order = torch.tensor(classes, dtype=torch.long)
    return ClassStore(images, [store.names[c] for c in classes], store.counts[order]), order


def decode_inputs(support_files: dict[str, list[Path]], queries: list[Path], size: int,
                  mode: str) -> tuple[ClassStore, ClassStore]:
    """The support classes and the query images decoded at ``size`` px in PIL ``mode`` by the
    training readers' own function (:func:`~fewshot_cli.data.images.decode_files`: upright by
    EXIF, the same Lanczos filter), so a file gives the model the pixels it gave in training.

    Raises:
        FewshotError: a file that cannot be decoded, or one image (by content) under two
            support classes: the task would ask the model to tell a class from itself.
    """
    support = decode_files(support_files, size, mode, what="support image",
                           fix="replace or remove it")
    first: dict[int, tuple[str, int]] = {}
    for c, (name, count) in enumerate(zip(support.names, support.counts.tolist(), strict=True)):
        for i, digest in enumerate(support.digests[c, :count].tolist()):
            other, j = first.setdefault(digest, (name, i))
            if other != name:
                raise FewshotError(
                    f"the support images {support_files[other][j]} and {support_files[name][i]} "
                    f"are the same image under two classes ({other} and {name}), so no model "
                    "can tell those classes apart by it; keep it in the one class it shows")
    query = decode_files({"query": queries}, size, mode, what="query image",
                         fix="replace or remove it")
    return support, query


def as_task(store: ClassStore) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a (ragged) store as one task: ``float [1, M, C, H, W]`` and labels."""
    keep = torch.arange(store.images.shape[1]) < store.counts.unsqueeze(1)  # [classes, width]
    images = store.images[keep].float().div_(255)
    labels = torch.arange(store.num_classes).repeat_interleave(store.counts)
    return images.unsqueeze(0), labels.unsqueeze(0)


@dataclass(frozen=True)
class QueryRule:
    """How a model scores each query independently of the others: the rule in words, and the
    most queries one forward pass may hold (None: any number)."""

    words: str
    most: int | None = None


def inductive_rule(algo: FewShotAlgorithm) -> QueryRule:
    """Make ``algo`` answer each query from the support set and that query alone, and say how.

    The inner-loop family trained with ``algo.batchnorm=task`` normalises a query batch with
    its own statistics (Finn et al.'s transductive setting, which ``fewshot eval`` keeps and
    names): it is switched to the support set's statistics. A model whose BatchNorm keeps no
    running statistics sees each query alone with the support set. Every other model (running
    statistics; Matching's full-context embeddings, Relation's pairs and weightgen's generator
    read the support set only) already is inductive. Idempotent."""
    policy = getattr(algo, "batchnorm", None)
    if policy == "task":
        algo.batchnorm = POLICIES["inductive"]
        return QueryRule("queries normalised with the support set's BatchNorm statistics; this "
                         "model was trained with algo.batchnorm=task, whose fewshot eval uses "
                         "each query set's own")
    if batch_statistics(algo):
        return QueryRule("each query classified alone with the support set, as this model's "
                         "BatchNorm keeps no running statistics", most=1)
    if policy is not None:
        return QueryRule("queries normalised with the support set's BatchNorm statistics")
    return QueryRule("every query scored on its own, BatchNorm with the statistics of training")


def assignments(algo: FewShotAlgorithm, classes: int) -> range:
    """The label shifts fewshot predict averages over: the ``classes`` cyclic assignments of
    classes to labels where ``algo.binds_classes_to_outputs`` (each class meets each output of
    the head once), else the one assignment.

    A MAML-family head is symmetric over labels only in expectation over the random assignments
    of training, so one assignment's answer depends on which label each class happened to get
    (before this, renaming the support folders changed 10 of 12 MAML answers); averaging the
    probabilities over assignments is Ye & Chao's (ICLR 2022, "How to train your MAML to excel
    in few-shot classification") permutation ensemble, over the cyclic ones, at ``classes``
    adaptations instead of ``classes!``."""
    return range(classes if algo.binds_classes_to_outputs else 1)


def classify(algo: FewShotAlgorithm, support: ClassStore, query: torch.Tensor,
             device: torch.device, autocast: Any = contextlib.nullcontext, batch: int = 64
             ) -> torch.Tensor:
    """Class probabilities ``[Q, classes]`` (columns in ``support``'s class order) of query
    images ``float [Q, C, H, W]`` given the support set, ``batch`` queries at a time (the
    support is re-used for each). Inductive (:func:`inductive_rule`): a query's row does not
    depend on the other queries. Independent of names and file order: the support is given to
    the model in content order (:func:`in_content_order`), averaged over :func:`assignments`
    where the model binds classes to its outputs."""
    rule = inductive_rule(algo)
    batch = min(batch, rule.most or batch)
    ordered, order = in_content_order(support)
    ways = ordered.num_classes
    support_x, support_y = (t.to(device) for t in as_task(ordered))
    shifts = assignments(algo, ways)
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(query), batch):
            chunk = query[start:start + batch].unsqueeze(0).to(device)
            total = 0
            for shift in shifts:  # class c gets label (c + shift) % ways; its column is put back
                with autocast():
                    scores = algo.predict(support_x, (support_y + shift) % ways, chunk, ways)
                total = total + algo.class_probabilities(scores)[0].cpu().roll(-shift, dims=-1)
            probabilities.append(total / len(shifts))
    return torch.cat(probabilities)[:, order.argsort()]


def table(rows: list[dict[str, Any]]) -> str:
    """The predictions as an aligned text table."""
    shown = [[str(r["file"]), r["predicted"], f"{r['probability']:.3f}", r["runner_up"],
              f"{r['runner_up_probability']:.3f}"] for r in rows]
    head = ["file", "predicted", "p", "runner-up", "p"]
    widths = [max(len(x) for x in column) for column in zip(head, *shown, strict=False)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(head), *(line(cells) for cells in shown)])


@dataclass(frozen=True)
class Model:
    """What classifies the queries, and how images are decoded for it (size, PIL mode)."""

    algo: FewShotAlgorithm
    image_size: int
    mode: str


def trained_model(cfg: DictConfig, classes: int, device: torch.device) -> Model:
    """The model of the run checkpoint ``ckpt=``, for ``classes`` support classes; images
    decoded as its training data was."""
    ckpt = Path(cfg.ckpt).expanduser().resolve()
    state = load_checkpoint(ckpt)
    run = OmegaConf.create(state["config"])
    run.device = cfg.device
    algo = load_model(run, state, ckpt, device)
    if not isinstance(algo, FewShotAlgorithm):
        raise FewshotError(f"fewshot predict classifies images, but {ckpt} holds a model of "
                           f"{algo.score_name}; evaluate it with fewshot eval")
    if algo.fixed_ways and classes != algo.ways:
        raise FewshotError(f"this model's head was trained for {algo.ways} classes but "
                           f"support={cfg.support} holds {classes} class folders; "
                           f"give it {algo.ways} classes, or use a model that takes any number "
                           "(protonet, matching, relation, siamese, weightgen)")
    inputs = state.get("inputs") or {}
    return Model(algo, int(run.dataset.image_size),
                 "L" if inputs.get("in_channels", 1) == 1 else "RGB")


def pretrained_model(cfg: DictConfig, classes: int, device: torch.device) -> Model:
    """No training: the nearest class prototype (mean support feature; Snell et al. 2017's
    rule, by ``distance=`` cosine or squared Euclidean) in the feature space of the
    pretrained ``backbone=``; RGB images decoded at ``image_size=`` px. One sentence for a
    backbone without pretrained weights (its features would classify at random)."""
    size = cfg.image_size  # distance and image_size: checked with every option (options.py)
    name = backbone_choice(cfg)
    run = OmegaConf.create({"backbone": cfg.backbone, "choices": {"backbone": name},
                            "algo": {"_target_": f"{ProtoNet.__module__}.ProtoNet",
                                     "distance": cfg.distance}})
    backbone = build(run, "backbone", in_channels=3, image_size=size)
    if not getattr(backbone, "pretrained", False):
        raise FewshotError(f"backbone={name} has no pretrained weights, so its features would "
                           "classify at random; use backbone=torchvision backbone.weights="
                           "DEFAULT (or a PATH to a saved state dict), or ckpt= a trained run")
    log.info("no training: %s prototypes in the features of backbone=%s %s", cfg.distance,
             name, " ".join(f"{k}={v}" for k, v in cfg.backbone.items() if k != "_target_"))
    return Model(build(run, "algo", backbone=backbone, ways=classes).to(device).eval(), size,
                 "RGB")


def backbone_choice(cfg: DictConfig) -> str:
    """The ``backbone=`` option of this command (its class name outside Hydra's app)."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("backbone") if HydraConfig.initialized() \
        else None
    return choice or str(cfg.backbone._target_).rsplit(".", 1)[-1].lower()


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict the class of every query image, with the model of a run (``ckpt=``) or, with
    no training, a pretrained backbone's features (``backbone=``); print the table, write the
    CSV."""
    pretrained = cfg.get("backbone") is not None
    if pretrained and cfg.get("ckpt"):
        raise FewshotError("fewshot predict takes ckpt= (a trained run) or backbone= (a "
                           "pretrained backbone, no training), not both; drop one")
    for key in ("support", "query") if pretrained else ("ckpt", "support", "query"):
        if not cfg.get(key):
            raise FewshotError(f"fewshot predict needs {key}=PATH: ckpt= a best.pt of a run (or "
                               "backbone=torchvision for a pretrained one, no training), "
                               "support= a folder of class folders, query= an image or a folder")
    pad_host_heap()
    support_files = support_classes(Path(cfg.support).expanduser())
    queries = query_files(Path(cfg.query).expanduser())
    out = Path(cfg.out).expanduser() if cfg.get("out") else Path.cwd() / "predictions.csv"
    if out.is_dir():
        raise FewshotError(f"out={out} is a folder; give the path of the CSV file to write")

    device = resolve_device(cfg.device.type)
    model = (pretrained_model if pretrained else trained_model)(cfg, len(support_files), device)
    algo, size, mode = model.algo, model.image_size, model.mode
    support, query = decode_inputs(support_files, queries, size, mode)
    query_x = as_task(query)[0][0]

    rule = inductive_rule(algo)
    probabilities = classify(algo, support, query_x, device,
                             autocast_for(device, cfg.device.precision), int(cfg.batch))
    top = probabilities.topk(2, dim=-1)
    rows = [{"file": str(f), "predicted": support.names[int(i[0])], "probability": float(p[0]),
             "runner_up": support.names[int(i[1])], "runner_up_probability": float(p[1])}
            for f, p, i in zip(queries, top.values, top.indices, strict=True)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), out)
    print(table(rows))
    print(f"query statistics: inductive, each answer depends only on the support set and its "
          f"file ({rule.words})")
    print(f"{len(rows)} predictions over {support.num_classes} classes written to {out}")
    return rows
