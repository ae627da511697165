"""Optimizers: LARS and LAMB (large-batch, layer-wise trust ratio) and `build_optimizer`.

Both optimizers also run on "stacked" parameters of the batched K-worker backend: with the param-group
option `worker_dim=True` every tensor has a leading worker dimension [K, *shape], and every norm (hence
every trust ratio) is taken per worker, never over the whole stack. Elementwise work is unchanged, so one
stacked step equals K separate steps. step() never reads a value back to the host.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .config import OptimConfig


def _norm(t: Tensor, worker_dim: bool) -> Tensor:
    """L2 norm of one layer; with a worker dim, one norm per worker, shaped [K, 1, ...] to broadcast."""
    if not worker_dim:
        return torch.linalg.vector_norm(t)
    if t.ndim == 1:  # a stacked scalar parameter
        return t.abs()
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


class LARS(torch.optim.Optimizer):
    """LARS, You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", Algorithm 1.

    For each layer l (here: each parameter tensor), with global lr gamma (the schedule's value):
        lambda^l = eta * ||w^l|| / (||g^l|| + beta * ||w^l|| + eps)       local LR (eps: 0/0 guard)
        v^l     <- m * v^l + gamma * lambda^l * (g^l + beta * w^l)         momentum
        w^l     <- w^l - v^l
    lambda^l = 1 when ||w^l|| or ||g^l|| is 0 (a zero-initialised layer must still move). As in the paper
    the lr sits inside the momentum buffer. Nesterov (not in the paper) follows torch's SGD: the step is
    u + m * v with u = gamma * lambda * (g + beta * w). Groups with `trust=False` (biases, 1-d params)
    take the same step with lambda = 1: plain SGD momentum with the group's weight decay.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 trust: bool = True, worker_dim: bool = False):
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
                    w_norm, g_norm = _norm(p, group["worker_dim"]), _norm(g, group["worker_dim"])
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


class LAMB(torch.optim.Optimizer):
    """LAMB, You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    Algorithm 2, with phi = identity. For each layer (parameter tensor), at step t:
        m <- b1 * m + (1 - b1) * g;   v <- b2 * v + (1 - b2) * g^2
        m^ = m / (1 - b1^t);          v^ = v / (1 - b2^t)
        r  = m^ / (sqrt(v^) + eps) + lambda * w
        w <- w - lr * (||w|| / ||r||) * r
    The trust ratio is 1 when ||w|| or ||r|| is 0. Groups with `trust=False` (biases, 1-d params) use
    ratio 1: an AdamW-like step (decoupled decay inside r) with the group's weight decay.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust: bool = True, worker_dim: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("LAMB: lr, eps, weight_decay must be >= 0 and betas in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust=trust,
                        worker_dim=worker_dim)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: bias correction is computed on the host, no sync
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)  # b1 * m + (1 - b1) * g
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                r = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                r = torch.div(m, r).div_(1 - b1**t)  # m^ / (sqrt(v^) + eps)
                if wd != 0:
                    r.add_(p, alpha=wd)
                if group["trust"]:
                    w_norm, r_norm = _norm(p, group["worker_dim"]), _norm(r, group["worker_dim"])
                    ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, 1.0)
                    r.mul_(ratio * lr)
                    p.sub_(r)
                else:
                    p.add_(r, alpha=-lr)
        return loss


OPTIMIZERS = ("sgdm", "adamw", "lars", "lamb")


def build_optimizer(named_params: Iterable[tuple[str, Tensor]], cfg: OptimConfig, lr: float,
                    stacked: bool = False) -> torch.optim.Optimizer:
    """The optimizer of `cfg` at learning rate `lr` (already scaled by the schedule's batch rule).

    With `cfg.exclude_1d`, biases and 1-d params (norm weights) get no weight decay and no trust ratio
    (the usual LARS/LAMB practice); with `stacked`, dim 0 is the worker dim, so they have ndim <= 2.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (no_decay if cfg.exclude_1d and p.ndim <= 1 + stacked else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay, trust=True),
              dict(params=no_decay, weight_decay=0.0, trust=False)]
    groups = [g for g in groups if g["params"]]
    if cfg.name in ("sgdm", "adamw"):  # elementwise: stacked params need nothing special
        for g in groups:
            del g["trust"]
    if cfg.name == "sgdm":  # torch's SGD couples the decay (g + wd * w), as the sources do
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, eps=cfg.eps,
                    nesterov=cfg.nesterov, worker_dim=stacked)
    return LAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, worker_dim=stacked)
