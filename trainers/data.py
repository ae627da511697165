"""Datasets as uint8 tensors resident on the training device, plus batched augmentation and sharding.

A dataset is loaded whole (the largest, CIFAR-100, is 180 MB as uint8), so the hot loop never touches a
DataLoader: batches are index_select + `augment` + `normalize` on the device. Sources are tried in order:
the local cache `<root>/<name>.pt`, torchvision's own layout under the data root, known offline copies
(Debian's dataset-fashion-mnist), then torchvision's download. Whatever fails is remembered, so the final
DataNotFoundError names every place tried and how to get the data.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainers.config import DataConfig, DataNotFoundError, SyntheticConfig

Parts = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (train, test) of (x, y)


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


@dataclass(frozen=True)
class _Spec:
    title: str
    tv_class: str  # torchvision.datasets class that parses (and downloads) it
    tv_folder: str  # where that class expects the files, relative to its root
    num_classes: int
    idx: bool  # IDX files (possibly gzipped) rather than CIFAR pickles
    hint: str  # how to get the files, for the error message


_KRIZ = "https://www.cs.toronto.edu/~kriz"
SPECS = {
    "cifar100": _Spec("CIFAR-100", "CIFAR100", "cifar-100-python", 100, False,
                      f"extract {_KRIZ}/cifar-100-python.tar.gz so that {{root}}/cifar-100-python/ exists"),
    "cifar10": _Spec("CIFAR-10", "CIFAR10", "cifar-10-batches-py", 10, False,
                     f"extract {_KRIZ}/cifar-10-python.tar.gz so that {{root}}/cifar-10-batches-py/ exists"),
    "fashion-mnist": _Spec("Fashion-MNIST", "FashionMNIST", "FashionMNIST/raw", 10, True,
                           "place train-images-idx3-ubyte[.gz] and the other three IDX files under"
                           " {root}/FashionMNIST/raw/, or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"),
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Copies that a package manager puts on disk: (label, folder holding the files as torchvision's raw folder would).
OFFLINE_COPIES: dict[str, list[tuple[str, str]]] = {
    "fashion-mnist": [("Debian's dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")],
}
SYNTHETIC_SEED = 20240917  # fixed, not the run seed: every run and every trial sees the same synthetic data


def data_root(cfg: DataConfig) -> pathlib.Path:
    return pathlib.Path(cfg.data_dir or os.environ.get("SWEEPER_DATA_DIR") or "data")


# --------------------------------------------------------------------------------------------------
# Loading


def load_dataset(cfg: DataConfig, seed: int, log: Callable[[str], None] = print) -> Dataset:
    if cfg.dataset == "synthetic":
        parts, source, num_classes = _synthetic(cfg.synthetic), "synthetic", cfg.synthetic.classes
    elif cfg.dataset in SPECS:
        parts, source = _load_real(cfg.dataset, data_root(cfg), cfg.download, log)
        num_classes = SPECS[cfg.dataset].num_classes
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of synthetic, {', '.join(SPECS)}")
    (train_x, train_y), (eval_x, eval_y) = parts

    if cfg.split == "val":  # seeded by the run seed, so repeats with another seed see another split
        n = len(train_x)
        n_val = max(1, round(n * cfg.val_fraction))
        if n - n_val < 1:
            raise ValueError(f"{cfg.dataset}: {n} examples are too few for a validation split")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train_idx, val_idx = perm[: n - n_val], perm[n - n_val :]
        train_x, train_y, eval_x, eval_y = train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx]
    elif cfg.split != "test":
        raise ValueError(f"unknown split {cfg.split!r}; choose val or test")

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


def _load_real(name: str, root: pathlib.Path, download: bool, log: Callable[[str], None]) -> tuple[Parts, str]:
    spec = SPECS[name]
    cache = root / f"{name}.pt"
    tried: list[str] = []
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            parts = ((blob["train_x"], blob["train_y"]), (blob["test_x"], blob["test_y"]))
            _check_parts(parts)
            log(f"loading {name} from cache {cache}")
            return parts, f"cache {cache} (of {blob.get('origin', '?')})"
        except Exception as err:  # a truncated or foreign file: re-parse rather than fail
            log(f"cache {cache} is unreadable ({_why(err)}); re-parsing")
            tried.append(f"cache {cache}: unreadable ({_why(err)})")
    else:
        tried.append(f"cache {cache}: not found")

    local = root / spec.tv_folder
    folders = [(str(local), local, f"parsing {spec.title} from {local}")]
    for label, path in OFFLINE_COPIES.get(name, []):
        where = f"{label} at {path}"
        folders.append((where, pathlib.Path(path), f"no local copy in {root}/; using {where}"))
    for where, folder, message in folders:
        if not folder.is_dir():
            tried.append(f"{where}: not found")
            continue
        log(message)
        try:
            return _keep(_read_folder(spec, folder), where, cache, log)
        except Exception as err:  # incomplete, corrupt, bad md5: note it and try the next source
            log(f"{where} is unusable ({_why(err)}); trying the next source")
            tried.append(f"{where}: unusable ({_why(err)})")
    if download:
        log(f"no local copy; downloading {spec.title} with torchvision into {root}/ ...")
        try:
            return _keep(_download(spec, root), f"{local} (downloaded by torchvision)", cache, log)
        except Exception as err:  # no network (URLError/OSError), or torchvision's RuntimeError after its mirrors
            log(f"download failed ({_why(err)})")
            tried.append(f"torchvision download into {root}/: failed ({_why(err)})")
    else:
        tried.append("torchvision download: skipped (data.download is false)")

    lines = "\n".join(f"  - {t}" for t in tried)
    raise DataNotFoundError(
        f"{spec.title} ({name}) not found. Tried, in order:\n{lines}\n"
        f"To get it: run once with network access and data.download=true (torchvision fetches it into {root}/), "
        f"or {spec.hint.format(root=root)}. The data root is data.data_dir, else $SWEEPER_DATA_DIR, else ./data."
    )


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line, even for torchvision's multi-line errors


def _keep(parts: Parts, where: str, cache: pathlib.Path, log: Callable[[str], None]) -> tuple[Parts, str]:
    _check_parts(parts)
    _write_cache(cache, parts, where, log)
    return parts, where


def _read_folder(spec: _Spec, folder: pathlib.Path) -> Parts:
    """Parse `folder` (laid out as torchvision's `tv_folder`) with torchvision's own dataset class."""
    # torchvision wants `<root>/<tv_folder>` with plain files; stage symlinks (and gunzipped IDX files) in a
    # scratch root so the same parser reads torchvision's layout, Debian's and gzipped copies alike.
    with tempfile.TemporaryDirectory(prefix="sweeper-data-") as tmp:
        staged = pathlib.Path(tmp, spec.tv_folder)
        staged.parent.mkdir(parents=True, exist_ok=True)
        if spec.idx:
            staged.mkdir()
            for stem in IDX_FILES:
                plain, packed = folder / stem, folder / f"{stem}.gz"
                if plain.is_file():
                    (staged / stem).symlink_to(plain.resolve())
                elif packed.is_file():  # torchvision's IDX reader does not read .gz
                    with gzip.open(packed) as src, open(staged / stem, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                else:
                    raise FileNotFoundError(f"incomplete: no {stem}[.gz] in {folder}")
        else:
            staged.symlink_to(folder.resolve(), target_is_directory=True)
        return _torchvision_splits(spec, tmp)


def _torchvision_splits(spec: _Spec, root: str) -> Parts:
    import numpy as np
    import torchvision

    cls = getattr(torchvision.datasets, spec.tv_class)
    out = []
    for train in (True, False):
        ds = cls(root, train=train, download=False)
        x = torch.as_tensor(np.asarray(ds.data))  # CIFAR: NHWC numpy; MNIST-like: NHW tensor
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        out.append((x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)))
    return out[0], out[1]


def _download(spec: _Spec, root: pathlib.Path) -> Parts:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    getattr(torchvision.datasets, spec.tv_class)(str(root), train=True, download=True)  # fetches both splits
    return _read_folder(spec, root / spec.tv_folder)


def _check_parts(parts: Parts) -> None:
    for x, y in parts:
        if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.long or y.shape != (len(x),):
            raise ValueError(f"expected uint8 [N,C,H,W] images and int64 [N] labels, got {x.dtype} "
                             f"{tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")


def _write_cache(cache: pathlib.Path, parts: Parts, origin: str, log: Callable[[str], None]) -> None:
    (train_x, train_y), (test_x, test_y) = parts
    blob = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, origin=origin)
    # A name of this process's own: processes sharing the data directory (dist ranks, compose workers on one
    # volume) may write the same cache at once; each replaces it whole.
    tmp = cache.with_name(f"{cache.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, cache)  # atomic: a crash mid-write never leaves a truncated cache behind
        log(f"wrote cache {cache} ({cache.stat().st_size / 2**20:.0f} MiB) for fast later loads")
    except OSError as err:  # a read-only data root only costs the next run a re-parse
        tmp.unlink(missing_ok=True)
        log(f"could not write cache {cache}: {err}")


def _synthetic(s: SyntheticConfig) -> Parts:
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

SHARD_MODES = ("contiguous", "random", "reshuffle")


def shard_indices(n: int, workers: int, mode: str, seed: int, epoch: int = 0) -> list[torch.Tensor]:
    """K shards of range(n), sizes as equal as possible (torch.tensor_split).

    contiguous: worker k owns the k-th block (as in the first source); random: one seeded permutation,
    fixed for the run; reshuffle: a permutation of seed and epoch, so shards change every epoch.
    """
    if mode not in SHARD_MODES:
        raise ValueError(f"unknown shard mode {mode!r}; choose one of {', '.join(SHARD_MODES)}")
    if not 1 <= workers <= n:
        raise ValueError(f"cannot split {n} examples among {workers} workers: need 1 <= workers <= {n}")
    if mode == "contiguous":
        order = torch.arange(n)
    else:
        key = seed if mode == "random" else seed * 1_000_003 + epoch  # distinct (seed, epoch) -> distinct stream
        order = torch.randperm(n, generator=torch.Generator().manual_seed(key))
    return list(order.tensor_split(workers))
