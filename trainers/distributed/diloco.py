"""DiLoCo (Douillard et al. 2023, Algorithm 1): H = `distributed.local_steps` inner steps of each worker's
own optimizer (AdamW in the paper), then an outer SGD step with Nesterov momentum on the pseudo-gradient
(anchor minus the workers' mean), at its own lr (0.7) and momentum (0.9), independent of the inner
schedule (`distributed.diloco`)."""
from __future__ import annotations

from .local import Local
from .outer import OuterSGD


class DiLoCo(Local):
    name = "diloco"

    def make_outer(self):
        o = self.cfg.diloco
        return OuterSGD(self.engine.x[0], o.outer_lr, o.outer_momentum, o.nesterov)
