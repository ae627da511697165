"""The primitives of a training step that every runner shares: the device, batches of resident data,
mixed precision, the running loss (with its divergence check) and evaluation."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, TrainConfig
from .data import Dataset, augment, normalize
from .results import EpochReport

DIVERGENCE_CHECK_EVERY = 25  # steps between host syncs that look for a NaN/inf or exploding loss

EpochCallback = Callable[[EpochReport], None]
ProgressCallback = Callable[[int, int], None]


class Diverged(Exception):
    """Raised inside a runner's epoch when the loss is NaN/inf or above `divergence_loss`."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device "
                          f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); use device=cpu or auto")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batcher:
    """Turns resident uint8 training data into normalised, augmented batches on the device."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device):
        self.data = data
        self.augment = cfg.data.augment and (cfg.data.crop_padding > 0 or cfg.data.flip)
        self.padding, self.flip = cfg.data.crop_padding, cfg.data.flip
        shape = (1, data.channels, 1, 1)
        self.mean = torch.tensor(data.mean, device=device).view(shape)
        self.std = torch.tensor(data.std, device=device).view(shape)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is not None and self.augment:
            x = augment(x, generator, self.padding, self.flip)
        return normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def train_batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.data.train_x[idx], generator), self.data.train_y[idx]


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, batcher: Batcher, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy (%) of `model` on the evaluation split."""
    data = batcher.data
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, len(data.eval_y), cfg.eval_batch_size):
        x = batcher.prepare(data.eval_x[start:start + cfg.eval_batch_size], None)
        y = data.eval_y[start:start + cfg.eval_batch_size]
        with autocast(cfg, device):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = len(data.eval_y)
    return loss_sum.item() / n, 100.0 * correct.item() / n


class LossMeter:
    """Sums loss and correct predictions on the device; looks at them on the host only every
    DIVERGENCE_CHECK_EVERY steps so the hot loop does not wait on the device.

    With a worker group that spans processes (engine's dist backend) the sums are all-reduced at the
    epoch's end and divergence is decided there, on the same figures in every process: a check of one
    rank's own loss mid-epoch would stop that rank alone and leave the others waiting in a collective."""

    def __init__(self, device: torch.device, limit: float, group=None):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0
        self.steps = 0
        self.limit = limit
        self.group = group if getattr(group, "spans_processes", False) else None

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss += loss.detach().double() * n
        self.correct += (out.detach().argmax(-1) == y).sum()
        self.count += n
        self.steps += 1
        if self.group is None and self.steps % DIVERGENCE_CHECK_EVERY == 0:
            self.check(loss.item())

    def check(self, value: float) -> None:
        if not math.isfinite(value) or value > self.limit:
            raise Diverged(f"loss {value:.4g}")

    def result(self) -> dict[str, float]:
        loss_sum, correct, count = self.loss.item(), self.correct.item(), self.count
        if self.group is not None:
            sums = torch.stack([self.loss, self.correct.double(), self.loss.new_tensor(float(count))])
            loss_sum, correct, count = self.group.sum(sums.unsqueeze(0)).tolist()
        loss = loss_sum / max(count, 1)
        self.check(loss)
        return {"train_loss": loss, "train_acc": 100.0 * correct / max(count, 1), "images": float(count)}
