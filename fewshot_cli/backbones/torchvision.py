"""Any torchvision classification network as a backbone, with or without pretrained weights.

``backbone=torchvision backbone.arch=resnet18 backbone.weights=DEFAULT`` builds the network with
torchvision's own builder (``torchvision.models.get_model``): named weights are downloaded and
hash-checked by torchvision itself into its cache (``torch.hub.get_dir()/checkpoints``) on first
use; ``backbone.weights=PATH`` loads a local state dict instead (``weights_only=True``);
``backbone.weights=null`` leaves the architecture untrained. The ImageNet classifier (the model's
last linear layer) is removed, so the backbone gives the features it was fed with.

The weights' own preprocessing (``weights.transforms()``: resize, centre crop, normalisation) runs
inside :meth:`forward`, so data sets and episodes stay ``uint8 -> float in [0, 1]`` as for every
other backbone; grey images are repeated to the three channels ImageNet networks read.
"""

from __future__ import annotations

import contextlib
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewshot_cli.backbones import LOAD_PRETRAINED
from fewshot_cli.episode import IMAGE_TASKS
from fewshot_cli.errors import FewshotError


def _arch(name: str) -> Any:
    """torchvision's weights enum of the classification model ``name``; one sentence for a name
    that is not one."""
    import torchvision
    from torchvision.models import get_model_weights, list_models

    models = list_models(module=torchvision.models)  # classification models only
    if name not in models:
        raise FewshotError(f"backbone.arch={name} is not a torchvision classification model; "
                           f"choose one of torchvision.models.list_models(), e.g. resnet18, "
                           f"resnet50, efficientnet_b0, convnext_tiny, vit_b_16")
    return get_model_weights(name)


def named_weights(enum: Any, weights: str | None) -> Any:
    """The member of the weights enum ``enum`` called ``weights`` (``DEFAULT``,
    ``IMAGENET1K_V2``, ``ResNet18_Weights.DEFAULT``), or None when ``weights`` is None or not
    such a name (then it is a file)."""
    if weights is None:
        return None
    name = weights.removeprefix(f"{enum.__name__}.")
    return enum[name] if name in enum.__members__ else None


def _remove_classifier(model: nn.Module, arch: str) -> int:
    """Replace the model's last linear layer (the ImageNet classifier in every torchvision
    classification model) by the identity; returns its input width, the feature size."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise FewshotError(f"backbone.arch={arch} ends in no linear "
                           "classifier to remove; choose another arch, e.g. resnet18")
    parent, _, child = last.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    width = getattr(owner, child).in_features
    setattr(owner, child, nn.Identity())
    return width


class HardSigmoid(nn.Module):
    """``nn.Hardsigmoid`` written as a clamp: the same function, and twice differentiable
    (torch has no derivative of ``hardsigmoid_backward``, which second-order MAML needs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 3).clamp(0, 6) / 6


class HardSwish(HardSigmoid):
    """``nn.Hardswish`` (x times the hard sigmoid), twice differentiable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * super().forward(x)


def twice_differentiable(model: nn.Module) -> None:
    """Replace the activations whose backward torch cannot differentiate (MobileNetV3's hard
    sigmoid and hard swish) by equal functions that it can, in place."""
    for name, child in model.named_children():
        if type(child) in (nn.Hardsigmoid, nn.Hardswish):
            setattr(model, name, HardSwish() if isinstance(child, nn.Hardswish)
                    else HardSigmoid())
        else:
            twice_differentiable(child)


def one_output(model: nn.Module) -> list[str]:
    """Switch off the auxiliary training heads of GoogLeNet and Inception v3, whose forward
    then returns the logits alone in training mode too; returns the removed modules' names."""
    if not getattr(model, "aux_logits", False):
        return []
    model.aux_logits = False
    removed = [name for name, _ in model.named_children() if name.lower().startswith("aux")]
    for name in removed:
        setattr(model, name, None)
    return removed


def _download_failed(arch: str, weights: Any, err: BaseException) -> FewshotError:
    from torch.hub import get_dir

    why = getattr(err, "reason", None) or err
    file = weights.url.rsplit("/", 1)[-1]
    return FewshotError(
        f"backbone.weights={weights.name}: torchvision could not download {weights.url} "
        f"({why}); on a machine with network run python -c \"import torchvision; "
        f"torchvision.models.get_model('{arch}', weights='{weights.name}')\", then copy {file} "
        f"from torch.hub.get_dir()/checkpoints there into {get_dir()}/checkpoints/ here, or "
        "pass backbone.weights=PATH to that file")


def _download(arch: str, weights: Any) -> nn.Module:
    """``get_model(arch, weights=weights)``: torchvision downloads the file into its cache
    once, checks its hash and loads it; its failures as one sentence."""
    from torchvision.models import get_model

    try:
        return get_model(arch, weights=weights)
    except (urllib.error.URLError, OSError) as err:
        raise _download_failed(arch, weights, err) from None
    except RuntimeError as err:
        if "hash" not in str(err):
            raise
        raise FewshotError(f"backbone.weights={weights.name}: the file torchvision downloaded "
                           f"for {arch} failed its hash check ({err}); torchvision kept "
                           "nothing, so run again (a download cut short), or copy the file in "
                           "by hand") from None


