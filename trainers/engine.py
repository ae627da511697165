"""The K-worker engine: K simulated data-parallel workers.

Each worker k has parameters x_k, its own inner optimizer and scheduler, its own shard and generator, and
takes local steps with local batch B; an epoch is one pass of every worker over its shard, so
ceil(N / (K*B)) local steps each. The learning rate is scaled for the global batch K*B.

All workers' parameters live in one flat tensor X [K, P] (float BatchNorm buffers in B [K, Q]); the
workers' modules (serial backend) or stacked parameters (vmap backend) are views into it. So averaging,
gossip, SlowMo and the spread statistics are single tensor ops over X, whatever the backend.

Backends:
- `serial`: K module copies stepped one after another: the reference semantics.
- `vmap`: one batched forward/backward per step (torch.func.functional_call + vmap + grad) on parameters
  stacked on a leading worker dim, one optimizer built with `stacked=True` (per-worker LARS/LAMB norms).
- `dist`: one process per worker under torch.distributed (`launch.py` starts them, or torchrun does);
  each process steps its own worker with the serial backend and the engine's cross-worker operations
  (averaging, gossip, SlowMo's mean, the spread and gradient statistics) become collectives through
  `comm.ProcessGroup`. In one process they go through `comm.LocalGroup`: the same code, tensor ops.

Time is measured per local step and per communication (CUDA events on a GPU, read once per epoch), and
communication is counted in rounds and bytes and priced by `comm.py`'s network model.

What the workers exchange, and when, is the algorithm's: one class per `distributed.algorithm` in
`trainers/distributed/` (the protocol is `distributed.base.Algorithm`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import comm
from .config import ConfigError, TrainConfig
from .data import Dataset, shard_indices
from .models import build_model
from .optim import build_optimizer
from .registry import ALGORITHMS, BACKENDS
from .schedules import build_scheduler, scale_lr
from .steps import Batcher, LossMeter, ProgressCallback, autocast

GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads derived seeds far apart


def derived_seed(seed: int, stream: int) -> int:
    """Seed of an independent stream of run `seed`; stream 0 is the run seed itself, so worker 0 of a
    one-worker run draws exactly what the centralized runner draws."""
    return (seed + stream * GOLDEN) % 2**63


def make_engine(cfg: TrainConfig, data: Dataset, device: torch.device,
                on_progress: ProgressCallback | None = None, group=None) -> "WorkerRunner":
    return WorkerRunner(cfg, data, device, on_progress, group)


# --------------------------------------------------------------------------------------------------
# Flat layout of a model's tensors


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # the tensor's own dense layout (e.g. channels_last), kept in the flat row
    offset: int


class Layout:
    """Where each parameter (and float buffer) of the model lives in a flat row."""

    def __init__(self, model: nn.Module):
        self.params, self.p = self._slots(model.named_parameters())
        floats = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.buffers, self.q = self._slots(floats)
        self.ints = [n for n, b in model.named_buffers() if not b.is_floating_point()]  # BN step counters
        dtypes = {t.dtype for _, t in [*model.named_parameters(), *floats]}
        if len(dtypes) > 1:
            raise ValueError(f"the K-worker engine needs one parameter dtype, got {dtypes}")
        self.dtype = dtypes.pop()

    @staticmethod
    def _slots(named) -> tuple[list[Slot], int]:
        slots, offset = [], 0
        for name, t in named:
            stride = torch.empty_like(t).stride()  # dense strides in t's memory format
            slots.append(Slot(name, tuple(t.shape), stride, offset))
            offset += t.numel()
        return slots, offset

    @staticmethod
    def row_views(flat: Tensor, slots: list[Slot], k: int) -> list[Tensor]:
        """Views of row k of flat [K, n], one per slot, shaped (and strided) like the model's tensors."""
        base = flat.storage_offset() + k * flat.stride(0)
        return [flat.as_strided(s.shape, s.stride, base + s.offset) for s in slots]

    @staticmethod
    def stacked_views(flat: Tensor, slots: list[Slot]) -> list[Tensor]:
        """Views [K, *shape] of flat [K, n], one per slot: the stacked tensors of the vmap backend."""
        k, base = flat.shape[0], flat.storage_offset()
        return [flat.as_strided((k, *s.shape), (flat.stride(0), *s.stride), base + s.offset) for s in slots]

    def stack(self, model: nn.Module, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """New flat X [k, P] and B [k, Q] holding k copies of the model's parameters and float buffers."""
        x = torch.empty(k, self.p, dtype=self.dtype, device=device)
        b = torch.empty(k, self.q, dtype=self.dtype, device=device)
        with torch.no_grad():
            for view, slot in zip(self.stacked_views(x, self.params), self.params):
                view.copy_(model.get_parameter(slot.name))
            for view, slot in zip(self.stacked_views(b, self.buffers), self.buffers):
                view.copy_(model.get_buffer(slot.name))
        return x, b

    def bind(self, model: nn.Module, x: Tensor, b: Tensor, k: int) -> None:
        """Make `model`'s parameters and float buffers views of row k of x and b (values are not copied)."""
        for view, slot in zip(self.row_views(x, self.params, k), self.params):
            model.get_parameter(slot.name).data = view
        for view, slot in zip(self.row_views(b, self.buffers, k), self.buffers):
            model.get_buffer(slot.name).data = view


# --------------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Times local steps (per worker) and communications without waiting on the device in the hot loop:
    perf_counter on the CPU, CUDA events on a GPU (synchronised once, when the epoch's figures are read).

    Rounds are delimited by communications: the parallel estimate adds, per round, the slowest worker's
    compute since the previous communication (the epoch's end closes the last round)."""

    COMM = -1

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[int, object, object]] = []

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def compute(self, worker: int, start) -> None:
        self.spans.append((worker, start, self.now()))

    def comm(self, start) -> None:
        self.spans.append((self.COMM, start, self.now()))

    def close(self) -> tuple[float, float, float]:
        """(compute summed over workers, parallel compute, communication) seconds; clears the spans."""
        if self.cuda:
            torch.cuda.synchronize()
        total = parallel = communication = 0.0
        current: dict[int, float] = {}
        for who, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            if who == self.COMM:
                communication += seconds
                parallel += max(current.values(), default=0.0)
                current.clear()
            else:
                total += seconds
                current[who] = current.get(who, 0.0) + seconds
        parallel += max(current.values(), default=0.0)
        self.spans.clear()
        return total, parallel, communication


Batches = list[tuple[Tensor, torch.Generator]]  # per worker: (example indices, its generator)
SyncFn = Callable[[list[Tensor]], None]  # averages stacked gradients [K, ...] in place


# --------------------------------------------------------------------------------------------------
# Backends


class SerialBackend:
    """K module copies, stepped one after another on one device (the reference semantics)."""

    def __init__(self, cfg: TrainConfig, template: nn.Module, layout: Layout, x: Tensor, b: Tensor,
                 lr: float, steps_per_epoch: int, batcher: Batcher, device: torch.device):
        self.cfg, self.layout, self.x, self.batcher, self.device = cfg, layout, x, batcher, device
        self.models = []
        for k in range(x.shape[0]):
            model = copy.deepcopy(template)
            layout.bind(model, x, b, k)
            self.models.append(model.train())
        self.params = [list(m.parameters()) for m in self.models]
        self.optimizers = [build_optimizer(m.named_parameters(), cfg.optim, lr) for m in self.models]
        self.schedulers = [build_scheduler(o, cfg.schedule, steps_per_epoch, cfg.epochs) for o in self.optimizers]
        self.grad_buffer: Tensor | None = None  # flat [K, P] gradients, only for synchronous steps

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def _forward_backward(self, k: int, idx: Tensor, generator: torch.Generator, meter: LossMeter) -> None:
        x, y = self.batcher.train_batch(idx, generator)
        with autocast(self.cfg, self.device):
            out = self.models[k](x)
            loss = F.cross_entropy(out, y)
        loss.backward()
        meter.add(loss, out, y)

    def step(self, batches: Batches, meter: LossMeter, clock: Clock, sync: SyncFn | None = None) -> None:
        if sync is None:  # local steps: each worker steps on its own, exactly like the centralized runner
            for k, (idx, generator) in enumerate(batches):
                start = clock.now()
                self.optimizers[k].zero_grad(set_to_none=True)
                self._forward_backward(k, idx, generator, meter)
                self.optimizers[k].step()
                self.schedulers[k].step()
                clock.compute(k, start)
            return
        # Synchronous step: every worker's gradient into the flat buffer, all-reduce, K identical steps.
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros_like(self.x)
        self.grad_buffer.zero_()
        for k, (idx, generator) in enumerate(batches):
            start = clock.now()
            for p, view in zip(self.params[k], self.layout.row_views(self.grad_buffer, self.layout.params, k)):
                p.grad = view  # backward accumulates into the zeroed view in place
            self._forward_backward(k, idx, generator, meter)
            clock.compute(k, start)
        sync([self.grad_buffer])
        for k in range(len(batches)):
            start = clock.now()
            self.optimizers[k].step()
            self.schedulers[k].step()
            clock.compute(k, start)

    def grads(self) -> Tensor:
        """The workers' last gradients, [K, P] (a copy)."""
        return torch.stack([torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in params]) for params in self.params])

    def int_buffers(self, k: int) -> dict[str, Tensor]:
        return {n: self.models[k].get_buffer(n) for n in self.layout.ints}

    def train(self) -> None:
        for m in self.models:
            m.train()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "ints": [{n: t.clone() for n, t in self.int_buffers(k).items()} for k in range(len(self.models))]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        with torch.no_grad():
            for k, ints in enumerate(state["ints"]):
                for n, t in ints.items():
                    self.models[k].get_buffer(n).copy_(t)


