"""The protocol of a K-worker algorithm, and the family that averages every few local steps.

The engine (`engine.WorkerRunner`) owns the workers: their parameters as rows of one flat tensor
`engine.x` [K, P] (BatchNorm statistics in `engine.b`), the backend that steps them, their shards and
generators, the clock and the communication counts. An algorithm decides what one step of the workers
is and what they exchange; it keeps its own state (checkpointed with the run) and per-round trajectory.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import comm
from .outer import outer_step

if TYPE_CHECKING:  # (the engine imports this package)
    from ..engine import Batches, Clock, WorkerRunner
    from ..steps import LossMeter


class Algorithm:
    """One local step of every worker and what follows it. Subclasses override `step` (a synchronous
    step), or `communicate` (what happens after the workers stepped on their own)."""

    name = ""

    def __init__(self, engine: "WorkerRunner"):
        self.engine = engine
        self.cfg = engine.dist  # the `distributed` section
        self.trajectory: dict[str, list[float]] = {}  # per-round values, in the result's state

    def start_epoch(self, epoch: int) -> None:
        """Called before the epoch's first step."""

    def step(self, batches: "Batches", meter: "LossMeter", clock: "Clock") -> None:
        lr = self.engine.backend.lr  # the lr this step uses (the schedulers step after it)
        self.engine.backend.step(batches, meter, clock)
        self.communicate(lr, clock)

    def communicate(self, lr: float, clock: "Clock") -> None:
        """After every worker took a local step with learning rate `lr`."""

    def synchronous_step(self, batches: "Batches", meter: "LossMeter", clock: "Clock",
                         clean: Tensor | None = None) -> None:
        """Every worker's gradient averaged before anyone steps (minibatch SGD); with `clean`, the step
        applies to those weights rather than the (perturbed) ones the gradients were taken at."""
        e = self.engine

        @torch.no_grad()
        def allreduce(grads: list[Tensor]) -> None:
            start = clock.now()
            for g in grads:
                e.group.average_(g)
            if clean is not None:
                e.x.copy_(clean.expand_as(e.x))
            clock.comm(start)
            e.count(comm.allreduce_bytes(e.grad_bytes, e.k))

        e.backend.step(batches, meter, clock, sync=allreduce)

    def epoch_figures(self) -> dict[str, float]:
        """Figures of the epoch besides the engine's (e.g. the period in force)."""
        return {}

    def record(self, **values: float) -> None:
        for key, value in values.items():
            self.trajectory.setdefault(key, []).append(value)

    def describe(self) -> dict:
        """What the result's `state` shows of the algorithm: its trajectory."""
        return {key: list(values) for key, values in self.trajectory.items()}

    def state_dict(self) -> dict:
        return {"trajectory": copy.deepcopy(self.trajectory)}

    def load_state_dict(self, state: dict) -> None:
        self.trajectory = copy.deepcopy(state["trajectory"])


class Periodic(Algorithm):
    """Local steps, and every `period()` of them an averaging round: the workers' mean goes through the
    outer step (plain average, SlowMo, DiLoCo's outer optimizer) and every worker starts from its result;
    BatchNorm statistics are averaged plainly."""

    def __init__(self, engine: "WorkerRunner"):
        super().__init__(engine)
        self.since_average = 0  # local steps since the last averaging
        self.outer = self.make_outer()

    def make_outer(self):
        return outer_step(self.cfg, self.engine.x[0])

    def period(self) -> int:
        raise NotImplementedError

    def communicate(self, lr: float, clock: "Clock") -> None:
        self.since_average += 1
        if self.since_average >= self.period():
            self.average(lr, clock)
            self.since_average = 0

    @torch.no_grad()
    def average(self, lr: float, clock: "Clock") -> None:
        """An averaging round after global step `engine.global_step`, whose lr was `lr`."""
        e = self.engine
        start = clock.now()
        mean = e.group.mean(e.x)
        sent = comm.allreduce_bytes(e.model_bytes, e.k) + self.statistics(mean, lr)
        mean = self.outer.step(mean, lr)
        e.x.copy_(mean.expand_as(e.x))
        if e.layout.q:
            e.group.average_(e.b)
        clock.comm(start)
        e.count(sent)

    def statistics(self, mean: Tensor, lr: float) -> float:
        """What the round measures before the outer step (to adapt the period); returns the bytes it
        sends besides the model's all-reduce."""
        return 0.0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "since_average": self.since_average, "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.since_average = state["since_average"]
        self.outer.load_state_dict(state["outer"])
