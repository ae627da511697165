"""`fashion-mnist`, `cifar10`, `cifar100`: datasets that torchvision parses (and downloads).

Sources are tried in order: the local cache `<root>/<name>.pt`, torchvision's own layout under the data
root, known offline copies (`OFFLINE_COPIES`), then torchvision's download. Whatever fails is remembered,
so the final DataNotFoundError names every place tried and how to get the data.
"""
from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from trainers.config import DataConfig, DataNotFoundError

from . import Loaded, Parts, data_root


@dataclass(frozen=True)
class TorchvisionSet:
    name: str  # the `data.dataset` value; also the cache's file name
    title: str
    tv_class: str  # torchvision.datasets class that parses (and downloads) it
    tv_folder: str  # where that class expects the files, relative to its root
    num_classes: int
    idx: bool  # IDX files (possibly gzipped) rather than CIFAR pickles
    hint: str  # how to get the files, for the error message

    def load(self, cfg: DataConfig, log: Callable[[str], None]) -> Loaded:
        parts, source = _load_real(self, data_root(cfg), cfg.download, log)
        return Loaded(parts, source, self.num_classes)


_KRIZ = "https://www.cs.toronto.edu/~kriz"
CIFAR100 = TorchvisionSet("cifar100", "CIFAR-100", "CIFAR100", "cifar-100-python", 100, False,
                          f"extract {_KRIZ}/cifar-100-python.tar.gz so that {{root}}/cifar-100-python/ exists")
CIFAR10 = TorchvisionSet("cifar10", "CIFAR-10", "CIFAR10", "cifar-10-batches-py", 10, False,
                         f"extract {_KRIZ}/cifar-10-python.tar.gz so that {{root}}/cifar-10-batches-py/ exists")
FASHION_MNIST = TorchvisionSet("fashion-mnist", "Fashion-MNIST", "FashionMNIST", "FashionMNIST/raw", 10, True,
                               "place train-images-idx3-ubyte[.gz] and the other three IDX files under"
                               " {root}/FashionMNIST/raw/, or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
SPECS = {s.name: s for s in (CIFAR100, CIFAR10, FASHION_MNIST)}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Copies that a package manager puts on disk: (label, folder holding the files as torchvision's raw folder
# would). The path is where Debian's and Ubuntu's package dataset-fashion-mnist installs its files (the
# package's documented location), not a path of any one machine.
OFFLINE_COPIES: dict[str, list[tuple[str, str]]] = {
    "fashion-mnist": [("Debian's dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")],
}


def _load_real(spec: TorchvisionSet, root: pathlib.Path, download: bool,
               log: Callable[[str], None]) -> tuple[Parts, str]:
    name = spec.name
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


def _read_folder(spec: TorchvisionSet, folder: pathlib.Path) -> Parts:
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


def _torchvision_splits(spec: TorchvisionSet, root: str) -> Parts:
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


def _download(spec: TorchvisionSet, root: pathlib.Path) -> Parts:
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
