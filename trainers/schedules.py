"""Learning-rate scaling rules and per-iteration schedules (linear warm-up, then cosine / step / constant).

The schedule is a plain function of the iteration, wrapped in a LambdaLR, so a checkpointed scheduler
(its `last_epoch`) resumes the exact lr sequence.
"""
from __future__ import annotations

import math

import torch

from .config import ScheduleConfig


def scale_lr(lr: float, global_batch: int, cfg: ScheduleConfig) -> float:
    """The lr at `global_batch` from the lr tuned at `cfg.reference_batch` (linear: Goyal et al. 2017;
    sqrt: Krizhevsky 2014 / Hoffer et al. 2017, keeps the gradient-noise scale)."""
    ratio = global_batch / cfg.reference_batch
    if cfg.scaling == "none":
        return lr
    if cfg.scaling == "linear":
        return lr * ratio
    if cfg.scaling == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown lr scaling {cfg.scaling!r}; choose one of none, linear, sqrt")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at iteration `step` (0-based)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)  # round, not ceil: 0.07 * 100 = 7.000000000000001
    if step < warmup:
        return (step + 1) / warmup  # reaches 1 on the last warm-up step
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":  # milestones in epochs, may be fractional
        return cfg.gamma ** sum(step / steps_per_epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":  # half-cosine from 1 (first step after warm-up) to 0 (after the last step)
        progress = min(1.0, (step - warmup) / max(1, epochs * steps_per_epoch - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {cfg.name!r}; choose one of cosine, step, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over iterations; the caller steps it once per iteration, after optimizer.step()."""
    if steps_per_epoch <= 0 or epochs <= 0:
        raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and epochs ({epochs}) must be positive")

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict keeps only last_epoch etc.
        return lr_factor(step, steps_per_epoch, epochs, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
