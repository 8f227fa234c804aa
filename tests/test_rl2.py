"""RL² on bandits: GAE against a loop, the A2C loss, the real CLI end to end (TensorBoard, eval
table, results.json, exact resume), bad options in one sentence, and real learning on k=5, n=10
against Thompson sampling on the same test trials."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose, failed, ok, recorded_hparams, weights

from fewshot_cli.algorithms.rl2 import RL2, gae, sample
from fewshot_cli.backbones.gru import GRUPolicy
from fewshot_cli.build import build_algorithm, build_dataset
from fewshot_cli.data.bandits import Bandits
from fewshot_cli.errors import FewshotError

# Small and fast: a narrow GRU, short validation.
TINY = ["algo=rl2", "dataset=bandits", "backbone.hidden=16", "train.meta_batch=32",
        "train.val_episodes=20", "eval.episodes=40", "eval.batch=40", "device=cpu"]


def trials(arms: int = 3, pulls: int = 6, count: int = 8):
    return next(Bandits(arms=arms, pulls=pulls).sampler("train", {}, count, "cpu").fixed(
        count, seed=1))


def test_gae_matches_the_backward_recursion():
    rewards, values = torch.rand(4, 7), torch.rand(4, 7)
    discount, lam = 0.9, 0.7
    expected, running = torch.zeros(4, 7), torch.zeros(4)
    for t in reversed(range(7)):
        following = values[:, t + 1] if t + 1 < 7 else torch.zeros(4)
        running = rewards[:, t] + discount * following - values[:, t] + discount * lam * running
        expected[:, t] = running
    assert torch.allclose(gae(rewards, values, discount, lam), expected, atol=1e-5)
    # lambda = 1, no baseline: the discounted reward-to-go
    to_go = torch.stack([sum(0.9 ** (s - t) * rewards[:, s] for s in range(t, 7))
                         for t in range(7)], 1)
    assert torch.allclose(gae(rewards, torch.zeros(4, 7), 0.9, 1.0), to_go, atol=1e-5)


def test_inverse_cdf_sampling_follows_the_probabilities():
    probs = torch.tensor([[0.2, 0.5, 0.3]]).expand(30000, 3)
    u = torch.rand(30000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample(probs, u), minlength=3).float() / 30000
    assert torch.allclose(counts, probs[0], atol=0.01)


def test_a2c_loss_trains_policy_and_value_and_plays_reproducibly():
    torch.manual_seed(0)
    algo = RL2(GRUPolicy(arms=3, hidden=8))
    tasks = trials()
    loss, metrics = algo.meta_loss(tasks)
    assert {"total_reward", "entropy", "value_loss", "policy_loss"} <= metrics.keys()
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    loss.backward()
    for name, p in algo.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        score = algo.score(tasks)
        assert score.shape == (8,) and torch.equal(score, algo.score(tasks))
        assert ((0 <= score) & (score <= 6)).all()
    # The first pull has no previous action: a zero one-hot, not arm 0.
    net = GRUPolicy(arms=3, hidden=8)
    state = net.initial_state(2, torch.device("cpu"))
    none, _, _ = net(torch.tensor([-1, -1]), torch.zeros(2), torch.zeros(2), state)
    arm0, _, _ = net(torch.tensor([0, 0]), torch.zeros(2), torch.zeros(2), state)
    assert not torch.allclose(none, arm0)


@pytest.mark.parametrize(("overrides", "words"), [
    (["algo=protonet", "dataset=bandits"],
     "algo=protonet learns few-shot image classification tasks but dataset=bandits holds "
     "multi-armed bandit tasks; use dataset="),
    (["algo=rl2", "dataset=glyphs"], "algo=rl2 learns multi-armed bandit tasks but "
     "dataset=glyphs holds few-shot image classification tasks"),
    (["algo=rl2", "dataset=bandits", "backbone=resnet12"], "backbone=resnet12 is a network for "
     "few-shot image classification tasks but algo=rl2 learns multi-armed bandit tasks; use "
     "backbone=gru"),
])
def test_tasks_of_another_kind_are_one_sentence(overrides, words):
    cfg = compose(overrides)
    dataset = build_dataset(cfg)
    with pytest.raises(FewshotError) as err:
        build_algorithm(cfg, dataset.input_spec())
    assert words in str(err.value)


def test_rl2_chooses_its_gru(tmp_path):
    cfg = compose(["algo=rl2", "dataset=bandits", "dataset.arms=7"])
    algo = build_algorithm(cfg, build_dataset(cfg).input_spec())
    assert isinstance(algo.backbone, GRUPolicy) and algo.backbone.policy.out_features == 7


# ---------------------------------------------------------------- the real CLI


def test_train_eval_and_resume_through_the_cli(cli, tmp_path):
    args = [*TINY, "train.val_every=5", "train.scheduler.step_size=7",
            "dataset.gittins_max_pulls=5"]  # pulls=10 > 5: Gittins is not computed
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(cli("train", *args, "train.steps=10", f"hydra.run.dir={straight}"))
    ok(cli("train", *args, "train.steps=5", f"hydra.run.dir={split}"))
    ok(cli("train", f"resume={split / 'last.pt'}", "train.steps=10"))
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight)).Reload().Tags()["scalars"]
    for tag in ("train/total_reward", "train/entropy", "train/value_loss",
                "val/total_reward"):
        assert tag in events, events

    out = ok(cli("eval", f"ckpt={straight / 'best.pt'}")).stdout
    assert "5-armed Bernoulli bandit, 10 pulls test total_reward" in out
    for row in ("| rl2 ", "| random ", "| Gittins        | — |", "| TS ", "| OTS ", "| UCB1 ",
                "| epsilon-greedy ", "| greedy "):
        assert row in out, out
    result = next(iter(json.loads((straight / "results.json").read_text())["best.pt"].values()))
    assert result["metric"] == "total_reward" and result["episodes"] == 40
    assert 0 <= result["total_reward"] <= 10 and result["ci95"] > 0
    assert result["baselines"]["Gittins"] is None
    assert 5 < result["baselines"]["UCB1"]["mean"] <= 10


def test_bad_bandit_options_fail_in_one_sentence(fewshot):
    """Through the CLI (dataset.pulls=0 takes the same path as arms: tests/test_bandits.py)."""
    err = failed(fewshot("train", *TINY, "dataset.arms=1"))
    assert "dataset.arms=1 must be a whole number of at least 2" in err
    assert len(err.strip().splitlines()) == 1
    err = failed(fewshot("train", *TINY, "backbone=conv4"))
    assert "backbone=conv4 is a network for few-shot image classification tasks" in err
    assert "use backbone=gru" in err and len(err.strip().splitlines()) == 1


def test_rl2_learns_to_match_thompson_sampling_on_k5_n10(cli, tmp_path):
    """A few hundred A2C steps on 5-armed, 10-pull bandits: RL²'s mean total reward on 1000
    fixed test trials is at least Thompson sampling's on the same trials minus its 95% CI
    (Duan et al.: TS 5.7, RL² 6.7 after 500 iterations of 250000 pulls)."""
    run = tmp_path / "run"
    ok(cli("train", "experiment=rl2_bandits_k5_n10", "backbone.hidden=64", "train.steps=500",
           "train.val_every=500", "train.val_episodes=200", "device=cpu",
           f"hydra.run.dir={run}"))
    out = ok(cli("eval", f"ckpt={run / 'last.pt'}")).stdout
    print(out)
    result = next(iter(json.loads((run / "results.json").read_text())["last.pt"].values()))
    ts = result["baselines"]["TS"]
    assert result["episodes"] == 1000
    assert result["total_reward"] >= ts["mean"] - ts["ci95"], out
    assert result["total_reward"] > result["baselines"]["random"]["mean"] + 0.8, out


def test_rl2_hparams_hold_no_image_settings(fewshot, tmp_path):
    """Issue 31.8: an RL² run recorded train.ways, train.shots, train.queries and augment in
    TensorBoard's hparams, settings that mean nothing to a bandit learner."""
    run = tmp_path / "run"
    ok(fewshot("train", *TINY, "train.steps=2", "train.val_every=2", f"hydra.run.dir={run}"))
    values = recorded_hparams(run)
    assert values["algo"] == "rl2" and values["dataset.arms"] == 5
    assert values["train.meta_batch"] == 32 and values["algo.discount"] == pytest.approx(0.99)
    image = [k for k in values if k.split(".")[0] == "augment" or k in
             ("train.ways", "train.shots", "train.queries", "train.batch_size")]
    assert not image, image
