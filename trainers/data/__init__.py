"""Datasets as uint8 tensors resident on the training device, plus batched augmentation and sharding.

A dataset is loaded whole (the largest, CIFAR-100, is 180 MB as uint8), so the hot loop never touches a
DataLoader: batches are index_select + `augment` + `normalize` on the device.

`data.dataset` picks a loader from `trainers.registry.DATASETS`: a callable `(cfg: DataConfig, log) ->
Loaded` (the train and test parts as uint8 [N, C, H, W] images and int64 labels, where they came from,
the number of classes). `torchvision_sets.py` reads Fashion-MNIST, CIFAR-10 and CIFAR-100 from local
copies or torchvision's download; `synthetic.py` generates a learnable set of any shape. `load_dataset`
then splits, subsets and measures whatever a loader returns.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from trainers.config import DataConfig, DataNotFoundError
from trainers.registry import DATASETS

__all__ = ["DATASETS", "DataNotFoundError", "Dataset", "Loaded", "Parts", "SHARD_MODES", "augment", "data_root",
           "load_dataset", "normalize", "shard_indices"]

Parts = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (train, test) of (x, y)


class Loaded(NamedTuple):
    """What a dataset loader returns."""

    parts: Parts
    source: str  # where the data came from: a path, or "synthetic"
    num_classes: int


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    eval_x: torch.Tensor  # uint8 [M, C, H, W]: the validation split or the test set
    eval_y: torch.Tensor  # int64 [M]
    num_classes: int
    mean: tuple[float, ...]  # per channel, over the training images used, in [0, 1] units
    std: tuple[float, ...]
    source: str  # where the data came from: a path, or "synthetic"

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]

    def to(self, device) -> "Dataset":
        return dataclasses.replace(
            self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
            eval_x=self.eval_x.to(device), eval_y=self.eval_y.to(device),
        )


def data_root(cfg: DataConfig) -> pathlib.Path:
    return pathlib.Path(cfg.data_dir or os.environ.get("SWEEPER_DATA_DIR") or "data")


# --------------------------------------------------------------------------------------------------
# Loading


def load_dataset(cfg: DataConfig, seed: int, log: Callable[[str], None] = print) -> Dataset:
    parts, source, num_classes = DATASETS.load(cfg.dataset)(cfg, log)
    (train_x, train_y), (eval_x, eval_y) = parts

    if cfg.split == "val":  # seeded by the run seed, so repeats with another seed see another split
        n = len(train_x)
        n_val = max(1, round(n * cfg.val_fraction))
        if n - n_val < 1:
            raise ValueError(f"{cfg.dataset}: {n} examples are too few for a validation split")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train_idx, val_idx = perm[: n - n_val], perm[n - n_val :]
        train_x, train_y, eval_x, eval_y = train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx]

    if cfg.subset is not None:
        if cfg.subset >= len(train_x):
            log(f"data.subset={cfg.subset} >= the {len(train_x)} training examples: keeping all of them")
        else:
            log(f"data.subset: keeping the first {cfg.subset} of {len(train_x)} training examples")
            train_x, train_y = train_x[: cfg.subset], train_y[: cfg.subset]

    mean, std = _channel_stats(train_x)
    c, h, w = train_x.shape[1:]
    log(f"{cfg.dataset}: {len(train_x)} train / {len(eval_x)} {cfg.split} examples of {c}x{h}x{w}, "
        f"{num_classes} classes, from {source}")
    return Dataset(cfg.dataset, train_x, train_y, eval_x, eval_y, num_classes, mean, std, source)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std (population) from a 256-bin histogram: no float copy of the whole set."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1).cpu(), minlength=256).double()
        counts /= counts.sum()
        m = float((counts * values).sum())
        mean.append(m)
        std.append(float((counts * (values - m) ** 2).sum().sqrt()))
    return tuple(mean), tuple(std)


# --------------------------------------------------------------------------------------------------
# Batch-time transforms (on the device)


def augment(x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop of the zero-padded batch plus random horizontal flip, as one gather; uint8 in and out."""
    if padding == 0 and not flip:
        return x
    b, c, h, w = x.shape
    dev, gdev = x.device, generator.device  # draw on the generator's device so runs reproduce, then move
    offsets = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator, device=gdev).to(dev)
    rows = offsets[0] + torch.arange(h, device=dev)  # [B, H] rows of the padded image
    cols = offsets[1] + torch.arange(w, device=dev)  # [B, W]
    if flip:  # a flipped sample reads its window's columns right to left
        mirror = (torch.rand(b, 1, generator=generator, device=gdev) < 0.5).to(dev)
        cols = torch.where(mirror, cols.flip(1), cols)
    padded = F.pad(x, (padding,) * 4) if padding else x
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(x / 255 - mean) / std, folded into one multiply-add; mean/std broadcast as [1, C, 1, 1]."""
    work = torch.promote_types(dtype, torch.float32)  # bf16 scale factors would cost precision
    mean = torch.as_tensor(mean, dtype=work, device=x.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=work, device=x.device).reshape(1, -1, 1, 1)
    out = x.to(work).mul_(1 / (255 * std)).sub_(mean / std)
    return out.to(dtype)


# --------------------------------------------------------------------------------------------------
# Sharding for the K-worker engine


def _permutation(n: int, key: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


# The order in which the examples are dealt out, by `distributed.shards` (its choices: this dict's keys).
SHARD_ORDERS: dict[str, Callable[[int, int, int], torch.Tensor]] = {
    # worker k owns the k-th block, as in Poiatti et al.
    "contiguous": lambda n, seed, epoch: torch.arange(n),
    # one seeded permutation, fixed for the run
    "random": lambda n, seed, epoch: _permutation(n, seed),
    # a permutation of (seed, epoch), so shards change every epoch; distinct pairs give distinct keys
    "reshuffle": lambda n, seed, epoch: _permutation(n, seed * 1_000_003 + epoch),
}
SHARD_MODES = tuple(SHARD_ORDERS)


def shard_indices(n: int, workers: int, mode: str, seed: int, epoch: int = 0) -> list[torch.Tensor]:
    """K shards of range(n) in the order of `SHARD_ORDERS[mode]`, sizes as equal as possible
    (torch.tensor_split). `mode` is a validated `distributed.shards`."""
    if not 1 <= workers <= n:  # n is the dataset's, known only once it is loaded
        raise ValueError(f"cannot split {n} examples among {workers} workers: need 1 <= workers <= {n}")
    return list(SHARD_ORDERS[mode](n, seed, epoch).tensor_split(workers))
