"""Models: the sources' LeNet-5, the classic LeNet-5, and a small ResNet with BatchNorm.

Input channels and image size follow the dataset, so the same names work on CIFAR (3x32x32) and
Fashion-MNIST (1x28x28).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .config import ModelConfig


class LeNet5(nn.Module):
    """The first source's LeNet-5 (the federated-learning variant of Hsu et al. 2020):
    conv 5x5 C->64, max-pool 2, conv 5x5 64->64, max-pool 2, FC 1600->384->192->classes, ReLU.
    `classic=True` gives LeCun's widths (6/16 channels, 120/84 hidden units)."""

    def __init__(self, channels: int, image_size: int, classes: int, classic: bool = False):
        super().__init__()
        c1, c2, h1, h2 = (6, 16, 120, 84) if classic else (64, 64, 384, 192)
        self.conv1 = nn.Conv2d(channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by a 2x2 pool
        if side < 1:
            raise ValueError(f"lenet5 needs images of at least 16x16 pixels, got {image_size}")
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


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet (three stages of one BasicBlock: ResNet-8). Its BatchNorm buffers
    are part of the state the K-worker engine averages."""

    def __init__(self, channels: int, classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(cfg: ModelConfig, channels: int, image_size: int, classes: int) -> nn.Module:
    if cfg.name == "lenet5":
        return LeNet5(channels, image_size, classes)
    if cfg.name == "lenet5-classic":
        return LeNet5(channels, image_size, classes, classic=True)
    if cfg.name == "resnet":
        return ResNet(channels, classes, cfg.width)
    raise ValueError(f"model.name: unknown model {cfg.name!r}; choose lenet5, lenet5-classic or resnet")