def _load_file(model: nn.Module, path: Path, arch: str, removed: list[str]) -> None:
    """``model.load_state_dict`` of the state dict saved at ``path`` (tensors only), less the
    weights of the ``removed`` modules (auxiliary heads torchvision's own files hold)."""
    if not path.is_file():
        raise FewshotError(f"backbone.weights={path} is neither a file nor a weights name of "
                           f"{arch} ({', '.join(_arch(arch).__members__)}); give the path of a "
                           "saved state dict, or DEFAULT")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds
        raise FewshotError(f"backbone.weights={path} cannot be read as a state dict "
                           f"({str(err).splitlines()[0][:120]}); save one with "
                           "torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        raise FewshotError(f"backbone.weights={path} is a fewshot checkpoint, not a state dict "
                           f"of {arch}; evaluate it with fewshot eval ckpt={path}")
    try:
        model.load_state_dict({k: v for k, v in state.items()
                               if k.split(".", 1)[0] not in removed})
    except (RuntimeError, TypeError, AttributeError) as err:
        raise FewshotError(f"backbone.weights={path} does not fit backbone.arch={arch} "
                           f"({str(err).splitlines()[0][:120]}); give the state dict of a "
                           f"torchvision {arch} (torchvision.models.get_model('{arch}')"
                           ".state_dict())") from None


class TorchvisionBackbone(nn.Module):
    """A torchvision classification network without its classifier: images ``[M, C, H, W]``
    (float in [0, 1], C = 1 or 3) to features ``[M, out_features]`` (512 for resnet18).

    ``weights``: a name of the arch's weights enum (``DEFAULT``: torchvision's best; downloaded
    and hash-checked by torchvision), the path of a state dict, or None (untrained).
    ``preprocess``: ``auto`` applies the named weights' ``transforms()`` (for a file: those of
    the arch's DEFAULT weights, the file being usually their copy; for None: nothing), ``none``
    feeds the images as they are. ``freeze``: the network's weights and BatchNorm statistics
    stay as loaded (features only; an algorithm's own layers still train).
    Raises a FewshotError (one sentence) for an unknown arch or weights name, an unreadable or
    mismatching file, and a download that fails.
    """

    task_kind = IMAGE_TASKS
    feature_map = None  # pooled features: no spatial map (Relation Networks need one)

    def __init__(self, in_channels: int = 3, image_size: int = 224, arch: str = "resnet18",
                 weights: str | None = "DEFAULT", preprocess: str = "auto",
                 freeze: bool = False) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise FewshotError(f"backbone=torchvision reads grey or RGB images, not "
                               f"{in_channels} channels; give it a data set of 1 or 3 channels")
        if preprocess not in ("auto", "none"):
            raise FewshotError(f"backbone.preprocess={preprocess} is unknown; choose auto (the "
                               "weights' own resize and normalisation) or none")
        weights = None if weights is None else str(weights)
        enum = _arch(arch)
        named = named_weights(enum, weights)
        meta = named or (enum.DEFAULT if weights else None)
        self.preprocess = meta.transforms() if meta is not None and preprocess == "auto" \
            else nn.Identity()
        self.pretrained = weights is not None
        self.freeze = bool(freeze)
        model = self._build(arch, named, weights)
        self.out_features = _remove_classifier(model, arch)
        self.attention = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        self.feature_shape = (self.out_features,)
        self.net = model
        self._check_input(arch, in_channels, image_size)
        if self.freeze:
            self.net.requires_grad_(False)
            self.net.eval()

    def _check_input(self, arch: str, channels: int, size: int) -> None:
        """One forward pass of a blank image: one sentence where the network cannot read the
        data's images (too small for its poolings, or not the size a ViT is made for)."""
        was = self.net.training
        try:
            with torch.no_grad():
                self.net.eval()(self.preprocess(torch.zeros(1, 3, size, size)))
        except (RuntimeError, ValueError, AssertionError) as err:
            fix = "raise dataset.image_size" if isinstance(self.preprocess, nn.Identity) \
                else "choose another backbone.arch"
            raise FewshotError(f"backbone.arch={arch} cannot read {size} px images "
                               f"({str(err).splitlines()[0][:100]}); {fix}, or use "
                               "backbone.preprocess=auto with named weights (their own resize)"
                               ) from None
        finally:
            self.net.train(was)

    def _build(self, arch: str, named: Any, weights: str | None) -> nn.Module:
        """The network as torchvision's builder makes it for ``weights``, with them loaded
        unless inside :func:`restoring`; one output, and twice differentiable."""
        from torchvision.models import get_model

        if named is not None and LOAD_PRETRAINED.get():
            model = _download(arch, named)
        else:
            # What torchvision's builders set for their weights: ViTs sized by them (SWAG:
            # 384 px), GoogLeNet and Inception v3 re-normalising their input as trained.
            sized = {"image_size": named.meta["min_size"][0]} \
                if named is not None and arch.startswith("vit_") else {}
            model = get_model(arch, weights=None, **sized)
            if weights is not None and hasattr(model, "transform_input"):
                model.transform_input = True
        removed = one_output(model)
        if weights is not None and named is None and LOAD_PRETRAINED.get():
            _load_file(model, Path(weights).expanduser(), arch, removed)
        twice_differentiable(model)
        return model

    def train(self, mode: bool = True) -> TorchvisionBackbone:
        """As ``nn.Module.train``, except that a frozen network keeps its BatchNorm statistics."""
        super().train(mode)
        if self.freeze:
            self.net.eval()
        return self

    def set_step(self, step: int) -> None:
        """Nothing follows the training step here (the Backbone protocol asks for it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, C, H, W]`` images in [0, 1] to ``[M, out_features]`` features."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey as an RGB viewer shows it
        # The fused attention kernels have no second derivative (second-order MAML needs
        # one); the plain math kernel has, and serves wherever gradients are taken.
        math = self.attention and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
            return self.net(self.preprocess(x))
