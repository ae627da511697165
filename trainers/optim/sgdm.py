"""`sgdm`: torch's SGD with momentum. Its weight decay is coupled (g + wd * w), as in the papers that the
studies reproduce."""
from __future__ import annotations

import torch

from ..config import OptimConfig


def build(groups: list[dict], cfg: OptimConfig, lr: float, stacked: bool) -> torch.optim.Optimizer:
    # Elementwise, so stacked parameters need nothing special, and `trust` means nothing to it.
    groups = [{k: v for k, v in g.items() if k != "trust"} for g in groups]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
