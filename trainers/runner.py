"""Runners: how one epoch of steps is taken. `CentralizedRunner` is one model and one optimizer; the
K-worker engine (`engine.WorkerRunner`) is the other. Both follow `Runner`, which the loop (`loop.py`)
drives."""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, TrainConfig
from .data import Dataset
from .engine import make_engine
from .models import build_model
from .optim import build_optimizer
from .schedules import build_scheduler, scale_lr
from .steps import Batcher, LossMeter, ProgressCallback, autocast


class Runner(Protocol):
    """What the loop asks of a runner."""

    batcher: Batcher

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of steps: train_loss, train_acc, images, lr, and the runner's own figures."""

    def eval_model(self) -> nn.Module:
        """The model to evaluate (the K workers' average for the engine)."""

    def totals(self) -> dict[str, float]:
        """Run totals of the additive per-epoch figures (none for one model)."""

    def algorithm_state(self) -> dict:
        """What the result's `state` shows of the algorithm (nothing for one model)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CentralizedRunner:
    """One model, one optimizer: the reference every K-worker algorithm is compared with."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device,
                 on_progress: ProgressCallback | None = None):
        self.cfg, self.device, self.on_progress = cfg, device, on_progress
        self.batcher = Batcher(cfg, data, device)
        self.model = build_model(cfg.model, data.channels, data.image_size, data.num_classes).to(device)
        self.model = self.model.to(memory_format=self.batcher.memory_format)
        self.n = len(data.train_y)
        self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)
        lr = scale_lr(cfg.optim.lr, cfg.batch_size, cfg.schedule)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, cfg.epochs)
        # One generator for shuffling and augmentation, on the training device, saved in checkpoints.
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        meter = LossMeter(self.device, cfg.divergence_loss)
        perm = torch.randperm(self.n, device=self.device, generator=self.generator)
        for step in range(self.steps_per_epoch):
            x, y = self.batcher.train_batch(perm[step * cfg.batch_size:(step + 1) * cfg.batch_size], self.generator)
            with autocast(cfg, self.device):
                out = model(x)
                loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            meter.add(loss, out, y)
            if self.on_progress is not None:
                self.on_progress(step + 1, self.steps_per_epoch)
        stats = meter.result()
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    def eval_model(self) -> nn.Module:
        return self.model

    def totals(self) -> dict[str, float]:
        return {}

    def algorithm_state(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


def make_runner(cfg: TrainConfig, data: Dataset, device: torch.device, on_progress: ProgressCallback | None,
                group=None):
    if cfg.distributed.enabled:
        return make_engine(cfg, data, device, on_progress, group)
    return CentralizedRunner(cfg, data, device, on_progress)


def check_fits(cfg: TrainConfig, data: Dataset) -> None:
    """A batch larger than the data (per worker) is a config error, not a silent short epoch."""
    workers = cfg.distributed.workers
    n = len(data.train_y)
    if cfg.batch_size * workers > n:
        what = f"batch_size={cfg.batch_size}" + (f" x distributed.workers={workers}" if workers > 1 else "")
        raise ConfigError(f"batch_size: {what} is larger than the {n} training examples of "
                          f"{data.name} (split={cfg.data.split}); lower it or use more data")