class VmapBackend:
    """All K workers in one batched forward/backward per step: parameters stacked on a leading worker dim
    (views of X), `torch.func.vmap` over `grad_and_value` of a `functional_call` of one template module,
    one optimizer over the stacked parameters (elementwise rules are unchanged; LARS/LAMB take per-worker
    norms through `build_optimizer(stacked=True)`)."""

    def __init__(self, cfg: TrainConfig, template: nn.Module, layout: Layout, x: Tensor, b: Tensor,
                 lr: float, steps_per_epoch: int, batcher: Batcher, device: torch.device):
        self.cfg, self.layout, self.x, self.batcher, self.device = cfg, layout, x, batcher, device
        self.k = x.shape[0]
        self.template = template.train()
        self.params = {s.name: nn.Parameter(v) for s, v in zip(layout.params, layout.stacked_views(x, layout.params))}
        # BatchNorm statistics: vmap's batch-norm rule updates them in place only in contiguous [K, C]
        # tensors (a strided view of B is silently copied), so they live apart and go through B each step.
        self.b_views = layout.stacked_views(b, layout.buffers)
        self.buffers = {s.name: v.clone(memory_format=torch.contiguous_format)
                        for s, v in zip(layout.buffers, self.b_views)}
        for n in layout.ints:  # BN step counters, one per worker
            t = template.get_buffer(n)
            self.buffers[n] = t.detach().expand(self.k, *t.shape).clone()
        self.optimizer = build_optimizer(self.params.items(), cfg.optim, lr, stacked=True)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, steps_per_epoch, cfg.epochs)

        def loss(params: dict, buffers: dict, inputs: Tensor, targets: Tensor):
            with autocast(cfg, device):
                out = torch.func.functional_call(template, (params, buffers), (inputs,))
                value = F.cross_entropy(out, targets)
            return value, out

        # randomness="different": a model's own random ops (dropout) draw independently per worker, as K
        # separate models would (vmap refuses random ops unless told how to batch them).
        self.grad_fn = torch.func.vmap(torch.func.grad_and_value(loss, has_aux=True), randomness="different")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _inputs(self, batches: Batches, group: list[int]) -> tuple[Tensor, Tensor]:
        data = self.batcher.data
        if not self.batcher.augment:  # one gather and one normalisation for all workers (elementwise: equal)
            idx = torch.cat([batches[k][0] for k in group])
            x, y = self.batcher.prepare(data.train_x[idx], None), data.train_y[idx]
        else:  # each worker's own generator draws its augmentation, as in the serial backend
            xs, ys = zip(*(self.batcher.train_batch(*batches[k]) for k in group))
            x, y = torch.cat(xs), torch.cat(ys)
        return x.view(len(group), -1, *x.shape[1:]), y.view(len(group), -1)

    @torch.no_grad()  # grad_and_value differentiates inside; nothing outside needs a graph
    def _grads(self, batches: Batches, meter: LossMeter) -> dict[str, Tensor]:
        sizes = [len(idx) for idx, _ in batches]
        if len(set(sizes)) == 1:
            groups = [list(range(self.k))]
        else:  # shards of unequal size: the short last batches go in their own vmap call(s)
            groups = [[k for k in range(self.k) if sizes[k] == s] for s in sorted(set(sizes))]
        grads: dict[str, Tensor] = {}
        for group in groups:
            inputs, targets = self._inputs(batches, group)
            if len(group) == self.k:
                grads, (loss, out) = self.grad_fn(self.params, self.buffers, inputs, targets)
            else:
                idx = torch.tensor(group, device=self.device)
                buffers = {n: t[idx] for n, t in self.buffers.items()}
                part, (loss, out) = self.grad_fn({n: p[idx] for n, p in self.params.items()}, buffers,
                                                 inputs, targets)
                for n, t in buffers.items():  # BN running statistics of this group
                    self.buffers[n][idx] = t
                for n, g in part.items():
                    grads.setdefault(n, torch.zeros_like(self.params[n]))[idx] = g
            meter.add(loss.mean(), out.flatten(0, 1), targets.flatten())
        return grads

    def step(self, batches: Batches, meter: LossMeter, clock: Clock, sync: SyncFn | None = None) -> None:
        start = clock.now()
        floats = [self.buffers[s.name] for s in self.layout.buffers]
        if floats:
            torch._foreach_copy_(floats, self.b_views)
        grads = self._grads(batches, meter)
        if floats:
            torch._foreach_copy_(self.b_views, floats)
        if sync is not None:
            clock.compute(0, start)
            sync(list(grads.values()))
            start = clock.now()
        for n, p in self.params.items():
            p.grad = grads[n]
        self.optimizer.step()
        self.scheduler.step()
        clock.compute(0, start)

    def grads(self) -> Tensor:
        return torch.cat([p.grad.reshape(self.k, -1) for p in self.params.values()], 1)

    def int_buffers(self, k: int) -> dict[str, Tensor]:
        return {n: self.buffers[n][k] for n in self.layout.ints}

    def train(self) -> None:
        self.template.train()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ints": {n: self.buffers[n].clone() for n in self.layout.ints}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for n, t in state["ints"].items():
            self.buffers[n].copy_(t)


