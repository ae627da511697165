"""The training loop: `train(config, on_epoch, checkpoint_dir) -> TrainResult`.

The loop owns what every run shares (data on the device, evaluation, divergence, checkpoints, timing);
a *runner* owns how one epoch of steps is taken: `CentralizedRunner` here, the K-worker engine's
runners in `engine.py`. A runner has `train_epoch(epoch) -> dict`, `eval_model() -> nn.Module`,
`state_dict()`, `load_state_dict()`, and may have `totals()` / `algorithm_state()`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, TrainConfig
from .data import Dataset, augment, load_dataset, normalize
from .models import build_model
from .optim import build_optimizer
from .results import EpochReport, TrainResult
from .schedules import build_scheduler, scale_lr

CHECKPOINT = "checkpoint.pt"
DIVERGENCE_CHECK_EVERY = 25  # steps between host syncs that look for a NaN/inf or exploding loss

EpochCallback = Callable[[EpochReport], None]
ProgressCallback = Callable[[int, int], None]


class Diverged(Exception):
    """Raised inside a runner's epoch when the loss is NaN/inf or above `divergence_loss`."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device "
                          f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); use device=cpu or auto")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batcher:
    """Turns resident uint8 training data into normalised, augmented batches on the device."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device):
        self.data = data
        self.augment = cfg.data.augment and (cfg.data.crop_padding > 0 or cfg.data.flip)
        self.padding, self.flip = cfg.data.crop_padding, cfg.data.flip
        shape = (1, data.channels, 1, 1)
        self.mean = torch.tensor(data.mean, device=device).view(shape)
        self.std = torch.tensor(data.std, device=device).view(shape)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is not None and self.augment:
            x = augment(x, generator, self.padding, self.flip)
        return normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def train_batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.data.train_x[idx], generator), self.data.train_y[idx]


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, batcher: Batcher, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy (%) of `model` on the evaluation split."""
    data = batcher.data
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, len(data.eval_y), cfg.eval_batch_size):
        x = batcher.prepare(data.eval_x[start:start + cfg.eval_batch_size], None)
        y = data.eval_y[start:start + cfg.eval_batch_size]
        with autocast(cfg, device):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = len(data.eval_y)
    return loss_sum.item() / n, 100.0 * correct.item() / n


class LossMeter:
    """Sums loss and correct predictions on the device; looks at them on the host only every
    DIVERGENCE_CHECK_EVERY steps so the hot loop does not wait on the device.

    With a worker group that spans processes (engine's dist backend) the sums are all-reduced at the
    epoch's end and divergence is decided there, on the same figures in every process: a check of one
    rank's own loss mid-epoch would stop that rank alone and leave the others waiting in a collective."""

    def __init__(self, device: torch.device, limit: float, group=None):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0
        self.steps = 0
        self.limit = limit
        self.group = group if getattr(group, "spans_processes", False) else None

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss += loss.detach().double() * n
        self.correct += (out.detach().argmax(-1) == y).sum()
        self.count += n
        self.steps += 1
        if self.group is None and self.steps % DIVERGENCE_CHECK_EVERY == 0:
            self.check(loss.item())

    def check(self, value: float) -> None:
        if not math.isfinite(value) or value > self.limit:
            raise Diverged(f"loss {value:.4g}")

    def result(self) -> dict[str, float]:
        loss_sum, correct, count = self.loss.item(), self.correct.item(), self.count
        if self.group is not None:
            sums = torch.stack([self.loss, self.correct.double(), self.loss.new_tensor(float(count))])
            loss_sum, correct, count = self.group.sum(sums.unsqueeze(0)).tolist()
        loss = loss_sum / max(count, 1)
        self.check(loss)
        return {"train_loss": loss, "train_acc": 100.0 * correct / max(count, 1), "images": float(count)}


