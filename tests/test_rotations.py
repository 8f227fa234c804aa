"""``eval.rotations``: the val/test classes plus their rotations as classes of their own, as
Snell et al. and Vinyals et al. test Omniglot (423 characters x 4 = 1692 classes). A rotated
test is another protocol (its own results.json entry), photographs refuse it, and a run
trained before the key existed reads as unrotated."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, compose, ok, one_sentence

from fewshot_cli.build import build_dataset, task_shape
from fewshot_cli.data.base import FewShotDataset
from fewshot_cli.data.store import ClassStore
from fewshot_cli.episode import TaskShape
from fewshot_cli.errors import FewshotError
from fewshot_cli.options import RULES, check
from fewshot_cli.results import protocol

QUARTERS = (0, 90, 180, 270)
GLYPHS = ["dataset=glyphs", "dataset.classes.train=6", "dataset.classes.val=3",
          "dataset.classes.test=3", "dataset.images_per_class=4"]


def test_rotated_test_tasks_draw_from_four_times_the_classes():
    dataset = build_dataset(compose(GLYPHS))
    test = dataset.load("test")
    plain = dataset.sampler("test", TaskShape(3, 1, 1), 1, torch.device("cpu"))
    rotated = dataset.sampler("test", TaskShape(12, 1, 1, rotations=QUARTERS), 1,
                              torch.device("cpu"))
    assert plain.store.num_classes == 3 and rotated.store.num_classes == 12
    # every class's images are the originals turned by its rotation
    for d, block in zip(QUARTERS, rotated.store.images.split(3), strict=True):
        assert torch.equal(block, torch.rot90(test.images, d // 90, dims=(-2, -1)))
    # a 12-way task needs the rotations: the test split holds 3 characters
    episode = next(iter(rotated.fixed(1, seed=0)))
    assert episode.ways == 12


def test_photographs_refuse_rotated_classes_in_one_sentence():
    class Photos(FewShotDataset):
        def load(self, split: str) -> ClassStore:
            return ClassStore(torch.zeros(4, 2, 1, 4, 4, dtype=torch.uint8),
                              [f"c{i}" for i in range(4)], torch.full((4,), 2))

    with pytest.raises(FewshotError, match=r"only character data sets.*eval.rotations=\[0\]"):
        Photos().sampler("test", TaskShape(2, 1, 1, rotations=QUARTERS), 1,
                         torch.device("cpu"))
    assert Photos().sampler("test", TaskShape(2, 1, 1), 1, torch.device("cpu"))


@pytest.mark.parametrize("value", ["[45]", "[]", "[0,0]", "[360]", "[-90]"])
def test_rotations_that_are_not_distinct_quarter_turns_are_refused(value):
    cfg = compose([f"eval.rotations={value}"])
    with pytest.raises(FewshotError, match=r"eval.rotations=.* must be a list of distinct "
                                           r"multiples of 90 degrees"):
        check(cfg, RULES["train"])


def test_shape_words_and_protocol_name_the_rotations():
    cfg = compose([*GLYPHS, "eval.rotations=[0,90,180,270]"])
    shape = task_shape(cfg.eval)
    assert shape.rotations == QUARTERS
    assert shape.describe().endswith(", classes rotated by 0/90/180/270 degrees")
    assert task_shape(compose(GLYPHS).eval).describe() == "5-way 1-shot (15 queries)"
    # a config written before the key existed is the unrotated protocol
    now = json.loads(json.dumps(dict(eval={"rotations": [0], "ways": 5}, dataset={})))
    before = {"eval": {"ways": 5}, "dataset": {}}
    assert protocol(now, None) == protocol(before, None)
    assert protocol(now, None) != protocol({"eval": {"rotations": list(QUARTERS), "ways": 5},
                                            "dataset": {}}, None)


def test_eval_with_rotations_is_its_own_result(fewshot, tmp_path):
    run = tmp_path / "run"
    ok(fewshot("train", *TINY, "train.steps=2", "train.val_every=2", f"hydra.run.dir={run}"))
    ok(fewshot("eval", f"ckpt={run / 'best.pt'}"))
    rotated = ok(fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.rotations=[0,90,180,270]",
                         "eval.ways=20"))
    assert "20-way 1-shot (3 queries), classes rotated by 0/90/180/270 degrees" in rotated.stdout
    entries = json.loads((run / "results.json").read_text())["best.pt"]
    assert sorted(e["protocol"]["rotations"] for e in entries.values()) == [[0], list(QUARTERS)]
    # 20 ways from 8 test characters: only with their rotations
    fewer = fewshot("eval", f"ckpt={run / 'best.pt'}", "eval.ways=20")
    one_sentence(fewer, "20")


def test_bandits_refuse_rotations_in_one_sentence(fewshot):
    proc = fewshot("train", "experiment=rl2_bandits_k5_n10", "train.steps=1",
                   "eval.rotations=[0,90]", "device=cpu")
    one_sentence(proc, "eval.rotations=[0, 90]", "bandit")
