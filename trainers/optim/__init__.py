"""Optimizers: `build_optimizer`, and LARS and LAMB (large-batch, layer-wise trust ratio).

`optim.name` picks a factory from `trainers.registry.OPTIMIZERS`, one module per optimizer here. A
factory takes `(param_groups, cfg: OptimConfig, lr, stacked)` and returns a `torch.optim.Optimizer`;
each group is `{params, weight_decay, trust}` (trust: False for the 1-d group, see `build_optimizer`).

Every optimizer also runs on the "stacked" parameters of the batched K-worker backend (`stacked=True`):
every tensor has a leading worker dimension [K, *shape]. Elementwise optimizers need nothing for that;
LARS and LAMB take every norm (hence every trust ratio) per worker, never over the whole stack, so one
stacked step equals K separate steps. No step() reads a value back to the host.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..config import OptimConfig
from ..registry import OPTIMIZERS
from .lamb import LAMB
from .lars import LARS

__all__ = ["LAMB", "LARS", "OPTIMIZERS", "build_optimizer"]


def build_optimizer(named_params: Iterable[tuple[str, Tensor]], cfg: OptimConfig, lr: float,
                    stacked: bool = False) -> torch.optim.Optimizer:
    """The optimizer of `cfg` at learning rate `lr` (already scaled by the schedule's batch rule).

    With `cfg.exclude_1d`, biases and 1-d params (norm weights) get no weight decay and no trust ratio
    (the usual LARS/LAMB practice); with `stacked`, dim 0 is the worker dim, so they have ndim <= 2.
    """
    factory = OPTIMIZERS.load(cfg.name)
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (no_decay if cfg.exclude_1d and p.ndim <= 1 + stacked else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay, trust=True),
              dict(params=no_decay, weight_decay=0.0, trust=False)]
    return factory([g for g in groups if g["params"]], cfg, lr, stacked)
