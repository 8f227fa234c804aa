"""The recurrent policy of RL² (Duan et al. 2016, section 2.3) for bandit tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.episode import BANDIT_TASKS


class GRUPolicy(nn.Module):
    """A GRU whose input at each pull is the previous action (one-hot), reward and done flag,
    with a policy head (logits over the ``arms``) and a value head on its hidden state.

    The hidden state is kept across the pulls of a trial (and reset between trials by the
    caller), so it can hold what a bandit algorithm would: it is the learned algorithm's state.
    Policy and value share the GRU (Duan et al. give the value baseline its own GRU).
    """

    task_kind = BANDIT_TASKS

    def __init__(self, arms: int, hidden: int = 128) -> None:
        super().__init__()
        self.arms, self.hidden = arms, hidden
        self.cell = nn.GRUCell(arms + 2, hidden)
        self.policy = nn.Linear(hidden, arms)
        self.value = nn.Linear(hidden, 1)
        # A near-uniform first policy: exploration starts unbiased.
        nn.init.normal_(self.policy.weight, std=0.01)
        nn.init.zeros_(self.policy.bias)

    def initial_state(self, batch: int, device: torch.device) -> torch.Tensor:
        """The hidden state ``[B, hidden]`` at the start of a trial."""
        return torch.zeros(batch, self.hidden, device=device)

    def forward(self, action: torch.Tensor, reward: torch.Tensor, done: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pull: previous ``action`` ``long [B]`` (-1 before the first pull), ``reward``
        and ``done`` ``float [B]``, hidden ``state`` -> logits ``[B, arms]``, value ``[B]`` and
        the next state."""
        one_hot = F.one_hot(action.clamp(min=0), self.arms).to(reward.dtype)
        one_hot = one_hot * (action >= 0).unsqueeze(1)
        state = self.cell(torch.cat([one_hot, reward.unsqueeze(1), done.unsqueeze(1)], 1), state)
        return self.policy(state), self.value(state).squeeze(1), state
