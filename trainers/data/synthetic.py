"""`synthetic`: a deterministic, learnable dataset of any shape (`data.synthetic.*`), for tests and benchmarks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from trainers.config import DataConfig, SyntheticConfig

from . import Loaded, Parts

SYNTHETIC_SEED = 20240917  # fixed, not the run seed: every run and every trial sees the same synthetic data


def load(cfg: DataConfig, log: Callable[[str], None]) -> Loaded:
    return Loaded(generate(cfg.synthetic), "synthetic", cfg.synthetic.classes)


def generate(s: SyntheticConfig) -> Parts:
    """Each class is a smooth random prototype image; samples are prototype + pixel noise, as uint8.

    Prototypes are upsampled from a coarse grid so that random crops and flips keep them recognisable.
    Prototypes, train and test set come from separate fixed seeds, so changing train_size keeps the test set.
    """
    coarse = max(2, s.image_size // 8)
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    protos = torch.rand(s.classes, s.channels, coarse, coarse, generator=g)
    protos = F.interpolate(protos, size=(s.image_size, s.image_size), mode="bilinear", align_corners=False)

    def draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = (torch.arange(n) % s.classes)[torch.randperm(n, generator=g)]  # balanced classes, shuffled
        x = torch.empty(n, s.channels, s.image_size, s.image_size, dtype=torch.uint8)
        for i in range(0, n, 8192):  # chunks bound the float32 working memory
            yc = y[i : i + 8192]
            noisy = protos[yc] + 0.35 * torch.randn(len(yc), *protos.shape[1:], generator=g)
            x[i : i + 8192] = noisy.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return x, y

    return draw(s.train_size, SYNTHETIC_SEED + 1), draw(s.test_size, SYNTHETIC_SEED + 2)
