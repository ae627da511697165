"""Post-local SGD (Lin et al. 2020): minibatch SGD before `distributed.switch_epoch`, Local SGD from it on,
starting (with SlowMo's anchor) from the identical workers minibatch SGD leaves."""
from __future__ import annotations

from .local import Local


class PostLocal(Local):
    name = "post-local"

    def __init__(self, engine):
        super().__init__(engine)
        self.local_phase = False
        self.synchronous = True

    def start_epoch(self, epoch: int) -> None:
        self.synchronous = epoch < self.cfg.switch_epoch
        if not self.synchronous and not self.local_phase:
            self.local_phase = True
            self.since_average = 0
            self.outer.reset(self.engine.x[0])

    def step(self, batches, meter, clock) -> None:
        if self.synchronous:
            self.synchronous_step(batches, meter, clock)
        else:
            super().step(batches, meter, clock)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "local_phase": self.local_phase}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.local_phase = state["local_phase"]
