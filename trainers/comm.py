"""Communication of the K-worker engine: how workers reach each other (worker groups: tensor ops in one
process, torch.distributed collectives across processes) and what it costs (bytes each worker sends, and
modeled network time).

The cost model is pure functions. A communication *round* is one averaging (all-reduce) or one gossip exchange.
The model is the usual latency-bandwidth (alpha-beta) one:

    comm_time_modeled = rounds * latency + bytes_sent_per_worker / bandwidth

that is, per round `latency + bytes / bandwidth`. It ignores contention and the 2(K-1) latency hops of a
ring all-reduce on purpose: a study compares algorithms under one network, not absolute seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import algorithms
from .config import NetworkConfig

# name: (latency in microseconds, bandwidth in Gbit/s per worker link, one direction). Orders of
# magnitude of commodity hardware, not measurements of any one cluster:
PRESETS: dict[str, tuple[float, float]] = {
    # 10 Gbit/s Ethernet through the kernel TCP stack: MPI/NCCL small-message latency is tens of
    # microseconds. Jiang & Agrawal (ADPSGD, section IV-E) emulate this "cloud" setting by throttling
    # its nodes to 10 Gbit/s.
    "10gbe": (30.0, 10.0),
    # 100 Gbit/s EDR InfiniBand with RDMA: about 1-2 us MPI ping-pong latency (Mellanox ConnectX-5 data
    # sheets quote sub-microsecond adapter latency); Jiang & Agrawal's HPC cluster.
    "100gib": (2.0, 100.0),
    # NVLink 3 (A100 SXM): 12 links x 25 GB/s per direction = 300 GB/s = 2400 Gbit/s between GPUs of one
    # node; the latency is that of a NCCL kernel launch and handshake, a few microseconds.
    "nvlink": (5.0, 2400.0),
}


@dataclass(frozen=True)
class Network:
    latency_s: float  # per round
    bandwidth_bytes_per_s: float  # per worker, one direction


def network(cfg: NetworkConfig) -> Network:
    """The preset of `cfg`, with `latency_us` / `bandwidth_gbps` overriding its figures."""
    if cfg.preset == "custom":
        if cfg.latency_us is None or cfg.bandwidth_gbps is None:
            raise ValueError("network preset custom needs latency_us and bandwidth_gbps")
        latency_us, gbps = cfg.latency_us, cfg.bandwidth_gbps
    elif cfg.preset in PRESETS:
        latency_us, gbps = PRESETS[cfg.preset]
        latency_us = latency_us if cfg.latency_us is None else cfg.latency_us
        gbps = gbps if cfg.bandwidth_gbps is None else cfg.bandwidth_gbps
    else:
        raise ValueError(f"unknown network preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}, custom")
    return Network(latency_s=latency_us * 1e-6, bandwidth_bytes_per_s=gbps * 1e9 / 8)


def allreduce_bytes(payload_bytes: float, workers: int) -> float:
    """Bytes each worker sends in a bandwidth-optimal ring all-reduce of `payload_bytes`: a reduce-scatter
    and an all-gather, each (K-1) chunks of payload/K (Patarasuk & Yuan 2009). One worker sends nothing."""
    return 2.0 * (workers - 1) / workers * payload_bytes


def gossip_bytes(payload_bytes: float, neighbours: int) -> float:
    """Bytes each worker sends in one gossip step: its whole model to every neighbour."""
    return float(payload_bytes) * neighbours


def round_time(bytes_sent: float, net: Network) -> float:
    """Modeled seconds of one round in which each worker sends `bytes_sent`."""
    return net.latency_s + bytes_sent / net.bandwidth_bytes_per_s


def modeled_time(rounds: float, bytes_sent: float, net: Network) -> float:
    """Modeled seconds of `rounds` rounds sending `bytes_sent` in total (per worker): the sum of the rounds'
    `round_time`, since the model is linear in bytes."""
    return rounds * net.latency_s + bytes_sent / net.bandwidth_bytes_per_s


# --------------------------------------------------------------------------------------------------
# Worker groups: how the engine's cross-worker operations reach the other workers.
#
# The engine keeps the rows of the workers it holds in a flat tensor X [k, P]. In one process (serial
# and vmap backends) k = K and every operation is a tensor op over the rows; under torch.distributed
# (backend dist) each process holds k = 1 row, its rank's, and the same operations are collectives.
# Both groups compute the same sums in the same order for K = 2, so dist equals serial there bit for bit.


class LocalGroup:
    """All K workers live in this process."""

    rank, reports, spans_processes = 0, True, False

    def __init__(self, workers: int):
        self.world = workers
        self.rows = range(workers)

    def mean(self, x):
        """The mean over all workers of rows x [k, ...] -> [...]."""
        return x.mean(0)

    def sum(self, x):
        """The sum over all workers of per-worker values x [k, ...] -> [...]."""
        return x.sum(0)

    def average_(self, x) -> None:
        """Every worker's row becomes the mean (an all-reduce average), in place."""
        algorithms.average_(x)

    def place(self, w, like):
        """A mixing matrix W [K, K] in the form `mix_` takes: on x's device and dtype."""
        return w.to(device=like.device, dtype=like.dtype)

    def mix_(self, x, w) -> None:
        """x_k <- sum_j W_kj x_j for every held worker k (one gossip step), in place."""
        algorithms.mix_(x, w)


class ProcessGroup:
    """One worker per process under an initialised torch.distributed default group: rank r holds row
    r. Averaging is an all-reduce, gossip is point-to-point exchange with W's non-zero neighbours."""

    spans_processes = True

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist, self.device = dist, device  # small collectives' tensors live there (NCCL: on the GPU)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rows = range(self.rank, self.rank + 1)
        self.reports = self.rank == 0  # rank 0 evaluates and reports

    def _allreduce(self, t):
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t

    def mean(self, x):
        return self._allreduce(x[0].clone()).div_(self.world)

    def sum(self, x):
        return self._allreduce(x.sum(0).clone())

    def average_(self, x) -> None:
        self._allreduce(x).div_(self.world)

    def place(self, w, like):
        """This rank's row of W (receive from) and column (send to), as host floats."""
        row, column = w[self.rank].tolist(), w[:, self.rank].tolist()
        return ([(j, v) for j, v in enumerate(row) if v != 0],
                [j for j, v in enumerate(column) if v != 0 and j != self.rank])

    def mix_(self, x, placed) -> None:
        receive, send_to = placed
        peers = {j: torch.empty_like(x[0]) for j, _ in receive if j != self.rank}
        ops = [self.dist.P2POp(self.dist.isend, x[0], j) for j in send_to]
        ops += [self.dist.P2POp(self.dist.irecv, buffer, j) for j, buffer in peers.items()]
        if ops:
            for request in self.dist.batch_isend_irecv(ops):
                request.wait()
        # The same sum, in the same order (j ascending), as row k of the matmul W @ X.
        out = None
        for j, weight in receive:
            term = (x[0] if j == self.rank else peers[j]) * weight
            out = term if out is None else out.add_(term)
        x[0].copy_(out)

    def gather(self, values):
        """Per-process scalars -> one list of floats per process, in rank order."""
        mine = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(everyone, mine)
        return [t.tolist() for t in everyone]

    def barrier(self) -> None:
        self.dist.barrier()

    def min_int(self, value: int) -> int:
        """The least of the processes' `value`s."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return int(t.item())

