"""Bernoulli bandits: the environment against its arm means, the fixed trials, the classical
baselines against Duan et al.'s Table 1 and on easy instances, and the Gittins index against an
independent reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fewshot_cli.data import bandit_policies as policies
from fewshot_cli.data.bandits import Bandits
from fewshot_cli.episode import BanditTrials
from fewshot_cli.errors import FewshotError


def trials(arms: int, pulls: int, count: int, seed: int = 2024, split: str = "test"
           ) -> BanditTrials:
    sampler = Bandits(arms=arms, pulls=pulls).sampler(split, {}, count, "cpu")
    return next(sampler.fixed(count, seed=seed))


def easy(means: list[float], pulls: int, count: int = 200) -> BanditTrials:
    """``count`` trials of the same bandit (its arms in a different order in each), with the
    luck of random trials."""
    tasks = trials(len(means), pulls, count)
    order = torch.rand(count, len(means), generator=torch.Generator().manual_seed(0)).argsort(1)
    tasks.means = torch.tensor(means)[order]
    return tasks


# ---------------------------------------------------------------- the environment


def test_rewards_follow_the_arm_means():
    tasks = trials(arms=4, pulls=400, count=1000, split="train")
    # means ~ Uniform[0, 1]: the mean, variance and deciles of 4000 draws
    means = tasks.means.flatten()
    assert abs(float(means.mean()) - 0.5) < 0.015 and abs(float(means.var()) - 1 / 12) < 0.006
    deciles = torch.quantile(means, torch.linspace(0.1, 0.9, 9))
    assert (deciles - torch.linspace(0.1, 0.9, 9)).abs().max() < 0.03
    # Pull arm b % 4 of trial b 400 times: the count of 1s is Binomial(400, p).
    arm = torch.arange(1000) % 4
    rewards = torch.stack([tasks.pull(t, arm) for t in range(400)], 1)  # [1000, 400]
    p = tasks.means.gather(1, arm.unsqueeze(1)).squeeze(1)
    z = (rewards.sum(1) - 400 * p) / (400 * p * (1 - p)).sqrt()
    assert abs(float(z.mean())) < 4 / math.sqrt(1000)  # z ~ N(0, 1) per trial
    assert abs(float(z.var()) - 1) < 0.15
    # and the pulls are independent: successive rewards uncorrelated given the arm
    centred = rewards - p.unsqueeze(1)
    lag = (centred[:, 1:] * centred[:, :-1]).mean() / (p * (1 - p)).mean()
    assert abs(float(lag)) < 0.01
    assert set(rewards.unique().tolist()) == {0.0, 1.0}


def test_fixed_trials_do_not_depend_on_batching_and_splits_differ():
    sampler = Bandits(arms=3, pulls=5).sampler("test", {}, 4, "cpu")
    whole = next(sampler.fixed(10, seed=7, batch=10))
    parts = list(sampler.fixed(10, seed=7, batch=3))
    assert [p.meta_batch for p in parts] == [3, 3, 3, 1]
    for name in ("means", "draws", "choices"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts]))
    val = Bandits(arms=3, pulls=5).sampler("val", {}, 4, "cpu")
    assert not torch.equal(next(val.fixed(10, seed=7)).means, whole.means[:4])
    train = Bandits(arms=3, pulls=5).sampler("train", {}, 4, "cpu", seed=7)
    first, second = train.sample(), train.sample()
    assert first.means.shape == (4, 3) and first.draws.shape == (4, 5)
    assert not torch.equal(first.means, second.means)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("arms", 1, "dataset.arms=1 must be a whole number of at least 2"),
    ("pulls", 0, "dataset.pulls=0 must be a whole number of at least 1"),
    ("epsilon", 1.5, "dataset.epsilon=1.5 must be a probability"),
    ("ots_samples", 0, "dataset.ots_samples=0 must be"),
])
def test_impossible_bandits_are_one_sentence(key, value, words):
    with pytest.raises(FewshotError, match=words):
        Bandits(**{key: value})


# ---------------------------------------------------------------- the baselines


def test_baselines_reproduce_duan_et_al_where_nothing_is_tuned():
    """Table 1 of Duan et al. (2016), k=5, n=100, 1000 instances: random 49.9, TS 74.7,
    greedy 74.8 (methods without parameters), Gittins 78.3 (theirs: tuned discounted indices;
    ours: the finite-horizon index, at least as good). Their means have standard errors of about
    0.5, and so do ours."""
    scores = Bandits(arms=5, pulls=100, ucb_c=0.2).baselines(trials(5, 100, 1000))
    mean = {name: float(s.mean()) for name, s in scores.items()}
    assert abs(mean["random"] - 49.9) < 1.5
    assert abs(mean["TS"] - 74.7) < 2.0
    assert abs(mean["greedy"] - 74.8) < 2.0
    assert mean["Gittins"] > 78.3 - 1.5
    # the informed methods beat random by a wide margin
    for name in ("Gittins", "TS", "OTS", "UCB1", "epsilon-greedy", "greedy"):
        assert mean[name] > mean["random"] + 20, (name, mean)


def test_baselines_find_the_good_arm_of_an_easy_bandit():
    tasks = easy([0.9, 0.1, 0.1], pulls=100)
    best = 90.0  # always the 0.9 arm
    assert abs(float(policies.random(tasks).mean()) - 100 * 1.1 / 3) < 2
    for name, scores in [("TS", policies.thompson(tasks)), ("UCB1", policies.ucb1(tasks, 0.2)),
                         ("Gittins", policies.gittins(tasks)),
                         ("OTS", policies.optimistic_thompson(tasks, 4)),
                         ("greedy", policies.greedy(tasks))]:
        assert float(scores.mean()) > best - 5, name
    # epsilon-greedy pays for exploring: about epsilon * (0.9 - 0.37) per pull
    assert best - 8 < float(policies.epsilon_greedy(tasks, 0.1).mean()) < best - 2


def test_thompson_sampling_is_reproducible_and_leaves_the_global_generator_alone():
    tasks = trials(5, 20, 50)
    state = torch.get_rng_state()
    first = policies.thompson(tasks)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, policies.thompson(tasks))


# ---------------------------------------------------------------- the Gittins index


@functools.cache
def _worth(wins: int, losses: int, left: int, rate: float) -> float:
    """Value of an arm with ``left`` pulls to go and the option to retire at ``rate`` per pull."""
    if left == 0:
        return 0.0
    p = (wins + 1) / (wins + losses + 2)
    go_on = p * (1 + _worth(wins + 1, losses, left - 1, rate)) + (1 - p) * _worth(
        wins, losses + 1, left - 1, rate)
    return max(go_on, rate * left)


def reference_index(wins: int, losses: int, left: int) -> float:
    """The retirement rate at which continuing stops paying, by bisection: the calibration
    definition of the finite-horizon Gittins index, computed independently of the table."""
    low, high = 0.0, 1.0
    for _ in range(30):
        rate = (low + high) / 2
        p = (wins + 1) / (wins + losses + 2)
        go_on = p * (1 + _worth(wins + 1, losses, left - 1, rate)) + (1 - p) * _worth(
            wins, losses + 1, left - 1, rate)
        low, high = (rate, high) if go_on > rate * left + 1e-12 else (low, rate)
    return (low + high) / 2


def test_gittins_table_matches_the_calibration_definition():
    table = policies.gittins_table(12)
    for wins, losses, left in [(0, 0, 12), (0, 0, 5), (2, 1, 6), (0, 3, 9), (5, 0, 4), (1, 7, 3)]:
        assert abs(float(table[left, wins, losses]) - reference_index(wins, losses, left)) < 2e-3
    # one pull left: the index is the posterior mean; more pulls left, more worth exploring
    wins, losses = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    mean = (wins + 1) / (wins + losses + 2)
    assert torch.allclose(table[1, :8, :8], mean.float(), atol=1e-5)
    assert (table[2:5, :8, :8] >= table[1:4, :8, :8] - 1e-6).all()
    assert (table[5, :7, :7] > mean[:7, :7] + 0.01).all()


def _expected_total(pulls: int, choose) -> float:
    """Exact expected total reward of a policy on two Beta(1, 1) arms, over all outcomes."""

    @functools.cache
    def value(s1: int, f1: int, s2: int, f2: int) -> float:
        left = pulls - (s1 + f1 + s2 + f2)
        if left == 0:
            return 0.0
        arms = [(s1, f1), (s2, f2)]

        def after(arm: int) -> float:
            s, f = arms[arm]
            p = (s + 1) / (s + f + 2)
            win = (s1 + (arm == 0), f1, s2 + (arm == 1), f2)
            loss = (s1, f1 + (arm == 0), s2, f2 + (arm == 1))
            return p * (1 + value(*win)) + (1 - p) * value(*loss)

        return max(after(0), after(1)) if choose is None else after(choose(arms, left))

    return value(0, 0, 0, 0)


def test_gittins_policy_is_nearly_bayes_optimal():
    """On two arms and 20 pulls the Bayes-optimal policy is computable (12.431): the
    finite-horizon Gittins policy comes within 0.1% of it (12.429), greedy does not (12.331)."""
    pulls = 20
    table = policies.gittins_table(pulls)
    gittins = lambda arms, left: int(torch.tensor(
        [float(table[left, s, f]) for s, f in arms]).argmax())
    greedy = lambda arms, left: int(torch.tensor(
        [(s + 1) / (s + f + 2) for s, f in arms]).argmax())
    optimal = _expected_total(pulls, None)
    assert _expected_total(pulls, gittins) > 0.999 * optimal
    assert _expected_total(pulls, gittins) > _expected_total(pulls, greedy) + 0.05