class CentralizedRunner:
    """One model, one optimizer: the reference every K-worker algorithm is compared with."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device,
                 on_progress: ProgressCallback | None = None):
        self.cfg, self.device, self.on_progress = cfg, device, on_progress
        self.batcher = Batcher(cfg, data, device)
        self.model = build_model(cfg.model, data.channels, data.image_size, data.num_classes).to(device)
        self.model = self.model.to(memory_format=self.batcher.memory_format)
        self.n = len(data.train_y)
        self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)
        lr = scale_lr(cfg.optim.lr, cfg.batch_size, cfg.schedule)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, cfg.epochs)
        # One generator for shuffling and augmentation, on the training device, saved in checkpoints.
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        meter = LossMeter(self.device, cfg.divergence_loss)
        perm = torch.randperm(self.n, device=self.device, generator=self.generator)
        for step in range(self.steps_per_epoch):
            x, y = self.batcher.train_batch(perm[step * cfg.batch_size:(step + 1) * cfg.batch_size], self.generator)
            with autocast(cfg, self.device):
                out = model(x)
                loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            meter.add(loss, out, y)
            if self.on_progress is not None:
                self.on_progress(step + 1, self.steps_per_epoch)
        stats = meter.result()
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    def eval_model(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


def make_runner(cfg: TrainConfig, data: Dataset, device: torch.device, on_progress: ProgressCallback | None,
                group=None):
    if cfg.distributed.enabled:
        from .engine import make_engine  # the K-worker engine

        return make_engine(cfg, data, device, on_progress, group)
    return CentralizedRunner(cfg, data, device, on_progress)


def check_fits(cfg: TrainConfig, data: Dataset) -> None:
    """A batch larger than the data (per worker) is a config error, not a silent short epoch."""
    workers = cfg.distributed.workers
    n = len(data.train_y)
    if cfg.batch_size * workers > n:
        what = f"batch_size={cfg.batch_size}" + (f" x distributed.workers={workers}" if workers > 1 else "")
        raise ConfigError(f"batch_size: {what} is larger than the {n} training examples of "
                          f"{data.name} (split={cfg.data.split}); lower it or use more data")


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def ranked_checkpoints(directory: Path) -> dict[int, dict[int, Path]]:
    """rank -> epoch -> file of the dist backend's `checkpoint.rank<r>.epoch<e>.pt` in `directory`."""
    found: dict[int, dict[int, Path]] = {}
    for path in directory.glob("checkpoint.rank*.epoch*.pt"):
        rank, _, epoch = path.name[len("checkpoint.rank"):-len(".pt")].partition(".epoch")
        if rank.isdigit() and epoch.isdigit():
            found.setdefault(int(rank), {})[int(epoch)] = path
    return found


