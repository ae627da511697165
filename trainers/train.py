"""The one entry point: `train(config, on_epoch, checkpoint_dir) -> TrainResult`. It trains here, or, for
`distributed.backend: dist`, launches the K processes (`launch.py`) or, inside one of them (under
torchrun), joins the group and trains that rank's worker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import launch
from .config import TrainConfig
from .data import load_dataset
from .loop import run_loop
from .results import TrainResult
from .runner import check_fits
from .steps import EpochCallback, ProgressCallback, resolve_device


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
    if cfg.distributed.enabled and cfg.distributed.backend == "dist":
        if launch.in_group():
            return launch.run_rank(cfg, on_epoch, checkpoint_dir, on_progress, log)
        data = load_dataset(cfg.data, cfg.seed, lambda _: None)  # fail here, not in K ranks; fills the cache
        check_fits(cfg, data)
        del data
        return launch.launch(cfg, on_epoch, checkpoint_dir, on_progress, log)
    return run_loop(cfg, resolve_device(cfg.device), None, on_epoch, checkpoint_dir, on_progress, log)
