"""Throughput benchmarks, side by side in one process (the machine is shared and noisy: only ratios
measured together mean anything).

(a) the first source's way: per-sample torchvision transforms on PIL images through a DataLoader,
    fp32, NCHW, a plain loop;
(b) the trainer core: resident uint8 data, batched augmentation on the device, each precision and
    memory format;
plus K-worker rows (serial and vmap backends) and the achieved GFLOP/s against a matmul peak
measured on the same device.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import load_dataset
from .train import CentralizedRunner, autocast, make_runner, resolve_device, sync


@dataclass
class BenchSettings:
    steps: int = 200  # timed training steps per row
    warmup: int = 20  # untimed steps first
    batch_size: int = 64
    model: str = "lenet5"
    image_size: int = 32
    channels: int = 3
    classes: int = 100
    loader_workers: int = 2  # DataLoader worker processes of the baseline
    device: str = "auto"
    workers: tuple[int, ...] = (2, 4, 8)  # K of the K-worker rows
    local_steps: int = 4
    backends: tuple[str, ...] = ("serial", "vmap")


def bench_config(s: BenchSettings, **overrides) -> TrainConfig:
    workers = int(overrides.get("distributed.workers", 1))
    n = (s.steps + s.warmup) * s.batch_size * workers  # every worker takes steps + warmup local steps
    raw = {"data": {"dataset": "synthetic", "split": "test",
                    "synthetic": {"train_size": n, "test_size": 256, "channels": s.channels,
                                  "image_size": s.image_size, "classes": s.classes}},
           "model": {"name": s.model}, "optim": {"name": "sgdm", "lr": 0.01}, "schedule": {"name": "constant"},
           "batch_size": s.batch_size, "epochs": 1, "device": s.device}
    return TrainConfig.from_dict(raw, overrides)


def time_runner(cfg: TrainConfig, s: BenchSettings) -> dict:
    """Images/s of one training epoch of `cfg`'s runner after `s.warmup` untimed steps."""
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, cfg.seed, log=lambda _: None).to(device)
    marks: list[float] = []

    def progress(step: int, total: int) -> None:
        if step == s.warmup or step == total:
            sync(device)
            marks.append(time.perf_counter())

    runner = make_runner(cfg, data, device, progress)
    steps = runner.steps_per_epoch
    runner.train_epoch(0)
    images = (steps - s.warmup) * cfg.batch_size * cfg.distributed.workers
    seconds = marks[-1] - marks[0]
    return {"images_per_sec": images / seconds, "seconds": seconds, "steps": steps - s.warmup}


def time_dataloader_baseline(s: BenchSettings) -> dict:
    """The first source's input pipeline: PIL images, per-sample RandomCrop/Flip/ToTensor/Normalize."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset as TorchDataset
    from torchvision import transforms

    device = resolve_device(s.device)
    cfg = bench_config(s)
    data = load_dataset(cfg.data, cfg.seed, log=lambda _: None)
    images = data.train_x.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR keeps them
    labels = data.train_y.tolist()
    mode = "L" if s.channels == 1 else "RGB"
    tf = transforms.Compose([transforms.RandomCrop(s.image_size, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])

    class PILDataset(TorchDataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            img = images[i][..., 0] if mode == "L" else images[i]
            return tf(Image.fromarray(np.ascontiguousarray(img), mode=mode)), labels[i]

    from .models import build_model
    from .config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=s.model), s.channels, s.image_size, data.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-4)
    loader = DataLoader(PILDataset(), batch_size=s.batch_size, shuffle=True, num_workers=s.loader_workers,
                        drop_last=True, persistent_workers=False)
    t0 = None
    done = 0
    for step, (x, y) in enumerate(loader):
        if step == s.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= s.warmup:
            done += 1
        if done >= s.steps:
            break
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_sec": done * s.batch_size / seconds, "seconds": seconds, "steps": done}


def train_step_flops(s: BenchSettings) -> float:
    """FLOPs of one training step (forward + backward) of the model at batch s.batch_size."""
    from torch.utils.flop_counter import FlopCounterMode
    from .models import build_model
    from .config import ModelConfig

    model = build_model(ModelConfig(name=s.model), s.channels, s.image_size, s.classes)
    x = torch.randn(s.batch_size, s.channels, s.image_size, s.image_size)
    y = torch.randint(0, s.classes, (s.batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul on `device`: the practical peak the training rows are compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def run_bench(s: BenchSettings, log=print, include_workers: bool = True) -> dict:
    device = resolve_device(s.device)
    torch.manual_seed(0)
    flops = train_step_flops(s)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    rows = []

    def add(name: str, timing: dict, precision: str, **extra) -> None:
        gflops = flops * timing["images_per_sec"] / s.batch_size / 1e9
        row = {"name": name, "precision": precision, **extra, **timing, "gflops": gflops,
               "peak_fraction": gflops / peaks[precision]}
        rows.append(row)
        log(f"{name:<34} {timing['images_per_sec']:>9.0f} images/s  {gflops:6.1f} GFLOP/s "
            f"({100 * row['peak_fraction']:.0f}% of the {precision} matmul peak)")

    add("(a) dataloader+PIL, fp32, NCHW", time_dataloader_baseline(s), "fp32", kind="baseline")
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            cfg = bench_config(s, precision=precision, channels_last=channels_last)
            fmt = "channels_last" if channels_last else "NCHW"
            add(f"(b) core, {precision}, {fmt}", time_runner(cfg, s), precision, kind="core",
                channels_last=channels_last)
    core = [r for r in rows if r["kind"] == "core"]
    best = max(core, key=lambda r: r["images_per_sec"])
    baseline = rows[0]
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "settings": {k: getattr(s, k) for k in s.__dataclass_fields__}, "step_gflop": flops / 1e9,
              "matmul_peak_gflops": peaks, "rows": rows,
              "fastest_core": best["name"], "speedup_vs_baseline": best["images_per_sec"] / baseline["images_per_sec"]}
    log(f"speedup of the fastest core setting over (a): {result['speedup_vs_baseline']:.2f}x")

    if include_workers:
        central = {"precision": best["precision"], "channels_last": best["channels_last"]}
        reference = best["images_per_sec"]
        for backend in s.backends:
            for k in s.workers:
                overrides = {**central, "distributed.workers": k, "distributed.algorithm": "local",
                             "distributed.local_steps": s.local_steps, "distributed.backend": backend}
                cfg = bench_config(s, **overrides)
                try:
                    timing = time_runner(cfg, s)
                except Exception as err:  # noqa: BLE001 - report, keep going
                    log(f"K={k} {backend}: failed: {err}")
                    rows.append({"name": f"K={k} J={s.local_steps} {backend}", "kind": "workers", "error": str(err)})
                    continue
                add(f"K={k} J={s.local_steps} {backend}", timing, best["precision"], kind="workers", workers=k,
                    backend=backend, ratio_to_centralized=timing["images_per_sec"] / reference)
                log(f"{'':<34} ratio to centralized: {timing['images_per_sec'] / reference:.2f}")
    return result
