"""weightgen: a support set mapped straight to classifier weights, θ = M_φ(S).

The backbone embeds the support set; a permutation-invariant generator maps each class's
(L2-normalised) support features to that class's classifier weight vector and bias; the queries
are classified by a cosine classifier with a learned scale. Generators: ``mean`` (a learned map of
the class mean, Qiao et al. 2018, "Few-Shot Image Recognition by Predicting Parameters from
Activations") and ``attention`` (Gidaris & Komodakis 2018, "Dynamic Few-Shot Visual Learning
without Forgetting": the class mean plus an attention read of a learned memory of weight
vectors). ``finetune_steps`` then adapts the generated weights on the support set with the
shared inner loop: mapping first, optimisation second.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import FewShotAlgorithm, embed_episode
from fewshot_cli.algorithms.inner_loop import SGD, Params, adapt, batching_mode, check_batching
from fewshot_cli.algorithms.protonet import prototypes
from fewshot_cli.episode import Backbone
from fewshot_cli.errors import FewshotError


class WeightGenerator(nn.Module):
    """Maps a task's support features to one classifier weight vector and one bias per class.

    Subclasses implement :meth:`weights`; the bias is a learned linear function of the class's
    mean feature (zero at first). Every generator is built as ``Generator(features, **options)``.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.bias = nn.Linear(features, 1)
        nn.init.zeros_(self.bias.weight)
        nn.init.zeros_(self.bias.bias)

    def forward(self, support: torch.Tensor, support_y: torch.Tensor, ways: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[B, ways, D]`` and biases ``[B, ways]`` from support features ``[B, M, D]``."""
        z = F.normalize(support, dim=-1)
        mean = prototypes(z, support_y, ways)
        return self.weights(z, mean, support_y, ways), self.bias(mean).squeeze(-1)

    def weights(self, z: torch.Tensor, mean: torch.Tensor, support_y: torch.Tensor,
                ways: int) -> torch.Tensor:
        """Class weight vectors from normalised support features ``z`` and their class means."""
        raise NotImplementedError


class MeanGenerator(WeightGenerator):
    """Qiao et al. 2018: a learned linear map φ of the class mean activation, w = φ(ā)."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.map = nn.Linear(features, features)
        # Identity at first: the class mean itself, a cosine prototype classifier.
        nn.init.eye_(self.map.weight)
        nn.init.zeros_(self.map.bias)

    def weights(self, z: torch.Tensor, mean: torch.Tensor, support_y: torch.Tensor,
                ways: int) -> torch.Tensor:
        return self.map(mean)


class AttentionGenerator(WeightGenerator):
    """Gidaris & Komodakis 2018: w = φ_avg ⊙ ā + φ_att ⊙ w_att.

    ``w_att`` averages, over a class's shots, an attention read of ``memory`` learned weight
    vectors: each support feature, mapped by a learned query layer, is compared by cosine (times
    a learned ``temperature``) with a learned key per memory slot. Gidaris & Komodakis keep one
    slot per base class, trained by a base-class classifier first; episodes carry no global
    class labels here, so the memory is learned end to end from the episodes' query loss.
    """

    def __init__(self, features: int, memory: int = 64, temperature: float = 10.0) -> None:
        super().__init__(features)
        if memory < 1:
            raise FewshotError(f"algo.generators.attention.memory={memory} must be at least 1")
        std = math.sqrt(2.0 / features)  # their initialisation of weight vectors and keys
        self.values = nn.Parameter(torch.randn(memory, features) * std)
        self.keys = nn.Parameter(torch.randn(memory, features) * std)
        self.query = nn.Linear(features, features)
        with torch.no_grad():  # near the identity, as theirs
            self.query.weight.copy_(torch.eye(features) + 0.001 * torch.randn(features, features))
            self.query.bias.zero_()
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.mean_gain = nn.Parameter(torch.ones(features))
        self.attention_gain = nn.Parameter(torch.ones(features))

    def weights(self, z: torch.Tensor, mean: torch.Tensor, support_y: torch.Tensor,
                ways: int) -> torch.Tensor:
        similarity = F.normalize(self.query(z), dim=-1) @ F.normalize(self.keys, dim=-1).T
        attention = torch.softmax(self.temperature * similarity, dim=-1)  # [B, M, memory]
        read = attention @ F.normalize(self.values, dim=-1)
        return self.mean_gain * mean + self.attention_gain * prototypes(read, support_y, ways)


GENERATORS: dict[str, Callable[..., WeightGenerator]] = {
    "mean": MeanGenerator, "attention": AttentionGenerator}


class WeightGen(FewShotAlgorithm):
    """Classifier weights generated from the support set; cosine classifier with learned scale.

    ``generators`` maps a name to a factory ``(features) -> WeightGenerator`` (from the yaml,
    Hydra partials carrying each generator's options); ``generator`` picks one. Any number of
    ways at test time: the generator makes one weight vector per class of the episode.
    """

    def __init__(self, backbone: Backbone, ways: int, generator: str = "attention",
                 generators: dict[str, Callable[..., WeightGenerator]] | None = None,
                 scale: float = 10.0, finetune_steps: int = 0, finetune_lr: float = 0.1,
                 batching: str = "auto") -> None:
        super().__init__(backbone, ways)
        generators = generators or GENERATORS
        if generator not in generators:
            raise FewshotError(f"algo.generator={generator} is unknown; choose one of "
                               f"{', '.join(generators)} (algo.generators lists them)")
        if finetune_steps < 0:
            raise FewshotError(f"algo.finetune_steps={finetune_steps} must be 0 (none) or more")
        check_batching(batching)
        self.generator = generators[generator](backbone.out_features)
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.finetune_steps, self.batching = finetune_steps, batching
        self.finetune_rule = SGD({}, finetune_steps, lr=finetune_lr)

    def classify(self, fast: Params, features: torch.Tensor) -> torch.Tensor:
        """Cosine-classifier logits ``[..., M, ways]`` of ``features`` ``[..., M, D]``."""
        cosine = F.normalize(features, dim=-1) @ F.normalize(fast["weight"], dim=-1).transpose(
            -1, -2)
        return self.scale * cosine + fast["bias"].unsqueeze(-2)

    def predict(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                ways: int) -> torch.Tensor:
        """Generate each task's classifier from its support set (then fine-tune); query logits."""
        support_f, query_f = embed_episode(self.backbone, support, query)
        weight, bias = self.generator(support_f, support_y, ways)
        fast = {"weight": weight, "bias": bias}
        if self.finetune_steps:
            # Second order in meta-training (only the head adapts, so it is cheap): the
            # generator learns to produce weights that fine-tune well.
            fast = adapt(self.classify, fast, self.finetune_rule, support_f, support_y,
                         self.finetune_steps, first_order=not torch.is_grad_enabled(),
                         mode=batching_mode(self.batching, support.device),
                         shared_start=False)
        return self.classify(fast, query_f)
