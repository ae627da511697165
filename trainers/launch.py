"""The dist backend's processes: one per worker under torch.distributed.

Two ways in:
- torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): every process calls
  `train()`, which joins the group from the environment (`join`); this is how a run spans machines.
- `train()` called in an ordinary process with `distributed.backend: dist`: `launch` starts the K
  processes on this machine (spawned, loopback rendezvous), and the caller's process relays: rank 0's
  epoch reports, progress and log lines come back through a queue and the caller's callbacks run there.
  So `sweeper train` and a study trial use the dist backend exactly as they use the others; an exception
  raised by `on_epoch` (an Optuna pruner's) stops the ranks, whose checkpoints are already written.

The group is gloo on the CPU and NCCL on GPUs (one GPU per process, `LOCAL_RANK`).
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig
from .loop import run_loop
from .steps import resolve_device

POLL_S = 0.5  # how often the relay looks at its processes while waiting for a message
PROGRESS_UPDATES = 100  # progress messages per epoch at most


def in_group() -> bool:
    """Whether this process is (or is about to become, under torchrun) a rank of a process group."""
    return dist.is_available() and (dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ))


def join(cfg: TrainConfig, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group of this rank (from the environment, unless already joined): returns the
    rank's device (cuda:LOCAL_RANK on GPUs) and whether this call created the group."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        created = True
    world = dist.get_world_size()
    if world != cfg.distributed.workers:
        raise ConfigError(f"distributed.workers: {cfg.distributed.workers} workers, but {world} processes were "
                          "launched; start one process per worker (torchrun --nproc-per-node K, times nodes)")
    return device, created


def run_rank(cfg: TrainConfig, on_epoch, checkpoint_dir, on_progress, log):
    """Inside a rank (started by `launch` or torchrun): join the group and train this rank's worker; only
    rank 0 evaluates and calls back."""
    from .comm import ProcessGroup

    device, created = join(cfg, resolve_device(cfg.device))
    group = ProcessGroup(device)
    if not group.reports:
        on_epoch, on_progress = None, None
    try:
        return run_loop(cfg, device, group, on_epoch, checkpoint_dir, on_progress, log)
    finally:
        if created:
            dist.destroy_process_group()


def launch(cfg: TrainConfig, on_epoch, checkpoint_dir, on_progress, log):
    """Run `cfg` on K local processes and relay rank 0's reports to the callbacks; returns its TrainResult."""
    k = cfg.distributed.workers
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < k:
        raise ConfigError(f"distributed.backend: dist runs one process per GPU, and this machine has "
                          f"{torch.cuda.device_count()} GPU(s) for {k} workers; use backend vmap for K workers "
                          "on one GPU, or torchrun across machines")
    if device.type == "cpu" and not dist.is_gloo_available():
        raise ConfigError("distributed.backend: dist needs torch.distributed with gloo, which this torch lacks")
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // k)  # the K processes share the machine's cores
    port = _free_port()
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()
    ranks = [context.Process(target=_rank_main, name=f"sweeper-dist-rank{r}",
                             args=(r, k, port, cfg, None if checkpoint_dir is None else str(checkpoint_dir),
                                   messages, threads))
             for r in range(k)]
    try:
        for p in ranks:
            p.start()
        return relay(ranks, messages, on_epoch, on_progress, log)
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
        for p in ranks:
            p.join()


def relay(ranks, messages, on_epoch, on_progress, log):
    """Pass the ranks' messages to the callbacks until rank 0's result. A rank that died without a word
    (killed, out of memory) fails the run instead of hanging it; what the ranks sent before is still
    delivered first (an error report among it wins over the bare exit code)."""
    dead: RuntimeError | None = None
    while True:
        try:
            message = messages.get(timeout=POLL_S)
        except queue.Empty:
            if dead is not None:  # the queue stayed empty for POLL_S after the death: nothing more comes
                raise dead from None
            dead = _dead_rank(ranks)
            continue
        kind, payload = message
        if kind == "epoch" and on_epoch is not None:
            on_epoch(payload)
        elif kind == "progress" and on_progress is not None:
            on_progress(*payload)
        elif kind == "log":
            log(payload)
        elif kind == "error":
            raise _rebuild(*payload)
        elif kind == "result":
            for p in ranks:
                p.join()
            return payload


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_rank(ranks) -> RuntimeError | None:
    for r, p in enumerate(ranks):
        if p.exitcode not in (None, 0):
            return RuntimeError(f"distributed.backend dist: rank {r} exited with code {p.exitcode}")
    return None


def _rebuild(rank: int, blob: bytes | None, text: str) -> BaseException:
    """The rank's own exception when it pickles (ConfigError, DataNotFoundError keep their type and message
    for the CLI), else a RuntimeError with its traceback."""
    if blob is not None:
        try:
            return pickle.loads(blob)
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    return RuntimeError(f"distributed.backend dist: rank {rank} failed:\n{text}")


def _rank_main(rank: int, world: int, port: int, cfg: TrainConfig, checkpoint_dir: str | None, messages,
               threads: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(threads)
    reporter = rank == 0
    state = {"every": 1}

    def on_progress(step: int, total: int) -> None:
        state["every"] = max(1, total // PROGRESS_UPDATES)
        if step == total or step % state["every"] == 0:
            messages.put(("progress", (step, total)))

    try:
        result = run_rank(cfg.validate(), on_epoch=(lambda report: messages.put(("epoch", report))) if reporter else None,
                          checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
                          on_progress=on_progress if reporter else None,
                          log=(lambda line: messages.put(("log", line))) if reporter else (lambda line: None))
        if reporter:
            messages.put(("result", result))
    except BaseException as err:  # noqa: BLE001 - every failure is reported to the relay, then re-raised
        try:
            blob = pickle.dumps(err)
        except Exception:  # noqa: BLE001
            blob = None
        messages.put(("error", (rank, blob, traceback.format_exc())))
        sys.exit(1)  # the relay raises it; no second traceback on stderr
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
