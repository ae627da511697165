"""`lenet5` and `lenet5-classic`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig


class LeNet5(nn.Module):
    """Poiatti et al.'s LeNet-5 (the federated-learning variant of Hsu et al. 2020):
    conv 5x5 C->64, max-pool 2, conv 5x5 64->64, max-pool 2, FC 1600->384->192->classes, ReLU.
    `classic=True` gives LeCun's widths (6/16 channels, 120/84 hidden units)."""

    def __init__(self, channels: int, image_size: int, classes: int, classic: bool = False):
        super().__init__()
        c1, c2, h1, h2 = (6, 16, 120, 84) if classic else (64, 64, 384, 192)
        self.conv1 = nn.Conv2d(channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by a 2x2 pool
        if side < 1:  # the image size is the dataset's, known only once it is loaded
            raise ConfigError(f"model.name: lenet5 needs images of at least 16x16 pixels, got {image_size}")
        self.fc1 = nn.Linear(c2 * side * side, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build(cfg: ModelConfig, channels: int, image_size: int, classes: int) -> LeNet5:
    return LeNet5(channels, image_size, classes)


def build_classic(cfg: ModelConfig, channels: int, image_size: int, classes: int) -> LeNet5:
    return LeNet5(channels, image_size, classes, classic=True)
