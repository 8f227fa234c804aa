"""Update rules: one inner step of one task, the next fast weights from the current ones.

:class:`SGD` steps the MAML family (a fixed rate, or learned rates per weight for Meta-SGD and
per layer and step for MAML++ LSLR), :class:`Adam` steps Reptile (β1 = 0, its authors' choice),
and :class:`LSTMRule` is Ravi & Larochelle's meta-learner LSTM. A new rule is one class here
(or anywhere) and one yaml key: ``algo.update_rule={_target_: <class>, _partial_: true, ...}``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from fewshot_cli.errors import FewshotError

#: fast weights (or a rule's per-task state): tensors by name, ``[B, ...]`` once batched
Params = dict[str, torch.Tensor]


class UpdateRule(Protocol):
    """One inner step of one task: the next fast weights from the current ones.

    Built as ``Rule(shapes, steps, **options)`` from the fast weights' shapes and the number of
    inner steps it is trained for; an ``nn.Module`` whose parameters the meta-optimizer learns.
    ``state`` is the rule's own per-task memory (a dict of tensors, empty for SGD); ``step``
    returns a state with the same names as ``initial_state``.
    """

    def initial_state(self, fast: Params) -> Params:
        """The state before the first step, from one task's (unbatched) fast weights."""
        ...

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """Fast weights and state after inner step ``t`` (support gradients and loss given)."""
        ...


def rate_key(name: str) -> str:
    """A fast weight's name as a ParameterDict key ('.' is not allowed there)."""
    return name.replace(".", "__")


