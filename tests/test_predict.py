"""fewshot predict: a user's own support and query images through the real CLI, every image
algorithm through the same function, and bad input that writes nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import compose, ok, one_sentence
from image_folder import make_image_folder
from PIL import Image

from fewshot_cli.build import build_algorithm
from fewshot_cli.data.images import decode_files
from fewshot_cli.data.store import ClassStore
from fewshot_cli.predict import classify

SHAPES = {f"shape{i}": 8 for i in range(6)}  # a training folder: 6 classes of 8 images
TRAIN = ["dataset=folder", "dataset.image_size=28", "dataset.min_images=2",
         "dataset.split_fractions=[0.5,0.25,0.25]", "backbone.hidden=8", "train.ways=2",
         "train.queries=2", "eval.ways=2", "eval.queries=2", "train.steps=4", "train.val_every=4",
         "train.val_episodes=2", "device=cpu"]


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
def test_bad_input_is_one_sentence_and_writes_nothing(fewshot, trained, mine, tmp_path, case,
                                                      words):
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
    one_sentence(fewshot("predict", *args), *words)
    assert not (tmp_path / "predictions.csv").exists()


@pytest.fixture(scope="module")
def maml(tmp_path_factory) -> Path:
    """A default MAML checkpoint (algo.batchnorm=task, 2 ways) trained a few steps."""
    folder = tmp_path_factory.mktemp("maml")
    data = make_image_folder(folder / "data", SHAPES)
    ok(run_cli(["train", *TRAIN, "algo=maml", "train.meta_batch=2", "algo.eval_inner_steps=1",
                f"dataset.root={data}", f"hydra.run.dir={folder / 'run'}"], folder))
    return folder / "run" / "best.pt"


def test_a_fixed_head_needs_its_number_of_classes(fewshot, maml, mine, tmp_path):
    support, query = mine
    one_sentence(fewshot("predict", f"ckpt={maml}", f"support={support}", f"query={query}"),
                 "trained for 2 classes", "holds 3 class folders")
    assert not (tmp_path / "predictions.csv").exists()


def test_a_maml_answer_does_not_depend_on_the_other_query_files(cli, maml, tmp_path):
    """Issue 19.2 through the real CLI: with algo.batchnorm=task one image got p=0.8251 alone,
    0.8678 among nine others, and 0.8251 / 0.8648 / 0.8678 with batch=1/4/64."""
    support = make_image_folder(tmp_path / "support", {"round": 2, "square": 1}, seed=3)
    query = make_image_folder(tmp_path / "query", {"q": 10}, seed=4) / "q"
    files = sorted(query.iterdir())

    def probabilities(query_path: Path, *extra: str) -> dict[str, float]:
        out = tmp_path / "p.csv"
        proc = ok(cli("predict", f"ckpt={maml}", f"support={support}", f"query={query_path}",
                      f"out={out}", *extra))
        assert "query statistics: inductive" in proc.stdout
        assert "support set's BatchNorm statistics" in proc.stdout
        return {Path(r["file"]).name: float(r["probability"]) if r["predicted"] == "round"
                else float(r["runner_up_probability"]) for r in read_csv(out)}

    together = probabilities(query)
    assert probabilities(files[3]) == pytest.approx({files[3].name: together[files[3].name]},
                                                    abs=1e-5)
    assert probabilities(query, "batch=1") == pytest.approx(together, abs=1e-5)
    # The same files among others, in another order (names decide the order): the three
    # brightest and darkest of another image set join them.
    mixed = tmp_path / "mixed"
    make_image_folder(mixed, {"other": 3}, seed=9)
    for f in files[:5]:
        (mixed / "other" / f"z{f.name}").write_bytes(f.read_bytes())
    answers = probabilities(mixed / "other")
    assert {f.name: answers[f"z{f.name}"] for f in files[:5]} == pytest.approx(
        {f.name: together[f.name] for f in files[:5]}, abs=1e-5)


@pytest.mark.parametrize("algo", ["protonet", "matching", "relation", "siamese", "maml",
                                  "metasgd", "anil", "meta_lstm", "weightgen"])
def test_every_image_algorithm_classifies_unequal_support(algo, mine):
    """The function behind fewshot predict, on each algorithm as the config tree builds it."""
    support_dir, query_dir = mine
    cfg = compose([f"algo={algo}", "dataset=folder", "dataset.root=unused", "train.ways=3",
                   "eval.ways=3", "device=cpu"])
    torch.manual_seed(0)
    algo_ = build_algorithm(cfg, {"in_channels": 3, "image_size": 28}).eval()
    files = {p.name: sorted(p.iterdir()) for p in sorted(support_dir.iterdir())}
    support = decode_files(files, 28, "RGB")
    query = decode_files({"q": sorted(query_dir.iterdir())}, 28, "RGB")
    images = query.images[0, : int(query.counts[0])].float() / 255
    probabilities = classify(algo_, support, images, torch.device("cpu"), batch=3)
    assert probabilities.shape == (4, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))


# Every image algorithm whose predictions could depend on the query batch: BatchNorm with batch
# statistics (the MAML family's algo.batchnorm=task, any backbone without running statistics),
# Matching's full-context embeddings, Relation's pairs, weightgen's generator and fine-tuning.
MAML_FAMILY = ["algo.eval_inner_steps=1"]  # one inner step is enough to see the statistics
QUERY_BATCH_CASES = {
    "maml": ["algo=maml", *MAML_FAMILY], "fomaml": ["algo=fomaml", *MAML_FAMILY],
    "metasgd": ["algo=metasgd", *MAML_FAMILY], "anil": ["algo=anil", *MAML_FAMILY],
    "maml, batchnorm=support": ["algo=maml", "algo.batchnorm=support", *MAML_FAMILY],
    "meta_lstm": ["algo=meta_lstm", "algo.inner_steps=2"],
    "meta_lstm, batchnorm=task": ["algo=meta_lstm", "algo.inner_steps=2", "algo.batchnorm=task"],
    "protonet": ["algo=protonet"],
    "protonet, no running statistics": ["algo=protonet", "backbone.track_running_stats=false"],
    "matching, full context": ["algo=matching", "algo.fce=true"], "relation": ["algo=relation"],
    "siamese": ["algo=siamese"],
    "weightgen, fine-tuned": ["algo=weightgen", "algo.finetune_steps=2"],
}


@pytest.mark.parametrize("case", QUERY_BATCH_CASES)
def test_a_query_answer_depends_only_on_the_support_set_and_that_query(case):
    """Permuting, subsetting and re-batching the queries leaves every query's probabilities
    as they were (issue 19.2: with algo.batchnorm=task one image got 0.8251 alone and 0.8678
    among nine others)."""
    cfg = compose([*QUERY_BATCH_CASES[case], "dataset=folder", "dataset.root=unused",
                   "train.ways=3", "eval.ways=3", "backbone.hidden=8", "device=cpu"])
    torch.manual_seed(0)
    algo = build_algorithm(cfg, {"in_channels": 1, "image_size": 28}).eval()
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (3, 2, 1, 28, 28), dtype=torch.uint8, generator=generator)
    support = ClassStore(pixels, ["a", "b", "c"], counts=torch.tensor([2, 1, 2]))
    # Queries of very different brightness, so that batch statistics would move a lot.
    query = torch.rand(6, 1, 28, 28, generator=generator) * torch.linspace(0.1, 1, 6).view(
        -1, 1, 1, 1)
    cpu = torch.device("cpu")
    alone = torch.cat([classify(algo, support, q[None], cpu) for q in query])
    order = torch.randperm(6, generator=generator)
    views = {"all at once": classify(algo, support, query, cpu),
             "in batches of 4": classify(algo, support, query, cpu, batch=4),
             "permuted": classify(algo, support, query[order], cpu, batch=5)[order.argsort()]}
    for name, probabilities in views.items():
        torch.testing.assert_close(probabilities, alone, atol=2e-5, rtol=0, msg=name)
    subset = classify(algo, support, query[[4, 1]], cpu)
    torch.testing.assert_close(subset, alone[[4, 1]], atol=2e-5, rtol=0)
