"""`lars`: LARS, You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"."""
from __future__ import annotations

import torch

from ..config import OptimConfig
from ._norms import layer_l2


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, Algorithm 1).

    For each layer l (here: each parameter tensor), with global lr gamma (the schedule's value):
        lambda^l = eta * ||w^l|| / (||g^l|| + beta * ||w^l|| + eps)       local LR (eps: 0/0 guard)
        v^l     <- m * v^l + gamma * lambda^l * (g^l + beta * w^l)         momentum
        w^l     <- w^l - v^l
    lambda^l = 1 when ||w^l|| or ||g^l|| is 0 (a zero-initialised layer must still move). As in the paper
    the lr sits inside the momentum buffer. Nesterov (not in the paper) follows torch's SGD: the step is
    u + m * v with u = gamma * lambda * (g + beta * w). Groups with `trust=False` (biases, 1-d params)
    take the same step with lambda = 1: plain SGD momentum with the group's weight decay.
    `worker_dim=True`: every tensor is a stack [K, *shape] of K workers' parameters (see trainers.optim).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 trust: bool = True, worker_dim: bool = False):
        # torch.optim's convention: the class checks its own arguments (it is usable without a config)
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError("LARS: lr, momentum, weight_decay, eps must be >= 0 and trust_coefficient > 0")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, trust=trust, worker_dim=worker_dim)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                u = g.add(p, alpha=wd) if wd != 0 else g.clone()  # g + beta * w
                if group["trust"]:
                    w_norm, g_norm = layer_l2(p, group["worker_dim"]), layer_l2(g, group["worker_dim"])
                    local = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    local = torch.where((w_norm > 0) & (g_norm > 0), local, 1.0)
                    u.mul_(local * lr)  # gamma * lambda * (g + beta * w)
                else:
                    u.mul_(lr)
                if m != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)  # v_0 = 0
                    v = state["momentum_buffer"]
                    v.mul_(m).add_(u)
                    u = u.add_(v, alpha=m) if group["nesterov"] else v
                p.sub_(u)
        return loss


def build(groups: list[dict], cfg: OptimConfig, lr: float, stacked: bool) -> LARS:
    return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, eps=cfg.eps,
                nesterov=cfg.nesterov, worker_dim=stacked)
