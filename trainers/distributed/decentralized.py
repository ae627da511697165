"""Decentralized SGD (DPSGD, Lian et al. 2017): after every local step each worker mixes its parameters
with its graph neighbours', x_k <- sum_j W_kj x_j, W doubly stochastic (`distributed.topology`)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import algorithms as alg
from .. import comm
from .base import Algorithm

TOPOLOGIES = ("ring", "random", "exponential")


class Decentralized(Algorithm):
    name = "decentralized"

    def __init__(self, engine):
        super().__init__(engine)
        from ..engine import derived_seed

        self.generator = torch.Generator().manual_seed(derived_seed(engine.cfg.seed, (1 << 20) + 1))
        self.matrices: dict = {}  # the ring's and the exponential graph's few matrices, on the device

    @torch.no_grad()
    def communicate(self, lr: float, clock) -> None:
        """Adapt-then-combine: each worker steps, then mixes (Lian et al. mix before applying the gradient,
        which differs only in that the gradient step is not itself mixed). Optimizer state is not mixed."""
        e = self.engine
        start = clock.now()
        w, peers = self.mixing_matrix()
        e.group.mix_(e.x, w)
        if e.layout.q:
            e.group.mix_(e.b, w)
        clock.comm(start)
        e.count(comm.gossip_bytes(e.model_bytes, peers))

    def mixing_matrix(self) -> tuple[Tensor, int]:
        """W for this gossip step, on the device, and how many peers each worker sends to; a random
        matching is drawn every step."""
        e, topology = self.engine, self.cfg.topology
        if topology == "random":
            return self._placed(alg.matching_matrix(e.k, self.generator))
        key = 0 if topology == "ring" else e.global_step % max(1, (e.k - 1).bit_length())
        if key not in self.matrices:
            w = alg.ring_matrix(e.k) if topology == "ring" else alg.exponential_matrix(e.k, key)
            self.matrices[key] = self._placed(w)
        return self.matrices[key]

    def _placed(self, w: Tensor) -> tuple[Tensor, int]:
        return self.engine.group.place(w, self.engine.x), alg.neighbours(w)  # peers counted on the host

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())
