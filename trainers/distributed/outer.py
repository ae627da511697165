"""Outer steps: what an averaging round makes of the workers' mean. Plain averaging takes it; SlowMo and
DiLoCo keep an anchor (the model at the last round) and step it along the round's pseudo-gradient
(anchor - mean) with momentum."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import algorithms as alg


class Average:
    """x <- mean of the workers."""

    def step(self, mean: Tensor, lr: float) -> Tensor:
        return mean

    def reset(self, x: Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SlowMo:
    """SlowMo (Wang et al. 2020, Algorithm 1): slow momentum on the pseudo-gradient per unit of the inner
    lr, the step scaled by that lr (`algorithms.slowmo_`). alpha=1, beta=0 is plain averaging."""

    def __init__(self, x0: Tensor, alpha: float, beta: float, nesterov: bool):
        self.alpha, self.beta, self.nesterov = alpha, beta, nesterov
        self.anchor, self.momentum = x0.clone(), torch.zeros_like(x0)

    def step(self, mean: Tensor, lr: float) -> Tensor:
        alg.slowmo_(self.anchor, self.momentum, mean, lr, self.alpha, self.beta, self.nesterov)
        return self.anchor

    def reset(self, x: Tensor) -> None:
        """Start over from `x` (post-local's switch to local steps)."""
        self.anchor.copy_(x)
        self.momentum.zero_()

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.clone(), "momentum": self.momentum.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.copy_(state["anchor"])
        self.momentum.copy_(state["momentum"])


class OuterSGD:
    """DiLoCo's outer optimizer (Douillard et al. 2023, Algorithm 1): torch.optim.SGD with (Nesterov)
    momentum stepping the anchor with the outer gradient anchor - mean, at its own lr, whatever the inner
    schedule. lr 1 without momentum is plain averaging."""

    def __init__(self, x0: Tensor, lr: float, momentum: float, nesterov: bool):
        self.anchor = x0.clone()
        self.optimizer = torch.optim.SGD([self.anchor], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

    @torch.no_grad()
    def step(self, mean: Tensor, lr: float) -> Tensor:
        self.anchor.grad = self.anchor - mean
        self.optimizer.step()
        return self.anchor

    def reset(self, x: Tensor) -> None:
        self.anchor.copy_(x)
        self.optimizer.state.clear()

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.copy_(state["anchor"])
        self.optimizer.load_state_dict(state["optimizer"])


def outer_step(cfg, x0: Tensor):
    """The outer step of an averaging algorithm's `distributed` config: SlowMo when set, else plain."""
    if cfg.slowmo is not None:
        return SlowMo(x0, cfg.slowmo.alpha, cfg.slowmo.beta, cfg.slowmo.nesterov)
    return Average()
