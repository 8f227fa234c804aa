"""Transfer baselines: a backbone pretrained as an ordinary classifier over every base class, and
a new classifier fit on each test episode's support features.

Training is not episodic: the trainer feeds :class:`~fewshot_cli.episode.LabelledBatch`
minibatches of base-class images with their global labels (``trains_on = "batches"``) and the
loss is the cross-entropy of a head over all base classes. Validation and test stay episodic, on
the same fixed episodes as every other algorithm: the backbone is frozen, a new head is fit on the
support features, and it scores the queries.

- ``classifier=linear`` is Baseline, ``classifier=cosine`` Baseline++ (Chen, Liu, Kira, Wang &
  Huang 2019, "A Closer Look at Few-shot Classification"): the head is linear, or a cosine
  classifier with a class-wise learned norm times a fixed scale (their ``backbone.py``,
  ``distLinear``). ``support_classifier=finetune`` fits a new head of the same kind on the support
  set with their optimiser settings (``methods/baselinefinetune.py``, lines 33-45: SGD lr 0.01,
  momentum 0.9, dampening 0.9, weight decay 0.001, 100 epochs of minibatches of 4), batched over
  the episodes of an evaluation batch.
- ``support_classifier=logistic`` is the RFS variant (Tian, Wang, Krishnan, Tenenbaum & Isola
  2020, "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?"):
  scikit-learn's ``LogisticRegression`` on L2-normalised support features, as in their
  ``eval/meta_eval.py`` (lbfgs, ``max_iter=1000``, ``random_state=0``, ``C=1``).
- ``support_classifier=centroid`` is Classifier-Baseline (Chen, Liu, Xu, Darrell & Wang 2021,
  "Meta-Baseline: Exploring Simple Meta-Learning for Few-Shot Learning"): the cosine similarity
  of each query to each class's mean support feature, nothing fit.

A metric learner can start from such a pretrained backbone with ``init_from=CKPT``
(Meta-Baseline, Chen et al. 2021: ``algo=protonet algo.distance=cosine algo.learn_scale=true``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm, embed_episode
from fewshot_cli.algorithms.protonet import prototypes
from fewshot_cli.draws import drawn_by
from fewshot_cli.episode import Backbone, LabelledBatch
from fewshot_cli.errors import FewshotError

CLASSIFIERS = ("linear", "cosine")
SUPPORT_CLASSIFIERS = ("finetune", "logistic", "centroid")
CENTROID_SCALE = 10.0  # Meta-Baseline's initial temperature; it leaves the argmax unchanged
# Chen et al.'s distLinear: scale 2 for at most 200 classes, 10 above ("in omniglot, a larger
# scale factor is required to handle >1000 output classes"), backbone.py lines 30-33.
SMALL_HEAD, SMALL_SCALE, LARGE_SCALE = 200, 2.0, 10.0
EPS = 1e-5  # distLinear's guard against a zero feature norm


def chen_scale(classes: int) -> float:
    """Baseline++'s fixed cosine scale for a head over ``classes`` classes (Chen et al. 2019)."""
    return SMALL_SCALE if classes <= SMALL_HEAD else LARGE_SCALE


