"""Throughput benchmarks, side by side in one process (the machine is shared and noisy: only ratios
measured together mean anything).

(a) Poiatti et al.'s way: per-sample torchvision transforms on PIL images through a DataLoader,
    fp32, NCHW, a plain loop;
(b) the trainer core: resident uint8 data, batched augmentation on the device, each precision and
    memory format;
plus K-worker rows (serial and vmap backends) and the achieved GFLOP/s against a matmul peak
measured on the same device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import load_dataset
from .runner import make_runner
from .steps import resolve_device, sync


@dataclass
class BenchSettings:
    steps: int = 100  # timed training steps per row and repeat
    warmup: int = 10  # untimed steps first
    repeats: int = 3  # interleaved repeats of every row; the median is reported
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
    """Poiatti et al.'s input pipeline: PIL images, per-sample RandomCrop/Flip/ToTensor/Normalize."""
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


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run_bench(s: BenchSettings, log=print, include_workers: bool = True) -> dict:
    """Every row is timed `s.repeats` times, the rows interleaved round-robin, and the median kept: on
    a shared machine the load drifts over minutes, and interleaving spreads it over all rows alike."""
    device = resolve_device(s.device)
    torch.manual_seed(0)
    flops = train_step_flops(s)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}

    plan: list[dict] = [{"name": "(a) dataloader+PIL, fp32, NCHW", "kind": "baseline", "precision": "fp32"}]
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            fmt = "channels_last" if channels_last else "NCHW"
            plan.append({"name": f"(b) core, {precision}, {fmt}", "kind": "core", "precision": precision,
                         "overrides": {"precision": precision, "channels_last": channels_last}})
    if include_workers:
        for backend in s.backends:
            for k in s.workers:
                # K-worker rows run at the fastest core setting found on this machine (bf16, channels_last on
                # CPUs with bf16 units); the centralized row with the same setting is their reference.
                plan.append({"name": f"K={k} J={s.local_steps} {backend}", "kind": "workers", "workers": k,
                             "backend": backend, "precision": "bf16",
                             "overrides": {"precision": "bf16", "channels_last": True, "distributed.workers": k,
                                           "distributed.algorithm": "local",
                                           "distributed.local_steps": s.local_steps, "distributed.backend": backend}})
    timings: dict[str, list[float]] = {row["name"]: [] for row in plan}
    errors: dict[str, str] = {}
    for rep in range(s.repeats):
        for row in plan:
            if row["name"] in errors:
                continue
            try:
                if row["kind"] == "baseline":
                    timing = time_dataloader_baseline(s)
                else:
                    timing = time_runner(bench_config(s, **row["overrides"]), s)
            except Exception as err:  # noqa: BLE001 - report the row, keep measuring the others
                errors[row["name"]] = f"{type(err).__name__}: {err}"
                log(f"{row['name']}: failed: {errors[row['name']]}")
                continue
            timings[row["name"]].append(timing["images_per_sec"])
            log(f"[{rep + 1}/{s.repeats}] {row['name']:<34} {timing['images_per_sec']:>9.0f} images/s")

    rows = []
    for row in plan:
        row = {k: v for k, v in row.items() if k != "overrides"}
        if row["name"] in errors:
            rows.append({**row, "error": errors[row["name"]]})
            continue
        ips = median(timings[row["name"]])
        gflops = flops * ips / s.batch_size / 1e9
        rows.append({**row, "images_per_sec": ips, "samples": timings[row["name"]], "gflops": gflops,
                     "peak_fraction": gflops / peaks[row["precision"]]})
    by_name = {r["name"]: r for r in rows}
    baseline = by_name[plan[0]["name"]]
    core = [r for r in rows if r["kind"] == "core" and "error" not in r]
    best = max(core, key=lambda r: r["images_per_sec"])
    reference = by_name["(b) core, bf16, channels_last"]
    for r in rows:
        if r["kind"] == "workers" and "error" not in r and "error" not in reference:
            r["ratio_to_centralized"] = r["images_per_sec"] / reference["images_per_sec"]

    log(f"\nmedian of {s.repeats} interleaved runs; {flops / 1e9:.2f} GFLOP per training step; matmul peak "
        f"{peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} GFLOP/s bf16 on {device}")
    for r in rows:
        if "error" in r:
            log(f"{r['name']:<34} failed: {r['error']}")
            continue
        extra = f"  x{r['ratio_to_centralized']:.2f} of centralized" if "ratio_to_centralized" in r else ""
        log(f"{r['name']:<34} {r['images_per_sec']:>9.0f} images/s {r['gflops']:7.1f} GFLOP/s "
            f"({100 * r['peak_fraction']:.0f}% of the {r['precision']} peak){extra}")
    speedup = best["images_per_sec"] / baseline["images_per_sec"] if "error" not in baseline else None
    if speedup is not None:
        log(f"fastest core setting ({best['name']}) over (a): {speedup:.2f}x")
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "settings": {k: getattr(s, k) for k in s.__dataclass_fields__}, "step_gflop": flops / 1e9,
            "matmul_peak_gflops": peaks, "rows": rows, "fastest_core": best["name"],
            "speedup_vs_baseline": speedup}