class SGD(nn.ParameterDict):
    """θ ← θ − α ⊙ g, the inner step of the MAML family.

    α is ``lr``, or learned: one rate per weight (``per_weight``, Meta-SGD), one per layer and
    inner step (``per_step``, MAML++ LSLR), or both; the learned rates are this dict's entries,
    keyed by fast weight name, drawn from ``lr_range`` if given. Steps beyond the trained ones
    (more inner steps at test time) reuse the last step's rates.
    """

    def __init__(self, shapes: dict[str, torch.Size], steps: int = 1, lr: float = 0.4,
                 per_weight: bool = False, per_step: bool = False,
                 lr_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.lr, self.steps, self.per_step = float(lr), steps, per_step
        if per_weight or per_step:
            for name, shape in shapes.items():
                rate = torch.full(((steps,) if per_step else ()) + (
                    tuple(shape) if per_weight else ()), self.lr)
                if lr_range is not None:
                    rate.uniform_(*lr_range)
                self[rate_key(name)] = nn.Parameter(rate)

    def rate(self, name: str, t: int) -> torch.Tensor | float:
        """The step size of fast weight ``name`` at inner step ``t``."""
        if not self:
            return self.lr
        rate = self[rate_key(name)]
        return rate[min(t, self.steps - 1)] if self.per_step else rate

    def initial_state(self, fast: Params) -> Params:
        """SGD keeps no state."""
        return {}

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """One gradient step on every fast weight."""
        return {n: fast[n] - self.rate(n, t) * grads[n] for n in fast}, state


class Adam(nn.Module):
    """Adam (Kingma & Ba 2015) as an inner-loop rule; every task starts with zero moments.

    θ ← θ − lr · m̂ / (√v̂ + eps), m̂ and v̂ the bias-corrected moving averages (``betas``) of
    the support gradient and its square: torch.optim.Adam's step, task by task. Reptile's
    authors use β1 = 0 (openai/supervised-reptile, supervised_reptile/models.py line 10), so the
    step is the gradient over its running RMS. Their TensorFlow optimizer keeps its moments
    across tasks (reptile.py lines 24 and 62-74 restore only the trainable variables); here
    each task starts afresh, so the tasks of a meta-batch are independent and batch. No
    learned parameters.
    """

    def __init__(self, shapes: dict[str, torch.Size], steps: int = 1, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        self.lr, self.eps = float(lr), float(eps)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise FewshotError(f"algo.update_rule has lr={lr} and betas={list(betas)}; Adam "
                               "needs lr > 0 and betas in [0, 1), e.g. lr=0.001 betas=[0,0.999]")

    def initial_state(self, fast: Params) -> Params:
        """Zero first and second moments for every fast weight."""
        return {f"{moment}.{n}": torch.zeros_like(w) for n, w in fast.items()
                for moment in ("m", "v")}

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """One Adam step on every fast weight (the ``t + 1``-th, for the bias correction)."""
        first = 1 - self.beta1 ** (t + 1)
        second = math.sqrt(1 - self.beta2 ** (t + 1))
        new, moments = {}, {}
        for n, w in fast.items():
            m = self.beta1 * state[f"m.{n}"] + (1 - self.beta1) * grads[n]
            v = self.beta2 * state[f"v.{n}"] + (1 - self.beta2) * grads[n] * grads[n]
            new[n] = w - (self.lr / first) * m / (v.sqrt() / second + self.eps)
            moments[f"m.{n}"], moments[f"v.{n}"] = m, v
        return new, moments


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. 2016 (Appendix A): ``x`` as ``(log|x| / p, sign x)`` when
    ``|x| >= e^-p``, else ``(-1, e^p x)``; a trailing dimension of 2.

    Magnitude and sign apart, so coordinates of very different scales give inputs of similar size.
    """
    big = x.abs() >= math.exp(-p)
    log = torch.log(x.abs().clamp_min(math.exp(-p))) / p
    return torch.stack([torch.where(big, log, -torch.ones_like(x)),
                        torch.where(big, torch.sign(x), math.exp(p) * x)], dim=-1)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh as ``2 sigmoid(2x) - 1``: torch's CPU tanh kernel is the slower of the two on the
    LSTM rule's wide gates (``scripts/time_presets.py`` times the meta_lstm presets' steps)."""
    return 2 * torch.sigmoid(2 * x) - 1


class LSTMRule(nn.Module):
    """Ravi & Larochelle's meta-learner: the learner's weights are the cell state of an LSTM.

    Coordinate-wise, with parameters shared across all coordinates: a first LSTM layer
    (``hidden`` units) reads the preprocessed gradient and loss of each coordinate; the second
    layer's cell is the weight itself, updated as ``θ_t = f_t ⊙ θ_{t-1} − i_t ⊙ ∇_t`` with the
    learned gates ``f_t = σ(W_F [h_t, θ_{t-1}, f_{t-1}] + b_F)`` and
    ``i_t = σ(W_I [h_t, θ_{t-1}, i_{t-1}] + b_I)``. The initial cell state c₀ is the learner's
    initial weights, which the algorithm learns. ``forget_bias`` and ``input_bias`` are the
    ranges the gate biases are drawn from (the first step's shrinkage and step size).
    """

    def __init__(self, shapes: dict[str, torch.Size], steps: int = 1, hidden: int = 20,
                 p: float = 10.0, forget_bias: tuple[float, float] = (4.0, 5.0),
                 input_bias: tuple[float, float] = (-5.0, -4.0)) -> None:
        super().__init__()
        self.hidden, self.p = hidden, p
        self.lstm = nn.LSTMCell(4, hidden)  # preprocessed gradient (2) and loss (2)
        self.forget = nn.Linear(hidden + 2, 1)
        self.input = nn.Linear(hidden + 2, 1)
        # The authors' initialisation (twitter/meta-learning-lstm, meta-learner-lstm.lua): all
        # weights U(-0.01, 0.01), forget bias U(4, 5) and input bias U(-5, -4), so training
        # starts close to gradient descent with a small learning rate (f ≈ 1, i ≈ 0.01).
        with torch.no_grad():
            for weight in self.parameters():
                weight.uniform_(-0.01, 0.01)
            self.forget.bias.uniform_(*forget_bias)
            self.input.bias.uniform_(*input_bias)

    def initial_state(self, fast: Params) -> Params:
        """Zero LSTM state and zero previous gates for every coordinate."""
        ref = next(iter(fast.values()))
        coords = sum(v.numel() for v in fast.values())
        return {"h": ref.new_zeros(self.hidden, coords), "c": ref.new_zeros(self.hidden, coords),
                "f": ref.new_zeros(coords), "i": ref.new_zeros(coords)}

    def step(self, fast: Params, grads: Params, loss: torch.Tensor, t: int,
             state: Params) -> tuple[Params, Params]:
        """One meta-learner step over all coordinates at once.

        Coordinates run along the last dimension (state ``[hidden, coordinates]``), so each gate
        is a contiguous block, split with ``chunk`` rather than slices, for speed
        (``scripts/time_presets.py`` times the meta_lstm presets' steps).
        """
        theta = torch.cat([v.reshape(-1) for v in fast.values()])
        g = torch.cat([grads[n].reshape(-1) for n in fast])
        x = torch.cat([preprocess(g, self.p).T,
                       preprocess(loss, self.p)[:, None].expand(2, len(theta))])  # [4, P]
        # nn.LSTMCell written out: vmap has no batching rule for aten::lstm_cell.
        cell, hidden = self.lstm, self.hidden
        weight = torch.cat([cell.weight_ih, cell.weight_hh], dim=1)
        gates = torch.addmm((cell.bias_ih + cell.bias_hh)[:, None], weight,
                            torch.cat([x, state["h"]]))  # [4 * hidden, P]
        # chunk, not slices: the backward then concatenates instead of zero-filling four times
        gate_i, gate_f, gate_g, gate_o = gates.chunk(4)
        c = torch.sigmoid(gate_f) * state["c"] + torch.sigmoid(gate_i) * tanh(gate_g)
        h = torch.sigmoid(gate_o) * tanh(c)
        w = torch.cat([self.forget.weight, self.input.weight])  # [2, hidden + 2]
        w_h, w_theta, w_prev = w.split([hidden, 1, 1], dim=1)
        # As in the paper's equations the gates read the previous gate values (the authors'
        # lstm-helper.lua feeds the previous pre-activations instead).
        f, i = torch.sigmoid(torch.addmm(torch.cat([self.forget.bias, self.input.bias])[:, None],
                                         w_h, h)
                             + w_theta * theta + w_prev * torch.stack([state["f"], state["i"]]))
        theta = f * theta - i * g
        sizes = [v.numel() for v in fast.values()]
        new = {n: part.view_as(fast[n])
               for n, part in zip(fast, theta.split(sizes), strict=True)}
        return new, {"h": h, "c": c, "f": f, "i": i}