# --------------------------------------------------------------------------------------------------
# The runner


class WorkerRunner:
    """K workers under one of the distributed algorithms; the protocol of `train.CentralizedRunner`."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device,
                 on_progress: ProgressCallback | None = None, group=None):
        d = cfg.distributed
        if d.backend == "dist" and not isinstance(group, comm.ProcessGroup):
            raise ConfigError("distributed.backend: dist runs one process per worker: start it with "
                              "trainers.train.train() (or `sweeper train`), which launches them, or under torchrun")
        self.cfg, self.dist, self.device, self.on_progress = cfg, d, device, on_progress
        self.k = d.workers
        self.group = group if group is not None else comm.LocalGroup(self.k)
        if self.group.world != self.k:
            raise ConfigError(f"distributed.workers: {self.k} workers, but the process group has "
                              f"{self.group.world} processes; launch one process per worker")
        self.rows = self.group.rows  # the workers held here: all K, or this process's rank
        self.batcher = Batcher(cfg, data, device)
        # Built first, as the centralized runner does, so that both draw the same initial weights.
        template = build_model(cfg.model, data.channels, data.image_size, data.num_classes).to(device)
        template = template.to(memory_format=self.batcher.memory_format)
        self.n = len(data.train_y)
        self.steps_per_epoch = math.ceil(self.n / (self.k * cfg.batch_size))
        lr = scale_lr(cfg.optim.lr, self.k * cfg.batch_size, cfg.schedule)  # the global batch K*B

        self.layout = Layout(template)
        self.x, self.b = self.layout.stack(template, len(self.rows), device)  # every worker starts from x_0
        self.eval_x, self.eval_b = self.layout.stack(template, 1, device)
        self.eval_module = copy.deepcopy(template)
        self.layout.bind(self.eval_module, self.eval_x, self.eval_b, 0)
        self.backend = BACKENDS.load(d.backend)(cfg, template, self.layout, self.x, self.b, lr, self.steps_per_epoch,
                                           self.batcher, device)

        # One generator per worker (shuffling its shard, augmenting its batches); worker 0 uses the run seed.
        self.generators = [torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, k)) for k in self.rows]
        self.global_step = 0  # local steps each worker has taken

        self.net = comm.network(d.network)
        elem = self.x.element_size()
        self.grad_bytes = self.layout.p * elem
        self.model_bytes = (self.layout.p + self.layout.q) * elem  # parameters + BatchNorm statistics
        self.rounds, self.bytes_sent = 0, 0.0  # of the current epoch
        self.accumulated: dict[str, float] = {}
        self.algorithm = ALGORITHMS.load(d.algorithm)(self)

    # -- one epoch ---------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.backend.train()
        meter = LossMeter(self.device, cfg.divergence_loss, self.group)
        clock = Clock(self.device)
        self.rounds, self.bytes_sent = 0, 0.0
        plan = self._plan(epoch)
        self.algorithm.start_epoch(epoch)
        for step in range(self.steps_per_epoch):
            batches = [(self._batch(order, step), g) for order, g in zip(plan, self.generators)]
            self.algorithm.step(batches, meter, clock)
            self.global_step += 1
            if self.on_progress is not None:
                self.on_progress(step + 1, self.steps_per_epoch)
        compute, parallel, measured = self._times(clock.close())
        stats = meter.result()
        stats["lr"] = self.backend.lr
        modeled = comm.modeled_time(self.rounds, self.bytes_sent, self.net)
        figures = {"compute_time": compute, "compute_time_parallel": parallel, "comm_rounds": float(self.rounds),
                   "comm_bytes": self.bytes_sent, "comm_time_measured": measured, "comm_time_modeled": modeled,
                   "wall_time_modeled": parallel + modeled}
        for key, value in figures.items():
            self.accumulated[key] = self.accumulated.get(key, 0.0) + value
        stats.update(figures)
        stats["local_steps_mean"] = self.steps_per_epoch / max(self.rounds, 1)  # local steps per round
        stats.update(self.algorithm.epoch_figures())
        return stats

    def _times(self, local: tuple[float, float, float]) -> tuple[float, float, float]:
        """(compute summed over workers, parallel compute, communication) of the epoch. Across processes:
        the sum of the ranks' compute, the slowest rank's compute, the ranks' mean collective time (which
        includes waiting for the slowest, as a real all-reduce does)."""
        if not self.group.spans_processes:
            return local
        ranks = self.group.gather(local)
        return (sum(r[0] for r in ranks), max(r[1] for r in ranks), sum(r[2] for r in ranks) / len(ranks))

    def _plan(self, epoch: int) -> list[Tensor]:
        """Each held worker's examples for this epoch, in order: its shard (re-split every epoch under
        `reshuffle`) in a random order drawn from its own generator."""
        shards = shard_indices(self.n, self.k, self.dist.shards, self.cfg.seed, epoch)
        return [shards[k].to(self.device)[torch.randperm(len(shards[k]), device=self.device, generator=g)]
                for k, g in zip(self.rows, self.generators)]

    def _batch(self, order: Tensor, step: int) -> Tensor:
        """Local batch `step` of a worker. All workers take the same number of steps, so a smaller shard
        has a short last batch; a shard that is exhausted one step early (N/K a multiple of B while
        ceil(N/(K*B)) is one more) starts over from its beginning for that step."""
        b = self.cfg.batch_size
        start = step * b
        if start >= len(order):
            start %= len(order)
        return order[start:start + b]

    def count(self, bytes_sent: float) -> None:
        """One communication round of the epoch, in which each worker sent `bytes_sent`."""
        self.rounds += 1
        self.bytes_sent += bytes_sent

    # -- the runner protocol -----------------------------------------------------------------------

    @torch.no_grad()
    def eval_model(self) -> nn.Module:
        """The average of the workers' parameters and BatchNorm statistics (Gonzalez Ortiz et al.: models are
        averaged before evaluation), in a module of its own: the workers are untouched."""
        self.eval_x.copy_(self.group.mean(self.x).unsqueeze(0))
        self.eval_b.copy_(self.group.mean(self.b).unsqueeze(0))
        for n, t in self.backend.int_buffers(0).items():
            self.eval_module.get_buffer(n).copy_(t)
        return self.eval_module

    def totals(self) -> dict[str, float]:
        """Run totals of the per-epoch figures (a resumed run includes the epochs before the resume)."""
        out = dict(self.accumulated)
        if out.get("comm_rounds"):
            out["local_steps_mean"] = self.global_step / out["comm_rounds"]
        return out

    def algorithm_state(self) -> dict:
        return {"algorithm": self.dist.algorithm, "workers": self.k, "local_steps_taken": self.global_step,
                **self.algorithm.describe()}

    def state_dict(self) -> dict:
        return {"x": self.x.clone(), "b": self.b.clone(), "backend": self.backend.state_dict(),
                "generators": [g.get_state() for g in self.generators], "global_step": self.global_step,
                "accumulated": dict(self.accumulated),
                "algorithm": {"name": self.dist.algorithm, **self.algorithm.state_dict()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint. A state of another algorithm (minibatch SGD's, say) restores the workers,
        their optimizers and generators, and this algorithm starts afresh from there."""
        self.x.copy_(state["x"])
        self.b.copy_(state["b"])
        self.backend.load_state_dict(state["backend"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s.cpu())
        self.global_step = state["global_step"]
        self.accumulated = dict(state["accumulated"])
        if state["algorithm"]["name"] == self.dist.algorithm:
            self.algorithm.load_state_dict(state["algorithm"])
