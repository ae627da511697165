"""Models: `build_model` and the built-in networks (LeNet-5 in two widths, a small ResNet).

`model.name` picks a factory from `trainers.registry.MODELS`: a registered name (one module per model
here), `torchvision/<builder>` or a user's `package.module:callable` (both in `external.py`). A factory
takes `(cfg: ModelConfig, channels, image_size, classes)` and returns an `nn.Module` that maps a float
batch [N, channels, image_size, image_size] to logits [N, classes]. Channels, image size and classes
come from the dataset, so one name works on CIFAR (3x32x32) and Fashion-MNIST (1x28x28).
"""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..registry import MODELS
from .lenet import LeNet5
from .resnet import BasicBlock, ResNet

__all__ = ["BasicBlock", "LeNet5", "MODELS", "ResNet", "build_model"]


def build_model(cfg: ModelConfig, channels: int, image_size: int, classes: int) -> nn.Module:
    return MODELS.load(cfg.name)(cfg, channels, image_size, classes)
