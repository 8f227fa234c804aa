"""Pretrained backbones through torchvision's weights API (issue 22.3): ``backbone=torchvision``
from torchvision's own download (never ours: checked by replacing its functions, nothing is
downloaded), from a local state dict, or untrained; training with it, and ``fewshot predict``
with no training at all."""

from __future__ import annotations

import csv
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import run_cli
from helpers import ok, one_sentence
from image_folder import make_image_folder
from torch.func import vmap
from torchvision.models import ResNet18_Weights

from fewshot_cli.backbones import restoring
from fewshot_cli.backbones.torchvision import TorchvisionBackbone
from fewshot_cli.errors import FewshotError

GLYPHS = ["dataset=glyphs", "dataset.classes.train=20", "dataset.classes.val=8",
          "dataset.classes.test=8", "train.queries=3", "eval.queries=3", "train.val_episodes=4",
          "eval.episodes=8", "device=cpu", "train.steps=2", "train.val_every=2"]



@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A local resnet18 state dict: torchvision's architecture, untrained, seed 0."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18 (local).pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and a network that answers nothing: the hub folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return tmp_path / "torch" / "hub"


# ---------------------------------------------------------------- weights


def test_named_weights_come_from_torchvisions_own_builder(monkeypatch):
    """DEFAULT is resolved by torchvision's weights enum and loaded by get_model, which
    downloads and hash-checks; the preprocessing is the weights' transforms()."""
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs.get("weights")))
        return torchvision.models.resnet18(weights=None)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    net = TorchvisionBackbone(arch="resnet18", weights="DEFAULT")
    assert calls == [("resnet18", ResNet18_Weights.DEFAULT)]
    assert repr(net.preprocess) == repr(ResNet18_Weights.DEFAULT.transforms())
    assert net.out_features == 512 and net.pretrained
    calls.clear()
    with restoring():  # a checkpoint brings the weights: nothing to fetch
        TorchvisionBackbone(arch="resnet18", weights="IMAGENET1K_V1")
    assert calls == [("resnet18", None)]


def test_offline_without_the_file_is_one_sentence(offline):
    with pytest.raises(FewshotError) as err:
        TorchvisionBackbone(arch="resnet18", weights="DEFAULT")
    message = str(err.value)
    assert message.startswith("backbone.weights=IMAGENET1K_V1: torchvision could not download "
                              f"{ResNet18_Weights.DEFAULT.url} (no network); on a machine with "
                              "network run")
    assert f"copy resnet18-f37072fd.pth from torch.hub.get_dir()/checkpoints there into " \
           f"{offline}/checkpoints/ here" in message and "backbone.weights=PATH" in message
    assert "\n" not in message


def test_the_file_copied_into_torchvisions_cache_serves_offline(offline, weights):
    """The fix the offline sentence gives: torchvision finds its file in its cache."""
    (offline / "checkpoints").mkdir(parents=True)
    url = ResNet18_Weights.DEFAULT.url
    shutil.copy(weights, offline / "checkpoints" / url.rsplit("/", 1)[-1])
    net = TorchvisionBackbone(arch="resnet18", weights="DEFAULT")
    saved = torch.load(weights, weights_only=True)
    assert torch.equal(net.net.conv1.weight, saved["conv1.weight"])


