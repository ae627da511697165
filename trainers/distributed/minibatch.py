"""Minibatch SGD (synchronous SGD, FULLSGD): the workers' gradients are averaged at every step, so all
take the same step; with `noise_std`, the SSGD* variant of Zhang et al. (2021, section 2.2)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Algorithm


class Minibatch(Algorithm):
    name = "minibatch"

    def __init__(self, engine):
        super().__init__(engine)
        from ..engine import derived_seed

        self.noise_generators = [torch.Generator(device=engine.device).manual_seed(derived_seed(engine.cfg.seed,
                                                                                              (1 << 21) + k))
                                 for k in engine.rows]

    def step(self, batches, meter, clock) -> None:
        clean = self.perturb() if self.cfg.noise_std > 0 else None
        self.synchronous_step(batches, meter, clock, clean)

    @torch.no_grad()
    def perturb(self) -> Tensor:
        """SSGD*: each learner's weights are w_a + delta_j with delta_j i.i.d. N(0, sigma_0^2 I), drawn
        fresh after each synchronous step from learner j's own generator; the gradients are taken there,
        the synchronous update applies to the clean w_a. Returns w_a."""
        x = self.engine.x
        clean = x[0].clone()
        for row, generator in zip(x, self.noise_generators):
            noise = torch.randn(row.shape, generator=generator, device=x.device, dtype=x.dtype)
            row.add_(noise, alpha=self.cfg.noise_std)
        return clean

    def state_dict(self) -> dict:
        return {**super().state_dict(), "noise_generators": [g.get_state() for g in self.noise_generators]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for g, s in zip(self.noise_generators, state["noise_generators"]):
            g.set_state(s.cpu())