def head_scores(kind: str, features: torch.Tensor, weight: torch.Tensor,
                bias_or_norm: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores ``[..., M, N]`` of features ``[..., M, D]`` under ``N`` class weights ``[..., N, D]``.

    ``linear``: ``features @ weight.T + bias`` (bias ``[..., N]``). ``cosine`` (Baseline++):
    ``scale * cos`` between the features and the weight directions, each class's weight then
    multiplied by its learned norm ``[..., N]`` (Chen et al.'s WeightNorm on ``distLinear``).
    """
    if kind == "linear":
        return features @ weight.transpose(-1, -2) + bias_or_norm.unsqueeze(-2)
    unit = features / (features.norm(dim=-1, keepdim=True) + EPS)
    rows = weight / weight.norm(dim=-1, keepdim=True) * bias_or_norm.unsqueeze(-1)
    return scale * (unit @ rows.transpose(-1, -2))


def init_head(kind: str, features: int, classes: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear(features, classes)``'s default initialisation of the weight ``[classes,
    features]`` and, for ``linear``, its bias ``[classes]``; for ``cosine``, each row's norm (the
    WeightNorm gain starts at the weight's own norm)."""
    bound = 1 / math.sqrt(features)
    weight = torch.empty(classes, features).uniform_(-bound, bound, generator=generator)
    if kind == "linear":
        return weight, torch.empty(classes).uniform_(-bound, bound, generator=generator)
    return weight, weight.norm(dim=-1)


class Baseline(FewShotAlgorithm):
    """Baseline / Baseline++ (Chen et al. 2019), RFS (Tian et al. 2020) and Classifier-Baseline
    (Chen et al. 2021): see the module. Options as in ``conf/algo/baseline.yaml``.

    Raises:
        FewshotError: an unknown ``algo.classifier`` or ``algo.support_classifier``, a scale or
            count out of range, or ``support_classifier=logistic`` without scikit-learn.
    """

    trains_on = "batches"

    def __init__(self, backbone: Backbone, ways: int, classifier: str = "linear",
                 scale: float | str = "auto", support_classifier: str = "finetune",
                 finetune_steps: int | None = None, finetune_batch: int = 4,
                 finetune_lr: float = 0.01, finetune_momentum: float = 0.9,
                 finetune_dampening: float = 0.9, finetune_weight_decay: float = 0.001,
                 finetune_seed: int = 0, logistic_c: float = 1.0,
                 logistic_max_iter: int = 1000) -> None:
        super().__init__(backbone, ways)
        _check_options(classifier, support_classifier, scale,
                       {"finetune_batch": finetune_batch, "logistic_max_iter": logistic_max_iter,
                        "finetune_steps": finetune_steps})
        self.classifier, self.support_classifier = classifier, support_classifier
        self.scale = scale
        self.finetune_steps, self.finetune_batch = finetune_steps, finetune_batch
        self.finetune_options = {"lr": finetune_lr, "momentum": finetune_momentum,
                                 "dampening": finetune_dampening,
                                 "weight_decay": finetune_weight_decay}
        self.finetune_seed = finetune_seed
        self.logistic_options = {"C": logistic_c, "max_iter": logistic_max_iter}
        if support_classifier == "logistic":
            _sklearn()  # a missing scikit-learn is one sentence before any data is read
        self.head: nn.ParameterDict | None = None  # built once the number of classes is known

    # ---- pretraining on labelled minibatches of the base classes

    def set_base_classes(self, classes: int) -> None:
        """Build the pretraining head over ``classes`` base classes (the trainer calls this once
        the training split is read; a checkpoint's weights bring their own head)."""
        weight, other = init_head(self.classifier, self.backbone.out_features, classes)
        if self.classifier == "linear":
            other.zero_()  # Chen et al. zero the pretraining head's bias (baselinetrain.py)
        device = next(self.backbone.parameters()).device
        self.head = nn.ParameterDict({"weight": nn.Parameter(weight.to(device)),
                                      "bias_or_norm": nn.Parameter(other.to(device))})

    @property
    def binds_classes_to_outputs(self) -> bool:
        """Fine-tuning starts each episode's new head from one seeded initialisation, row i
        for label i (Chen et al. 2019); the logistic and centroid classifiers treat labels
        alike."""
        return self.support_classifier == "finetune"

    def head_scale(self, classes: int) -> float:
        """The cosine head's scale for ``classes`` classes (``algo.scale``, or Chen et al.'s)."""
        return chen_scale(classes) if self.scale == "auto" else float(self.scale)

    def meta_loss(self, tasks: LabelledBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the head over every base class on one labelled minibatch."""
        if self.head is None:
            raise RuntimeError("Baseline.set_base_classes must be called before training")
        with drawn_by(tasks.seeds):  # each image's dropout masks are its own
            features = self.backbone(tasks.images).flatten(1)
        weight, other = self.head["weight"], self.head["bias_or_norm"]
        logits = head_scores(self.classifier, features, weight, other,
                             self.head_scale(weight.shape[0])).float()
        loss = F.cross_entropy(logits, tasks.labels)
        acc = (logits.detach().argmax(dim=-1) == tasks.labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": acc}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``; the pretraining head is built to the stored shape
        first (evaluation rebuilds the model without reading the training split)."""
        if self.head is None and "head.weight" in state_dict:
            self.set_base_classes(state_dict["head.weight"].shape[0])
        return super().load_state_dict(state_dict, strict, assign)

    # ---- a new classifier on each episode's support features

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        """Scores ``[B, N*Q, ways]`` from a head fit on the frozen support features: logits of
        the fine-tuned head, the logistic regression's log-probabilities, or scaled cosine
        similarities to the class centroids."""
        with torch.no_grad():
            support_f, query_f = (f.float() for f in embed_episode(self.backbone, support, query))
        with torch.autocast(support_f.device.type, enabled=False):  # the head fits in float32
            if self.support_classifier == "logistic":
                return logistic_regression(support_f, support_y, query_f, ways,
                                           **self.logistic_options)
            if self.support_classifier == "centroid":
                centroids = prototypes(support_f, support_y, ways)
                return CENTROID_SCALE * F.normalize(query_f, dim=-1) @ F.normalize(
                    centroids, dim=-1).transpose(1, 2)
            return self.finetune(support_f, support_y, query_f, ways)

    def finetune(self, support_f: torch.Tensor, support_y: torch.Tensor, query_f: torch.Tensor,
                 ways: int) -> torch.Tensor:
        """Chen et al.'s fine-tuning, batched over the ``B`` episodes: a new head per episode
        ``[B, ways, D]``, SGD on minibatches of the support features ``[B, M, D]``.

        Every episode gets the same initial head and the same minibatch order (both drawn from
        ``algo.finetune_seed``), so a figure does not depend on how episodes are batched; each
        episode's loss is its own mean cross-entropy, summed, so that each head follows its own
        gradient exactly as in a loop over episodes.
        """
        b, m, d = support_f.shape
        g = torch.Generator().manual_seed(self.finetune_seed)
        weight, other = (t.to(support_f.device).expand(b, *t.shape).clone().requires_grad_()
                         for t in init_head(self.classifier, d, ways, g))
        scale = self.head_scale(ways)
        optimizer = torch.optim.SGD([weight, other], **self.finetune_options)
        with torch.enable_grad(), one_thread(support_f.device):
            for picks in minibatches(m, self.finetune_batch, self.finetune_steps, g):
                picks = picks.to(support_f.device)
                scores = head_scores(self.classifier, support_f[:, picks], weight, other, scale)
                loss = F.cross_entropy(scores.transpose(1, 2), support_y[:, picks],
                                       reduction="none").mean(dim=1).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return head_scores(self.classifier, query_f, weight, other, scale)


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU while fine-tuning: its tensors are a few kilobytes, which
    threads do not speed up, and on a busy machine every parallel region of a step waits for a
    descheduled thread (a 5-way head's step took 50-100 ms with 2 threads against 0.1 ms with
    one, on this project's shared 2-core machine)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def minibatches(size: int, batch: int, steps: int | None, generator: torch.Generator
                ) -> list[torch.Tensor]:
    """Support indices of each fine-tuning step: a fresh permutation of the ``size`` support
    images per epoch, cut into minibatches of ``batch`` (the last one of an epoch may be
    smaller, as in Chen et al.'s loop); ``steps`` of them, or 100 epochs' worth when None."""
    per_epoch = -(-size // batch)
    steps = 100 * per_epoch if steps is None else steps
    out: list[torch.Tensor] = []
    while len(out) < steps:
        out += list(torch.randperm(size, generator=generator).split(batch))
    return out[:steps]


def logistic_regression(support_f: torch.Tensor, support_y: torch.Tensor, query_f: torch.Tensor,
                        ways: int, C: float = 1.0, max_iter: int = 1000) -> torch.Tensor:
    """Tian et al.'s support classifier: scikit-learn's multinomial logistic regression on
    L2-normalised features, fit per episode; query log-probabilities ``[B, N*Q, ways]``.

    One fit per episode: scikit-learn has no batched solver, and its lbfgs fit on a few dozen
    features takes milliseconds next to the backbone's forward pass.
    """
    linear_model = _sklearn()
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    s = F.normalize(support_f, dim=-1).double().cpu().numpy()
    q = F.normalize(query_f, dim=-1).double().cpu().numpy()
    labels = support_y.cpu().numpy()
    out = []
    with threadpool_limits(1):  # tiny problems: threads only wait for each other (see one_thread)
        for b in range(s.shape[0]):
            clf = linear_model.LogisticRegression(C=C, max_iter=max_iter, random_state=0,
                                                  solver="lbfgs")
            clf.fit(s[b], labels[b])
            scores = torch.full((q.shape[1], ways), -math.inf, dtype=torch.float64)
            scores[:, torch.as_tensor(clf.classes_)] = torch.from_numpy(
                clf.predict_log_proba(q[b]))
            out.append(scores)
    return torch.stack(out).to(device=support_f.device, dtype=torch.float32)


def _sklearn() -> Any:
    try:
        from sklearn import linear_model
    except ImportError:
        raise FewshotError("algo.support_classifier=logistic needs scikit-learn, which is not "
                           "installed; pip install scikit-learn (a dependency of fewshot: "
                           "reinstall it with pip install -e .)") from None
    return linear_model


def _check_options(classifier: str, support_classifier: str, scale: Any,
                   counts: dict[str, Any]) -> None:
    """One sentence for the first option of Baseline that cannot work."""
    for key, value, choices in (("classifier", classifier, CLASSIFIERS),
                                ("support_classifier", support_classifier, SUPPORT_CLASSIFIERS)):
        if value not in choices:
            raise FewshotError(f"algo.{key}={value} is unknown; choose {' or '.join(choices)}")
    if scale != "auto" and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                            or scale <= 0):
        raise FewshotError(f"algo.scale={scale} must be auto (Chen et al.: 2 for at most 200 "
                           "classes, 10 above) or a positive number")
    for key, value in counts.items():
        if key == "finetune_steps" and value is None:
            continue  # the paper's 100 epochs
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FewshotError(f"algo.{key}={value} must be a whole number of at least 1"
                               + (" (or null: the paper's 100 epochs)"
                                  if key == "finetune_steps" else ""))