def test_a_local_state_dict(weights, tmp_path):
    net = TorchvisionBackbone(arch="resnet18", weights=str(weights)).eval()
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(net.net.state_dict()[k], v) for k, v in saved.items() if k[:2] != "fc")
    assert repr(net.preprocess) == repr(ResNet18_Weights.DEFAULT.transforms())
    images = torch.rand(2, 3, 40, 30)
    expected = net.net(ResNet18_Weights.DEFAULT.transforms()(images))
    assert torch.allclose(net(images), expected)
    grey = images[:, :1]
    assert torch.equal(net(grey), net(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("arch, given, words", [
    ("resnet34", "weights", "does not fit backbone.arch=resnet34"),
    ("resnet18", "garbage", "cannot be read as a state dict"),
    ("resnet18", "missing", "is neither a file nor a weights name of resnet18 (IMAGENET1K_V1, "
                            "DEFAULT)"),
    ("resnet18", "IMAGENET1K_V7", "is neither a file nor a weights name"),
    ("nosuchnet", None, "backbone.arch=nosuchnet is not a torchvision classification model"),
    ("squeezenet1_0", None, "ends in no linear classifier"),
])
def test_bad_weights_are_one_sentence(weights, tmp_path, arch, given, words):
    files = {"weights": str(weights), "garbage": tmp_path / "g.pth", "missing": tmp_path / "m"}
    (tmp_path / "g.pth").write_bytes(b"not a state dict")
    with pytest.raises(FewshotError, match="^backbone") as err:
        TorchvisionBackbone(arch=arch, weights=str(files.get(given, given)) if given else None)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_untrained_frozen_and_too_small():
    net = TorchvisionBackbone(in_channels=1, image_size=28, arch="resnet18", weights=None,
                              freeze=True)
    assert not net.pretrained and isinstance(net.preprocess, torch.nn.Identity)
    assert not any(p.requires_grad for p in net.parameters())
    assert not net.train().net.training  # BatchNorm statistics stay as loaded
    with pytest.raises(FewshotError, match="cannot read 8 px images .*raise dataset.image_size"):
        TorchvisionBackbone(image_size=8, arch="vgg11", weights=None)


def test_the_preprocessing_runs_under_vmap(weights):
    """The MAML family maps its inner loop over tasks with torch.func: the weights' resize and
    normalisation inside forward batch like any other layer."""
    net = TorchvisionBackbone(arch="resnet18", weights=str(weights)).eval()
    tasks = torch.rand(2, 2, 3, 20, 20)
    with torch.no_grad():
        assert torch.allclose(vmap(net)(tasks), torch.stack([net(t) for t in tasks]), atol=1e-4)


# ---------------------------------------------------------------- training and predict


def test_train_protonet_and_maml_on_it_then_eval_without_the_file(cli, weights, tmp_path):
    """A local state dict trains with a metric learner and a MAML learner (torch.func runs
    it); the run's checkpoint holds every weight, so eval needs no file any more."""
    local = tmp_path / "local.pth"
    shutil.copy(weights, local)
    net = ["backbone=torchvision", f"backbone.weights={local}", "backbone.preprocess=none"]
    for algo, *options in (("protonet",), ("fomaml", "algo.inner_steps=1")):
        ok(cli("train", *GLYPHS, f"algo={algo}", *options, *net,
               f"hydra.run.dir={tmp_path / algo}"))
    local.unlink()
    for algo in ("protonet", "fomaml"):
        assert "test accuracy" in ok(cli("eval", f"ckpt={tmp_path / algo / 'best.pt'}")).stdout


def test_a_frozen_backbone_under_protonet_has_nothing_to_train(cli):
    one_sentence(cli("train", *GLYPHS, "backbone=torchvision", "backbone.weights=null",
                     "backbone.freeze=true"),
                 "algo=protonet has no weights of its own and backbone.freeze=true",
                 "fewshot predict")


@pytest.fixture
def photos(tmp_path) -> tuple[Path, Path]:
    """Support: 3 classes of 2 photos; query: a copy of every support photo."""
    support = make_image_folder(tmp_path / "my (photos)" / "support",
                                {"cat": 2, "dog": 2, "owl": 2}, seed=5)
    query = tmp_path / "query"
    query.mkdir()
    for image in sorted(support.glob("*/*")):
        shutil.copy(image, query / f"{image.parent.name}_{image.name}")
    return support, query


@pytest.mark.parametrize("distance", ["cosine", "sqeuclidean"])
def test_predict_with_a_pretrained_backbone_and_no_training(weights, photos, tmp_path,
                                                            distance):
    """The acceptance test: backbone=torchvision from a local state dict, no checkpoint, no
    network (an empty torch cache stays empty): each query is a support photo, so the nearest
    prototype is its own class."""
    support, query = photos
    torch_home = tmp_path / "torch"
    proc = ok(run_cli(["predict", "backbone=torchvision", f"backbone.weights={weights}",
                       f"support={support}", f"query={query}", f"distance={distance}",
                       "image_size=64", "device=cpu"], tmp_path,
                      env={"TORCH_HOME": str(torch_home)}))
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 6
    for row in rows:
        assert row["predicted"] == Path(row["file"]).name.split("_")[0], rows
    assert f"no training: {distance} prototypes" in proc.stdout
    assert not torch_home.exists()


@pytest.mark.parametrize("model, words", [
    (["backbone=torchvision", "backbone.weights=null"],
     ["backbone=torchvision has no pretrained weights", "backbone.weights=DEFAULT"]),
    (["backbone=conv4"], ["backbone=conv4 has no pretrained weights"]),
    (["backbone=torchvision", "backbone.weights={weights}", "ckpt={weights}"],
     ["takes ckpt= (a trained run) or backbone=", "not both"]),
    (["backbone=torchvision", "backbone.weights={weights}", "distance=manhattan"],
     ["distance=manhattan must be cosine or sqeuclidean"]),
])
def test_predict_mistakes_are_one_sentence(cli, weights, photos, model, words):
    support, query = photos
    model = [m.format(weights=weights) for m in model]
    one_sentence(cli("predict", *model, f"support={support}", f"query={query}", "device=cpu"),
                 *words)
