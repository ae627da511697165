"""The training loop of one process: what every run shares (data on the device, evaluation, divergence,
checkpoints, timing) around a runner's epochs (`runner.py`)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import Checkpoints, rng_state, set_rng_state
from .config import TrainConfig
from .data import load_dataset
from .results import EpochReport, TrainResult
from .runner import check_fits, make_runner
from .steps import Diverged, EpochCallback, ProgressCallback, evaluate, sync


def run_loop(cfg: TrainConfig, device: torch.device, group, on_epoch: EpochCallback | None,
           checkpoint_dir: str | Path | None, on_progress: ProgressCallback | None,
           log: Callable[[str], None]) -> TrainResult:
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    reports = group is None or group.reports  # under dist: rank 0 evaluates and reports
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed, log).to(device)
    check_fits(cfg, data)
    runner = make_runner(cfg, data, device, on_progress, group)

    history: list[EpochReport] = []
    status = "completed"
    checkpoints = Checkpoints(checkpoint_dir, group) if checkpoint_dir is not None else None
    payload = checkpoints.load(cfg, device) if checkpoints is not None else None
    if payload is not None:
        runner.load_state_dict(payload["runner"])
        set_rng_state(payload["rng"], device)
        history = [EpochReport(**r) for r in payload["history"]]
        status = payload["status"]
        log(f"resuming from {checkpoints.directory} after epoch {len(history)}")

    try:
        while status == "completed" and len(history) < cfg.epochs:
            epoch = len(history)
            sync(device)
            t0 = time.perf_counter()
            try:
                stats = runner.train_epoch(epoch)
            except Diverged as why:
                log(f"epoch {epoch + 1}: diverged ({why})")
                status = "diverged"
                stats = {"train_loss": math.nan, "train_acc": math.nan, "images": 0.0, "lr": math.nan}
            sync(device)
            epoch_time = time.perf_counter() - t0
            t1 = time.perf_counter()
            eval_loss, eval_acc = (math.nan, math.nan)
            if status == "completed":
                model = runner.eval_model()  # under dist a collective: every rank takes part
                if reports:
                    eval_loss, eval_acc = evaluate(model, runner.batcher, cfg, device)
            extra = {k: v for k, v in stats.items() if k not in ("train_loss", "train_acc", "images", "lr")}
            report = EpochReport(epoch=epoch + 1, train_loss=stats["train_loss"], train_acc=stats["train_acc"],
                                 eval_loss=eval_loss, eval_acc=eval_acc, lr=stats["lr"], epoch_time=epoch_time,
                                 eval_time=time.perf_counter() - t1,
                                 images_per_sec=stats["images"] / epoch_time if epoch_time > 0 else 0.0, extra=extra)
            history.append(report)
            if checkpoints is not None:
                checkpoints.save({"config": cfg.to_dict(), "status": status, "history": [asdict(r) for r in history],
                                  "runner": runner.state_dict(), "rng": rng_state(device)}, len(history))
            if on_epoch is not None:
                on_epoch(report)
    finally:
        if checkpoints is not None:
            checkpoints.close()  # the last epoch's checkpoint is on disk when train() returns or raises

    totals, state = runner.totals(), runner.algorithm_state()
    return TrainResult(status=status, epochs_completed=len(history), history=history,
                       total_time=time.perf_counter() - started, device=str(device), totals=totals, state=state)
