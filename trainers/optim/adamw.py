"""`adamw`: torch's AdamW (Loshchilov & Hutter 2019: weight decay decoupled from the adaptive step)."""
from __future__ import annotations

import torch

from ..config import OptimConfig


def build(groups: list[dict], cfg: OptimConfig, lr: float, stacked: bool) -> torch.optim.Optimizer:
    # Elementwise, so stacked parameters need nothing special, and `trust` means nothing to it.
    groups = [{k: v for k, v in g.items() if k != "trust"} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
