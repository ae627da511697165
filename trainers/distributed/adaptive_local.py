"""ADPSGD (Jiang & Agrawal, Algorithm 2): Local SGD whose averaging period p adapts to the spread S of the
workers' parameters at each averaging (`algorithms.PeriodController`); S costs one scalar all-reduce."""
from __future__ import annotations

from torch import Tensor

from .. import algorithms as alg
from .base import Periodic


class AdaptiveLocal(Periodic):
    name = "adaptive-local"

    def __init__(self, engine):
        super().__init__(engine)
        a = self.cfg.adaptive
        total_steps = engine.cfg.epochs * engine.steps_per_epoch
        self.controller = alg.PeriodController(a.p_init, warmup_steps=round(a.warmup_epochs * engine.steps_per_epoch),
                                               sample_steps=int(a.sample_fraction * total_steps), low=a.low,
                                               high=a.high)

    def period(self) -> int:
        return self.controller.period(self.engine.global_step)

    def statistics(self, mean: Tensor, lr: float) -> float:
        e = self.engine
        s = float(alg.spread(e.x, mean, e.group))
        p = self.controller.update(e.global_step, s, lr)
        self.record(adaptive_step=e.global_step, adaptive_S=s, adaptive_lr=lr, adaptive_period=p)
        return 0.0  # one scalar: negligible beside the model

    def epoch_figures(self) -> dict[str, float]:
        return {"local_steps": float(self.controller.period(self.engine.global_step))}

    def describe(self) -> dict:
        return {**super().describe(), "adaptive_C2": self.controller.c2}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