def snapshot(obj):
    """A copy of a checkpoint payload that the next steps cannot change: tensors copied to the CPU (a GPU
    state is not doubled on the GPU; torch.save would copy it to the CPU anyway; loading maps it back),
    containers rebuilt, anything else deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


class Checkpoints:
    """Where a run's checkpoints live.

    One process: `checkpoint.pt`, replaced atomically after every epoch. Under torch.distributed each rank
    writes its own `checkpoint.rank<r>.epoch<e>.pt` and removes its older ones only once every rank has
    written epoch e (a barrier): a kill at any moment leaves an epoch that all ranks hold, and a restart
    continues from the latest such epoch (the ranks agree on it with an all-reduce)."""

    def __init__(self, directory: str | Path, group=None):
        self.directory = Path(directory)
        self.group = group if getattr(group, "spans_processes", False) else None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _mine(self) -> dict[int, Path]:
        return ranked_checkpoints(self.directory).get(self.group.rank, {})

    def load(self, cfg: TrainConfig, device: torch.device) -> dict | None:
        if self.group is None:
            return load_checkpoint(self.directory / CHECKPOINT, cfg, device)
        mine = self._mine()
        epoch = self.group.min_int(max(mine, default=0))
        if epoch == 0:
            return None
        if epoch not in mine:
            raise ConfigError(f"checkpoints in {self.directory}: rank {self.group.rank} has no epoch {epoch}, "
                              "which every other rank holds; delete the directory to start over")
        return load_checkpoint(mine[epoch], cfg, device)

    def save(self, payload: dict, epoch: int) -> None:
        if self.group is None:
            # A copy of this moment's state, serialized and written by a thread while the next epoch
            # trains (LeNet-5 + momentum, 6.4 MB: the copy takes 1-2.5 ms, torch.save to the file 12 ms on
            # this host). One write at a time, in epoch order.
            copied = snapshot(payload)
            self.flush()
            self._writer = self._writer or ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
            self._pending = self._writer.submit(save_checkpoint, self.directory / CHECKPOINT, copied)
            return
        save_checkpoint(self.directory / f"checkpoint.rank{self.group.rank}.epoch{epoch}.pt", payload)
        self.group.barrier()
        for old, path in self._mine().items():
            if old != epoch:
                path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait for the last save to be on disk; raises its error (a full disk) if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None


def checkpoint_history(directory: str | Path) -> list[EpochReport]:
    """The epochs a run's checkpoint in `directory` holds, without loading the model state onto a device;
    [] when there is none. Under the dist backend: rank 0's file of the latest epoch all ranks hold (the
    one a restart continues from)."""
    directory = Path(directory)
    path = directory / CHECKPOINT
    if not path.exists():
        ranks = ranked_checkpoints(directory)
        common = set.intersection(*map(set, ranks.values())) if 0 in ranks else set()
        if not common:
            return []
        path = ranks[0][max(common)]
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return [EpochReport(**r) for r in payload["history"]]


def load_checkpoint(path: Path, cfg: TrainConfig, device: torch.device) -> dict | None:
    if not path.exists():
        return None
    payload = torch.load(path, map_location=device, weights_only=False)
    saved, current = payload["config"], cfg.to_dict()
    if saved != current:
        from .config import flatten

        a, b = flatten(saved), flatten(current)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"checkpoint {path} was written by a different config (differs in: "
                          f"{', '.join(diff)}); delete it or use another checkpoint directory")
    return payload


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --------------------------------------------------------------------------------------------------


def train(config: TrainConfig, on_epoch: EpochCallback | None = None, checkpoint_dir: str | Path | None = None,
          on_progress: ProgressCallback | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train `config` for its epochs, calling `on_epoch(report)` after each one.

    With `checkpoint_dir`, the full state is saved after every epoch (before `on_epoch`), and a call
    that finds a checkpoint there continues from it: the result equals an uninterrupted run bit for
    bit on the CPU. Exceptions raised by `on_epoch` (e.g. a pruner's) propagate after the save.

    `distributed.backend: dist` runs one process per worker (`launch.py`): called in an ordinary process,
    this starts them and relays rank 0's reports to the callbacks; called in a rank (under torchrun),
    it trains that rank's worker, and only rank 0 evaluates and calls back.
    """
    cfg = config.validate()
    group, created = None, False
    if cfg.distributed.enabled and cfg.distributed.backend == "dist":
        from . import launch

        if not launch.in_group():
            data = load_dataset(cfg.data, cfg.seed, lambda _: None)  # fail here, not in K ranks; fills the cache
            check_fits(cfg, data)
            del data
            return launch.launch(cfg, on_epoch, checkpoint_dir, on_progress, log)
        from .comm import ProcessGroup

        device, created = launch.join(cfg, resolve_device(cfg.device))
        group = ProcessGroup(device)
        if not group.reports:
            on_epoch, on_progress = None, None
    else:
        device = resolve_device(cfg.device)
    try:
        return _train(cfg, device, group, on_epoch, checkpoint_dir, on_progress, log)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, group, on_epoch: EpochCallback | None,
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

    totals = runner.totals() if hasattr(runner, "totals") else {}
    state = runner.algorithm_state() if hasattr(runner, "algorithm_state") else {}
    return TrainResult(status=status, epochs_completed=len(history), history=history,
                       total_time=time.perf_counter() - started, device=str(device), totals=totals, state=state)
