"""`lamb`: LAMB, You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"."""
from __future__ import annotations

import torch

from ..config import OptimConfig
from ._norms import layer_l2


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2020, Algorithm 2) with phi = identity. For each layer (parameter tensor), at step t:
        m <- b1 * m + (1 - b1) * g;   v <- b2 * v + (1 - b2) * g^2
        m^ = m / (1 - b1^t);          v^ = v / (1 - b2^t)
        r  = m^ / (sqrt(v^) + eps) + lambda * w
        w <- w - lr * (||w|| / ||r||) * r
    The trust ratio is 1 when ||w|| or ||r|| is 0. Groups with `trust=False` (biases, 1-d params) use
    ratio 1: an AdamW-like step (decoupled decay inside r) with the group's weight decay.
    `worker_dim=True`: every tensor is a stack [K, *shape] of K workers' parameters (see trainers.optim).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, trust: bool = True, worker_dim: bool = False):
        # torch.optim's convention: the class checks its own arguments (it is usable without a config)
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
                    w_norm, r_norm = layer_l2(p, group["worker_dim"]), layer_l2(r, group["worker_dim"])
                    ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, 1.0)
                    r.mul_(ratio * lr)
                    p.sub_(r)
                else:
                    p.add_(r, alpha=-lr)
        return loss


def build(groups: list[dict], cfg: OptimConfig, lr: float, stacked: bool) -> LAMB:
    return LAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, worker_dim=stacked)
