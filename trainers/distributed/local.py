"""Local SGD (periodic averaging, CPSGD): the workers' parameters are averaged every J local steps
(`distributed.local_steps`), through SlowMo's outer step when `distributed.slowmo` is set."""
from __future__ import annotations

from .base import Periodic


class Local(Periodic):
    name = "local"

    def period(self) -> int:
        return self.cfg.local_steps
