"""fewshot predict: a user's own support and query images through the real CLI, every image
algorithm through the same function, and bad input that writes nothing."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir
from image_folder import make_image_folder
from PIL import Image

from fewshot_cli.build import build_algorithm
from fewshot_cli.config import conf_dir
from fewshot_cli.data.images import decode_files
from fewshot_cli.predict import classify

SHAPES = {f"shape{i}": 8 for i in range(6)}  # a training folder: 6 classes of 8 images
TRAIN = ["dataset=folder", "dataset.image_size=28", "dataset.min_images=2",
         "dataset.split_fractions=[0.5,0.25,0.25]", "backbone.hidden=8", "train.ways=2",
         "train.queries=2", "eval.ways=2", "eval.queries=2", "train.steps=4", "train.val_every=4",
         "train.val_episodes=2", "device=cpu"]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def one_sentence(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fewshot: error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A ProtoNet checkpoint trained a few steps on a generated RGB image folder."""
    folder = tmp_path_factory.mktemp("predict")
    data = make_image_folder(folder / "data", SHAPES)
    ok(run_cli(["train", *TRAIN, f"dataset.root={data}", f"hydra.run.dir={folder / 'run'}"],
               folder))
    return folder / "run" / "best.pt"


@pytest.fixture
def mine(tmp_path) -> tuple[Path, Path]:
    """A support folder of 3 classes with 1, 2 and 3 images (PNG and JPEG, any size, one grey
    and one RGBA image) and a query folder of 4 images; the path holds parentheses, which
    Hydra's grammar needs quoted (the command line quotes path keys itself)."""
    support = make_image_folder(tmp_path / "my (photos)" / "support",
                                {"cat": 1, "dog": 2, "owl": 3}, seed=5)
    Image.open(next((support / "owl").glob("*.jpg"))).convert("L").save(support / "owl" / "g.png")
    Image.new("RGBA", (50, 20), (10, 200, 30, 128)).save(support / "dog" / "alpha.png")
    query = make_image_folder(tmp_path / "query", {"q": 4}, seed=6) / "q"
    return support, query


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_a_folder_and_one_image(cli, trained, mine, tmp_path):
    support, query = mine
    out = ok(cli("predict", f"ckpt={trained}", f"support={support}", f"query={query}")).stdout
    rows = read_csv(tmp_path / "predictions.csv")
    assert [Path(r["file"]).name for r in rows] == sorted(p.name for p in query.iterdir())
    for row in rows:
        assert row["predicted"] in {"cat", "dog", "owl"} and row["runner_up"] != row["predicted"]
        assert 1.0 >= float(row["probability"]) >= float(row["runner_up_probability"]) >= 0.0
        assert Path(row["file"]).name in out
    assert "4 predictions over 3 classes" in out
    single = next(query.iterdir())
    ok(cli("predict", f"ckpt={trained}", f"support={support}", f"query={single}",
           f"out={tmp_path / 'one.csv'}"))
    assert [r["file"] for r in read_csv(tmp_path / "one.csv")] == [str(single)]


@pytest.mark.parametrize("case, words", [
    ("corrupt", ["cannot decode the support image", "broken.png", "replace or remove it"]),
    ("one class", ["holds 1 class folder", "at least 2 classes"]),
    ("empty class", ["holds no images", "empty"]),
    ("no query", ["query=", "does not exist"]),
    ("no ckpt", ["needs ckpt=PATH"]),
])
def test_bad_input_is_one_sentence_and_writes_nothing(cli, trained, mine, tmp_path, case, words):
    support, query = mine
    args = [f"ckpt={trained}", f"support={support}", f"query={query}"]
    if case == "corrupt":
        good = next((support / "owl").glob("*.png")).read_bytes()
        (support / "owl" / "broken.png").write_bytes(good[: len(good) // 2])
    elif case == "one class":
        args[1] = f"support={tmp_path / 'alone'}"
        make_image_folder(tmp_path / "alone", {"cat": 2})
    elif case == "empty class":
        (support / "empty").mkdir()
    elif case == "no query":
        args[2] = f"query={tmp_path / 'nowhere'}"
    else:
        args = args[1:]
    one_sentence(cli("predict", *args), *words)
    assert not (tmp_path / "predictions.csv").exists()


def test_a_fixed_head_needs_its_number_of_classes(cli, mine, tmp_path):
    data = make_image_folder(tmp_path / "data", SHAPES)
    ok(cli("train", *TRAIN, "algo=maml", "train.meta_batch=2", f"dataset.root={data}",
           f"hydra.run.dir={tmp_path / 'maml'}"))
    support, query = mine
    one_sentence(cli("predict", f"ckpt={tmp_path / 'maml' / 'best.pt'}", f"support={support}",
                     f"query={query}"), "trained for 2 classes", "holds 3 class folders")
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.parametrize("algo", ["protonet", "matching", "relation", "siamese", "maml",
                                  "metasgd", "anil", "meta_lstm", "weightgen"])
def test_every_image_algorithm_classifies_unequal_support(algo, mine):
    """The function behind fewshot predict, on each algorithm as the config tree builds it."""
    support_dir, query_dir = mine
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", [f"algo={algo}", "dataset=folder", "dataset.root=unused",
                                "train.ways=3", "eval.ways=3", "device=cpu"])
    torch.manual_seed(0)
    algo_ = build_algorithm(cfg, {"in_channels": 3, "image_size": 28}).eval()
    files = {p.name: sorted(p.iterdir()) for p in sorted(support_dir.iterdir())}
    support = decode_files(files, 28, "RGB")
    query = decode_files({"q": sorted(query_dir.iterdir())}, 28, "RGB")
    images = query.images[0, : int(query.counts[0])].float() / 255
    probabilities = classify(algo_, support, images, torch.device("cpu"), batch=3)
    assert probabilities.shape == (4, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))
