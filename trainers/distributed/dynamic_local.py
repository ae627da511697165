"""Local SGD with dynamic local steps J_t (Poiatti et al., section 6): at each averaging the workers' last
gradients give G and sigma^2 (one more all-reduce, of P values), and J_t = clip(alpha G / (sigma^2 + eps),
J_min, J_max) is the next period; the first period is J_min (synchronise early, cheaply)."""
from __future__ import annotations

from torch import Tensor

from .. import algorithms as alg
from .. import comm
from .base import Periodic


class DynamicLocal(Periodic):
    name = "dynamic-local"

    def __init__(self, engine):
        super().__init__(engine)
        self.j = self.cfg.dynamic.j_min

    def period(self) -> int:
        return self.j

    def statistics(self, mean: Tensor, lr: float) -> float:
        e, d = self.engine, self.cfg.dynamic
        big_g, sigma2 = alg.gradient_stats(e.backend.grads(), e.group)
        self.j = alg.dynamic_steps(big_g, sigma2, d.alpha, d.eps, d.j_min, d.j_max)
        self.record(dynamic_step=e.global_step, dynamic_J=self.j, dynamic_G=big_g, dynamic_sigma2=sigma2)
        return comm.allreduce_bytes(e.grad_bytes, e.k)

    def epoch_figures(self) -> dict[str, float]:
        return {"local_steps": float(self.j)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "j": self.j}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.j = state["j"]
