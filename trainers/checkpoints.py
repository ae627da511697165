"""Checkpoints: a run's full state after every epoch, written so that a kill at any moment leaves one
that a restart continues from (bit for bit on the CPU)."""
from __future__ import annotations

import copy
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig
from .results import EpochReport

CHECKPOINT = "checkpoint.pt"


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


def evaluated_state(payload: dict, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict of the model a checkpoint's last evaluation measured, loaded into `model` (one of
    the run's architecture): the one-model runner's weights, or the K workers' average (parameters and
    float buffers; integer buffers of worker 0), as `WorkerRunner.eval_model` evaluates it. None for a
    checkpoint that holds neither (a dist rank's)."""
    from .engine import Layout

    runner = payload.get("runner") or {}
    if "model" in runner:
        model.load_state_dict(runner["model"])
        return model.state_dict()
    if "x" not in runner:
        return None
    layout = Layout(model)
    x, b = runner["x"].float().mean(0, keepdim=True), runner["b"].float().mean(0, keepdim=True)
    with torch.no_grad():
        for view, slot in zip(layout.row_views(x, layout.params, 0), layout.params):
            model.get_parameter(slot.name).copy_(view)
        for view, slot in zip(layout.row_views(b, layout.buffers, 0), layout.buffers):
            model.get_buffer(slot.name).copy_(view)
        ints = (runner.get("backend") or {}).get("ints")
        first = ints[0] if isinstance(ints, list) else {n: t[0] for n, t in (ints or {}).items()}
        for name, value in first.items():
            model.get_buffer(name).copy_(value)
    return model.state_dict()
