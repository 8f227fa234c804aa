"""RL² (Duan, Schulman, Chen, Bartlett, Sutskever & Abbeel, 2016): a recurrent policy trained
across many bandit tasks, so that its hidden state becomes a bandit algorithm of its own.

The slow learner is A2C with generalised advantage estimation (GAE, Schulman et al. 2016) and a
value baseline: each meta-step plays one trial of every task of the meta-batch and makes one
policy-gradient step, which is exactly the trainer's one optimizer step per meta-step. (The
paper used a first-order TRPO; PPO would take several steps per batch of trials, which only
pays where trials are expensive to play, and here they are a tensor operation.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.algorithms.base import MetaAlgorithm
from fewshot_cli.episode import BANDIT_TASKS, BanditTrials, TaskShape

log = logging.getLogger(__name__)
#: below this many trials per meta-step, A2C's gradient (and the advantages normalised over the
#: meta-batch) is mostly noise
FEW_TRIALS = 16


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An index per row of ``probs`` ``[B, k]`` by inverse CDF with uniforms ``u`` ``[B]``."""
    return (probs.cumsum(1) < u.unsqueeze(1)).sum(1).clamp(max=probs.shape[1] - 1)


def gae(rewards: torch.Tensor, values: torch.Tensor, discount: float, lam: float) -> torch.Tensor:
    """Advantages ``[B, n]`` of a trial that ends after pull n (value 0 beyond it):
    A_t = sum_l (discount lam)^l delta_{t+l}, delta_t = r_t + discount V_{t+1} - V_t."""
    n = rewards.shape[1]
    following = F.pad(values[:, 1:], (0, 1))
    deltas = rewards + discount * following - values
    steps = torch.arange(n, device=rewards.device)
    ahead = (steps.view(1, -1) - steps.view(-1, 1)).to(rewards.dtype)  # [t, t'] = t' - t
    weights = torch.where(ahead >= 0, (discount * lam) ** ahead.clamp(min=0),
                          torch.zeros((), device=rewards.device))
    return deltas @ weights.T


class RL2(MetaAlgorithm):
    """Plays trials with the recurrent policy ``backbone`` (backbone=gru) and learns from them
    with A2C + GAE: loss = policy loss + value_coef * value loss - entropy_coef * entropy."""

    score_name = "total_reward"
    prefers_channels_last = False
    task_kind = BANDIT_TASKS

    def __init__(self, backbone: nn.Module, ways: int | None = None, discount: float = 0.99,
                 gae_lambda: float = 1.0, value_coef: float = 0.5,
                 entropy_coef: float = 0.01) -> None:
        super().__init__()
        # ``ways`` (the image tasks' class count) is passed to every algorithm; bandits have none.
        self.backbone = backbone
        self.discount, self.gae_lambda = discount, gae_lambda
        self.value_coef, self.entropy_coef = value_coef, entropy_coef

    def check_tasks(self, train: TaskShape, eval: TaskShape) -> None:
        if train.meta_batch < FEW_TRIALS:
            log.warning("train.meta_batch=%d: A2C learns from the trials of one meta-batch at "
                        "a time and needs many; the presets use 128 (fewshot train "
                        "experiment=rl2_bandits_k5_n10)", train.meta_batch)

    def play(self, tasks: BanditTrials) -> dict[str, torch.Tensor]:
        """One trial of every task: per pull ``[B, n]`` rewards, log-probabilities of the
        actions taken, policy entropies and values. Actions are drawn with ``tasks.choices``."""
        b, n, device = tasks.meta_batch, tasks.pulls, tasks.means.device
        state = self.backbone.initial_state(b, device)
        action = torch.full((b,), -1, dtype=torch.long, device=device)
        reward = torch.zeros(b, device=device)
        done = torch.zeros(b, device=device)  # every pull is a one-step episode: done after it
        trace: dict[str, list[torch.Tensor]] = {"reward": [], "log_prob": [], "entropy": [],
                                                "value": []}
        # The value head gives the mean reward to expect per pull left (discounted), in [0, 1]
        # whatever the horizon; times the (discounted) pulls left it is the value itself, so
        # the baseline starts at the right scale instead of climbing to ~n from zero.
        left = torch.arange(n, 0, -1, device=device, dtype=torch.float32)
        horizon = (1 - self.discount ** left) / (1 - self.discount) if self.discount < 1 else left
        for t in range(n):
            logits, value, state = self.backbone(action, reward, done, state)
            log_probs = F.log_softmax(logits.float(), dim=1)
            probs = log_probs.exp()
            action = sample(probs.detach(), tasks.choices[:, t])
            reward = tasks.pull(t, action)
            done = torch.ones_like(reward)
            trace["reward"].append(reward)
            trace["log_prob"].append(log_probs.gather(1, action.unsqueeze(1)).squeeze(1))
            trace["entropy"].append(-(probs * log_probs).sum(1))
            trace["value"].append(value.float() * horizon[t])
        return {name: torch.stack(steps, 1) for name, steps in trace.items()}

    def meta_loss(self, tasks: BanditTrials) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trial = self.play(tasks)
        values = trial["value"]
        with torch.no_grad():
            advantages = gae(trial["reward"], values, self.discount, self.gae_lambda)
            returns = advantages + values
            # normalised over the meta-batch: the step size no longer depends on reward scale
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = -(advantages * trial["log_prob"]).mean()
        value_loss = 0.5 * (values - returns).pow(2).mean()
        entropy = trial["entropy"].mean()
        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        metrics: dict[str, Any] = {"loss": loss, "total_reward": trial["reward"].sum(1).mean(),
                                   "entropy": entropy, "value_loss": value_loss,
                                   "policy_loss": policy_loss}
        return loss, {name: value.detach() for name, value in metrics.items()}

    def score(self, tasks: BanditTrials) -> torch.Tensor:
        """Total reward of one trial per task ``[B]``."""
        return self.play(tasks)["reward"].sum(1)
